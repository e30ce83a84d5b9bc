"""Triton model repository from an artifact: configs parse with Triton's own schema, match the ONNX
graphs, and the BLS model's numpy pipeline (onnxruntime standing in for the BLS calls) equals
GroundingRuntime.ground. Triton itself does not run here (no GPU host, no server binary)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
import onnxruntime as ort
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from diffprompt.core.manifest import ArtifactError
from diffprompt.core.providers import ProviderConfig
from diffprompt.core.runtime import GroundingRuntime
from diffprompt.model_export.export import build_parser as export_parser
from diffprompt.model_export.export import main as export_main
from diffprompt.model_export.triton import VENDORED_CORE, build_parser, main, write_triton_repository

REPO_ROOT = Path(__file__).resolve().parents[2]
CPU = ProviderConfig(preferred=("cpu",), intra_op_threads=1)
GRAPHS = {"condition_encoder", "denoiser", "prompt_builder", "grounding"}
NUMPY = {"TYPE_FP32": np.float32, "TYPE_INT64": np.int64}
ONNX_TYPES = {onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.INT64: "TYPE_INT64"}
SEEDS = [5, 6, 7, 11]


@pytest.fixture(scope="module")
def artifacts(tiny_pipeline_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("artifacts")
    foundation = (tiny_pipeline_dir / ".." / "foundation").resolve()
    for args in (["--pipeline", str(tiny_pipeline_dir), "--steps", "3", "--name", "tiny"],
                 ["--pipeline", str(foundation), "--name", "found"]):
        assert export_main(export_parser().parse_args([*args, "--out", str(out), "--threads", "1",
                                                       "--no-progress"])) == 0
    return {"diffprompt": out / "tiny-3steps", "foundation": out / "found"}


@pytest.fixture(scope="module")
def repos(artifacts, tmp_path_factory):
    """Three repositories of the Diff-Prompt artifact: GPU (default), CPU, GPU + TensorRT."""
    root = tmp_path_factory.mktemp("triton")
    return {
        "gpu": write_triton_repository(artifacts["diffprompt"], root / "gpu"),
        "cpu": write_triton_repository(artifacts["diffprompt"], root / "cpu", max_batch_size=4,
                                       preferred_batch_sizes=(2,), max_queue_delay_us=500, instance_kind="KIND_CPU"),
        "trt": write_triton_repository(artifacts["diffprompt"], root / "trt", tensorrt_accelerator=True),
    }


@pytest.fixture(scope="module")
def runtime(artifacts):
    return GroundingRuntime.load(artifacts["diffprompt"], CPU, warmup=False)


def parse_config(path: Path) -> model_config_pb2.ModelConfig:
    """config.pbtxt -> Triton's ModelConfig protobuf (raises on anything the schema does not know)."""
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def type_name(data_type: int) -> str:
    return model_config_pb2.DataType.Name(data_type)


