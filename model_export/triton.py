"""An artifact directory -> an NVIDIA Triton Inference Server model repository.

    python -m diffprompt.model_export.triton --artifact artifacts/diffprompt-5steps --out triton_repo \
        [--cpu] [--tensorrt]

    triton_repo/
      condition_encoder/  config.pbtxt  1/model.onnx     platform onnxruntime_onnx, dynamic batching
      denoiser/           config.pbtxt  1/model.onnx
      prompt_builder/     config.pbtxt  1/model.onnx
      grounding/          config.pbtxt  1/model.onnx
      diffprompt/         config.pbtxt  1/model.py       Python backend (BLS): model_export/triton_model.py,
                                        1/diffprompt/    the core's numpy pipeline (diffprompt.core.pipeline,
                                        1/manifest.json  the one the onnxruntime service runs) over BLS calls
      README.md  tokenizer.json  manifest.json           for clients: models, command line, preprocessing

A foundation or baseline artifact (only `grounding.onnx`) gives the `grounding` model alone.
Input/output names, data types and dims of each ONNX model's config are read from the ONNX
graph (batch axis 0 dropped; axes the exporter left symbolic take the size the manifest
recorded from the traced run) and cross-checked against the manifest. `write_triton_repository`
is the function to call from other commands (e.g. `diffprompt export --triton REPO`).
"""

from __future__ import annotations

import argparse
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from diffprompt.core.files import replace_directory, staging_dir
from diffprompt.core.manifest import MANIFEST_FILE, ArtifactError, GraphInfo, Manifest, validate_artifact
from diffprompt.model_export.shared_weights import WEIGHTS_FILE

GRAPHS = ("condition_encoder", "denoiser", "prompt_builder", "grounding")
BLS_MODEL = "diffprompt"
VERSION = "1"
INSTANCE_KINDS = ("KIND_GPU", "KIND_CPU")

# ONNX TensorProto element type / manifest dtype -> Triton data type
ONNX_TO_TRITON = {1: "TYPE_FP32", 10: "TYPE_FP16", 11: "TYPE_FP64", 7: "TYPE_INT64", 6: "TYPE_INT32",
                  3: "TYPE_INT8", 2: "TYPE_UINT8", 9: "TYPE_BOOL"}
DTYPE_TO_TRITON = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "float64": "TYPE_FP64", "int64": "TYPE_INT64",
                   "int32": "TYPE_INT32", "int8": "TYPE_INT8", "uint8": "TYPE_UINT8", "bool": "TYPE_BOOL"}


@dataclass(frozen=True)
class TensorSpec:
    """One model input/output as Triton sees it: dims without the batch axis (may be empty)."""

    name: str
    data_type: str
    dims: tuple[int, ...]


# -- reading the graphs -------------------------------------------------------------------------


