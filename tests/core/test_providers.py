"""onnxruntime provider selection: order, options, TensorRT profiles, and a real CPU session."""

from __future__ import annotations

import dataclasses
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from diffprompt.core.providers import (
    CPU_PROVIDER,
    CUDA_PROVIDER,
    TENSORRT_PROVIDER,
    ProviderConfig,
    available_providers,
    describe,
    profile_shapes,
    resolve_shape,
    select_providers,
    session_options,
)

REPO = Path(__file__).resolve().parents[2]
SHAPES = {"pixel_values": ("batch", 3, 128, 128), "input_ids": ("batch", 16)}
ALL_GPU = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


def tiny_onnx(path: Path) -> Path:
    """out = x * 2 + y with x, y of shape (batch, 4)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 4])
    two = helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])
    nodes = [helper.make_node("Mul", ["x", "two"], ["x2"]), helper.make_node("Add", ["x2", "y"], ["out"])]
    graph = helper.make_graph(nodes, "tiny", [x, y], [out], initializer=[two])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def names(providers):
    return [name for name, _ in providers]


def test_config_defaults_and_validation():
    config = ProviderConfig()
    assert config.preferred == ("tensorrt", "cuda", "cpu")
    assert (config.fp16, config.engine_cache_dir, config.device_id, config.intra_op_threads) == (True, None, 0, None)
    assert (config.min_batch, config.opt_batch, config.max_batch) == (1, 8, 32)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.fp16 = False  # type: ignore[misc]
    for bad in [dict(min_batch=0), dict(opt_batch=64), dict(min_batch=9, opt_batch=8), dict(device_id=-1)]:
        with pytest.raises(ValueError):
            ProviderConfig(**bad)
    with pytest.raises(TypeError):
        ProviderConfig(preferred="cuda")  # type: ignore[arg-type]


def test_tensorrt_cuda_cpu_order_and_options():
    providers = select_providers(ProviderConfig(), SHAPES, available=ALL_GPU)
    assert names(providers) == [TENSORRT_PROVIDER, CUDA_PROVIDER, CPU_PROVIDER]
    trt = providers[0][1]
    assert trt == {
        "device_id": "0",
        "trt_fp16_enable": "True",
        "trt_engine_cache_enable": "False",
        "trt_timing_cache_enable": "False",
        "trt_profile_min_shapes": "pixel_values:1x3x128x128,input_ids:1x16",
        "trt_profile_opt_shapes": "pixel_values:8x3x128x128,input_ids:8x16",
        "trt_profile_max_shapes": "pixel_values:32x3x128x128,input_ids:32x16",
    }
    assert providers[1] == (CUDA_PROVIDER, {"device_id": "0"})
    assert providers[2] == (CPU_PROVIDER, {})
    assert all(isinstance(v, str) for _, options in providers for v in options.values())


def test_engine_cache_dir_is_created_and_used(tmp_path):
    cache = tmp_path / "trt" / "cache"
    config = ProviderConfig(engine_cache_dir=str(cache), fp16=False, device_id=1, min_batch=2, opt_batch=4, max_batch=4)
    providers = select_providers(config, {"x": ("batch", 5)}, available=ALL_GPU)
    trt = dict(providers)[TENSORRT_PROVIDER]
    assert cache.is_dir()
    assert trt["trt_engine_cache_enable"] == "True" and trt["trt_timing_cache_enable"] == "True"
    assert trt["trt_engine_cache_path"] == str(cache) == trt["trt_timing_cache_path"]
    assert trt["trt_fp16_enable"] == "False"
    assert trt["device_id"] == "1" and dict(providers)[CUDA_PROVIDER] == {"device_id": "1"}
    assert (trt["trt_profile_min_shapes"], trt["trt_profile_opt_shapes"], trt["trt_profile_max_shapes"]) == (
        "x:2x5",
        "x:4x5",
        "x:4x5",
    )


def test_cuda_and_cpu_only_skips_tensorrt_with_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="diffprompt.core.providers"):
        providers = select_providers(
            ProviderConfig(), SHAPES, available=["CUDAExecutionProvider", "CPUExecutionProvider"]
        )
    assert providers == [(CUDA_PROVIDER, {"device_id": "0"}), (CPU_PROVIDER, {})]
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert f"{TENSORRT_PROVIDER} requested but not available" in warned
    assert f"{CUDA_PROVIDER} requested" not in warned


def test_cpu_only_host(caplog):
    with caplog.at_level(logging.WARNING, logger="diffprompt.core.providers"):
        providers = select_providers(ProviderConfig(), SHAPES, available=["CPUExecutionProvider"])
    assert providers == [(CPU_PROVIDER, {})]
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert f"{TENSORRT_PROVIDER} requested but not available" in warned
    assert f"{CUDA_PROVIDER} requested but not available" in warned


def test_cpu_is_always_last():
    assert names(select_providers(ProviderConfig(preferred=("cuda",)), SHAPES, available=ALL_GPU)) == [
        CUDA_PROVIDER,
        CPU_PROVIDER,
    ]
    assert names(select_providers(ProviderConfig(preferred=()), SHAPES, available=ALL_GPU)) == [CPU_PROVIDER]
    assert names(select_providers(ProviderConfig(preferred=("cuda", "tensorrt")), SHAPES, available=ALL_GPU)) == [
        CUDA_PROVIDER,
        TENSORRT_PROVIDER,
        CPU_PROVIDER,
    ]
    # "cpu" first means CPU only: it runs every operator, so later entries would never be used.
    assert names(select_providers(ProviderConfig(preferred=("cpu", "cuda")), SHAPES, available=ALL_GPU)) == [
        CPU_PROVIDER
    ]
    # Duplicates and case are normalised.
    assert names(select_providers(ProviderConfig(preferred=("CUDA", "cuda")), SHAPES, available=ALL_GPU)) == [
        CUDA_PROVIDER,
        CPU_PROVIDER,
    ]


def test_unknown_provider_name_is_an_error():
    with pytest.raises(ValueError, match=r"unknown execution provider.*'rocm'.*allowed: tensorrt, cuda, cpu"):
        select_providers(ProviderConfig(preferred=("rocm", "cpu")), SHAPES, available=ALL_GPU)


def test_profile_shapes_and_shape_validation():
    assert profile_shapes(SHAPES, 3) == "pixel_values:3x3x128x128,input_ids:3x16"
    assert resolve_shape(["batch", 7], 2) == (2, 7)
    assert "trt_profile_min_shapes" not in select_providers(ProviderConfig(), {}, available=ALL_GPU)[0][1]
    for bad in [{"x": ("batch", 0)}, {"x": ("batch", 2.5)}, {"x": ()}, {"x": "batch"}, {"a,b": ("batch",)}]:
        with pytest.raises(ValueError):
            select_providers(ProviderConfig(), bad, available=ALL_GPU)
    # Shapes are validated even when TensorRT is not selected, so a CPU host catches bad configs too.
    with pytest.raises(ValueError, match="'x'"):
        profile_shapes({"x": ("batch", True)}, 1)


def test_describe(tmp_path):
    providers = select_providers(ProviderConfig(), SHAPES, available=ALL_GPU)
    assert describe(providers) == "TensorrtExecutionProvider(fp16) > CUDAExecutionProvider > CPUExecutionProvider"
    config = ProviderConfig(engine_cache_dir=str(tmp_path), device_id=1, preferred=("tensorrt",))
    cached = select_providers(config, SHAPES, available=ALL_GPU)
    assert describe(cached) == "TensorrtExecutionProvider(fp16, cache, device 1) > CPUExecutionProvider"
    assert describe(select_providers(config, SHAPES, available=[CPU_PROVIDER])) == "CPUExecutionProvider"
    assert (
        describe(["CUDAExecutionProvider", ("CPUExecutionProvider", {})])
        == "CUDAExecutionProvider > CPUExecutionProvider"
    )
    assert describe([(TENSORRT_PROVIDER, {"trt_fp16_enable": "False"})]) == "TensorrtExecutionProvider"


def test_available_providers_and_session_options():
    available = available_providers()
    assert available == ort.get_available_providers() and CPU_PROVIDER in available
    options = session_options(ProviderConfig(intra_op_threads=1))
    assert isinstance(options, ort.SessionOptions)
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert options.intra_op_num_threads == 1
    assert session_options(ProviderConfig()).intra_op_num_threads == 0  # onnxruntime's default


def test_real_cpu_session_runs_with_selected_providers(tmp_path):
    model = tiny_onnx(tmp_path / "tiny.onnx")
    config = ProviderConfig(intra_op_threads=1)
    providers = select_providers(config, {"x": ("batch", 4), "y": ("batch", 4)})
    assert providers[-1] == (CPU_PROVIDER, {})
    session = ort.InferenceSession(str(model), sess_options=session_options(config), providers=providers)
    assert session.get_providers()[-1] == CPU_PROVIDER
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    y = np.full((3, 4), 0.5, dtype=np.float32)
    (out,) = session.run(None, {"x": x, "y": y})
    np.testing.assert_allclose(out, x * 2 + y)


def test_module_never_imports_torch():
    code = (
        "import sys\n"
        "import diffprompt.core.providers as p\n"
        "assert 'onnxruntime' not in sys.modules, 'onnxruntime must be imported lazily'\n"
        "p.select_providers(p.ProviderConfig(), {'x': ('batch', 4)})\n"
        "p.session_options(p.ProviderConfig())\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


ARENA_PROBE = r"""
import sys
import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from diffprompt.core.providers import ProviderConfig, session_options

