"""REC samples for the Diff-Prompt stages: masks and boxes in memory, pixels decoded batch by batch.

Masks at the Mask-VAE's size (32 x 32 bits) and boxes are small, so they are held for the whole
split. Pixels at the foundation's resolution are not (8000 expressions at 768 px would be 28 GB):
`RecArrays.pixel_batches` decodes and resizes each batch's images when it is needed, in
DataLoader worker processes, so no split's pixels are ever in memory at once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from diffprompt.core.boxes import pixels_to_normalized
from diffprompt.core.image_spec import ImageSpec
from diffprompt.core.images import mask_to_input_frame
from diffprompt.training.data.grounding_dataset import load_pixels
from diffprompt.training.data.masks import rle_to_mask
from diffprompt.training.data.records import DatasetError, GroundingSample
from diffprompt.training.data.row_cache import RowFile, cached_rows


def target_mask(sample: GroundingSample, size: int, resize_mode: str) -> np.ndarray:
    """(size, size) bool: union of the referred objects' masks in the model's input square.

    Datasets without segmentation fall back to the filled boxes.
    """
    full = np.zeros((sample.height, sample.width), dtype=bool)
    if sample.masks:
        for rle in sample.masks:
            full |= rle_to_mask(rle)
    else:
        for x0, y0, x1, y1 in np.round(sample.boxes).astype(int):
            full[max(0, y0): max(0, y1), max(0, x0): max(0, x1)] = True
    return mask_to_input_frame(full, size, resize_mode)


@dataclass
class RecArrays:
    samples: list[GroundingSample]
    masks: torch.Tensor  # (N, m, m) bool, target masks in the input square
    boxes: list[torch.Tensor]  # N x (K, 4) cxcywh normalised to the input square
    spec: ImageSpec | None = None  # the foundation's input: what `pixel_batches` decodes to
    pixel_rows: RowFile | None = None  # (N, 3, S, S) float16 decoded once on disk (`cache_pixels`), if any

    def __len__(self) -> int:
        return len(self.samples)

    def pixel_batches(self, batches: Iterable[np.ndarray], workers: int = 0) -> Iterator[torch.Tensor]:
        """(B, 3, S, S) float32 normalised pixels of each batch of sample indices, in order.

        Pixels pass through float16 (what the stages have always trained on). With `workers` > 0,
        that many processes decode ahead of the consumer. An unreadable image raises `DatasetError`
        naming the file."""
        if self.spec is None:
            raise ValueError("these RecArrays were loaded without an image spec: no pixels")
        batches = [np.asarray(b) for b in batches]
        if self.pixel_rows is not None:
            for b in batches:
                yield torch.from_numpy(self.pixel_rows[b]).float()
            return
        if not batches:
            return
        loader = DataLoader(_Pixels(self.samples, self.spec), batch_sampler=batches, num_workers=workers,
                            collate_fn=_stack_or_error, prefetch_factor=2 if workers else None,
                            generator=torch.Generator())  # its seed draw leaves torch's global RNG alone
        for batch in loader:
            if isinstance(batch, DatasetError):
                raise batch
            yield batch.float()

    def sequential_batches(self, batch_size: int) -> list[np.ndarray]:
        """The split in order, in batches of `batch_size` (the last one shorter)."""
        return [np.arange(lo, min(lo + batch_size, len(self))) for lo in range(0, len(self), batch_size)]


class _Pixels(Dataset):
    """Item i: sample i's (3, S, S) float16 pixels, or the DatasetError of its unreadable image."""

    def __init__(self, samples: Sequence[GroundingSample], spec: ImageSpec):
        self.samples, self.spec = samples, spec

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> torch.Tensor | DatasetError:
        try:
            return torch.from_numpy(load_pixels(self.samples[i], self.spec)).half()
        except DatasetError as e:  # returned, not raised: a worker's exception would come back as a traceback
            return e


def _stack_or_error(items: list) -> torch.Tensor | DatasetError:
    errors = [it for it in items if isinstance(it, DatasetError)]
    return errors[0] if errors else torch.stack(items)


def pixel_bytes(data: RecArrays) -> int:
    """Bytes of the split's pixels at the model's input size in float16."""
    return len(data) * 3 * data.spec.image_size**2 * 2


def cache_pixels(data: RecArrays, directory: Path, workers: int = 0, progress: bool = False) -> None:
    """Decode every image once into `directory` (float16 rows, data/row_cache.py) and read batches from
    there from now on: for small splits read many times (stage 3's epochs at 128 px), where decoding
    per batch would cost more than reading."""
    def decode():
        batches = data.sequential_batches(256)
        for pixels in tqdm(data.pixel_batches(batches, workers), total=len(batches), desc="decoding images",
                           disable=not progress, leave=False):
            yield {"pixels": pixels.half().numpy()}

    data.pixel_rows = cached_rows(directory, len(data), decode).files["pixels"]


def load_rec_arrays(
    samples: Sequence[GroundingSample], spec: ImageSpec, mask_size: int, progress: bool = True,
) -> RecArrays:
    """Every sample's target mask and boxes; pixels come later, per batch (`RecArrays.pixel_batches`)."""
    samples = list(samples)
    masks = np.zeros((len(samples), mask_size, mask_size), dtype=bool)
    boxes = []
    for i, s in enumerate(tqdm(samples, desc="loading masks", unit="expr", disable=not progress, leave=False)):
        masks[i] = target_mask(s, mask_size, spec.resize_mode)
        boxes.append(torch.from_numpy(pixels_to_normalized(s.boxes, s.width, s.height, spec.resize_mode)))
    return RecArrays(samples, torch.from_numpy(masks), boxes, spec)


def data_digest(samples: Sequence[GroundingSample], spec: ImageSpec) -> str:
    """A key of the samples' inputs: image files (path, size, mtime), expressions, ids and the image spec."""
    h = hashlib.sha256(repr(spec).encode())
    for s in samples:
        st = Path(s.image_path).stat()
        h.update(f"{s.sample_id}|{s.expression}|{s.image_path}|{st.st_size}|{st.st_mtime_ns};".encode())
    return h.hexdigest()[:16]
