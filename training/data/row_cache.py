"""Per-sample arrays on disk: written once in sample order, read back by row index.

What the frozen models compute for a split (stage 2's conditions, stage 3's sampled masks) can
be larger than memory at real size (OWL-ViT B/32's image tokens: 1.7 MB per expression in
float32). Such arrays live in a directory of `.npy` files, one per name, with rows = samples:

    rows = cached_rows(cache_dir / f"conditions-{key}", n, batches_of_arrays)   # computes only if missing
    batch = rows.take(idx)                                                        # {name: (B, ...) ndarray}

Rows are read with positioned reads (`os.pread`), not a memory map: the pages read stay in the
kernel's page cache, not in the process's resident set, so a process's RSS does not grow with
the split however many rows it reads. The directory is written under a temporary name and
renamed when complete, so a reader never sees a half-written cache (parallel ranks, killed jobs).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np


def file_digest(paths: Iterable[str | Path], extra: str = "") -> str:
    """sha256 (hex, 16 characters) over the bytes of `paths` (directories: their files, sorted) and `extra`."""
    h = hashlib.sha256()
    for path in paths:
        path = Path(path)
        files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
        for f in files:
            h.update(f.name.encode() + b"\0")
            with f.open("rb") as fh:
                for block in iter(lambda: fh.read(1 << 22), b""):
                    h.update(block)
    h.update(extra.encode())
    return h.hexdigest()[:16]


class RowFile:
    """One C-ordered `.npy` file read by rows: `rows[idx]` is (len(idx), *shape[1:])."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        with self.path.open("rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read_header(f)
            self.offset = f.tell()
        if fortran:
            raise ValueError(f"{self.path}: Fortran-ordered arrays are not row files")
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        self._fd = os.open(self.path, os.O_RDONLY)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, idx) -> np.ndarray:
        """Rows `idx` (an int array, a list or a step-1 slice), in that order."""
        if isinstance(idx, slice):
            lo, hi, step = idx.indices(len(self))
            if step != 1:
                raise ValueError("row slices must have step 1")
            return self._read(lo, max(0, hi - lo))
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        if len(idx) and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"{self.path}: row index out of range 0..{len(self) - 1}")
        out = np.empty((len(idx), *self.shape[1:]), self.dtype)
        for j, i in enumerate(idx.tolist()):
            out[j] = self._read(i, 1)[0]
        return out

    def _read(self, lo: int, n: int) -> np.ndarray:
        size = n * self.row_bytes
        buf = os.pread(self._fd, size, self.offset + lo * self.row_bytes)
        if len(buf) != size:
            raise OSError(f"{self.path}: truncated (expected {size} bytes at row {lo})")
        return np.frombuffer(buf, self.dtype).reshape(n, *self.shape[1:]).copy()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        self.close()


class RowArrays:
    """Several `RowFile`s of the same samples, by name (a cache directory)."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.files = {p.stem: RowFile(p) for p in sorted(self.directory.glob("*.npy"))}
        if not self.files:
            raise ValueError(f"{self.directory}: no .npy files")

    def __len__(self) -> int:
        return len(next(iter(self.files.values())))

    def take(self, idx) -> dict[str, np.ndarray]:
        """{name: rows idx}."""
        return {k: f[idx] for k, f in self.files.items()}


def write_rows(directory: str | Path, n: int, batches: Iterable[dict[str, np.ndarray]],
               dtype: np.dtype | str | None = None) -> RowArrays:
    """Write `batches` (consecutive rows of every name, n rows in all) as `directory/<name>.npy`,
    atomically. `dtype` casts floating arrays (e.g. float16 to halve the disk)."""
    directory = Path(directory)
    tmp = directory.with_name(f"{directory.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    files: dict[str, object] = {}
    rows = 0
    try:
        for batch in batches:
            for name, a in batch.items():
                a = np.ascontiguousarray(a)
                if dtype is not None and np.issubdtype(a.dtype, np.floating):
                    a = a.astype(dtype)
                if name not in files:
                    files[name] = f = (tmp / f"{name}.npy").open("wb")
                    header = {"descr": np.lib.format.dtype_to_descr(a.dtype), "fortran_order": False,
                              "shape": (n, *a.shape[1:])}
                    np.lib.format.write_array_header_2_0(f, header)
                files[name].write(a.tobytes())
            rows += len(next(iter(batch.values())))
        if rows != n:
            raise ValueError(f"{directory}: {rows} rows written, {n} expected")
    except BaseException:
        for f in files.values():
            f.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for f in files.values():
        f.close()
    if directory.exists():  # a parallel job finished the same cache first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, directory)
    return RowArrays(directory)


def cached_rows(directory: str | Path, n: int, compute: Callable[[], Iterable[dict[str, np.ndarray]]],
                dtype: np.dtype | str | None = None) -> RowArrays:
    """The arrays under `directory` if a complete cache of n rows is there, else `compute()`'s written there."""
    directory = Path(directory)
    if directory.is_dir():
        rows = RowArrays(directory)
        if len(rows) == n:
            return rows
        shutil.rmtree(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    return write_rows(directory, n, compute(), dtype)