def graph_io(path: Path, graph: GraphInfo) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """(inputs, outputs) of one ONNX graph, in graph order, checked against its manifest entry."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # onnx raises DecodeError and friends
        raise ArtifactError(f"{path}: onnx cannot read it ({e})") from e
    initializers = {i.name for i in model.graph.initializer}
    values = {"inputs": [v for v in model.graph.input if v.name not in initializers],
              "outputs": list(model.graph.output)}
    result = []
    for side, onnx_values in values.items():
        recorded = getattr(graph, side)
        if [v.name for v in onnx_values] != [r.name for r in recorded]:
            raise ArtifactError(f"{path}: graph {side} {[v.name for v in onnx_values]} differ from the manifest's "
                                f"{[r.name for r in recorded]}")
        result.append([_tensor_spec(path, v, r) for v, r in zip(onnx_values, recorded)])
    return result[0], result[1]


def _tensor_spec(path: Path, value, recorded) -> TensorSpec:
    tensor = value.type.tensor_type
    data_type = ONNX_TO_TRITON.get(tensor.elem_type)
    if data_type is None:
        raise ArtifactError(f"{path}: {value.name} has ONNX element type {tensor.elem_type}, not supported here")
    if DTYPE_TO_TRITON.get(recorded.dtype) != data_type:
        raise ArtifactError(f"{path}: {value.name} is {data_type} in the graph, {recorded.dtype} in the manifest")
    dims = list(tensor.shape.dim)
    shape = recorded.shape
    if len(dims) != len(shape):
        raise ArtifactError(f"{path}: {value.name} has rank {len(dims)} in the graph, {len(shape)} in the manifest")
    if not dims or dims[0].HasField("dim_value"):
        raise ArtifactError(f"{path}: {value.name} has no dynamic batch axis 0 (Triton batching needs one)")
    out = []
    for axis, (dim, size) in enumerate(zip(dims[1:], shape[1:]), start=1):
        if dim.HasField("dim_value"):
            if dim.dim_value != size:
                raise ArtifactError(f"{path}: {value.name} axis {axis} is {dim.dim_value} in the graph, {size} in "
                                    "the manifest")
            out.append(int(dim.dim_value))
        elif isinstance(size, int):  # symbolic in the graph: the size recorded from the traced run
            out.append(size)
        else:
            raise ArtifactError(f"{path}: {value.name} axis {axis} has no fixed size ({dim.dim_param!r}, {size!r})")
    return TensorSpec(value.name, data_type, tuple(out))


# -- config.pbtxt --------------------------------------------------------------------------------


def _dims(dims: Sequence[int]) -> str:
    return "[ " + ", ".join(str(int(d)) for d in dims) + " ]" if dims else "[ ]"


def _tensors_pbtxt(key: str, tensors: Sequence[TensorSpec]) -> str:
    """`input [...]` / `output [...]`; a tensor of shape (batch,) becomes dims [1] reshaped to [] for the model."""
    blocks = []
    for t in tensors:
        lines = [f'    name: "{t.name}"', f"    data_type: {t.data_type}", f"    dims: {_dims(t.dims or (1,))}"]
        if not t.dims:
            lines.append("    reshape: { shape: [ ] }")
        blocks.append("  {\n" + "\n".join(lines) + "\n  }")
    return f"{key} [\n" + ",\n".join(blocks) + "\n]"


def _batching_pbtxt(preferred_batch_sizes: Sequence[int], max_queue_delay_us: int) -> str:
    return (f"dynamic_batching {{\n  preferred_batch_size: {_dims(preferred_batch_sizes)}\n"
            f"  max_queue_delay_microseconds: {int(max_queue_delay_us)}\n}}")


def onnx_model_config(name: str, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec], max_batch_size: int,
                      preferred_batch_sizes: Sequence[int], max_queue_delay_us: int, instance_kind: str,
                      tensorrt_accelerator: bool) -> str:
    """config.pbtxt text of one onnxruntime_onnx model (optionally with the TensorRT accelerator, FP16)."""
    parts = [f'name: "{name}"', 'platform: "onnxruntime_onnx"', f"max_batch_size: {int(max_batch_size)}",
             _tensors_pbtxt("input", inputs), _tensors_pbtxt("output", outputs),
             f"instance_group [\n  {{\n    kind: {instance_kind}\n    count: 1\n  }}\n]",
             _batching_pbtxt(preferred_batch_sizes, max_queue_delay_us)]
    if tensorrt_accelerator:
        parts.append('optimization {\n  execution_accelerators {\n    gpu_execution_accelerator: [\n      {\n'
                     '        name: "tensorrt"\n        parameters { key: "precision_mode" value: "FP16" }\n'
                     '        parameters { key: "max_workspace_size_bytes" value: "1073741824" }\n'
                     "      }\n    ]\n  }\n}")
    return "\n".join(parts) + "\n"


def bls_model_config(inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec], max_batch_size: int,
                     preferred_batch_sizes: Sequence[int], max_queue_delay_us: int, model_version: str) -> str:
    """config.pbtxt text of the Python-backend pipeline model (CPU instance: it only runs numpy and BLS calls)."""
    parts = [f'name: "{BLS_MODEL}"', 'backend: "python"', f"max_batch_size: {int(max_batch_size)}",
             _tensors_pbtxt("input", inputs), _tensors_pbtxt("output", outputs),
             "instance_group [\n  {\n    kind: KIND_CPU\n    count: 1\n  }\n]",
             _batching_pbtxt(preferred_batch_sizes, max_queue_delay_us),
             f'parameters {{\n  key: "artifact_model_version"\n  value: {{ string_value: "{model_version}" }}\n}}']
    return "\n".join(parts) + "\n"


def bls_io(io: dict[str, tuple[list[TensorSpec], list[TensorSpec]]]) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The pipeline model's inputs (pixel_values, input_ids, attention_mask, seed) and outputs
    (scores (P,), boxes (P, 4), mask_logits (m, m)), sized from the graphs."""
    enc_in = {t.name: t for t in io["condition_encoder"][0]}
    ground_in = {t.name: t for t in io["grounding"][0]}
    ground_out = {t.name: t for t in io["grounding"][1]}
    masks = {t.name: t for t in io["prompt_builder"][1]}["mask_logits"]
    names = ("pixel_values", "input_ids", "attention_mask")
    if any(n in ground_in and enc_in[n] != ground_in[n] for n in names):  # single pass: no pixel_values there
        raise ArtifactError("condition_encoder and grounding disagree on pixel_values / input_ids / attention_mask")
    inputs = [enc_in[n] for n in names] + [TensorSpec("seed", "TYPE_INT64", (1,))]
    outputs = [TensorSpec("scores", "TYPE_FP32", ground_out["logits"].dims),
               TensorSpec("boxes", "TYPE_FP32", ground_out["boxes"].dims),
               TensorSpec("mask_logits", "TYPE_FP32", masks.dims[-2:])]
    return inputs, outputs


