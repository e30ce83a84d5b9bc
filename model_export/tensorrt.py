"""Build TensorRT engines from exported ONNX graphs, and load them only where they are valid.

Needs the ``tensorrt`` Python package and a CUDA GPU; both are checked at call time and
``tensorrt`` is only imported inside functions, so this module imports fine on CPU hosts.
Engines are named after the GPU compute capability and the TensorRT version
(``dit.sm86.trt10.3.0.fp16.engine``) and get a JSON sidecar, so a stale engine is never
loaded on another GPU or TensorRT version. Command line::

    python -m model_export.tensorrt --onnx dit.onnx encoder.onnx --out engines/ \\
        --shape-json shapes.json --min-batch 1 --opt-batch 8 --max-batch 32 [--no-fp16]

``shapes.json`` maps each ONNX file stem to ``{input name: shape}`` with ``"batch"`` for the
batch dimension, e.g. ``{"dit": {"latents": ["batch", 4, 16, 16]}}``; with a single ``--onnx``
the inner mapping may be given directly. Exit code 2 means TensorRT or a GPU is missing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from model_export.providers import BATCH, InputShapes, check_batches, resolve_shapes

log = logging.getLogger(__name__)

SIDECAR_FORMAT = 1
_CC_RE = re.compile(r"^\d+\.\d+$")
_VERSION_RE = re.compile(r"^\d[0-9A-Za-z.]*$")


class EngineMismatchError(RuntimeError):
    """The engine was built for another GPU, TensorRT version or file content."""


def _import_tensorrt() -> ModuleType:
    import tensorrt as trt

    # Running this file as a script puts model_export/ on sys.path and `import tensorrt` would import itself.
    if Path(getattr(trt, "__file__", "") or "").resolve() == Path(__file__).resolve():
        raise ImportError(
            "imported model_export/tensorrt.py instead of TensorRT: run `python -m model_export.tensorrt`"
        )
    return trt


def _cuda_device_selector(device_id: int) -> str:
    """The nvidia-smi ``-i`` argument for CUDA device ``device_id``, honouring CUDA_VISIBLE_DEVICES."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return str(device_id)
    entries = [e.strip() for e in visible.split(",") if e.strip()]
    if not entries or entries[0] == "-1":
        raise RuntimeError(f"no CUDA GPU visible: CUDA_VISIBLE_DEVICES={visible!r} hides all GPUs")
    if device_id >= len(entries):
        raise RuntimeError(f"CUDA device {device_id} not visible: CUDA_VISIBLE_DEVICES={visible!r}")
    return entries[device_id]


def _compute_capability_cuda_python(device_id: int) -> str | None:
    """Compute capability via cuda-python's driver API; None if cuda-python is not installed."""
    try:
        from cuda.bindings import driver  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cuda as driver  # older cuda-python
        except ImportError:
            return None
    ok = driver.CUresult.CUDA_SUCCESS
    (err,) = driver.cuInit(0)
    if err != ok:
        raise RuntimeError(f"no CUDA GPU: cuInit failed with {err}")
    err, device = driver.cuDeviceGet(device_id)
    if err != ok:
        raise RuntimeError(f"no CUDA GPU {device_id}: cuDeviceGet failed with {err}")
    attr = driver.CUdevice_attribute
    err, major = driver.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, device)
    err2, minor = driver.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, device)
    if err != ok or err2 != ok:
        raise RuntimeError(f"cannot read the compute capability of CUDA GPU {device_id}: {err}, {err2}")
    return f"{major}.{minor}"


