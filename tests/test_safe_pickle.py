"""The restricted unpickler against hostile and broken files: one regression test per known attack, the
command's one-line errors, and hypothesis fuzzing (random opcode streams; mutations of official pickles).

Every input must load or raise `NetworkPickleError`: never another exception, a crash, or unbounded memory or
time. Memory and crash tests run in a subprocess with an address-space limit. The fuzz tests are
derandomized and sized for about a minute on a 2-core CPU; a long, randomized local run:
    KDJAX_FUZZ_EXAMPLES=20000 pytest -p no:cacheprovider tests/test_safe_pickle.py -k fuzz \\
        --hypothesis-show-statistics
"""

import functools
import hashlib
import io
import json
import os
import pathlib
import pickle
import pickletools
import re
import resource
import struct
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from kdjax.importers.safe_pickle import NetworkPickleError, PersistentObject, load_network_pickle, state_dict

REPO = pathlib.Path(__file__).resolve().parents[1]
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
SMALL_CFG = dict(z_dim=4, w_dim=4, c_dim=2, img_resolution=8, img_channels=1, channel_base=32, channel_max=4,
                 num_layers=2, conv_clamp=256.0)


# --- writing pickles by hand -------------------------------------------------------------------------------

def u(text: str) -> bytes:
    """BINUNICODE."""
    raw = text.encode("utf-8", "surrogatepass")
    return b"X" + struct.pack("<I", len(raw)) + raw


def i32(n: int) -> bytes:
    return b"J" + struct.pack("<i", n)


def tup(*items: bytes) -> bytes:
    return b"(" + b"".join(items) + b"t"


def glob(module: str, name: str) -> bytes:
    return u(module) + u(name) + b"\x93"            # STACK_GLOBAL


def call(fn: bytes, *args: bytes) -> bytes:
    return fn + tup(*args) + b"R"


def binbytes(raw: bytes) -> bytes:
    return b"B" + struct.pack("<I", len(raw)) + raw


def network_pickle(**entries: bytes) -> bytes:
    """A protocol-4 pickle of {name: the object the opcodes build}."""
    return b"\x80\x04}" + b"".join(u(k) + v + b"s" for k, v in entries.items()) + b"."


def storage_blob(values, pid_items=None, key: str = "0", storage: str = "FloatStorage", dtype=np.float32) -> bytes:
    """A legacy torch.save blob of a storage of `dtype` (what torch.storage._load_from_bytes reads)."""
    values = np.asarray(values, dtype).ravel()
    head = b"".join(pickle.dumps(x, protocol=2) for x in (LEGACY_MAGIC, 1001, {"little_endian": True}))
    if pid_items is None:
        pid_items = [u("storage"), f"ctorch\n{storage}\n".encode(), u(key), u("cpu"), i32(values.size), b"N"]
    return (head + b"\x80\x02" + tup(*pid_items) + b"Q." + pickle.dumps([key], protocol=2)
            + struct.pack("<q", values.size) + values.tobytes())


def tensor(storage: bytes, offset: int, size, stride) -> bytes:
    """_rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict()); storage: the opcodes of one."""
    return call(glob("torch._utils", "_rebuild_tensor_v2"), storage, i32(offset), tup(*map(i32, size)),
                tup(*map(i32, stride)), b"\x89", call(glob("collections", "OrderedDict")))


def blob_storage(values, **kwargs) -> bytes:
    return call(glob("torch.storage", "_load_from_bytes"), binbytes(storage_blob(values, **kwargs)))


@functools.cache
def official_bytes(layout: str = "stylegan2-ada") -> bytes:
    """A small official-format network pickle (written with torch by tests/official_pickle.py)."""
    pytest.importorskip("torch")
    import tempfile

    from official_pickle import write_pickle
    with tempfile.TemporaryDirectory() as tmp:
        write_pickle(pathlib.Path(tmp) / "net.pkl", cfg=SMALL_CFG, layout=layout)
        return (pathlib.Path(tmp) / "net.pkl").read_bytes()