# -- the repository -------------------------------------------------------------------------------


def _check_options(max_batch_size: int, preferred_batch_sizes: Sequence[int], max_queue_delay_us: int,
                   instance_kind: str, tensorrt_accelerator: bool) -> None:
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
    if any(b < 1 or b > max_batch_size for b in preferred_batch_sizes):
        raise ValueError(f"preferred batch sizes {list(preferred_batch_sizes)} must be in [1, {max_batch_size}]")
    if max_queue_delay_us < 0:
        raise ValueError(f"max_queue_delay_us must be >= 0, got {max_queue_delay_us}")
    if instance_kind not in INSTANCE_KINDS:
        raise ValueError(f"instance_kind must be one of {INSTANCE_KINDS}, got {instance_kind!r}")
    if tensorrt_accelerator and instance_kind != "KIND_GPU":
        raise ValueError("the TensorRT accelerator needs GPU instances (instance_kind='KIND_GPU')")


def write_triton_repository(artifact_dir: str | Path, out_dir: str | Path, max_batch_size: int = 32,
                            preferred_batch_sizes: Sequence[int] = (8, 16), max_queue_delay_us: int = 2000,
                            instance_kind: str = "KIND_GPU", tensorrt_accelerator: bool = False,
                            overwrite: bool = False) -> Path:
    """Validate the artifact and write a Triton model repository at `out_dir`; returns its path.

    Written to a temporary sibling and renamed into place. An existing non-empty `out_dir` is an
    error unless `overwrite` (which replaces it whole). Raises ArtifactError for a damaged artifact.
    """
    _check_options(max_batch_size, preferred_batch_sizes, max_queue_delay_us, instance_kind, tensorrt_accelerator)
    artifact_dir, out_dir = Path(artifact_dir), Path(out_dir)
    manifest = validate_artifact(artifact_dir)
    graphs = manifest.graphs
    if manifest.prompt_sampler is not None:
        raise ArtifactError(f"{artifact_dir}: a Prompt Diffusion artifact (its prompt solver loop is not written "
                            "as a Triton model); serve it with `python -m diffprompt.service`")
    names = list(GRAPHS) if manifest.makes_masks else ["grounding"]
    if set(graphs) != set(names):
        raise ArtifactError(f"{artifact_dir}: graphs {sorted(graphs)}, expected {sorted(names)}")
    io = {name: graph_io(artifact_dir / graphs[name].file, graphs[name]) for name in names}
    bls = bls_io(io) if manifest.makes_masks else None
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty (pass overwrite=True / --overwrite to replace it)")

    tmp = staging_dir(out_dir)
    try:
        _write(tmp, artifact_dir, manifest, io, bls, max_batch_size, tuple(preferred_batch_sizes),
               max_queue_delay_us, instance_kind, tensorrt_accelerator)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return replace_directory(tmp, out_dir)


