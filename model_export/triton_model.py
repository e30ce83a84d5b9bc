"""Diff-Prompt grounding as a Triton Python-backend model (BLS).

`diffprompt.model_export.triton` copies this file to `<repo>/diffprompt/1/model.py`, the artifact's
`manifest.json` beside it, and the numpy-only part of the core (`diffprompt/core/{ddim, errors, image_spec,
manifest, pipeline}.py`) to `<repo>/diffprompt/1/diffprompt/`, so the model runs the very pipeline
the onnxruntime service runs (`diffprompt.core.pipeline.run_pipeline`) with numpy as its only
dependency. One request row = one image, one tokenized expression and one seed:

    pixel_values (3, S, S) float32, input_ids (T,) int64, attention_mask (T,) int64, seed (1,) int64
    -> scores (P,) = sigmoid(logits), boxes (P, 4) cxcywh in [0, 1], mask_logits (m, m)

`execute` concatenates the rows of the requests Triton batched together, runs the pipeline over
them in chunks of at most max_batch_size, each graph call a BLS request to the ONNX models of the
repository, and splits the results back per request.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
if (HERE / "diffprompt" / "core").is_dir() and str(HERE) not in sys.path:  # inside Triton: the vendored core
    sys.path.insert(0, str(HERE))

from diffprompt.core.manifest import Manifest  # noqa: E402
from diffprompt.core.pipeline import Infer, run_pipeline  # noqa: E402

try:
    import triton_python_backend_utils as pb_utils
except ImportError:  # outside Triton: only the numpy functions below are usable
    pb_utils = None

INPUTS = ("pixel_values", "input_ids", "attention_mask", "seed")
OUTPUTS = ("scores", "boxes", "mask_logits")


def load_manifest(path: str | Path = HERE / "manifest.json") -> Manifest:
    return Manifest.from_dict(json.loads(Path(path).read_text()), str(path))


def with_column_scalars(infer: Infer) -> Infer:
    """Triton's configs declare a per-row scalar (the denoiser's timesteps) as dims [1] reshaped to
    []: a BLS call sends it as (B, 1), so (B,) arrays are reshaped on their way out."""

    def call(name: str, inputs: dict[str, np.ndarray], output_names: list[str]) -> list[np.ndarray]:
        return infer(name, {k: v.reshape(-1, 1) if v.ndim == 1 else v for k, v in inputs.items()}, output_names)

    return call


def run_rows(infer: Infer, manifest: Manifest, pixel_values: np.ndarray, input_ids: np.ndarray,
             attention_mask: np.ndarray, seeds) -> dict[str, np.ndarray]:
    """B rows through the pipeline -> {"scores": (B, P), "boxes": (B, P, 4), "mask_logits": (B, m, m)}, float32."""
    result = run_pipeline(with_column_scalars(infer), manifest, pixel_values, input_ids, attention_mask, seeds)
    return {"scores": np.asarray(result.scores, dtype=np.float32), "boxes": np.asarray(result.boxes, dtype=np.float32),
            "mask_logits": np.asarray(result.mask_logits, dtype=np.float32)}


def check_request(arrays: dict[str, np.ndarray]) -> int:
    """Rows of one request's inputs {name: (b, ...)}; ValueError if they disagree or a seed is not (b, 1)."""
    rows = {name: len(arrays[name]) for name in INPUTS}
    if len(set(rows.values())) != 1:
        raise ValueError(f"inputs have different batch sizes: {rows}")
    if arrays["seed"].shape != (rows["seed"], 1):
        raise ValueError(f"seed must have shape (batch, 1), got {arrays['seed'].shape}")
    return rows["seed"]


def run_batched(infer: Infer, manifest: Manifest, requests: list[dict[str, np.ndarray]],
                max_batch_size: int) -> list[dict[str, np.ndarray]]:
    """Concatenate the requests' rows, run `run_rows` in chunks of <= max_batch_size, split per request."""
    sizes = [check_request(r) for r in requests]
    batch = {name: np.concatenate([r[name] for r in requests]) for name in INPUTS}
    chunks = []
    for start in range(0, len(batch["seed"]), max_batch_size):
        rows = slice(start, start + max_batch_size)
        chunks.append(run_rows(infer, manifest, batch["pixel_values"][rows], batch["input_ids"][rows],
                               batch["attention_mask"][rows], batch["seed"][rows, 0]))
    outputs = {name: np.concatenate([c[name] for c in chunks]) for name in OUTPUTS}
    bounds = np.cumsum([0, *sizes])
    return [{name: outputs[name][a:b] for name in OUTPUTS} for a, b in zip(bounds[:-1], bounds[1:])]


class TritonPythonModel:
    """Triton's entry points: read the manifest once, then one pipeline run per batch of requests."""

    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.max_batch_size = max(1, int(config.get("max_batch_size", 0)))
        self.manifest = load_manifest(HERE / "manifest.json")

    def infer(self, model_name: str, inputs: dict[str, np.ndarray], output_names: list[str]) -> list[np.ndarray]:
        """One BLS call; outputs requested in CPU memory (Triton >= 23.04), errors raised."""
        options = {}
        if hasattr(pb_utils, "PreferredMemory"):
            options["preferred_memory"] = pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_CPU, 0)
        request = pb_utils.InferenceRequest(
            model_name=model_name, requested_output_names=list(output_names),
            inputs=[pb_utils.Tensor(name, np.ascontiguousarray(array)) for name, array in inputs.items()], **options)
        response = request.exec()
        if response.has_error():
            raise RuntimeError(f"BLS call to {model_name}: {response.error().message()}")
        arrays = []
        for name in output_names:
            tensor = pb_utils.get_output_tensor_by_name(response, name)
            if tensor is None:
                raise RuntimeError(f"BLS call to {model_name}: no output {name}")
            if not tensor.is_cpu():
                raise RuntimeError(f"BLS call to {model_name}: {name} is in GPU memory (needs Triton >= 23.04)")
            arrays.append(tensor.as_numpy())
        return arrays

    def execute(self, requests):
        responses = [None] * len(requests)
        good, arrays = [], []
        for i, request in enumerate(requests):
            try:
                inputs = {name: pb_utils.get_input_tensor_by_name(request, name).as_numpy() for name in INPUTS}
                check_request(inputs)
            except Exception as e:  # a malformed request fails alone
                responses[i] = pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(e)))
                continue
            good.append(i)
            arrays.append(inputs)
        if good:
            try:
                results = run_batched(self.infer, self.manifest, arrays, self.max_batch_size)
            except Exception as e:  # a failed BLS call fails the whole batch
                for i in good:
                    responses[i] = pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(e)))
            else:
                for i, result in zip(good, results):
                    responses[i] = pb_utils.InferenceResponse(
                        output_tensors=[pb_utils.Tensor(name, result[name]) for name in OUTPUTS])
        return responses
