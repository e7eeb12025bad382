"""The opcode level of the restricted unpickler: one error type, a per-load budget, a pre-scan, the Unpickler.

`pickle`'s C unpickler trusts the stream. It allocates what an opcode declares before reading it (BINBYTES8 of
2**40 bytes is a MemoryError, LONG_BINPUT 2**27 grows the memo table to 2 GiB), hashes whatever becomes a dict
key or set element (a tuple nested a million deep crashes the process, integers that collide modulo 2**61-1
make the load quadratic), and fails with a dozen exception types. `restricted_load` therefore first walks the
stream with `pickletools.genops`, which reads through a `BytesIO` and so never allocates more than the data
holds, and simulates the stack just enough to check:

- every frame length fits in the data, and every memo index is at most the number of memo stores so far;
- every dict key and set element is a str or bytes (randomised hashes), or one of at most `MAX_OTHER_KEYS`
  others per load, each at most `MAX_KEY_NODES` tuple/frozenset nodes (sharing counted every time);
- no extension codes (EXT1/2/4: `copyreg`'s process-wide cache).

Only then does it unpickle, with globals resolved by the caller's `find_class`; every failure is a
`NetworkPickleError` whose message is one line, with values from the file escaped (`describe`).
"""

from __future__ import annotations

import io
import pickle
import pickletools
import struct
import warnings
from typing import Any, Callable, NoReturn

MAX_OTHER_KEYS = 1024          # dict keys / set elements that are not str or bytes, per load (networks: ~0)
MAX_KEY_NODES = 64             # tuple/frozenset nodes hashed for one such key
MAX_TENSOR_BYTES = 4 << 30     # absolute cap on tensor bytes per load, see Budget
TENSOR_BYTES_SLACK = 16 << 20  # tensor bytes a load may expand to beyond twice the file's size
SCAN_BYTES_SLACK = 1 << 20     # pickle-stream bytes a load may scan beyond four times the file's size

_KEY_SAFE_PUSHES = {"UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8", "STRING", "BINSTRING",
                    "SHORT_BINSTRING", "BINBYTES", "SHORT_BINBYTES", "BINBYTES8"}   # str/bytes: random hashes
_HASHABLE_CONTAINERS = {"EMPTY_TUPLE", "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3", "FROZENSET"}
_MEMO_PUTS = {"PUT", "BINPUT", "LONG_BINPUT"}
_MEMO_GETS = {"GET", "BINGET", "LONG_BINGET"}
_REFUSED_OPCODES = {"EXT1", "EXT2", "EXT4"}
_MARK = object()               # a MARK on the simulated stack
# opcode name -> (items under its MARK that it also pops, or None if it takes no MARK; items it pops without
# a MARK; items it pushes), from pickletools' stack effects.
_STACK_EFFECTS = {
    op.name: ((names.index("mark"), 0) if "mark" in names else (None, len(names))) + (len(op.stack_after),)
    for op in pickletools.opcodes for names in [[s.name for s in op.stack_before]]}


class NetworkPickleError(pickle.UnpicklingError, ValueError):
    """The file is not a network pickle that can be read safely: empty, truncated, corrupt, oversized, hostile
    or not in the official structure. The message is one line; values from the file in it are escaped."""


class UnsafePickleError(NetworkPickleError):
    """The pickle references a global outside the allow-list (nothing from it was run)."""


