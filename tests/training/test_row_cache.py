"""Per-sample arrays on disk (training/data/row_cache.py) and per-batch pixel decoding (rec_arrays)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffprompt.core.image_spec import ImageSpec
from diffprompt.training.data.mdetr import load_mdetr
from diffprompt.training.data.rec_arrays import load_rec_arrays
from diffprompt.training.data.records import DatasetError
from diffprompt.training.data.row_cache import RowArrays, cached_rows, file_digest, write_rows


def _batches(a: dict[str, np.ndarray], size: int):
    n = len(next(iter(a.values())))
    for lo in range(0, n, size):
        yield {k: v[lo: lo + size] for k, v in a.items()}


def test_rows_come_back_as_written_in_any_order(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {"tokens": rng.normal(size=(11, 3, 5)).astype(np.float32), "mask": rng.random((11, 4)) > 0.5}
    rows = write_rows(tmp_path / "c", 11, _batches(arrays, 4))
    idx = np.array([10, 0, 3, 3, 7])
    got = rows.take(idx)
    np.testing.assert_array_equal(got["tokens"], arrays["tokens"][idx])
    np.testing.assert_array_equal(got["mask"], arrays["mask"][idx])
    np.testing.assert_array_equal(rows.files["tokens"][2:6], arrays["tokens"][2:6])
    assert np.load(tmp_path / "c" / "tokens.npy").shape == (11, 3, 5)  # a plain .npy file
    assert len(RowArrays(tmp_path / "c")) == 11
    with pytest.raises(IndexError):
        rows.files["tokens"][[11]]


def test_a_float16_cache_halves_floats_and_keeps_other_dtypes(tmp_path):
    arrays = {"x": np.linspace(0, 1, 12, dtype=np.float32).reshape(6, 2), "ids": np.arange(6)}
    rows = write_rows(tmp_path / "c", 6, _batches(arrays, 4), dtype="float16")
    assert rows.files["x"].dtype == np.float16 and rows.files["ids"].dtype == arrays["ids"].dtype
    np.testing.assert_allclose(rows.take(np.arange(6))["x"], arrays["x"], atol=1e-3)


def test_cached_rows_compute_once_and_a_failed_computation_leaves_nothing(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return _batches({"x": np.arange(5.0)[:, None]}, 2)

    first = cached_rows(tmp_path / "k", 5, compute)
    second = cached_rows(tmp_path / "k", 5, compute)
    assert len(calls) == 1 and np.array_equal(second.take([4])["x"], first.take([4])["x"])

    def broken():
        yield {"x": np.zeros((2, 1))}
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        cached_rows(tmp_path / "other", 5, broken)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k"]  # no half-written cache, no temp left
    with pytest.raises(ValueError, match="3 rows written, 5 expected"):
        write_rows(tmp_path / "short", 5, _batches({"x": np.zeros((3, 1))}, 2))
    assert not (tmp_path / "short").exists()


def test_the_key_follows_the_files_bytes(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.safetensors").write_bytes(b"a")
    key = file_digest([tmp_path / "m"], "data")
    assert file_digest([tmp_path / "m"], "data") == key and file_digest([tmp_path / "m"], "other") != key
    (tmp_path / "m" / "model.safetensors").write_bytes(b"b")
    assert file_digest([tmp_path / "m"], "data") != key


SPEC = ImageSpec(image_size=64, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), resize_mode="pad")


@pytest.mark.parametrize("workers", [0, 1])
def test_pixels_are_decoded_per_batch_in_the_batches_order(small_world, workers):
    from diffprompt.training.data.grounding_dataset import load_pixels

    samples = list(load_mdetr(small_world / "val.json"))[:6]
    data = load_rec_arrays(samples, SPEC, 16, progress=False)
    batches = [np.array([5, 0]), np.array([2, 2, 1])]
    got = list(data.pixel_batches(batches, workers))
    assert [tuple(b.shape) for b in got] == [(2, 3, 64, 64), (3, 3, 64, 64)]
    for batch, pixels in zip(batches, got):
        for i, p in zip(batch, pixels):  # through float16, as the stages always trained on
            assert torch.equal(p, torch.from_numpy(load_pixels(samples[i], SPEC)).half().float())


@pytest.mark.parametrize("workers", [0, 1])
def test_an_unreadable_image_is_one_error_naming_the_file(small_world, tmp_path, workers):
    import dataclasses

    samples = list(load_mdetr(small_world / "val.json"))[:3]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    samples[1] = dataclasses.replace(samples[1], image_path=broken)
    data = load_rec_arrays(samples, SPEC, 16, progress=False)
    with pytest.raises(DatasetError, match=f"{broken}: cannot read image") as e:
        list(data.pixel_batches([np.arange(3)], workers))
    assert "Traceback" not in str(e.value)


def test_pixels_cached_once_on_disk_are_the_pixels_decoded_per_batch(small_world, tmp_path):
    from diffprompt.training.data.rec_arrays import cache_pixels

    samples = list(load_mdetr(small_world / "val.json"))[:5]
    streamed = load_rec_arrays(samples, SPEC, 16, progress=False)
    cached = load_rec_arrays(samples, SPEC, 16, progress=False)
    cache_pixels(cached, tmp_path / "pixels")
    assert cached.pixel_rows is not None and cached.pixel_rows.shape == (5, 3, 64, 64)
    batches = [np.array([4, 1]), np.array([0, 2, 3])]
    for a, b in zip(streamed.pixel_batches(batches), cached.pixel_batches(batches)):
        assert torch.equal(a, b)
