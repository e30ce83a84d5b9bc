"""An exported artifact behind the evaluation interface (`image_spec`, `score`), so
`diffprompt evaluate --artifact DIR` scores onnxruntime exactly as it scores PyTorch."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from model_export.providers import ProviderConfig
from model_export.runtime import GroundingRuntime
from training.data.grounding_dataset import ImageSpec


class OnnxPipeline:
    def __init__(self, directory: str | Path, config: ProviderConfig | None = None, steps: int | None = None):
        self.runtime = GroundingRuntime.load(directory, config or ProviderConfig(preferred=("cpu",)), steps)
        self.tokenizer = self.runtime.tokenizer
        image = self.runtime.manifest["image"]
        self.image_spec = ImageSpec(image["size"], tuple(image["mean"]), tuple(image["std"]), image["resize_mode"])

    @property
    def steps(self) -> int:
        return self.runtime.steps

    def score(self, pixels: np.ndarray, ids: np.ndarray, mask: np.ndarray, seeds) -> tuple[np.ndarray, np.ndarray]:
        result = self.runtime.ground(pixels, ids, mask, seeds)
        return result.scores, result.boxes
