"""Directory swaps that never leave a moment with neither the old directory nor the new one.

    staging = staging_dir(target)          # a fresh sibling of target, on the same filesystem
    ... write everything into staging ...
    replace_directory(staging, target)     # target is now the new tree; the old one is gone

On Linux the swap is one `renameat2(RENAME_EXCHANGE)` system call: a reader sees either the old
tree or the new one at `target`, never nothing. Where the kernel, libc or filesystem does not
offer it, the fallback is two renames (old aside, new in), a gap of one system call; a crash in
that gap leaves the old tree at `<target>.old-<pid>`, named in the error.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import shutil
from pathlib import Path

_AT_FDCWD = -100
_RENAME_EXCHANGE = 1 << 1


def _renameat2():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError, TypeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_RENAMEAT2 = _renameat2()


def exchange(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Atomically swap two existing paths; False if this system cannot (then nothing changed)."""
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, f"renameat2({a}, {b}, RENAME_EXCHANGE): {os.strerror(err)}")


def staging_dir(target: str | os.PathLike) -> Path:
    """An empty directory next to `target` (same filesystem, so the final rename is atomic)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.staging-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    return staging


def replace_directory(new: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Move the directory `new` to `target`, replacing whatever directory is there; returns `target`."""
    new, target = Path(new), Path(target)
    if not target.exists() and not target.is_symlink():
        new.rename(target)
        return target
    if not target.is_dir():
        raise NotADirectoryError(f"{target} exists and is not a directory: not replacing it")
    if exchange(new, target):  # target = new tree, `new` = the old tree
        shutil.rmtree(new)
        return target
    aside = target.with_name(f"{target.name}.old-{os.getpid()}")
    shutil.rmtree(aside, ignore_errors=True)
    target.rename(aside)
    try:
        new.rename(target)
    except OSError as e:
        aside.rename(target)
        raise OSError(f"could not move {new} to {target} (the old tree is back in place): {e}") from e
    shutil.rmtree(aside)
    return target
