"""`ImageSpec`: how images enter a grounding model (numpy only, so the Triton model can read it)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RESIZE_MODES = ("pad", "stretch")
RESAMPLES = ("bicubic", "owlv2")  # diffprompt.core.images: PIL bicubic (OWL-ViT), or OWLv2's anti-aliased bilinear


@dataclass(frozen=True)
class ImageSpec:
    """How images enter a grounding model: the one description of its input, in every layer.

    A model's config carries these fields (`ImageSpec.from_config`), an artifact's manifest stores
    them under "image" (`Manifest.image`), and preprocessing takes them from here.
    """

    image_size: int  # side S of the square input, pixels
    mean: tuple[float, float, float]  # per-channel normalisation, on [0, 1] pixel values
    std: tuple[float, float, float]
    resize_mode: str = "pad"  # "pad" (OWLv2, embedded default) or "stretch" (OWL-ViT)
    resample: str = "bicubic"  # "bicubic" (OWL-ViT, embedded default) or "owlv2" (Owlv2ImageProcessor)

    def __post_init__(self) -> None:
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be 'pad' or 'stretch', got {self.resize_mode!r}")
        if self.resample not in RESAMPLES:
            raise ValueError(f"resample must be one of {RESAMPLES}, got {self.resample!r}")
        if int(self.image_size) < 1:
            raise ValueError(f"image_size must be >= 1, got {self.image_size}")

    @classmethod
    def from_config(cls, config) -> ImageSpec:
        """From any config with image_size / image_mean / image_std / resize_mode (/ resample) fields."""
        return cls(int(config.image_size), tuple(config.image_mean), tuple(config.image_std), config.resize_mode,
                   getattr(config, "resample", "bicubic"))

    def to_dict(self) -> dict:
        return {"size": self.image_size, "mean": list(self.mean), "std": list(self.std),
                "resize_mode": self.resize_mode, "resample": self.resample}

    @classmethod
    def from_dict(cls, d: dict) -> ImageSpec:
        """The manifest's "image" entry; artifacts written before "resample" existed used "bicubic"."""
        return cls(int(d["size"]), tuple(float(v) for v in d["mean"]), tuple(float(v) for v in d["std"]),
                   d["resize_mode"], d.get("resample", "bicubic"))

    def preprocess(self, image) -> np.ndarray:
        """RGB image (PIL, or (H, W, 3) uint8) -> normalised pixels (3, S, S) float32."""
        from diffprompt.core.images import preprocess_image

        return preprocess_image(image, self.image_size, self.mean, self.std, self.resize_mode, self.resample)