def load_bls_module(repo: Path, tag: str):
    """Import <repo>/diffprompt/1/model.py as a fresh module registered in sys.modules (Triton's stub
    does a plain `import model` with the version directory on sys.path)."""
    spec = importlib.util.spec_from_file_location(f"triton_bls_model_{tag}", repo / "diffprompt" / "1" / "model.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


class OnnxruntimeTriton:
    """The repository's ONNX models run with onnxruntime behind a BLS-shaped call, enforcing each
    config.pbtxt tensor contract (names, data types, batch + dims, reshape) the way Triton does."""

    def __init__(self, repo: Path):
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        self.models = {}
        for path in sorted(repo.glob("*/config.pbtxt")):
            config = parse_config(path)
            if config.platform == "onnxruntime_onnx":
                session = ort.InferenceSession(str(path.parent / "1" / "model.onnx"), options,
                                               providers=["CPUExecutionProvider"])
                self.models[config.name] = (config, session)
        self.calls: list[tuple[str, int]] = []

    def __call__(self, model_name: str, inputs: dict[str, np.ndarray], output_names: list[str]) -> list[np.ndarray]:
        config, session = self.models[model_name]
        declared_in = {t.name: t for t in config.input}
        assert set(inputs) == set(declared_in), (model_name, sorted(inputs))
        (batch,) = {len(a) for a in inputs.values()}
        assert 1 <= batch <= config.max_batch_size
        feeds = {}
        for name, array in inputs.items():
            t = declared_in[name]
            assert array.dtype == NUMPY[type_name(t.data_type)], (model_name, name, array.dtype)
            assert array.shape == (batch, *t.dims), (model_name, name, array.shape, list(t.dims))
            feeds[name] = array.reshape(batch, *t.reshape.shape) if t.HasField("reshape") else array
        declared_out = {t.name: t for t in config.output}
        assert set(output_names) <= set(declared_out), (model_name, output_names)
        outputs = session.run(output_names, feeds)
        for name, out in zip(output_names, outputs):
            t = declared_out[name]
            assert out.dtype == NUMPY[type_name(t.data_type)], (model_name, name, out.dtype)
            assert out.shape == (batch, *t.dims), (model_name, name, out.shape, list(t.dims))
        self.calls.append((model_name, batch))
        return outputs


def example_batch(runtime: GroundingRuntime, n: int = 4):
    texts = ["the red circle", "the second star from the left", "the small blue square", "the blue circle"]
    ids, mask = runtime.tokenizer(texts[:n])
    pixels = np.random.default_rng(3).standard_normal((n, 3, 128, 128)).astype(np.float32)
    return pixels, ids, mask


def assert_matches_runtime(got: dict, want, rows=slice(None), rtol=1e-5, atol=1e-6):
    np.testing.assert_allclose(got["scores"], want.scores[rows], rtol=rtol, atol=atol)
    np.testing.assert_allclose(got["boxes"], want.boxes[rows], rtol=rtol, atol=atol)
    np.testing.assert_allclose(got["mask_logits"], want.mask_logits[rows], rtol=rtol, atol=atol)


# -- layout and configs --------------------------------------------------------------------------


def test_repository_layout(repos, artifacts):
    repo = repos["gpu"]
    assert {p.name for p in repo.iterdir() if p.is_dir()} == GRAPHS | {"diffprompt"}
    for graph in GRAPHS:  # the same graph and tensors, its weights now in its own model.onnx.data
        assert sorted(p.name for p in (repo / graph / "1").iterdir()) == ["model.onnx", "model.onnx.data"]
        copied, original = (onnx.load(str(d / f)) for d, f in ((repo / graph / "1", "model.onnx"),
                                                               (artifacts["diffprompt"], f"{graph}.onnx")))
        assert copied.graph.node == original.graph.node
        assert ({t.name: onnx.numpy_helper.to_array(t).tobytes() for t in copied.graph.initializer}
                == {t.name: onnx.numpy_helper.to_array(t).tobytes() for t in original.graph.initializer})
    bls = repo / "diffprompt" / "1"
    assert sorted(p.name for p in bls.iterdir() if p.is_file()) == ["manifest.json", "model.py"]
    assert (bls / "model.py").read_text() == (REPO_ROOT / "model_export" / "triton_model.py").read_text()
    vendored = bls / "diffprompt" / "core"
    assert sorted(p.name for p in vendored.iterdir()) == sorted(["__init__.py", *VENDORED_CORE])
    for name in VENDORED_CORE:  # the very modules the onnxruntime service runs
        assert (vendored / name).read_text() == (REPO_ROOT / "diffprompt" / "core" / name).read_text()
    assert json.loads((bls / "manifest.json").read_text()) == json.loads((artifacts["diffprompt"] / "manifest.json")
                                                                         .read_text())
    readme = (repo / "README.md").read_text()
    assert "tritonserver --model-repository" in readme and all(f"`{m}`" in readme for m in GRAPHS | {"diffprompt"})
    assert (repo / "tokenizer.json").exists() and not list(repo.parent.glob("*.tmp"))


@pytest.mark.parametrize("which", ["gpu", "cpu", "trt"])
def test_every_config_parses_with_the_triton_schema(repos, which):
    repo = repos[which]
    batch, preferred, delay = {"cpu": (4, [2], 500)}.get(which, (32, [8, 16], 2000))
    configs = {p.parent.name: parse_config(p) for p in repo.glob("*/config.pbtxt")}
    assert set(configs) == GRAPHS | {"diffprompt"}
    for name, config in configs.items():
        assert config.name == name
        assert config.max_batch_size == batch
        assert list(config.dynamic_batching.preferred_batch_size) == preferred
        assert config.dynamic_batching.max_queue_delay_microseconds == delay
        assert len(config.instance_group) == 1 and config.instance_group[0].count == 1
        kind = model_config_pb2.ModelInstanceGroup.Kind.Name(config.instance_group[0].kind)
        accelerators = config.optimization.execution_accelerators.gpu_execution_accelerator
        if name == "diffprompt":
            assert config.backend == "python" and not config.platform and kind == "KIND_CPU"
            assert config.parameters["artifact_model_version"].string_value.startswith("tiny-")
            assert not accelerators
        else:
            assert config.platform == "onnxruntime_onnx" and not config.backend
            assert kind == ("KIND_CPU" if which == "cpu" else "KIND_GPU")
            if which == "trt":
                assert [a.name for a in accelerators] == ["tensorrt"]
                assert accelerators[0].parameters["precision_mode"] == "FP16"
            else:
                assert not accelerators


def test_a_config_with_an_unknown_field_does_not_parse(repos):
    """The schema check has teeth: a misspelt field is rejected by Triton's protobuf."""
    text = (repos["gpu"] / "grounding" / "config.pbtxt").read_text().replace("max_batch_size", "max_batchsize")
    with pytest.raises(text_format.ParseError):
        text_format.Parse(text, model_config_pb2.ModelConfig())


def test_onnx_model_configs_match_their_graphs(repos):
    repo = repos["gpu"]
    for graph in sorted(GRAPHS):
        config = parse_config(repo / graph / "config.pbtxt")
        model = onnx.load(str(repo / graph / "1" / "model.onnx"))
        initializers = {i.name for i in model.graph.initializer}
        for declared, values in ((config.input, [v for v in model.graph.input if v.name not in initializers]),
                                 (config.output, list(model.graph.output))):
            assert [t.name for t in declared] == [v.name for v in values], graph
            for t, v in zip(declared, values):
                tensor = v.type.tensor_type
                assert type_name(t.data_type) == ONNX_TYPES[tensor.elem_type], (graph, t.name)
                dims = list(t.reshape.shape) if t.HasField("reshape") else list(t.dims)
                assert len(dims) == len(tensor.shape.dim) - 1, (graph, t.name)
                assert tensor.shape.dim[0].dim_param, (graph, t.name, "batch axis must be dynamic")
                for d, onnx_dim in zip(dims, tensor.shape.dim[1:]):
                    if onnx_dim.HasField("dim_value"):
                        assert d == onnx_dim.dim_value, (graph, t.name, dims)
                if t.HasField("reshape"):
                    assert list(t.dims) == [1] and dims == []


def test_onnx_models_run_with_the_shapes_their_configs_declare(repos):
    """Every declared output dim (also those the graph leaves symbolic) is what onnxruntime returns."""
    models = OnnxruntimeTriton(repos["gpu"])
    rng = np.random.default_rng(0)
    for name, (config, _) in models.models.items():
        feeds = {}
        for t in config.input:
            dtype = NUMPY[type_name(t.data_type)]
            if dtype == np.int64:
                feeds[t.name] = rng.integers(1, 5, size=(3, *t.dims)).astype(np.int64)
            else:
                feeds[t.name] = rng.standard_normal((3, *t.dims)).astype(np.float32)
        models(name, feeds, [t.name for t in config.output])  # asserts dtypes and (batch, *dims)
    assert {m for m, _ in models.calls} == GRAPHS


def test_bls_config_matches_the_graphs(repos):
    repo = repos["gpu"]
    bls = parse_config(repo / "diffprompt" / "config.pbtxt")
    enc = {t.name: t for t in parse_config(repo / "condition_encoder" / "config.pbtxt").input}
    ground = {t.name: t for t in parse_config(repo / "grounding" / "config.pbtxt").output}
    masks = {t.name: t for t in parse_config(repo / "prompt_builder" / "config.pbtxt").output}["mask_logits"]
    inputs = {t.name: (type_name(t.data_type), list(t.dims)) for t in bls.input}
    outputs = {t.name: (type_name(t.data_type), list(t.dims)) for t in bls.output}
    assert inputs == {"pixel_values": ("TYPE_FP32", [3, 128, 128]), "input_ids": ("TYPE_INT64", [16]),
                      "attention_mask": ("TYPE_INT64", [16]), "seed": ("TYPE_INT64", [1])}
    assert all(inputs[n] == (type_name(enc[n].data_type), list(enc[n].dims)) for n in enc)
    assert outputs == {"scores": ("TYPE_FP32", list(ground["logits"].dims)),
                       "boxes": ("TYPE_FP32", list(ground["boxes"].dims)),
                       "mask_logits": ("TYPE_FP32", list(masks.dims)[-2:])}
    assert outputs["scores"][1] == [64] and outputs["mask_logits"][1] == [16, 16]


# -- the BLS model's pipeline ----------------------------------------------------------------------


def test_bls_pipeline_equals_the_onnxruntime_runtime(repos, runtime):
    bls = load_bls_module(repos["gpu"], "pipeline")
    spec = bls.load_manifest(repos["gpu"] / "diffprompt" / "1" / "manifest.json")
    assert len(spec.sampler.schedule) == 3 and spec.sampler.prediction_type == "sample"
    assert spec.sampler.clip_sample_range == 3.0
    pixels, ids, mask = example_batch(runtime)
    infer = OnnxruntimeTriton(repos["gpu"])
    got = bls.run_rows(infer, spec, pixels, ids, mask, SEEDS)
    want = runtime.ground(pixels, ids, mask, SEEDS)
    assert_matches_runtime(got, want)
    assert got["scores"].dtype == got["boxes"].dtype == got["mask_logits"].dtype == np.float32
    assert [m for m, _ in infer.calls] == ["condition_encoder", *["denoiser"] * 3, "prompt_builder", "grounding"]
    other = bls.run_rows(infer, spec, pixels, ids, mask, [99, *SEEDS[1:]])  # the seed reaches the noise
    assert not np.allclose(other["mask_logits"][0], got["mask_logits"][0])
    np.testing.assert_allclose(other["mask_logits"][1:], got["mask_logits"][1:], rtol=1e-5, atol=1e-6)


def test_bls_batches_requests_and_splits_them_back(repos, runtime):
    """Requests of 1, 2 and 1 rows, max batch 3: one chunk of 3 rows, one of 1, results per request."""
    bls = load_bls_module(repos["cpu"], "batched")
    spec = bls.load_manifest(repos["cpu"] / "diffprompt" / "1" / "manifest.json")
    pixels, ids, mask = example_batch(runtime)
    seeds = np.asarray(SEEDS, dtype=np.int64)[:, None]
    bounds = [(0, 1), (1, 3), (3, 4)]
    requests = [{"pixel_values": pixels[a:b], "input_ids": ids[a:b], "attention_mask": mask[a:b],
                 "seed": seeds[a:b]} for a, b in bounds]
    infer = OnnxruntimeTriton(repos["cpu"])
    results = bls.run_batched(infer, spec, requests, max_batch_size=3)
    assert sorted({b for m, b in infer.calls}) == [1, 3]
    want = runtime.ground(pixels, ids, mask, SEEDS)
    assert len(results) == 3
    for (a, b), result in zip(bounds, results):
        assert result["scores"].shape == (b - a, 64) and result["mask_logits"].shape == (b - a, 16, 16)
        assert_matches_runtime(result, want, slice(a, b), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="seed must have shape"):
        bls.run_batched(infer, spec, [{**requests[0], "seed": seeds[:1, 0]}], 3)


def fake_pb_utils(infer: OnnxruntimeTriton) -> types.ModuleType:
    """A stand-in for triton_python_backend_utils with the documented surface model.py uses;
    BLS calls go to onnxruntime (`infer`). Tensors are copied on construction, as Triton does."""
    pb = types.ModuleType("triton_python_backend_utils")

    class Tensor:
        def __init__(self, name, array):
            self._name, self._array = name, np.array(array, copy=True)

        def name(self):
            return self._name

        def as_numpy(self):
            return self._array

        def is_cpu(self):
            return True

    class TritonError:
        def __init__(self, message):
            self._message = message

        def message(self):
            return self._message

    class InferenceResponse:
        def __init__(self, output_tensors, error=None):
            self._outputs, self._error = list(output_tensors), error

        def output_tensors(self):
            return self._outputs

        def has_error(self):
            return self._error is not None

        def error(self):
            return self._error

    class InferenceRequest:
        def __init__(self, model_name, requested_output_names, inputs, preferred_memory=None):
            self.model_name, self.requested = model_name, list(requested_output_names)
            self._inputs, self.preferred_memory = list(inputs), preferred_memory

        def inputs(self):
            return self._inputs

        def exec(self):
            assert self.preferred_memory == ("cpu", 0)
            if self.model_name not in infer.models:
                return InferenceResponse([], TritonError(f"Request for unknown model: '{self.model_name}'"))
            arrays = infer(self.model_name, {t.name(): t.as_numpy() for t in self._inputs}, self.requested)
            return InferenceResponse([Tensor(n, a) for n, a in zip(self.requested, arrays)])

    def by_name(tensors, name):
        return next((t for t in tensors if t.name() == name), None)

    pb.Tensor, pb.TritonError, pb.InferenceRequest, pb.InferenceResponse = (Tensor, TritonError, InferenceRequest,
                                                                            InferenceResponse)
    pb.PreferredMemory = lambda kind, device: (kind, device)
    pb.TRITONSERVER_MEMORY_CPU = "cpu"
    pb.get_input_tensor_by_name = lambda request, name: by_name(request.inputs(), name)
    pb.get_output_tensor_by_name = lambda response, name: by_name(response.output_tensors(), name)
    return pb


def test_triton_python_model_execute_with_a_stand_in_backend(repos, runtime, monkeypatch):
    """initialize/execute/BLS glue of model.py: responses per request, a malformed request fails alone."""
    repo = repos["gpu"]
    infer = OnnxruntimeTriton(repo)
    pb = fake_pb_utils(infer)
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", pb)
    bls = load_bls_module(repo, "execute")
    model = bls.TritonPythonModel()
    model.initialize({"model_config": json.dumps({"name": "diffprompt", "max_batch_size": 2}),
                      "model_instance_kind": "CPU", "model_version": "1", "model_repository": str(repo / "diffprompt"),
                      "model_name": "diffprompt"})
    pixels, ids, mask = example_batch(runtime)
    seeds = np.asarray(SEEDS, dtype=np.int64)[:, None]

    def request(rows, seed=None):
        tensors = {"pixel_values": pixels[rows], "input_ids": ids[rows], "attention_mask": mask[rows],
                   "seed": seeds[rows] if seed is None else seed}
        return pb.InferenceRequest("diffprompt", list(bls.OUTPUTS), [pb.Tensor(k, v) for k, v in tensors.items()])

    requests = [request(slice(0, 3)), request(slice(1, 2), seed=np.array([[1, 2]])), request(slice(3, 4))]
    responses = model.execute(requests)
    assert len(responses) == 3
    assert responses[1].has_error() and "seed must have shape" in responses[1].error().message()
    want = runtime.ground(pixels, ids, mask, SEEDS)
    for response, rows in ((responses[0], slice(0, 3)), (responses[2], slice(3, 4))):
        assert not response.has_error()
        got = {n: pb.get_output_tensor_by_name(response, n).as_numpy() for n in bls.OUTPUTS}
        assert_matches_runtime(got, want, rows, rtol=1e-4, atol=1e-5)
    assert max(b for _, b in infer.calls) == 2  # 4 good rows in chunks of max_batch_size 2

    del infer.models["denoiser"]  # a failing BLS call fails every request of the batch with its message
    responses = model.execute([request(slice(0, 1)), request(slice(1, 2))])
    assert all(r.has_error() and "unknown model: 'denoiser'" in r.error().message() for r in responses)


def test_the_bls_model_imports_its_vendored_core_and_numpy_only(repos):
    """Inside Triton, model.py is imported with its version directory on sys.path: it must take the
    pipeline from the vendored copy, and pull in nothing beyond numpy (no PIL, tokenizers, onnxruntime, torch)."""
    version_dir = repos["gpu"] / "diffprompt" / "1"
    code = ("import sys, model\n"
            "import diffprompt.core.pipeline as p\n"
            "print(p.__file__)\n"
            "print(sorted(m for m in ('PIL', 'tokenizers', 'onnxruntime', 'torch') if m in sys.modules))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=version_dir, capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(version_dir)})
    assert proc.returncode == 0, proc.stderr
    where, heavy = proc.stdout.splitlines()
    assert Path(where).resolve().is_relative_to(version_dir.resolve())
    assert heavy == "[]"


def test_generated_model_py_passes_the_project_lint(repos):
    ruff = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    if not Path(ruff).exists():
        pytest.fail("ruff is not installed: it is part of the dev extra")
    proc = subprocess.run([ruff, "check", "--no-cache", "--config", str(REPO_ROOT / "pyproject.toml"),
                           str(repos["gpu"] / "diffprompt" / "1" / "model.py")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# -- other artifacts, errors, command line ----------------------------------------------------------


def test_foundation_artifact_gives_only_grounding(artifacts, tmp_path):
    repo = write_triton_repository(artifacts["foundation"], tmp_path / "repo", instance_kind="KIND_CPU")
    assert sorted(p.name for p in repo.iterdir() if p.is_dir()) == ["grounding"]
    config = parse_config(repo / "grounding" / "config.pbtxt")
    assert [t.name for t in config.input] == ["pixel_values", "input_ids", "attention_mask"]
    assert [(t.name, list(t.dims)) for t in config.output] == [("logits", [64]), ("boxes", [64, 4])]
    OnnxruntimeTriton(repo)("grounding", {"pixel_values": np.zeros((2, 3, 128, 128), np.float32),
                                          "input_ids": np.ones((2, 16), np.int64),
                                          "attention_mask": np.ones((2, 16), np.int64)}, ["logits", "boxes"])


@pytest.mark.parametrize("damage", ["truncated", "altered"])
def test_a_damaged_artifact_is_refused(artifacts, tmp_path, damage):
    d = tmp_path / "artifact"
    shutil.copytree(artifacts["diffprompt"], d)
    target = d / "prompt_builder.onnx"
    data = target.read_bytes()
    if damage == "truncated":
        target.write_bytes(data[:100])
    else:
        target.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    with pytest.raises(ArtifactError, match="prompt_builder.onnx"):
        write_triton_repository(d, tmp_path / "repo")
    assert not (tmp_path / "repo").exists() and not (tmp_path / "repo.tmp").exists()


def test_existing_repository_and_bad_options_are_refused(artifacts, tmp_path):
    out = tmp_path / "repo"
    out.mkdir()
    (out / "other_model").mkdir()
    with pytest.raises(FileExistsError, match="not empty"):
        write_triton_repository(artifacts["foundation"], out)
    assert (out / "other_model").exists()
    write_triton_repository(artifacts["foundation"], out, overwrite=True)
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["grounding"]
    for kwargs, match in [({"instance_kind": "KIND_CPU", "tensorrt_accelerator": True}, "needs GPU"),
                          ({"max_batch_size": 4}, "preferred batch sizes"),
                          ({"instance_kind": "GPU"}, "instance_kind")]:
        with pytest.raises(ValueError, match=match):
            write_triton_repository(artifacts["foundation"], tmp_path / "x", **kwargs)


def test_command_line(artifacts, tmp_path, capsys):
    out = tmp_path / "repo"
    args = build_parser().parse_args(["--artifact", str(artifacts["diffprompt"]), "--out", str(out), "--cpu",
                                      "--max-batch-size", "4", "--tensorrt"])
    with pytest.raises(SystemExit, match="needs GPU"):
        main(args)
    args = build_parser().parse_args(["--artifact", str(artifacts["diffprompt"]), "--out", str(out), "--cpu",
                                      "--max-batch-size", "4"])
    assert main(args) == 0
    assert "tritonserver --model-repository=" in capsys.readouterr().out
    config = parse_config(out / "denoiser" / "config.pbtxt")
    assert config.max_batch_size == 4 and list(config.dynamic_batching.preferred_batch_size) == []
    assert model_config_pb2.ModelInstanceGroup.Kind.Name(config.instance_group[0].kind) == "KIND_CPU"