def escape(text: str) -> str:
    """`text` with every non-printable character (CR, LF, ESC, ...) written as a backslash escape."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def describe(value: Any, depth: int = 2) -> str:
    """A short, escaped repr of an untrusted value for a message; never walks more than a few items."""
    if isinstance(value, (str, bytes, bytearray)):
        return repr(value[:120]) + ("..." if len(value) > 120 else "")
    if isinstance(value, bool) or value is None or isinstance(value, float):
        return repr(value)
    if isinstance(value, int):
        return repr(value) if value.bit_length() <= 64 else f"<int of {value.bit_length()} bits>"
    if isinstance(value, (tuple, list)) and depth > 0:
        items = [describe(v, depth - 1) for v in value[:6]] + (["..."] if len(value) > 6 else [])
        return ("(%s)" if isinstance(value, tuple) else "[%s]") % ", ".join(items)
    return f"<{type(value).__name__}>"


def refuse_global(module: str, name: str) -> NoReturn:
    """The error for a global outside the allow-list; raised when the pickle names it, before any call."""
    raise UnsafePickleError(
        f"Refusing to load the pickle: it references the global {describe(f'{module}.{name}')}, which is not "
        f"on the allow-list of tensor and container types (nothing from it was run).")


class Budget:
    """What one load may spend beyond reading the file, each limit a `NetworkPickleError` when passed.

    - tensor bytes: min(2 * file size + TENSOR_BYTES_SLACK, MAX_TENSOR_BYTES). A real network's tensors take
      about the file's size (each is stored once); a zero-stride tensor of a tiny file could otherwise expand
      to gigabytes. The absolute cap, 4 GiB, is 11x the official FFHQ-1024 pickle (G, D and G_ema: ~89 M
      float32 values, ~0.36 GB; a 1024x1024 G alone is ~30 M).
    - scanned bytes: 4 * file size + SCAN_BYTES_SLACK of pickle streams (a storage blob referenced many times
      is scanned each time it is rebuilt).
    - copied items: file size + 4096 container items copied by set/frozenset/OrderedDict calls.
    - other keys: MAX_OTHER_KEYS dict keys or set elements that are not str/bytes (hash-collision bombs).
    """

    def __init__(self, file_size: int):
        self.file_size = file_size
        self.left = {"tensor bytes": min(2 * file_size + TENSOR_BYTES_SLACK, MAX_TENSOR_BYTES),
                     "scanned bytes": 4 * file_size + SCAN_BYTES_SLACK,
                     "copied items": file_size + 4096,
                     "other keys": MAX_OTHER_KEYS}

    def spend(self, kind: str, amount: int, what: str) -> None:
        """Takes `amount` of `kind`; raises, naming `what`, if that passes the load's limit."""
        if amount > self.left[kind]:
            raise NetworkPickleError(
                f"{what} needs {amount} {kind}, more than this file of {self.file_size} bytes may use "
                f"({self.left[kind]} left); refusing a memory or time bomb.")
        self.left[kind] -= amount