def digest(path) -> str:
    """sha256 of G_ema's state dict (names, dtypes, values)."""
    sd = state_dict(load_network_pickle(path)["G_ema"])
    h = hashlib.sha256()
    for name in sorted(sd):
        h.update(f"{name}:{sd[name].dtype}:{sd[name].shape}".encode() + np.ascontiguousarray(sd[name]).tobytes())
    return h.hexdigest()


_ISOLATED = """
import io, json, resource, sys, time, tracemalloc
from kdjax.importers.safe_pickle import NetworkPickleError, load_network_pickle
data = sys.stdin.buffer.read()
vm = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
resource.setrlimit(resource.RLIMIT_AS, (vm + (512 << 20), resource.RLIM_INFINITY))
tracemalloc.start()
start = time.perf_counter()
try:
    net = load_network_pickle(io.BytesIO(data))
    result = "loaded"
except NetworkPickleError as e:
    result = "NetworkPickleError: " + str(e)
except BaseException as e:
    result = type(e).__name__ + ": " + str(e)[:300]
print(json.dumps(dict(result=result, peak=tracemalloc.get_traced_memory()[1],
                      seconds=time.perf_counter() - start)))
"""


def load_isolated(data: bytes, timeout: float = 60) -> dict:
    """Loads `data` in a fresh process limited to +512 MiB of address space: {result, peak bytes, seconds}."""
    proc = subprocess.run([sys.executable, "-c", _ISOLATED], input=data, capture_output=True, cwd=REPO,
                          timeout=timeout, check=False)
    assert proc.returncode == 0, f"crashed with status {proc.returncode}: {proc.stderr[-2000:]!r}"
    return json.loads(proc.stdout)


# --- regression tests, one per finding ---------------------------------------------------------------------

def test_tensor_views_are_bounds_checked_against_the_flat_storage():
    values = np.arange(10, dtype=np.float32)
    net = load_network_pickle(io.BytesIO(network_pickle(
        t=tensor(blob_storage(values), 2, (2, 4), (4, 1)),                     # last element read: 9
        z=tensor(blob_storage(values[:1]), 0, (3, 2), (0, 0)))))             # zero strides: broadcast
    np.testing.assert_array_equal(net["t"], values[2:10].reshape(2, 4))
    np.testing.assert_array_equal(net["z"], np.zeros((3, 2)))
    with pytest.raises(NetworkPickleError, match="reach element 10 of a storage of 10"):
        load_network_pickle(io.BytesIO(network_pickle(t=tensor(blob_storage(values), 2, (2, 4), (5, 1)))))


def test_a_2d_array_is_not_a_storage():
    """The finding: a 2-D numpy `_frombuffer` array as the storage made the old check count elements but
    slice rows, reading far past the buffer (heap contents; SIGSEGV at 32 MiB)."""
    dtype = call(glob("numpy", "dtype"), u("f4"), b"\x89", b"\x88")
    storage = call(glob("numpy._core.numeric", "_frombuffer"), binbytes(bytes(64 * 64 * 4)), dtype,
                   tup(i32(64), i32(64)), u("C"))
    result = load_isolated(network_pickle(t=tensor(storage, 63, (4033,), (1,))))
    assert result["result"].startswith("NetworkPickleError: tensor: the storage is"), result


