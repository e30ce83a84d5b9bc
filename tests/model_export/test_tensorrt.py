"""TensorRT engine building: naming, capability checks, CLI, and the build logic.

The build logic runs here against a small in-process stand-in for the ``tensorrt`` module
(it reads the real ONNX inputs with ``onnx`` and records what the builder is asked to do);
the real build is ``test_real_build_on_gpu``, which needs a CUDA GPU and TensorRT.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
import types
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from model_export import tensorrt as mt

REPO = Path(__file__).resolve().parents[2]
AVAILABLE, REASON = mt.tensorrt_available()
SHAPES = {"x": ["batch", 4], "y": ["batch", 4]}


def tiny_onnx(path: Path, scale: float = 2.0, op: str = "Mul", width: int | str = 4) -> Path:
    """out = x * scale + y with x, y of shape (batch, width)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", width])
    k = helper.make_tensor("k", TensorProto.FLOAT, [], [scale])
    nodes = [helper.make_node(op, ["x", "k"], ["xk"]), helper.make_node("Add", ["xk", "y"], ["out"])]
    graph = helper.make_graph(nodes, "tiny", [x, y], [out], initializer=[k])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return path


# --------------------------------------------------------------------------- stand-in for `tensorrt`


def fake_tensorrt(version: str = "10.3.0", fast_fp16: bool = True) -> types.ModuleType:
    """The subset of the TensorRT Python API that model_export.tensorrt uses, recording every build."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.builds = []

    class Logger:
        WARNING = "warning"

        def __init__(self, severity=None):
            self.severity = severity

    class ParserError:
        def __init__(self, node, name, desc):
            self._node, self._name, self._desc = node, name, desc

        def node(self):
            return self._node

        def node_name(self):
            return self._name

        def node_operator(self):
            return "Bogus"

        def desc(self):
            return self._desc

        def code(self):
            return 8  # UNSUPPORTED_NODE

    class Network:
        def __init__(self):
            self.inputs = []

        @property
        def num_inputs(self):
            return len(self.inputs)

        def get_input(self, i):
            return self.inputs[i]

    class OnnxParser:
        def __init__(self, network, logger):
            self.network, self.errors = network, []

        def parse_from_file(self, path):
            model = onnx.load(path)
            for value in model.graph.input:
                dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in value.type.tensor_type.shape.dim)
                self.network.inputs.append(types.SimpleNamespace(name=value.name, shape=dims))
            for i, node in enumerate(model.graph.node):
                if node.op_type == "Bogus":
                    self.errors.append(ParserError(i, node.name or f"node{i}", f"No importer registered for op: {i}"))
            return not self.errors

        @property
        def num_errors(self):
            return len(self.errors)

        def get_error(self, i):
            return self.errors[i]

    class Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, min_shape, opt_shape, max_shape):
            self.shapes[name] = (tuple(min_shape), tuple(opt_shape), tuple(max_shape))

    class Config:
        def __init__(self):
            self.flags, self.pools, self.profiles = set(), {}, []

        def set_memory_pool_limit(self, pool, size):
            self.pools[pool] = size

        def set_flag(self, flag):
            self.flags.add(flag)

        def add_optimization_profile(self, profile):
            self.profiles.append(profile)
            return len(self.profiles) - 1

    class Builder:
        platform_has_fast_fp16 = fast_fp16

        def __init__(self, logger):
            self.logger = logger

        def create_network(self, flags=0):
            self.network_flags = flags
            return Network()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            trt.builds.append(types.SimpleNamespace(network=network, config=config, network_flags=self.network_flags))
            return memoryview(f"engine #{len(trt.builds)} {sorted(config.flags)}".encode())

    class Runtime:
        def __init__(self, logger):
            self.logger = logger

        def deserialize_cuda_engine(self, data):
            return types.SimpleNamespace(data=bytes(data)) if data.startswith(b"engine") else None

    trt.Logger, trt.OnnxParser, trt.Builder, trt.Runtime = Logger, OnnxParser, Builder, Runtime
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(EXPLICIT_BATCH=0)
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="workspace")
    trt.BuilderFlag = types.SimpleNamespace(FP16="fp16")
    return trt


@pytest.fixture
def fake_trt(monkeypatch):
    trt = fake_tensorrt()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(mt, "gpu_compute_capability", lambda device_id=0: "8.6")
    return trt


@pytest.fixture
def no_trt_no_gpu(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` raise ImportError
    monkeypatch.setattr(mt, "_compute_capability_cuda_python", lambda device_id: None)
    monkeypatch.setattr(mt.shutil, "which", lambda name: None)


# --------------------------------------------------------------------------- pure helpers


def test_engine_filename():
    assert mt.engine_filename("exports/dit.onnx", "8.6", "10.3.0", True) == "dit.sm86.trt10.3.0.fp16.engine"
    assert mt.engine_filename(Path("a/b/encoder.onnx"), "12.0", "10.9.0.34", False) == (
        "encoder.sm120.trt10.9.0.34.fp32.engine"
    )
    names = {
        mt.engine_filename("dit.onnx", cc, v, fp16)
        for cc in ("8.6", "8.9")
        for v in ("10.3.0", "10.4.0")
        for fp16 in (True, False)
    }
    assert len(names) == 8  # every GPU / TensorRT version / precision gets its own file
    for cc, version in [("86", "10.3.0"), ("sm_86", "10.3.0"), ("8.6", ""), ("8.6", "../10"), ("8.6", "10/3")]:
        with pytest.raises(ValueError):
            mt.engine_filename("dit.onnx", cc, version, True)


def test_sidecar_path():
    assert mt.sidecar_path("/e/dit.sm86.trt10.3.0.fp16.engine") == Path("/e/dit.sm86.trt10.3.0.fp16.engine.json")


# --------------------------------------------------------------------------- capability checks


def test_tensorrt_available_here_reports_why_not():
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("tensorrt is installed on this host")
    available, reason = mt.tensorrt_available()
    assert available is False
    assert "tensorrt" in reason and "cannot be imported" in reason


def test_tensorrt_available_false_without_package_or_gpu(no_trt_no_gpu):
    available, reason = mt.tensorrt_available()
    assert available is False
    assert "tensorrt Python package cannot be imported" in reason
    assert "no CUDA GPU found" in reason
    with pytest.raises(RuntimeError, match="no CUDA GPU found"):
        mt.gpu_compute_capability()


def test_tensorrt_available_true_with_package_and_gpu(fake_trt):
    available, description = mt.tensorrt_available()
    assert available is True
    assert "TensorRT 10.3.0" in description and "8.6" in description


def fake_nvidia_smi(tmp_path: Path, monkeypatch, body: str) -> Path:
    """Put an `nvidia-smi` shell script on PATH that logs its arguments to args.txt."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "nvidia-smi"
    script.write_text(f'#!/bin/sh\necho "$@" > "{tmp_path}/args.txt"\n{body}\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.setattr(mt, "_compute_capability_cuda_python", lambda device_id: None)
    return tmp_path / "args.txt"


def test_gpu_compute_capability_via_nvidia_smi(tmp_path, monkeypatch):
    args = fake_nvidia_smi(tmp_path, monkeypatch, 'echo "8.9"')
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert mt.gpu_compute_capability() == "8.9"
    assert args.read_text().split() == ["--query-gpu=compute_cap", "--format=csv,noheader", "-i", "0"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-1234, 3")
    assert mt.gpu_compute_capability(1) == "8.9"
    assert args.read_text().split()[-2:] == ["-i", "3"]  # CUDA device 1 is physical GPU 3
    with pytest.raises(RuntimeError, match="not visible"):
        mt.gpu_compute_capability(2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(RuntimeError, match="hides all GPUs"):
        mt.gpu_compute_capability()


def test_gpu_compute_capability_nvidia_smi_failures(tmp_path, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    fake_nvidia_smi(tmp_path, monkeypatch, 'echo "No devices were found" >&2; exit 6')
    with pytest.raises(RuntimeError, match="exited with 6: No devices were found"):
        mt.gpu_compute_capability()
    available, reason = mt.tensorrt_available()
    assert not available and "No devices were found" in reason


def test_gpu_compute_capability_rejects_garbage(tmp_path, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    fake_nvidia_smi(tmp_path, monkeypatch, 'echo "Field \\"compute_cap\\" is not a valid field to query."')
    with pytest.raises(RuntimeError, match="did not report a compute capability"):
        mt.gpu_compute_capability()


# --------------------------------------------------------------------------- build logic (stand-in TensorRT)


def test_build_engine_writes_engine_and_sidecar(tmp_path, fake_trt):
    model = tiny_onnx(tmp_path / "dit.onnx")
    out = tmp_path / "engines"
    engine = mt.build_engine(model, out, SHAPES, 1, 8, 32, fp16=True, workspace_gb=1.5)

    assert engine == out / "dit.sm86.trt10.3.0.fp16.engine"
    assert engine.read_bytes() == b"engine #1 ['fp16']"
    assert sorted(p.name for p in out.iterdir()) == [engine.name, engine.name + ".json"]  # no temp files left
    (build,) = fake_trt.builds
    assert build.network_flags == 0  # TensorRT 10: explicit batch is implicit
    assert build.config.flags == {"fp16"}
    assert build.config.pools == {"workspace": int(1.5 * (1 << 30))}
    (profile,) = build.config.profiles
    assert profile.shapes == {"x": ((1, 4), (8, 4), (32, 4)), "y": ((1, 4), (8, 4), (32, 4))}

    meta = json.loads(mt.sidecar_path(engine).read_text())
    assert meta["tensorrt_version"] == "10.3.0" and meta["compute_capability"] == "8.6"
    assert meta["fp16"] is True and meta["fp16_enabled"] is True
    assert meta["onnx_sha256"] == hashlib.sha256(model.read_bytes()).hexdigest()
    assert meta["engine_sha256"] == hashlib.sha256(engine.read_bytes()).hexdigest()
    assert meta["input_shapes"] == SHAPES
    assert (meta["min_batch"], meta["opt_batch"], meta["max_batch"]) == (1, 8, 32)
    assert meta["profile"]["max"] == {"x": [32, 4], "y": [32, 4]}


def test_build_engine_reuses_existing_engine(tmp_path, fake_trt):
    model = tiny_onnx(tmp_path / "dit.onnx")
    first = mt.build_engine(model, tmp_path, SHAPES, 1, 8, 32)
    second = mt.build_engine(model, tmp_path, SHAPES, 1, 8, 32)
    assert first == second and len(fake_trt.builds) == 1

    # A different profile or different ONNX content must not silently reuse the old engine.
    mt.build_engine(model, tmp_path, SHAPES, 1, 8, 16)
    assert len(fake_trt.builds) == 2
    tiny_onnx(model, scale=3.0)
    mt.build_engine(model, tmp_path, SHAPES, 1, 8, 16)
    assert len(fake_trt.builds) == 3
    # An engine without its sidecar is rebuilt too.
    mt.sidecar_path(first).unlink()
    mt.build_engine(model, tmp_path, SHAPES, 1, 8, 16)
    assert len(fake_trt.builds) == 4 and mt.sidecar_path(first).is_file()


def test_build_engine_fp32_and_platform_without_fast_fp16(tmp_path, monkeypatch, fake_trt):
    model = tiny_onnx(tmp_path / "dit.onnx")
    engine = mt.build_engine(model, tmp_path, SHAPES, 1, 1, 1, fp16=False)
    assert engine.name == "dit.sm86.trt10.3.0.fp32.engine"
    assert fake_trt.builds[-1].config.flags == set()

    slow = fake_tensorrt(fast_fp16=False)
    monkeypatch.setitem(sys.modules, "tensorrt", slow)
    engine = mt.build_engine(model, tmp_path / "slow", SHAPES, 1, 1, 1, fp16=True)
    assert slow.builds[-1].config.flags == set()
    assert json.loads(mt.sidecar_path(engine).read_text())["fp16_enabled"] is False


def test_build_engine_reports_every_parser_error(tmp_path, fake_trt):
    model = tiny_onnx(tmp_path / "bad.onnx", op="Bogus")
    with pytest.raises(RuntimeError) as info:
        mt.build_engine(model, tmp_path / "out", SHAPES, 1, 8, 32)
    message = str(info.value)
    assert "could not parse" in message and "1 error(s)" in message
    assert "No importer registered for op: 0" in message and "Bogus" in message
    assert not fake_trt.builds
    assert not any((tmp_path / "out").glob("*.engine"))


def test_build_engine_checks_shapes_against_onnx_inputs(tmp_path, fake_trt):
    model = tiny_onnx(tmp_path / "dit.onnx")
    with pytest.raises(ValueError, match=r"missing \['y'\]"):
        mt.build_engine(model, tmp_path, {"x": ["batch", 4]}, 1, 8, 32)
    with pytest.raises(ValueError, match=r"unknown \['z'\]"):
        mt.build_engine(model, tmp_path, {**SHAPES, "z": ["batch", 1]}, 1, 8, 32)
    with pytest.raises(ValueError, match="cannot take min shape"):
        mt.build_engine(model, tmp_path, {"x": ["batch", 5], "y": ["batch", 4]}, 1, 8, 32)
    with pytest.raises(ValueError, match="min_batch <= opt_batch"):
        mt.build_engine(model, tmp_path, SHAPES, 8, 4, 32)
    with pytest.raises(FileNotFoundError):
        mt.build_engine(tmp_path / "missing.onnx", tmp_path, SHAPES, 1, 8, 32)
    assert not fake_trt.builds


def test_load_engine_if_compatible(tmp_path, monkeypatch, fake_trt):
    engine = mt.build_engine(tiny_onnx(tmp_path / "dit.onnx"), tmp_path, SHAPES, 1, 8, 32)
    loaded = mt.load_engine_if_compatible(engine)
    assert loaded.engine.data == engine.read_bytes() and loaded.metadata["compute_capability"] == "8.6"

    monkeypatch.setattr(mt, "gpu_compute_capability", lambda device_id=0: "8.9")
    with pytest.raises(mt.EngineMismatchError, match=r"compute capability 8\.6 \(engine\) != 8\.9 \(this GPU\)"):
        mt.load_engine_if_compatible(engine)
    monkeypatch.setattr(mt, "gpu_compute_capability", lambda device_id=0: "8.6")
    fake_trt.__version__ = "10.4.0"
    with pytest.raises(mt.EngineMismatchError, match=r"TensorRT version 10\.3\.0 \(engine\) != 10\.4\.0 \(installed\)"):
        mt.load_engine_if_compatible(engine)
    fake_trt.__version__ = "10.3.0"
    engine.write_bytes(engine.read_bytes()[:-1])
    with pytest.raises(mt.EngineMismatchError, match="sha256 differs"):
        mt.load_engine_if_compatible(engine)
    mt.sidecar_path(engine).unlink()
    with pytest.raises(mt.EngineMismatchError, match="no sidecar"):
        mt.check_engine_compatible(engine, "8.6", "10.3.0")


# --------------------------------------------------------------------------- CLI


def write_shapes(tmp_path: Path, spec, name: str = "shapes.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(spec))
    return path


def test_cli_exits_2_when_tensorrt_or_gpu_missing(tmp_path, capsys, no_trt_no_gpu):
    model = tiny_onnx(tmp_path / "dit.onnx")
    shapes = write_shapes(tmp_path, {"dit": SHAPES})
    code = mt.main(["--onnx", str(model), "--out", str(tmp_path / "e"), "--shape-json", str(shapes)])
    err = capsys.readouterr().err
    assert code == 2
    assert "cannot build TensorRT engines" in err
    assert "tensorrt Python package cannot be imported" in err and "no CUDA GPU found" in err
    assert not (tmp_path / "e").exists()


def test_cli_as_module_on_this_host(tmp_path):
    if AVAILABLE:
        pytest.skip("TensorRT and a GPU are available here")
    model = tiny_onnx(tmp_path / "dit.onnx")
    shapes = write_shapes(tmp_path, SHAPES)
    cmd = [sys.executable, "-m", "model_export.tensorrt", "--onnx", str(model), "--out", str(tmp_path / "e")]
    cmd += ["--shape-json", str(shapes), "--min-batch", "1", "--opt-batch", "8", "--max-batch", "32", "--no-fp16"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert REASON in proc.stderr


def test_cli_builds_every_model(tmp_path, capsys, fake_trt):
    dit = tiny_onnx(tmp_path / "dit.onnx")
    enc = tiny_onnx(tmp_path / "encoder.onnx", width=6)
    shapes = write_shapes(tmp_path, {"dit": SHAPES, "encoder.onnx": {"x": ["batch", 6], "y": ["batch", 6]}})
    out = tmp_path / "engines"
    argv = ["--onnx", str(dit), str(enc), "--out", str(out), "--shape-json", str(shapes)]
    assert mt.main([*argv, "--min-batch", "2", "--opt-batch", "4", "--max-batch", "16", "--no-fp16"]) == 0
    printed = capsys.readouterr().out.split()
    assert str(out / "dit.sm86.trt10.3.0.fp32.engine") in printed
    assert str(out / "encoder.sm86.trt10.3.0.fp32.engine") in printed
    assert [b.config.profiles[0].shapes["x"] for b in fake_trt.builds] == [
        ((2, 4), (4, 4), (16, 4)),
        ((2, 6), (4, 6), (16, 6)),
    ]


def test_cli_rejects_bad_arguments(tmp_path, capsys, fake_trt):
    model = tiny_onnx(tmp_path / "dit.onnx")
    other = tiny_onnx(tmp_path / "other.onnx")
    base = ["--out", str(tmp_path / "e")]
    flat = str(write_shapes(tmp_path, SHAPES, "flat.json"))
    per_model = str(write_shapes(tmp_path, {"dit": SHAPES}, "per_model.json"))
    bad_dim = str(write_shapes(tmp_path, {"x": ["b", 4], "y": ["batch", 4]}, "bad_dim.json"))
    (tmp_path / "broken.json").write_text("{not json")
    cases = [
        (["--onnx", str(tmp_path / "nope.onnx"), "--shape-json", flat], "ONNX file(s) not found"),
        (["--onnx", str(model), str(other), "--shape-json", per_model], "no entry for 'other'"),
        (["--onnx", str(model), str(other), "--shape-json", flat], "several --onnx"),
        (["--onnx", str(model), "--shape-json", bad_dim], "'batch'"),
        (["--onnx", str(model), "--shape-json", str(tmp_path / "broken.json")], "broken.json"),
        (["--onnx", str(model), "--shape-json", str(tmp_path / "absent.json")], "absent.json"),
        (["--onnx", str(model), "--shape-json", flat, "--min-batch", "9"], "min_batch"),
    ]
    for argv, expected in cases:
        with pytest.raises(SystemExit) as info:
            mt.main([*argv, *base])
        assert info.value.code == 2
        assert expected in capsys.readouterr().err
    assert not fake_trt.builds


def test_cli_reports_build_failure(tmp_path, capsys, fake_trt):
    model = tiny_onnx(tmp_path / "bad.onnx", op="Bogus")
    argv = ["--onnx", str(model), "--out", str(tmp_path / "e"), "--shape-json", str(write_shapes(tmp_path, SHAPES))]
    assert mt.main(argv) == 1
    assert "could not parse" in capsys.readouterr().err


def test_module_imports_without_tensorrt_or_torch():
    code = "import sys, model_export.tensorrt\nassert 'tensorrt' not in sys.modules and 'torch' not in sys.modules\n"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


# --------------------------------------------------------------------------- real GPU build


@pytest.mark.gpu
@pytest.mark.skipif(not AVAILABLE, reason=f"needs a CUDA GPU + the tensorrt package ({REASON})")
def test_real_build_on_gpu(tmp_path):
    import tensorrt as trt

    model = tiny_onnx(tmp_path / "dit.onnx")
    engine_path = mt.build_engine(model, tmp_path / "engines", SHAPES, 1, 2, 4, fp16=True, workspace_gb=0.5)
    assert engine_path.name == mt.engine_filename(model, mt.gpu_compute_capability(), trt.__version__, True)
    mtime = engine_path.stat().st_mtime_ns
    assert mt.build_engine(model, tmp_path / "engines", SHAPES, 1, 2, 4, fp16=True) == engine_path
    assert engine_path.stat().st_mtime_ns == mtime  # reused, not rebuilt

    loaded = mt.load_engine_if_compatible(engine_path)
    engine = loaded.engine
    names = {engine.get_tensor_name(i) for i in range(engine.num_io_tensors)}
    assert names == {"x", "y", "out"}
    assert [tuple(s) for s in engine.get_tensor_profile_shape("x", 0)] == [(1, 4), (2, 4), (4, 4)]
