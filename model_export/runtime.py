"""Run an exported artifact with onnxruntime and numpy only: the service's inference path.

    runtime = GroundingRuntime.load("artifacts/diffprompt-5steps", ProviderConfig(preferred=("cpu",)))
    result = runtime.ground(pixels, input_ids, attention_mask, seeds)   # one expression per image

`ground` runs condition encoder -> DDIM loop over the denoiser graph (numpy update, schedule
from the manifest) -> prompt builder -> grounding, and returns scores, boxes, the generated
mask and per-stage seconds. Noise is numpy PCG64 per seed, as in training, so PyTorch and
onnxruntime agree for the same seed. Nothing here imports torch (a test checks it).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from model_export.ddim import ddim_update, steps_from_table
from model_export.manifest import ArtifactError, check_steps, validate_artifact
from model_export.providers import ProviderConfig, describe, select_providers, session_options
from training.models.tokenizer import QueryTokenizer

STAGES = ("condition", "sampler", "prompt_builder", "grounding")


def initial_noise(seeds, shape: tuple[int, ...]) -> np.ndarray:
    """(B, *shape) float32 standard normal, one PCG64 stream per seed (= training.models.prompt_sampler)."""
    return np.stack([np.random.default_rng(int(s)).standard_normal(shape, dtype=np.float32) for s in seeds])


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


@dataclass
class GroundingResult:
    scores: np.ndarray  # (B, P) in [0, 1]
    boxes: np.ndarray  # (B, P, 4) cxcywh in [0, 1] of the model's input square
    mask_logits: np.ndarray | None  # (B, m, m) the final generated mask (logits > 0 = mask), Diff-Prompt only
    seconds: dict[str, float] = field(default_factory=dict)  # per stage


class GroundingRuntime:
    def __init__(self, directory: Path, manifest: dict, sessions: dict, providers: dict[str, list]):
        # providers: graph name -> the (provider, options) list its session was created with
        self.directory, self.manifest, self.sessions, self.providers = directory, manifest, sessions, providers
        tok = manifest["tokenizer"]
        self.tokenizer = QueryTokenizer.from_file(directory / tok["file"], tok["max_length"])
        self.steps = int(manifest["ddim_steps"])
        self.diffprompt = "denoiser" in sessions
        if self.diffprompt:
            self.schedule = steps_from_table(manifest["schedule"])
            if len(self.schedule) != self.steps:
                raise ArtifactError(f"{directory}: schedule has {len(self.schedule)} rows for {self.steps} steps")
            self.kept = list(manifest["kept_outputs"])
            self.conditions = list(manifest["denoiser_conditions"])

    # -- loading --------------------------------------------------------------------------------

    @classmethod
    def load(cls, directory: str | Path, config: ProviderConfig | None = None, steps: int | None = None,
             check_hashes: bool = True, warmup: bool = True) -> GroundingRuntime:
        """Validate the artifact (files, sizes, sha256), open one session per graph, warm up."""
        import onnxruntime as ort

        directory = Path(directory)
        manifest = validate_artifact(directory, check_hashes)
        check_steps(manifest, steps)
        config = config or ProviderConfig()
        sessions, providers = {}, {}
        for name, graph in manifest["graphs"].items():
            shapes = {i["name"]: tuple(i["shape"]) for i in graph["inputs"]}
            providers[name] = select_providers(config, shapes)
            try:
                sessions[name] = ort.InferenceSession(str(directory / graph["file"]), session_options(config),
                                                      providers=providers[name])
            except Exception as e:  # onnxruntime raises its own exception types
                raise ArtifactError(f"{directory / graph['file']}: onnxruntime cannot load it ({e})") from e
        runtime = cls(directory, manifest, sessions, providers)
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
        size = self.manifest["image"]["size"]
        for b in batch_sizes:
            ids, mask = self.tokenizer(["warm up"] * b)
            self.ground(np.zeros((b, 3, size, size), np.float32), ids, mask, list(range(b)))

    # -- inference ------------------------------------------------------------------------------

    def _run(self, name: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.sessions[name].run(None, feeds)

    def sample(self, cond: dict[str, np.ndarray], seeds) -> np.ndarray:
        """DDIM from seeded noise; -> kept latents (B, n, C, h, w)."""
        x = initial_noise(seeds, tuple(self.manifest["latent_shape"]))
        outputs = []
        feeds_cond = {k: cond[k] for k in self.conditions}
        for step in self.schedule:
            t = np.full((x.shape[0],), step.timestep, dtype=np.int64)
            (out,) = self._run("denoiser", {"latents": x, "timesteps": t, **feeds_cond})
            x = ddim_update(x, out, step, self.manifest["prediction_type"], self.manifest["clip_sample_range"])
            outputs.append(x)
        return np.stack([outputs[i] for i in self.kept], axis=1)

    def ground(self, pixels: np.ndarray, input_ids: np.ndarray, attention_mask: np.ndarray, seeds) -> GroundingResult:
        """pixels (B, 3, S, S) float32 normalised, input_ids / attention_mask (B, T) int64, one seed per row."""
        pixels = np.ascontiguousarray(pixels, dtype=np.float32)
        ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        mask = np.ascontiguousarray(attention_mask, dtype=np.int64)
        if len(seeds) != len(pixels):
            raise ValueError(f"{len(seeds)} seeds for a batch of {len(pixels)}")
        seconds: dict[str, float] = {}
        base = {"pixel_values": pixels, "input_ids": ids, "attention_mask": mask}
        mask_logits = None
        if self.diffprompt:
            t0 = time.perf_counter()
            names = [o.name for o in self.sessions["condition_encoder"].get_outputs()]
            cond = dict(zip(names, self._run("condition_encoder", base)))
            t1 = time.perf_counter()
            kept = self.sample(cond, seeds)
            t2 = time.perf_counter()
            vision, text, masks = self._run("prompt_builder", {"kept_latents": kept})
            t3 = time.perf_counter()
            logits, boxes = self._run("grounding", {**base, "vision_prompts": vision, "text_prompts": text})
            t4 = time.perf_counter()
            seconds = {"condition": t1 - t0, "sampler": t2 - t1, "prompt_builder": t3 - t2, "grounding": t4 - t3}
            mask_logits = masks[:, 0, 0]  # the shallowest layer's mask = the final x0
        else:
            t0 = time.perf_counter()
            logits, boxes = self._run("grounding", base)
            seconds = {"grounding": time.perf_counter() - t0}
        return GroundingResult(sigmoid(logits), boxes, mask_logits, seconds)