def _compute_capability_nvidia_smi(device_id: int) -> str | None:
    """Compute capability via ``nvidia-smi``; None if nvidia-smi is not on PATH."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    selector = _cuda_device_selector(device_id)
    cmd = [exe, "--query-gpu=compute_cap", "--format=csv,noheader", "-i", selector]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RuntimeError(f"no usable CUDA GPU: {' '.join(cmd)} failed: {e}") from e
    output = (proc.stdout or "").strip()
    if proc.returncode != 0:
        detail = (proc.stderr or "").strip() or output
        raise RuntimeError(f"no usable CUDA GPU: nvidia-smi exited with {proc.returncode}: {detail}")
    first = output.splitlines()[0].strip() if output else ""
    if not _CC_RE.match(first):
        raise RuntimeError(f"nvidia-smi did not report a compute capability for GPU {selector}: {output!r}")
    return first


def gpu_compute_capability(device_id: int = 0) -> str:
    """Compute capability of CUDA device ``device_id`` as ``"major.minor"`` (e.g. ``"8.6"``).

    Uses cuda-python when installed, else ``nvidia-smi``. Raises RuntimeError when no GPU is found.
    """
    for query in (_compute_capability_cuda_python, _compute_capability_nvidia_smi):
        capability = query(device_id)
        if capability is not None:
            return capability
    raise RuntimeError("no CUDA GPU found: neither cuda-python nor nvidia-smi is available")


def tensorrt_available(device_id: int = 0) -> tuple[bool, str]:
    """Whether engines can be built here: ``(True, description)`` or ``(False, reason)``."""
    reasons: list[str] = []
    trt: ModuleType | None = None
    try:
        trt = _import_tensorrt()
    except Exception as e:  # ImportError, or a broken install raising anything else on import
        reasons.append(f"the tensorrt Python package cannot be imported ({type(e).__name__}: {e})")
    try:
        capability: str | None = gpu_compute_capability(device_id)
    except RuntimeError as e:
        capability = None
        reasons.append(str(e))
    if reasons:
        return False, "; ".join(reasons)
    return True, f"TensorRT {trt.__version__} with CUDA GPU {device_id} (compute capability {capability})"


def engine_filename(onnx_path: str | os.PathLike[str], compute_capability: str, trt_version: str, fp16: bool) -> str:
    """``<onnx stem>.sm<cc>.trt<version>.<fp16|fp32>.engine``, e.g. ``dit.sm86.trt10.3.0.fp16.engine``."""
    if not _CC_RE.match(compute_capability):
        raise ValueError(f"compute capability must look like '8.6', got {compute_capability!r}")
    if not _VERSION_RE.match(trt_version):
        raise ValueError(f"TensorRT version must look like '10.3.0', got {trt_version!r}")
    stem = Path(onnx_path).stem
    if not stem:
        raise ValueError(f"no file name in {onnx_path!r}")
    sm = compute_capability.replace(".", "")
    return f"{stem}.sm{sm}.trt{trt_version}.{'fp16' if fp16 else 'fp32'}.engine"


def sidecar_path(engine_path: str | os.PathLike[str]) -> Path:
    """The JSON metadata file written next to an engine: ``<engine>.json``."""
    engine_path = Path(engine_path)
    return engine_path.with_name(engine_path.name + ".json")


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to a temp file in the same directory, fsync it, then ``os.replace`` it into place."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _shapes_json(input_shapes: InputShapes) -> dict[str, list[int | str]]:
    return {name: list(shape) for name, shape in input_shapes.items()}


def _reusable(engine: Path, onnx_sha256: str, requested: Mapping[str, Any]) -> bool:
    """True when ``engine`` and its sidecar exist and were built from the same ONNX with the same profile."""
    sidecar = sidecar_path(engine)
    if not engine.is_file():
        return False
    if not sidecar.is_file():
        log.warning("%s exists without %s; rebuilding", engine, sidecar.name)
        return False
    try:
        meta = json.loads(sidecar.read_text())
    except (OSError, ValueError) as e:
        log.warning("unreadable sidecar %s (%s); rebuilding", sidecar, e)
        return False
    if meta.get("onnx_sha256") != onnx_sha256:
        log.info("%s was built from a different ONNX file; rebuilding", engine.name)
        return False
    changed = [key for key, value in requested.items() if meta.get(key) != value]
    if changed:
        log.info("%s was built with different %s; rebuilding", engine.name, ", ".join(changed))
        return False
    return True


def _check_network_inputs(network: Any, profile: Mapping[str, Mapping[str, tuple[int, ...]]]) -> None:
    """Every network input has a shape, no extra shapes, ranks match and fixed dims agree."""
    network_inputs = {network.get_input(i).name: tuple(network.get_input(i).shape) for i in range(network.num_inputs)}
    missing = sorted(set(network_inputs) - set(profile["max"]))
    extra = sorted(set(profile["max"]) - set(network_inputs))
    if missing or extra:
        raise ValueError(
            f"input shapes do not match the ONNX inputs {sorted(network_inputs)}: missing {missing}, unknown {extra}"
        )
    for name, dims in network_inputs.items():
        for bound in ("min", "max"):
            shape = profile[bound][name]
            if len(shape) != len(dims) or any(d >= 0 and d != s for d, s in zip(dims, shape)):
                raise ValueError(f"input {name!r}: ONNX shape {dims} (-1 = dynamic) cannot take {bound} shape {shape}")


def _describe_parser_error(err: Any) -> str:
    """One line for a ``tensorrt.ParserError``: node index (and name/op on TensorRT 10), description, code."""
    where = f"node {err.node()}"
    name = err.node_name() if hasattr(err, "node_name") else ""
    op = err.node_operator() if hasattr(err, "node_operator") else ""
    if name or op:
        where += f" ({' '.join(x for x in (op, repr(name) if name else '') if x)})"
    return f"{where}: {err.desc()} [code {err.code()}]"


def build_engine(
    onnx_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    input_shapes: InputShapes,
    min_batch: int,
    opt_batch: int,
    max_batch: int,
    fp16: bool = True,
    workspace_gb: float = 2.0,
    device_id: int = 0,
) -> Path:
    """Build (or reuse) a serialized TensorRT engine for ``onnx_path`` in ``out_dir``.

    One optimisation profile covers ``min_batch``..``max_batch`` for every input. An existing
    engine with a matching sidecar (same ONNX sha256, shapes, batches and fp16) is returned as is.
    """
    check_batches(min_batch, opt_batch, max_batch)
    if workspace_gb <= 0:
        raise ValueError(f"workspace_gb must be > 0, got {workspace_gb}")
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"ONNX file not found: {onnx_path}")
    profile = {
        "min": resolve_shapes(input_shapes, min_batch),
        "opt": resolve_shapes(input_shapes, opt_batch),
        "max": resolve_shapes(input_shapes, max_batch),
    }
    trt = _import_tensorrt()
    capability = gpu_compute_capability(device_id)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    engine_path = out_dir / engine_filename(onnx_path, capability, trt.__version__, fp16)

    onnx_sha256 = sha256_file(onnx_path)
    requested = {
        "input_shapes": _shapes_json(input_shapes),
        "min_batch": min_batch,
        "opt_batch": opt_batch,
        "max_batch": max_batch,
        "fp16": fp16,
    }
    if _reusable(engine_path, onnx_sha256, requested):
        log.info("reusing %s", engine_path)
        return engine_path

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    major = int(trt.__version__.split(".")[0])
    # TensorRT 10 networks are always explicit-batch (the flag is deprecated); 8.x needs it set.
    flags = 0 if major >= 10 else 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    parsed = parser.parse_from_file(str(onnx_path))  # from a file so external weight data is found
    errors = [parser.get_error(i) for i in range(parser.num_errors)]
    if not parsed or errors:
        details = "\n".join(f"  [{i}] {_describe_parser_error(err)}" for i, err in enumerate(errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path} ({len(errors)} error(s)):\n{details or '  (none)'}")
    _check_network_inputs(network, profile)

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    fp16_enabled = bool(fp16 and getattr(builder, "platform_has_fast_fp16", True))
    if fp16 and not fp16_enabled:
        log.warning("fp16 requested but GPU %s (sm%s) has no fast fp16: building fp32", device_id, capability)
    if fp16_enabled:
        config.set_flag(trt.BuilderFlag.FP16)
    optimization_profile = builder.create_optimization_profile()
    for name in profile["opt"]:
        optimization_profile.set_shape(name, profile["min"][name], profile["opt"][name], profile["max"][name])
    config.add_optimization_profile(optimization_profile)

    log.info("building %s (batch %d..%d, opt %d, fp16=%s)", engine_path.name, min_batch, max_batch, opt_batch, fp16)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine for {onnx_path} (see the TensorRT log above)")
    data = bytes(serialized)  # IHostMemory supports the buffer protocol
    _write_atomic(engine_path, data)
    meta = {
        "format": SIDECAR_FORMAT,
        "engine": engine_path.name,
        "engine_sha256": hashlib.sha256(data).hexdigest(),
        "onnx": onnx_path.name,
        "onnx_sha256": onnx_sha256,
        "tensorrt_version": trt.__version__,
        "compute_capability": capability,
        "fp16_enabled": fp16_enabled,
        "workspace_gb": workspace_gb,
        "profile": {bound: {k: list(v) for k, v in shapes.items()} for bound, shapes in profile.items()},
        **requested,
    }
    _write_atomic(sidecar_path(engine_path), (json.dumps(meta, indent=2) + "\n").encode())
    log.info("wrote %s", engine_path)
    return engine_path


def check_engine_compatible(
    path: str | os.PathLike[str], compute_capability: str, trt_version: str, verify_hash: bool = True
) -> dict[str, Any]:
    """Return the engine's sidecar metadata, or raise EngineMismatchError naming what differs."""
    path = Path(path)
    sidecar = sidecar_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"engine not found: {path}")
    if not sidecar.is_file():
        raise EngineMismatchError(
            f"{path} has no sidecar {sidecar.name}: cannot tell what it was built for; rebuild it"
        )
    meta = json.loads(sidecar.read_text())
    mismatches = []
    if meta.get("tensorrt_version") != trt_version:
        mismatches.append(f"TensorRT version {meta.get('tensorrt_version')} (engine) != {trt_version} (installed)")
    if meta.get("compute_capability") != compute_capability:
        mismatches.append(
            f"compute capability {meta.get('compute_capability')} (engine) != {compute_capability} (this GPU)"
        )
    if verify_hash and meta.get("engine_sha256") != sha256_file(path):
        mismatches.append("engine file sha256 differs from its sidecar (truncated or replaced)")
    if mismatches:
        raise EngineMismatchError(
            f"{path.name} cannot be used here: {'; '.join(mismatches)}. "
            "Rebuild it with `python -m model_export.tensorrt` on this host."
        )
    return meta


