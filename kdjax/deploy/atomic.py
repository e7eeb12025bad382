"""Atomic outputs: an export is written beside its destination and moved there only once complete.

`staged(out)` yields a path inside a fresh hidden directory next to `out` (same file system, so the final
move is a rename). When the block finishes, the staged file (or directory) is renamed to `out`; when it
raises, or is interrupted (KeyboardInterrupt, SIGTERM turned into an exception), the staged copy is deleted
and `out` is left as it was. A process killed outright (SIGKILL, power loss) can leave the hidden
`.NAME.*.partial` directory behind, but never a partial file at `out`.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import tempfile
from typing import Iterator

from kdjax.deploy.errors import ExportError


def check_output(out: str | pathlib.Path, overwrite: bool) -> pathlib.Path:
    """The absolute output path, after checking (before any compute) that it can be written."""
    path = pathlib.Path(out).expanduser().absolute()
    if path.exists() and not overwrite:
        raise ExportError(f"--out={str(out)!r} already exists; pass --overwrite to replace it, or another --out.")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ExportError(f"--out={str(out)!r}: cannot create its directory ({e.strerror or e}); pass a path on "
                          "a writable file system.") from e
    if not os.access(path.parent, os.W_OK):
        raise ExportError(f"--out={str(out)!r}: the directory {str(path.parent)!r} is not writable.")
    return path


@contextlib.contextmanager
def staged(out: pathlib.Path) -> Iterator[pathlib.Path]:
    """Yields where to write `out`'s content; moves it to `out` if the block succeeds (see the module doc)."""
    scratch = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        target = scratch / out.name
        yield target
        if not target.exists():
            raise ExportError(f"the exporter wrote nothing for {str(out)!r}.")
        publish(target, out, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def publish(target: pathlib.Path, out: pathlib.Path, scratch: pathlib.Path) -> None:
    """Renames the finished `target` to `out`. A file replaces an old file in one atomic `os.replace`; an old
    directory (or a file of another type) is first moved into `scratch`, then the new one renamed in."""
    if out.exists() and (out.is_dir() or target.is_dir()):
        os.replace(out, scratch / ".old")
    os.replace(target, out)