def _write(tmp: Path, artifact_dir: Path, manifest: Manifest, io: dict, bls: tuple | None, max_batch_size: int,
           preferred_batch_sizes: tuple[int, ...], max_queue_delay_us: int, instance_kind: str,
           tensorrt_accelerator: bool) -> None:
    """The repository's files under `tmp`."""
    batching = (max_batch_size, preferred_batch_sizes, max_queue_delay_us)
    for name in io:
        (tmp / name / VERSION).mkdir(parents=True)
        copy_graph(artifact_dir / manifest.graphs[name].file, tmp / name / VERSION / "model.onnx")
        (tmp / name / "config.pbtxt").write_text(
            onnx_model_config(name, *io[name], *batching, instance_kind, tensorrt_accelerator))
    if bls is not None:
        version_dir = tmp / BLS_MODEL / VERSION
        version_dir.mkdir(parents=True)
        shutil.copyfile(Path(__file__).with_name("triton_model.py"), version_dir / "model.py")
        vendor_core(version_dir)
        shutil.copyfile(artifact_dir / MANIFEST_FILE, version_dir / MANIFEST_FILE)
        (tmp / BLS_MODEL / "config.pbtxt").write_text(bls_model_config(*bls, *batching, manifest.model_version))
    tokenizer = manifest.tokenizer.file
    if (artifact_dir / tokenizer).exists():
        shutil.copyfile(artifact_dir / tokenizer, tmp / tokenizer)
    shutil.copyfile(artifact_dir / MANIFEST_FILE, tmp / MANIFEST_FILE)
    (tmp / "README.md").write_text(repository_readme(manifest, io, bls, instance_kind, tensorrt_accelerator))


def copy_graph(src: Path, dst: Path) -> None:
    """One graph as a Triton model: `model.onnx`, and its own tensors in `model.onnx.data` when the
    artifact keeps them in a shared weights.bin (each Triton model loads on its own)."""
    if not (src.parent / WEIGHTS_FILE).exists():
        shutil.copyfile(src, dst)
        return
    import onnx

    model = onnx.load(str(src))  # reads its tensors from the artifact's weights.bin
    onnx.save_model(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=dst.name + ".data", size_threshold=1024)


# The numpy-only core modules the Python-backend model imports (diffprompt.core.pipeline and what it needs).
VENDORED_CORE = ("ddim.py", "errors.py", "image_spec.py", "manifest.py", "no_match.py", "pipeline.py",
                 "prompt_solver.py")


def vendor_core(version_dir: Path) -> None:
    """Copy the package's numpy-only pipeline modules to <version_dir>/diffprompt/core/ for model.py."""
    import diffprompt
    import diffprompt.core

    core = version_dir / "diffprompt" / "core"
    core.mkdir(parents=True)
    shutil.copyfile(diffprompt.__file__, version_dir / "diffprompt" / "__init__.py")
    (core / "__init__.py").write_text('"""The numpy-only part of diffprompt.core, vendored for the Triton model."""\n')
    for name in VENDORED_CORE:
        shutil.copyfile(Path(diffprompt.core.__file__).with_name(name), core / name)


