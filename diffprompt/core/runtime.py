"""Run an exported artifact with onnxruntime and numpy only: the service's inference path.

    runtime = GroundingRuntime.load("artifacts/diffprompt-5steps", ProviderConfig(preferred=("cpu",)))
    result = runtime.ground(pixels, input_ids, attention_mask, seeds)   # one expression per image

`ground` runs the one inference pipeline (diffprompt.core.pipeline: condition encoder -> DDIM
loop over the denoiser graph -> prompt builder -> grounding) with one onnxruntime session per
graph, and returns scores, boxes, the generated mask and per-stage seconds. The runtime is
also what `diffprompt evaluate --artifact` scores (`image_spec`, `score`). Nothing here
imports torch (an import-linter contract and a test check it).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from diffprompt.core.image_spec import ImageSpec
from diffprompt.core.manifest import ArtifactError, Manifest, validate_artifact
from diffprompt.core.pipeline import GroundingResult, run_pipeline
from diffprompt.core.providers import ProviderConfig, describe, select_providers, session_options
from diffprompt.core.tokenizer import QueryTokenizer

__all__ = ["GroundingResult", "GroundingRuntime"]


class GroundingRuntime:
    def __init__(self, directory: Path, manifest: Manifest, sessions: dict, providers: dict[str, list]):
        # providers: graph name -> the (provider, options) list its session was created with
        self.directory, self.manifest, self.sessions, self.providers = directory, manifest, sessions, providers
        self.tokenizer = QueryTokenizer.from_file(directory / manifest.tokenizer.file, manifest.tokenizer.max_length)
        self.steps = manifest.ddim_steps

    # -- loading --------------------------------------------------------------------------------

    @classmethod
    def load(cls, directory: str | Path, config: ProviderConfig | None = None, steps: int | None = None,
             check_hashes: bool = True, warmup: bool = True) -> GroundingRuntime:
        """Validate the artifact (files, sizes, sha256), open one session per graph, warm up."""
        import onnxruntime as ort

        directory = Path(directory)
        manifest = validate_artifact(directory, check_hashes)
        manifest.check_steps(steps)
        config = config or ProviderConfig()
        sessions, providers = {}, {}
        for name, graph in manifest.graphs.items():
            providers[name] = select_providers(config, graph.input_shapes)
            try:
                sessions[name] = ort.InferenceSession(str(directory / graph.file), session_options(config),
                                                      providers=providers[name])
            except Exception as e:  # onnxruntime raises its own exception types
                raise ArtifactError(f"{directory / graph.file}: onnxruntime cannot load it ({e})") from e
        runtime = cls(directory, manifest, sessions, providers)
        if manifest.dtype == "float16" and "CPUExecutionProvider" in runtime.providers_in_use.values():
            raise ArtifactError(f"{directory}: a float16 artifact runs on CUDA / TensorRT only, and "
                                f"{runtime.describe()} has none here (export with --precision fp32 for CPU)")
        if warmup:
            runtime.warmup()
        return runtime

    @property
    def provider(self) -> str:
        """The execution provider actually used by the grounding graph (the first that loaded)."""
        return self.sessions["grounding"].get_providers()[0]

    @property
    def providers_in_use(self) -> dict[str, str]:
        """graph name -> the provider its session actually runs on (a GPU provider may have fallen back)."""
        return {name: sess.get_providers()[0] for name, sess in self.sessions.items()}

    def describe(self) -> str:
        """The requested provider chain of the grounding graph, e.g. 'TensorrtExecutionProvider(fp16) > ...'."""
        return describe(self.providers["grounding"])

    def warmup(self, batch_sizes=(1,)) -> None:
        """Run each batch size once (onnxruntime allocates and, with TensorRT, builds engines here)."""
        size = self.manifest.image.image_size
        for b in batch_sizes:
            ids, mask = self.tokenizer(["warm up"] * b)
            self.ground(np.zeros((b, 3, size, size), np.float32), ids, mask, list(range(b)))

    # -- inference ------------------------------------------------------------------------------

    def infer(self, name: str, feeds: dict[str, np.ndarray], output_names: list[str]) -> list[np.ndarray]:
        """One graph run: the `Infer` callable of diffprompt.core.pipeline."""
        return self.sessions[name].run(output_names, feeds)

    def ground(self, pixels: np.ndarray, input_ids: np.ndarray, attention_mask: np.ndarray, seeds) -> GroundingResult:
        """pixels (B, 3, S, S) float32 normalised, input_ids / attention_mask (B, T) int64, one seed per row."""
        return run_pipeline(self.infer, self.manifest, pixels, input_ids, attention_mask, seeds)

    # -- the evaluation interface (diffprompt evaluate --artifact) ---------------------------------

    @property
    def image_spec(self) -> ImageSpec:
        return self.manifest.image

    def score(self, pixels: np.ndarray, ids: np.ndarray, mask: np.ndarray, seeds) -> tuple[np.ndarray, np.ndarray]:
        """(scores (B, P), boxes (B, P, 4) cxcywh in [0, 1]): what the REC evaluation loop ranks."""
        result = self.ground(pixels, ids, mask, seeds)
        return result.scores, result.boxes
