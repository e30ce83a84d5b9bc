"""Preprocessing and box mapping match transformers' OWL-ViT / OWLv2 processors on non-square images.

diffprompt.core.images is numpy + PIL only (the service imports it); transformers is the reference.
Tolerance 1e-5 on normalised pixels: both sides compute the same arithmetic, ours in float64 and
transformers' in float32, so they differ by float32 rounding (observed <= 5e-7; values reach ~2.2
after dividing by std ~0.27, so a few ulps of float32 are ~1e-6).
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageFilter

from diffprompt.core.boxes import boxes_to_pixels, on_image
from diffprompt.core.image_spec import ImageSpec
from diffprompt.core.images import OWLV2_PAD, preprocess_image

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")
TOL = 1e-5


def _photo(width: int, height: int, seed: int = 0) -> np.ndarray:
    """(height, width, 3) uint8 with structure at every scale (noise, blurred)."""
    noise = (np.random.default_rng(seed).random((height, width, 3)) * 255).astype(np.uint8)
    return np.asarray(Image.fromarray(noise).filter(ImageFilter.GaussianBlur(1.5)))


def _owlvit_processor():
    try:
        from transformers.models.owlvit.image_processing_pil_owlvit import OwlViTImageProcessorPil as cls
    except ImportError:  # transformers 4.x: the numpy/PIL processor is the only one
        from transformers import OwlViTImageProcessor as cls
    return cls()


def _owlv2_processor():
    try:
        from transformers.models.owlv2.image_processing_pil_owlv2 import Owlv2ImageProcessorPil as cls
    except ImportError:
        from transformers import Owlv2ImageProcessor as cls
    return cls()


@pytest.mark.parametrize("width, height", [(500, 300), (300, 500), (1000, 700)])
def test_stretch_bicubic_matches_owlvit_image_processor(width, height):
    proc = _owlvit_processor()
    image = _photo(width, height)
    ref = np.asarray(proc(images=image, return_tensors="np")["pixel_values"][0])
    ours = preprocess_image(image, 768, tuple(proc.image_mean), tuple(proc.image_std), "stretch", "bicubic")
    assert ref.shape == ours.shape == (3, 768, 768)
    assert np.abs(ref - ours).max() < TOL


@pytest.mark.parametrize("width, height", [(500, 300), (300, 500), (1600, 1100), (2000, 900)])
def test_pad_owlv2_matches_owlv2_image_processor(width, height):
    """Upscaling (bilinear only) and downscaling (Gaussian anti-aliasing first), wide and tall.

    The original OWLv2 (and transformers 4.x) pads with 0.5 grey after scaling to [0, 1];
    transformers 5 pads with 0. The reference therefore gets the image already scaled and padded
    with 0.5 grey (its own pad step is then a no-op): everything else is its code.
    """
    proc = _owlv2_processor()
    image = _photo(width, height)
    side = max(width, height)
    padded = np.pad(image.astype(np.float32) / 255.0, ((0, side - height), (0, side - width), (0, 0)),
                    constant_values=OWLV2_PAD)
    ref = np.asarray(proc(images=padded, do_rescale=False, return_tensors="np")["pixel_values"][0])
    ours = preprocess_image(image, 960, tuple(proc.image_mean), tuple(proc.image_std), "pad", "owlv2")
    assert ref.shape == ours.shape == (3, 960, 960)
    assert np.abs(ref - ours).max() < TOL


def test_pad_owlv2_agrees_with_transformers_own_padding_on_the_image_area():
    """Away from the pad border the pad colour does not matter: the processor as users call it agrees."""
    proc = _owlv2_processor()
    image = _photo(500, 300)  # the image fills rows [0, 576) of the 960 px square
    ref = np.asarray(proc(images=image, return_tensors="np")["pixel_values"][0])
    ours = preprocess_image(image, 960, tuple(proc.image_mean), tuple(proc.image_std), "pad", "owlv2")
    assert np.abs(ref[:, :570] - ours[:, :570]).max() < TOL


def test_image_spec_carries_the_resample_filter_and_old_manifests_mean_bicubic():
    spec = ImageSpec(960, (0.5,) * 3, (0.5,) * 3, "pad", "owlv2")
    assert ImageSpec.from_dict(spec.to_dict()) == spec
    old = {k: v for k, v in spec.to_dict().items() if k != "resample"}
    assert ImageSpec.from_dict(old).resample == "bicubic"
    with pytest.raises(ValueError, match="resample"):
        ImageSpec(960, (0.5,) * 3, (0.5,) * 3, "pad", "lanczos")


def _detections(processor, boxes_cxcywh: np.ndarray, width: int, height: int) -> np.ndarray:
    """transformers' post_process_object_detection boxes (xyxy pixels) for raw model boxes."""
    from types import SimpleNamespace

    n = len(boxes_cxcywh)
    outputs = SimpleNamespace(logits=torch.full((1, n, 1), 5.0),
                              pred_boxes=torch.as_tensor(boxes_cxcywh, dtype=torch.float32)[None])
    (result,) = processor.post_process_object_detection(outputs, threshold=0.0, target_sizes=[(height, width)])
    return result["boxes"].numpy()


@pytest.mark.parametrize("family", ["owlvit", "owlv2"])
def test_boxes_map_back_to_original_pixels_as_transformers(family):
    width, height = 640, 360
    proc, mode = (_owlvit_processor(), "stretch") if family == "owlvit" else (_owlv2_processor(), "pad")
    # boxes inside the image: 360 / 640 = 0.5625 of the square in pad mode
    boxes = np.array([[0.5, 0.25, 0.2, 0.1], [0.1, 0.3, 0.1, 0.2], [0.8, 0.4, 0.3, 0.2]], dtype=np.float32)
    ref = _detections(proc, boxes, width, height)
    ours = boxes_to_pixels(boxes, width, height, mode)
    assert np.abs(ref - ours).max() < 1e-3


def test_boxes_in_the_padding_are_dropped_and_straddling_ones_clipped():
    width, height = 640, 360  # pad mode: rows 360..640 of the 640 px square are padding
    boxes = np.array([
        [0.5, 0.25, 0.2, 0.1],  # on the image
        [0.5, 0.80, 0.2, 0.1],  # wholly in the padding (y 480..544 px)
        [0.5, 0.55, 0.2, 0.1],  # straddles the bottom edge (y 320..384 px)
    ], dtype=np.float32)
    xyxy = boxes_to_pixels(boxes, width, height, "pad")
    assert on_image(xyxy).tolist() == [True, False, True]
    assert xyxy[2].tolist() == pytest.approx([256.0, 320.0, 384.0, 360.0], abs=1e-3)  # clipped, keeps its area
    assert (xyxy[:, 3] <= height).all() and (xyxy[:, 2] <= width).all()
