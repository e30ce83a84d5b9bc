"""`diffprompt export --precision fp16`: float16 graphs with float32 inputs / outputs, for GPU providers.

Nothing here has a GPU: the graphs are run with onnxruntime's CPU provider directly (it can load
them; float16 runs there through casts), and the runtime must refuse to serve them on CPU alone.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from diffprompt.core.manifest import ArtifactError, validate_artifact
from diffprompt.core.pipeline import run_pipeline
from diffprompt.core.providers import ProviderConfig
from diffprompt.core.runtime import GroundingRuntime
from diffprompt.model_export.export import build_parser, main

ort = pytest.importorskip("onnxruntime")
CPU = ProviderConfig(preferred=("cpu",))
GRAPHS = ("condition_encoder", "denoiser", "prompt_builder", "grounding")


@pytest.fixture(scope="module")
def pair(tiny_pipeline_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("fp16")
    for precision in ("fp32", "fp16"):
        assert main(build_parser().parse_args(["--pipeline", str(tiny_pipeline_dir), "--steps", "3", "--out",
                                               str(out / precision), "--name", "tiny", "--precision", precision,
                                               "--threads", "1", "--no-progress"])) == 0
    return out / "fp32" / "tiny-3steps", out / "fp16" / "tiny-3steps"


def test_fp16_graphs_hold_float16_weights_behind_float32_io(pair):
    fp32, fp16 = pair
    manifest = validate_artifact(fp16, True)
    assert manifest.dtype == "float16" and validate_artifact(fp32, True).dtype == "float32"
    F16, F32 = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT
    for g in GRAPHS:
        model = onnx.load(str(fp16 / f"{g}.onnx"), load_external_data=False)
        types = {t.data_type for t in model.graph.initializer if t.data_type in (F16, F32)}
        assert F16 in types, g
        io = [v.type.tensor_type.elem_type for v in (*model.graph.input, *model.graph.output)]
        assert F16 not in io and F32 in io, g  # clients feed and read float32 as for any artifact
    # the shared weights file is about half as large
    ratio = (fp16 / "weights.bin").stat().st_size / (fp32 / "weights.bin").stat().st_size
    assert 0.4 < ratio < 0.6


def test_fp16_artifact_runs_close_to_fp32_on_onnxruntime(pair):
    fp32, fp16 = pair
    results = []
    for d in pair:
        manifest = validate_artifact(d, False)
        sessions = {g: ort.InferenceSession(str(d / f"{g}.onnx"), providers=["CPUExecutionProvider"]) for g in GRAPHS}
        tok = GroundingRuntime.load(fp32, CPU, warmup=False).tokenizer
        ids, mask = tok(["the red circle", "the second star from the left"])
        pixels = np.random.default_rng(0).standard_normal((2, 3, 128, 128)).astype(np.float32)
        results.append(run_pipeline(lambda g, feeds, names, s=sessions: s[g].run(names, feeds), manifest,
                                    pixels, ids, mask, [0, 1]))
    a, b = results
    assert b.scores.dtype == np.float32 and b.boxes.dtype == np.float32
    assert np.abs(a.boxes - b.boxes).max() < 0.05  # normalised box coordinates
    assert np.abs(a.scores - b.scores).max() < 0.05
    assert max(validate_artifact(fp16, False).export_max_abs_diff.values()) < 0.5  # logits, vs PyTorch float32


def test_the_runtime_refuses_an_fp16_artifact_without_a_gpu_provider(pair):
    with pytest.raises(ArtifactError, match="float16 artifact runs on CUDA / TensorRT only"):
        GroundingRuntime.load(pair[1], CPU, warmup=False)