@dataclass
class LoadedEngine:
    """A deserialized engine; keeps its runtime alive for as long as the engine is used."""

    engine: Any  # tensorrt.ICudaEngine
    runtime: Any  # tensorrt.Runtime
    metadata: dict[str, Any]


def load_engine_if_compatible(path: str | os.PathLike[str], device_id: int = 0) -> LoadedEngine:
    """Deserialize ``path`` after checking its sidecar against the running GPU and TensorRT version."""
    trt = _import_tensorrt()
    meta = check_engine_compatible(path, gpu_compute_capability(device_id), trt.__version__)
    logger = trt.Logger(trt.Logger.WARNING)
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(Path(path).read_bytes())
    if engine is None:
        raise RuntimeError(f"TensorRT could not deserialize {path} (see the TensorRT log above)")
    return LoadedEngine(engine=engine, runtime=runtime, metadata=meta)


def _shapes_for(onnx_paths: Sequence[Path], spec: Any) -> dict[Path, dict[str, list[int | str]]]:
    """Per-ONNX input shapes from the --shape-json content (keyed by stem or file name, or flat for one file)."""
    if not isinstance(spec, dict) or not spec:
        raise ValueError("the shape JSON must be a non-empty object")
    per_model = all(isinstance(v, dict) for v in spec.values())
    if not per_model:
        if len(onnx_paths) != 1:
            raise ValueError('with several --onnx files the shape JSON must be {"<onnx stem>": {input: shape}}')
        shapes = {onnx_paths[0]: spec}
    else:
        shapes = {}
        for path in onnx_paths:
            entry = spec.get(path.stem, spec.get(path.name))
            if entry is None:
                raise ValueError(f"the shape JSON has no entry for {path.stem!r} (keys: {sorted(spec)})")
            shapes[path] = entry
    for path, entry in shapes.items():
        try:
            resolve_shapes(entry, 1)
        except ValueError as e:
            raise ValueError(f"{path.name}: {e} (use {BATCH!r} for the batch dimension)") from None
    return shapes


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model_export.tensorrt", description=__doc__.split("\n\n")[0])
    parser.add_argument("--onnx", nargs="+", required=True, type=Path, help="ONNX files to build engines for")
    parser.add_argument("--out", required=True, type=Path, help="directory for the engines and their sidecars")
    parser.add_argument("--shape-json", required=True, type=Path, help="input shapes, 'batch' for the batch dim")
    parser.add_argument("--min-batch", type=int, default=1)
    parser.add_argument("--opt-batch", type=int, default=8)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--no-fp16", action="store_true", help="build fp32 engines")
    parser.add_argument("--workspace-gb", type=float, default=2.0, help="TensorRT builder workspace limit")
    parser.add_argument("--device-id", type=int, default=0, help="CUDA device to build on")
    args = parser.parse_args(argv)

    missing = [str(p) for p in args.onnx if not p.is_file()]
    if missing:
        parser.error(f"ONNX file(s) not found: {', '.join(missing)}")
    try:
        check_batches(args.min_batch, args.opt_batch, args.max_batch)
    except ValueError as e:
        parser.error(str(e))
    try:
        shapes = _shapes_for(args.onnx, json.loads(args.shape_json.read_text()))
    except (OSError, ValueError) as e:
        parser.error(f"--shape-json {args.shape_json}: {e}")

    available, reason = tensorrt_available(args.device_id)
    if not available:
        print(f"error: cannot build TensorRT engines on this host: {reason}", file=sys.stderr)
        return 2

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    print(reason)
    for onnx_path in args.onnx:
        try:
            engine = build_engine(
                onnx_path,
                args.out,
                shapes[onnx_path],
                args.min_batch,
                args.opt_batch,
                args.max_batch,
                fp16=not args.no_fp16,
                workspace_gb=args.workspace_gb,
                device_id=args.device_id,
            )
        except (RuntimeError, ValueError) as e:
            print(f"error: {onnx_path}: {e}", file=sys.stderr)
            return 1
        print(engine)
    return 0


if __name__ == "__main__":
    sys.exit(main())