n = 6000  # the outer product below is an n x n float32 intermediate: 144 MB of working memory
x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])  # dynamic, like the batch axis
y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [])
axes = [helper.make_tensor("a1", TensorProto.INT64, [1], [1]), helper.make_tensor("a0", TensorProto.INT64, [1], [0])]
nodes = [helper.make_node("Unsqueeze", ["x", "a1"], ["col"]), helper.make_node("Unsqueeze", ["x", "a0"], ["row"]),
         helper.make_node("MatMul", ["col", "row"], ["outer"]), helper.make_node("ReduceSum", ["outer"], ["y"],
                                                                                  keepdims=0)]
model = helper.make_model(helper.make_graph(nodes, "outer", [x], [y], initializer=axes),
                          opset_imports=[helper.make_opsetid("", 17)])
data = model.SerializeToString()
if sys.argv[1] == "shared":
    options = lambda: session_options(ProviderConfig(preferred=("cpu",), intra_op_threads=1))
else:
    def options():
        o = ort.SessionOptions()
        o.intra_op_num_threads = 1
        return o
sessions = [ort.InferenceSession(data, options(), providers=["CPUExecutionProvider"]) for _ in range(2)]
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * 4096
before = rss()
for s in (*sessions, *sessions):  # each twice: working memory must not grow with repeated runs either
    s.run(None, {"x": np.ones(n, np.float32)})
print(rss() - before)
"""


def test_sessions_share_one_cpu_arena():
    """Two sessions run one after the other keep one working set with session_options, two or more without."""
    grown = {}
    for mode in ("own", "shared"):
        proc = subprocess.run([sys.executable, "-c", ARENA_PROBE, mode], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        grown[mode] = int(proc.stdout.split()[-1])
    intermediate = 6000 * 6000 * 4
    assert grown["own"] > 1.7 * intermediate, grown  # each session keeps its own arena at its peak
    assert grown["shared"] < 0.6 * grown["own"], grown  # the second session reuses the first one's memory