def _signature(tensors: Sequence[TensorSpec]) -> str:
    return ", ".join(f"{t.name} {t.data_type[5:]} {list(t.dims)}" for t in tensors)


def repository_readme(manifest: Manifest, io: dict, bls: tuple | None, instance_kind: str, tensorrt: bool) -> str:
    """<repo>/README.md: the models with their tensors (batch axis omitted) and the server command line."""
    lines = [f"# Triton model repository: {manifest.model_version}", "",
             "Written by `python -m diffprompt.model_export.triton` from a Diff-Prompt artifact "
             f"(method {manifest.method!r}, {manifest.ddim_steps} DDIM steps). "
             f"ONNX instances: {instance_kind}" + (", TensorRT accelerator (FP16)." if tensorrt else "."), "",
             "| model | backend | inputs | outputs |", "|---|---|---|---|"]
    if bls is not None:
        lines.append(f"| `{BLS_MODEL}` | python (BLS) | {_signature(bls[0])} | {_signature(bls[1])} |")
    for name, (inputs, outputs) in io.items():
        lines.append(f"| `{name}` | onnxruntime_onnx | {_signature(inputs)} | {_signature(outputs)} |")
    entry = BLS_MODEL if bls is not None else "grounding"
    lines += ["", f"Clients call `{entry}`; every tensor has a leading batch axis (max batch size in config.pbtxt).",
              "Tokenize with `tokenizer.json` and preprocess images as `manifest.json` says (`image`)."]
    if bls is None:
        lines.append("`grounding` returns logits: scores = sigmoid(logits); boxes are cxcywh in [0, 1].")
    else:
        lines.append("`diffprompt` returns scores = sigmoid(logits), boxes cxcywh in [0, 1] of the input square, "
                     "and the generated mask's logits; one int64 seed per row fixes the DDIM noise.")
    gpus = "--gpus all " if instance_kind == "KIND_GPU" else ""
    lines += ["", "From this directory:", "", "```bash",
              f"docker run {gpus}--rm --shm-size=1g -p 8000:8000 -p 8001:8001 -p 8002:8002 \\",
              "    -v $PWD:/models nvcr.io/nvidia/tritonserver:<yy.mm>-py3 \\",
              "    tritonserver --model-repository=/models",
              "```", ""]
    return "\n".join(lines)


# -- command line ---------------------------------------------------------------------------------


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifact", required=True, help="an artifact directory written by `diffprompt export`")
    p.add_argument("--out", required=True, help="the model repository to write")
    p.add_argument("--cpu", action="store_true", help="KIND_CPU instances for the ONNX models (default KIND_GPU)")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--preferred-batch-sizes", type=int, nargs="+", default=None,
                   help="default: 8 16, those not above --max-batch-size")
    p.add_argument("--max-queue-delay-us", type=int, default=2000)
    p.add_argument("--tensorrt", action="store_true", help="ONNX Runtime's TensorRT accelerator (FP16), GPU only")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")
    return p


def main(args: argparse.Namespace) -> int:
    preferred = args.preferred_batch_sizes
    if preferred is None:
        preferred = [b for b in (8, 16) if b <= args.max_batch_size]
    try:
        out = write_triton_repository(args.artifact, args.out, args.max_batch_size, preferred,
                                      args.max_queue_delay_us, "KIND_CPU" if args.cpu else "KIND_GPU", args.tensorrt,
                                      args.overwrite)
    except (ArtifactError, FileExistsError, ValueError) as e:
        raise SystemExit(f"error: {e}") from e
    models = sorted(p.name for p in out.iterdir() if p.is_dir())
    print(f"wrote {out}: {', '.join(models)}\n  tritonserver --model-repository={out.resolve()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(build_parser().parse_args()))