def test_a_bfloat16_storage_loads_with_its_dtype():
    """A BFloat16Storage blob of 3 values (their bf16 bytes) loads as a bfloat16 array of those values; its dtype is
    made only when a blob names the type (a float32 file does not import ml_dtypes, the next test's bound)."""
    import ml_dtypes

    values = np.asarray([1.0, -2.5, 0.15625], np.float32)  # exact in bfloat16
    storage = blob_storage(values, storage="BFloat16Storage", dtype=ml_dtypes.bfloat16)
    net = load_network_pickle(io.BytesIO(network_pickle(t=tensor(storage, 0, (3,), (1,)))))
    assert net["t"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(np.asarray(net["t"], np.float32), values)


def test_zero_stride_bomb_is_refused_before_allocating():
    """A ~370-byte file whose one-element storage is viewed as 2**28 elements (1 GiB) with zero strides."""
    data = network_pickle(t=tensor(blob_storage([1.0]), 0, (1 << 15, 1 << 13), (0, 0)))
    assert len(data) < 400
    result = load_isolated(data)
    assert result["result"].startswith("NetworkPickleError:") and "tensor bytes" in result["result"], result
    assert result["peak"] < 4 << 20, result


@pytest.mark.parametrize("opcodes", [
    b"\x8e" + struct.pack("<Q", 1 << 40) + b"x",          # BINBYTES8 declaring 2**40 bytes
    b"\x8d" + struct.pack("<Q", 1 << 40) + b"x",          # BINUNICODE8
    b"\x96" + struct.pack("<Q", 1 << 40) + b"x",          # BYTEARRAY8
    b"\x95" + struct.pack("<Q", 1 << 40) + b"N.",         # FRAME
    b"N" + b"r" + struct.pack("<I", 1 << 28) + b".",      # LONG_BINPUT: a memo table of 2**29 slots
], ids=["bytes8", "unicode8", "bytearray8", "frame", "memo_index"])
def test_declared_sizes_are_checked_against_the_file(opcodes):
    result = load_isolated(b"\x80\x04" + opcodes)
    assert result["result"].startswith("NetworkPickleError:"), result
    assert result["peak"] < 1 << 20, result


@pytest.mark.parametrize("start, end", [(b"", b"\x86"), (b"](", b"e")], ids=["tuples", "lists"])
def test_shared_references_are_converted_once(start, end):
    """60 levels of [x, x] (under 1 KB; MEMOIZE, POP, then two LONG_BINGETs of the level below): the old
    conversion walked all 2**60 paths."""
    levels = b"".join(b"\x940" + start + (b"j" + struct.pack("<I", i)) * 2 + end for i in range(60))
    data = b"\x80\x04}" + u("x") + u("leaf") + levels + b"s."
    result = load_isolated(data, timeout=30)
    assert result["result"] == "loaded" and result["seconds"] < 5, result
    net = load_network_pickle(io.BytesIO(data))
    assert net["x"][0] is net["x"][1]


@pytest.mark.parametrize("make, message", [
    (lambda: b"\x80\x04}" + u("x") + b"]\x94h\x00a" + b"s.", "reference cycle"),      # x = [x]
    (lambda: b"\x80\x04}" + u("x") + b"]" * 5000 + b"a" * 4999 + b"s.", "more than 100 deep"),
    (lambda: b"\x80\x04}" + b")" + b"\x85" * 100000 + b"Ns.", "hashing bomb"),  # 1e6: pickle segfaults
    (lambda: b"\x80\x04}(" + b"".join(b"\x8a\x0b" + (i * (2 ** 61 - 1)).to_bytes(11, "little") + b"N"
                                       for i in range(20000)) + b"u.", "other keys"),  # equal hashes
], ids=["self_containing_list", "deep_nesting", "deep_tuple_key", "colliding_int_keys"])
def test_structures_that_hang_or_crash_plain_pickle(make, message):
    result = load_isolated(make(), timeout=60)
    assert result["result"].startswith("NetworkPickleError:") and message in result["result"], result
    assert result["seconds"] < 5, result


ALLOWED = [("torch._utils", "_rebuild_tensor_v2"), ("torch.storage", "_load_from_bytes"), ("numpy", "dtype"),
           ("collections", "OrderedDict"), ("builtins", "set"), ("numpy", "ndarray"), ("dnnlib.util", "EasyDict"),
           ("torch_utils.persistence", "_reconstruct_persistent_obj")]
BUILD_STATES = {"dict": b"}" + u("name") + u("DoubleStorage") + b"s",
                "slots": b"N}" + u("__defaults__") + tup(i32(1)) + b"s\x86"}


@pytest.fixture(scope="module")
def fresh_digest(tmp_path_factory):
    """An official pickle and its `digest` computed in a fresh process."""
    path = tmp_path_factory.mktemp("official") / "net.pkl"
    path.write_bytes(official_bytes())
    code = "import sys; from test_safe_pickle import digest; print(digest(sys.argv[1]))"
    fresh = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True,
                           cwd=REPO / "tests", check=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    return path, fresh.stdout.strip()


@pytest.mark.parametrize("state", list(BUILD_STATES))
@pytest.mark.parametrize("target", ["torch.FloatStorage"] + [".".join(g) for g in ALLOWED])
def test_build_on_a_global_cannot_change_a_later_load(fresh_digest, target, state):
    """BUILD on the shared FloatStorage stand-in used to rename it for the rest of the process (a later
    legitimate import then failed). Now BUILD on any allowed global is refused, and a later import in this
    process gives what it gives in a fresh one."""
    if target == "torch.FloatStorage":     # only resolvable inside a storage blob
        pid = [u("storage"), b"ctorch\nFloatStorage\n" + BUILD_STATES[state] + b"b", u("0"), u("cpu"), i32(1),
               b"N"]
        hostile = network_pickle(t=call(glob("torch.storage", "_load_from_bytes"),
                                        binbytes(storage_blob([1.0], pid))))
    else:
        hostile = network_pickle(x=glob(*target.rsplit(".", 1)) + BUILD_STATES[state] + b"b")
    with pytest.raises(NetworkPickleError, match="refused"):
        load_network_pickle(io.BytesIO(hostile))
    path, fresh = fresh_digest
    assert digest(path) == fresh


def test_persistent_ids_are_checked():
    short = [u("storage"), b"ctorch\nFloatStorage\n"]
    with pytest.raises(NetworkPickleError, match="unexpected persistent id"):
        load_network_pickle(io.BytesIO(network_pickle(
            t=call(glob("torch.storage", "_load_from_bytes"), binbytes(storage_blob([1.0], short))))))
    with pytest.raises(NetworkPickleError, match="unexpected persistent id"):
        load_network_pickle(io.BytesIO(network_pickle(t=tup(u("storage")) + b"Q")))


CONTROL = "\r\nWrote /tmp/x (all good).\x1b[2K\x1b[32m\x07"


def _bad_file(kind: str) -> bytes:
    if kind == "truncated":
        return official_bytes()[:5000]
    if kind == "garbage":
        return np.random.default_rng(0).bytes(3000)
    if kind == "zip":
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            z.writestr("archive/data.pkl", official_bytes())
        return buf.getvalue()
    return {"empty": b"", "plain_int": pickle.dumps(7), "control_chars": network_pickle(x=glob("os", CONTROL)),
            "not_a_generator": pickle.dumps({"G_ema": {"weight": 1}})}[kind]


@pytest.mark.parametrize("kind", ["truncated", "garbage", "empty", "zip", "plain_int", "control_chars",
                                  "not_a_generator"])
def test_command_reports_a_bad_file_in_one_escaped_line(tmp_path, kind):
    pkl = tmp_path / "bad.pkl"
    pkl.write_bytes(_bad_file(kind))
    proc = subprocess.run([sys.executable, "-m", "kdjax.stylegan2_import", f"--pkl={pkl}",
                           f"--out={tmp_path / 'out'}"], capture_output=True, text=True, cwd=REPO, timeout=120,
                          check=False)
    assert proc.returncode == 2 and proc.stdout == "", (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stderr.startswith("kdjax: error: ") and proc.stderr.endswith("\n"), proc.stderr
    line = proc.stderr[:-1]
    assert line.isprintable(), repr(line)         # one line: no CR/LF, ESC or other control character
    assert not (tmp_path / "out").exists()
    if kind == "control_chars":
        assert "refusing" in line.lower() and r"\r\nWrote /tmp/x (all good).\x1b[2K" in line


# --- fuzzing ---------------------------------------------------------------------------------------------

LONG_RUN = "KDJAX_FUZZ_EXAMPLES" in os.environ
FUZZ = dict(deadline=5000, derandomize=not LONG_RUN, database=None, print_blob=True,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example])


@functools.cache
def _expected_variables():
    """The converted variables of the unmutated small network: what fuzzed networks are mapped against."""
    from kdjax.importers import stylegan2 as si
    return si.convert_generator(load_network_pickle(io.BytesIO(official_bytes()))["G_ema"])[1]


@pytest.fixture(scope="module")
def warm_caches():
    """Writes the base pickles (torch) and converts one (jax) before the timed examples start."""
    for layout in ("stylegan2-ada", "stylegan3"):
        _arg_spans(official_bytes(layout))
    _expected_variables()


def check_input(data: bytes) -> None:
    """Loads, then converts what loaded: each step may only succeed or raise NetworkPickleError, and the
    process's peak memory may not grow by more than 256 MiB."""
    from kdjax.importers import stylegan2 as si
    expected = _expected_variables()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    outcome = "loaded"
    try:
        g = load_network_pickle(io.BytesIO(data)).get("G_ema")
        if isinstance(g, PersistentObject):
            sd = si.state_dict(g)
            outcome = "state dict"
            for name, step in (("kwargs", lambda: si.infer_generator_kwargs(g, sd)),
                               ("names", lambda: si.convert_state_dict(sd, expected))):
                try:
                    step()
                    outcome += f", {name} ok"
                except NetworkPickleError:
                    pass
    except NetworkPickleError as e:
        outcome = "refused: " + re.sub(r"[0-9]+", "N", str(e))[:40]
    event(outcome)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 256 << 10, "peak memory grew > 256 MiB"


NAMES = ALLOWED + [("torch._utils", "_rebuild_parameter"), ("numpy._core.multiarray", "scalar"),
                   ("numpy._core.multiarray", "_reconstruct"), ("torch", "FloatStorage"), ("os", "system"),
                   ("builtins", "eval"), ("x\r\n", "\x1b[0m")]
_SIMPLE = [bytes([c]) for c in b"()]}N\x88\x89tlduseb\x81\x92R\x940122\x85\x86\x87\x8f\x90\x91Q."]


def _sized(code: bytes, fmt: str, payload: st.SearchStrategy) -> st.SearchStrategy:
    """An opcode with a length-prefixed payload whose declared length is true or a lie."""
    limit = (1 << (8 * struct.calcsize(fmt))) - 1
    return st.tuples(payload, st.one_of(st.none(), st.integers(0, limit))).map(
        lambda p: code + struct.pack(fmt, len(p[0]) if p[1] is None else p[1]) + p[0])


def _ints(code: bytes, fmt: str, hi: int) -> st.SearchStrategy:
    return st.integers(0, hi).map(lambda n: code + struct.pack(fmt, n))


@st.composite
def tensors(draw):
    """A storage blob (its persistent id or key list sometimes broken) viewed by random offset/size/stride."""
    values = draw(st.lists(st.floats(width=32), max_size=6))
    pid = [u("storage"), b"ctorch\nFloatStorage\n", u("0"), u("cpu"), i32(len(values)), b"N"]
    if draw(st.booleans()):
        pid[draw(st.integers(0, 5))] = draw(st.sampled_from([b"N", i32(-1), i32(1 << 30), u("0"), b")"]))
    blob = storage_blob(values, pid)
    if draw(st.booleans()):
        cut = draw(st.integers(0, len(blob)))
        blob = blob[:cut] + draw(st.binary(max_size=4)) + blob[cut + draw(st.integers(0, 4)):]
    dims = draw(st.integers(0, 3))
    small = st.integers(-1, 9)
    return tensor(call(glob("torch.storage", "_load_from_bytes"), binbytes(blob)), draw(small),
                  draw(st.lists(small, min_size=dims, max_size=dims)),
                  draw(st.lists(small, min_size=dims, max_size=dims)))


OPCODE = st.one_of(
    st.sampled_from(_SIMPLE), st.sampled_from(NAMES).map(lambda n: glob(*n)),
    st.sampled_from([n for n in NAMES if "\n" not in n[0] + n[1]]).map(lambda n: f"c{n[0]}\n{n[1]}\n".encode()),
    _sized(b"X", "<I", st.text(max_size=8).map(lambda s: s.encode("utf-8", "surrogatepass"))),
    _sized(b"B", "<I", st.binary(max_size=8)), _sized(b"C", "<B", st.binary(max_size=8)),
    _sized(b"\x8e", "<Q", st.binary(max_size=8)), _sized(b"\x95", "<Q", st.just(b"")),
    _ints(b"K", "<B", 255), _ints(b"M", "<H", 65535), st.integers(-2 ** 31, 2 ** 31 - 1).map(i32),
    _ints(b"h", "<B", 255), _ints(b"q", "<B", 255), _ints(b"j", "<I", (1 << 32) - 1), _ints(b"r", "<I", 300),
    st.binary(min_size=1, max_size=9).map(lambda b: b"\x8a" + bytes([len(b)]) + b),
    st.lists(st.sampled_from([u("storage"), i32(3), b"N", u("cpu")]), max_size=6).map(lambda x: tup(*x) + b"Q"),
    tensors(), st.binary(min_size=1, max_size=6))


@settings(max_examples=int(os.environ.get("KDJAX_FUZZ_EXAMPLES", "4000")), **FUZZ)
@given(header=st.sampled_from([b"\x80\x02", b"\x80\x04", b""]), body=st.lists(OPCODE, max_size=40),
       in_dict=st.booleans(), stop=st.booleans())
def test_fuzz_random_opcode_streams(warm_caches, header, body, in_dict, stop):
    """Opcode soup, often as the value of {'G_ema': ...} so that it gets past the top-level check."""
    body = b"".join(body)
    check_input(header + (b"}" + u("G_ema") + body + b"s" if in_dict else body) + (b"." if stop else b""))


@functools.cache
def _arg_spans(data: bytes, base: int = 0, streams: int = 1) -> list[tuple[int, int]]:
    """(offset, width <= 8) of every opcode argument, also inside storage blobs (five pickle streams each):
    where lying lengths, memo indexes and sizes live."""
    spans, f = [], io.BytesIO(data)
    for _ in range(streams):
        ops = list(pickletools.genops(f))
        for (op, arg, pos), end in zip(ops, [p for _, _, p in ops[1:]] + [f.tell()]):
            if end > pos + 1:
                spans.append((base + pos + 1, min(end - pos - 1, 8)))
            if isinstance(arg, bytes) and arg.startswith(b"\x80\x02\x8a\n"):
                spans += _arg_spans(arg, base + end - len(arg), streams=5)
    return spans


@st.composite
def mutated_official(draw):
    """An official-format pickle (either layout) after 1-3 argument overwrites, byte flips, truncations,
    insertions or splices of its own bytes."""
    layout = draw(st.sampled_from(["stylegan2-ada", "stylegan3"]))
    base = official_bytes(layout)
    spans = _arg_spans(base)
    data = bytearray(base)
    for _ in range(draw(st.sampled_from([1, 1, 2, 3]))):
        kind = draw(st.sampled_from(["arg"] * 3 + ["flip"] * 2 + ["truncate", "insert", "splice"]))
        pos = draw(st.integers(0, len(data)))
        if kind == "arg":
            at, width = draw(st.sampled_from(spans))
            value = draw(st.sampled_from([b"\x00", b"\xff", b"\x01", b"\x7f", b"\x80"])) * width
            data[at:at + width] = draw(st.one_of(st.just(value), st.binary(min_size=width, max_size=width)))
        elif kind == "flip":
            if data:
                data[pos % len(data)] ^= draw(st.integers(1, 255))
        elif kind == "truncate":
            del data[pos:]
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        else:
            src, n = draw(st.integers(0, len(base))), draw(st.integers(1, 64))
            data[pos:pos] = base[src:src + n]
    return bytes(data)


@settings(max_examples=int(os.environ.get("KDJAX_FUZZ_EXAMPLES", "3000")), **FUZZ)
@given(data=mutated_official())
def test_fuzz_mutated_official_pickles(warm_caches, data):
    """Real network pickles, slightly broken, reach the blob, tensor and architecture checks too."""
    check_input(data)