class _StreamCheck:
    """The pre-scan of one pickle stream (see the module docstring); `run()` returns the offset past STOP."""

    def __init__(self, data: bytes, start: int, budget: Budget):
        self.data, self.start, self.budget = data, start, budget
        self.stack: list = []        # per entry: _MARK, or (key_safe, nodes)
        self.memo: dict[int, tuple] = {}
        self.memo_stores = 0

    def run(self) -> int:
        f = io.BytesIO(self.data)    # shares the bytes; read(n) returns at most what is there
        f.seek(self.start)
        pos = self.start
        try:
            for op, arg, pos in pickletools.genops(f):
                self.step(op, arg, pos, f.tell())
        except NetworkPickleError:
            raise
        except (ValueError, IndexError, struct.error) as e:   # genops: unknown opcode, short argument, ...
            raise NetworkPickleError(f"corrupt or truncated pickle at byte {pos}: {escape(str(e))[:300]}") from None
        self.budget.spend("scanned bytes", f.tell() - self.start, "reading the pickle streams")
        return f.tell()

    def step(self, op, arg, pos: int, next_pos: int) -> None:
        """Applies one opcode to the simulated stack and memo."""
        name = op.name
        if name in _REFUSED_OPCODES:
            raise NetworkPickleError(f"opcode {name} at byte {pos} (copyreg extension codes) is refused.")
        if name == "FRAME" and arg > len(self.data) - next_pos:
            raise NetworkPickleError(f"truncated pickle: the frame at byte {pos} declares {arg} bytes, "
                                     f"{len(self.data) - next_pos} remain.")
        if name in _MEMO_PUTS or name == "MEMOIZE":
            self.memo_store(len(self.memo) if name == "MEMOIZE" else arg, pos)
        elif name in _MEMO_GETS:
            self.stack.append(self.memo.get(arg, (False, 1)))
        elif name == "DUP":
            self.stack.append(self.top(pos))
        elif name == "MARK":
            self.stack.append(_MARK)
        elif name == "POP" and self.stack and self.stack[-1] is _MARK:
            self.stack.pop()                          # as pickle does: POP on a MARK drops the mark
        else:
            self.apply(op, pos)

    def memo_store(self, index: int, pos: int) -> None:
        if not 0 <= index <= self.memo_stores:
            raise NetworkPickleError(f"corrupt pickle: memo index {index} at byte {pos} skips ahead of the "
                                     f"{self.memo_stores} entries stored so far.")
        self.memo[index] = self.top(pos)
        self.memo_stores += 1

    def apply(self, op, pos: int) -> None:
        """A generic opcode: checks the keys it hashes, pops `stack_before`, pushes `stack_after`."""
        under_mark, pops, pushes = _STACK_EFFECTS[op.name]
        if under_mark is not None:
            items = self.pop_to_mark(pos)
            for _ in range(under_mark):                # e.g. the list under APPENDS' mark
                self.pop(pos)
        else:
            items = [self.pop(pos) for _ in range(pops)][::-1]
        if op.name == "SETITEM":
            self.check_keys(items[1:2], pos)
        elif op.name in ("SETITEMS", "DICT"):
            self.check_keys(items[0::2], pos)
        elif op.name in ("ADDITEMS", "FROZENSET"):
            self.check_keys(items, pos)
        if op.name in _HASHABLE_CONTAINERS:
            entry = (False, min(1 + sum(n for _, n in items), MAX_KEY_NODES + 1))
        else:
            entry = (op.name in _KEY_SAFE_PUSHES, 1)
        self.stack.extend([entry] * pushes)

    def check_keys(self, keys: list, pos: int) -> None:
        others = [nodes for safe, nodes in keys if not safe]
        if any(nodes > MAX_KEY_NODES for nodes in others):
            raise NetworkPickleError(f"a dict key or set element at byte {pos} is a tuple/frozenset of more "
                                     f"than {MAX_KEY_NODES} nodes; refusing a hashing bomb.")
        if others:
            self.budget.spend("other keys", len(others), f"the dict or set at byte {pos}")

    def top(self, pos: int):
        if not self.stack or self.stack[-1] is _MARK:
            raise NetworkPickleError(f"corrupt pickle: stack underflow at byte {pos}.")
        return self.stack[-1]

    def pop(self, pos: int):
        entry = self.top(pos)
        self.stack.pop()
        return entry

    def pop_to_mark(self, pos: int) -> list:
        for i in range(len(self.stack) - 1, -1, -1):
            if self.stack[i] is _MARK:
                items = self.stack[i + 1:]
                del self.stack[i:]
                return items
        raise NetworkPickleError(f"corrupt pickle: no MARK for the opcode at byte {pos}.")


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, find_class: Callable[[str, str], Any], persistent_load: Callable | None):
        super().__init__(file)
        self._find_class, self._persistent_load = find_class, persistent_load

    def find_class(self, module: str, name: str) -> Any:
        return self._find_class(module, name)

    def persistent_load(self, pid: Any) -> Any:
        if self._persistent_load is None:
            raise NetworkPickleError(f"unexpected persistent id {describe(pid)} (a network pickle has none).")
        return self._persistent_load(pid)


def restricted_load(data: bytes, start: int, budget: Budget, find_class: Callable[[str, str], Any],
                    persistent_load: Callable | None = None) -> tuple[Any, int]:
    """Checks, then unpickles the pickle stream at `data[start:]`; returns (object, offset past its STOP).

    Raises:
      NetworkPickleError (or UnsafePickleError from `find_class`) for every problem; nothing else.
    """
    f = io.BytesIO(data)
    f.seek(start)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)     # invalid escapes in protocol-0 strings
        end = _StreamCheck(data, start, budget).run()
        try:
            return _Unpickler(f, find_class, persistent_load).load(), end
        except NetworkPickleError:
            raise
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError,
                struct.error, OverflowError) as e:    # a stream the pre-scan let through but pickle rejects
            raise NetworkPickleError(f"corrupt pickle near byte {f.tell()}: {type(e).__name__}: "
                                     f"{escape(str(e))[:300]}") from e
