"""Choose onnxruntime execution providers (TensorRT > CUDA > CPU) and their options.

Used by the torch-free inference service and by the export tools. It never imports torch;
onnxruntime is imported lazily inside the functions that need it::

    config = ProviderConfig(engine_cache_dir="/var/cache/diffprompt/trt")
    shapes = {"pixel_values": ("batch", 3, 128, 128), "input_ids": ("batch", 16)}
    providers = select_providers(config, shapes)
    session = onnxruntime.InferenceSession(path, sess_options=session_options(config), providers=providers)
    log.info("providers: %s", describe(providers))

Input shapes use the string ``"batch"`` for the batch dimension; the TensorRT optimisation
profile covers ``min_batch``..``max_batch`` and is tuned for ``opt_batch``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover - typing only
    import onnxruntime

log = logging.getLogger(__name__)

BATCH = "batch"
"""Placeholder for the batch dimension in an input shape."""

CPU_PROVIDER = "CPUExecutionProvider"
CUDA_PROVIDER = "CUDAExecutionProvider"
TENSORRT_PROVIDER = "TensorrtExecutionProvider"

PROVIDER_NAMES: dict[str, str] = {
    "tensorrt": TENSORRT_PROVIDER,
    "cuda": CUDA_PROVIDER,
    "cpu": CPU_PROVIDER,
}
"""Short name -> onnxruntime provider name."""

InputShapes = Mapping[str, Sequence[int | str]]
Provider = tuple[str, dict[str, str]]


@dataclass(frozen=True)
class ProviderConfig:
    """Which providers to try, in order, and how to configure them."""

    preferred: tuple[str, ...] = ("tensorrt", "cuda", "cpu")
    fp16: bool = True
    engine_cache_dir: str | None = None
    min_batch: int = 1
    opt_batch: int = 8
    max_batch: int = 32
    device_id: int = 0
    intra_op_threads: int | None = None
    spin_wait: bool = True  # onnxruntime's default: idle intra-op threads spin before sleeping

    def __post_init__(self) -> None:
        if isinstance(self.preferred, str):
            raise TypeError(f"preferred must be a tuple of names, not the string {self.preferred!r}")
        check_batches(self.min_batch, self.opt_batch, self.max_batch)
        if self.device_id < 0:
            raise ValueError(f"device_id must be >= 0, got {self.device_id}")
        if self.intra_op_threads is not None and self.intra_op_threads < 0:
            raise ValueError(f"intra_op_threads must be >= 0 (0 = onnxruntime default), got {self.intra_op_threads}")


def check_batches(min_batch: int, opt_batch: int, max_batch: int) -> None:
    """Raise ValueError unless 1 <= min_batch <= opt_batch <= max_batch."""
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise ValueError(
            f"need 1 <= min_batch <= opt_batch <= max_batch, got min={min_batch} opt={opt_batch} max={max_batch}"
        )


def resolve_shape(shape: Sequence[int | str], batch: int) -> tuple[int, ...]:
    """Replace ``"batch"`` in ``shape`` with ``batch``; every other entry must be a positive int."""
    if isinstance(shape, str) or len(shape) == 0:
        raise ValueError(f"shape must be a non-empty sequence of dims, got {shape!r}")
    dims: list[int] = []
    for dim in shape:
        if dim == BATCH:
            dims.append(batch)
        elif isinstance(dim, int) and not isinstance(dim, bool) and dim > 0:
            dims.append(dim)
        else:
            raise ValueError(f"dims must be positive ints or {BATCH!r}, got {dim!r} in {tuple(shape)!r}")
    return tuple(dims)


def resolve_shapes(input_shapes: InputShapes, batch: int) -> dict[str, tuple[int, ...]]:
    """``resolve_shape`` for every input, keeping the input order."""
    resolved: dict[str, tuple[int, ...]] = {}
    for name, shape in input_shapes.items():
        if not name or any(c in name for c in ",:"):
            raise ValueError(f"input name {name!r} cannot be used in a TensorRT profile (empty, ',' or ':')")
        try:
            resolved[name] = resolve_shape(shape, batch)
        except ValueError as e:
            raise ValueError(f"input {name!r}: {e}") from None
    return resolved


def profile_shapes(input_shapes: InputShapes, batch: int) -> str:
    """onnxruntime's TensorRT profile format: ``name:1x3x128x128,name2:1x16``."""
    return ",".join(
        f"{name}:{'x'.join(str(d) for d in dims)}" for name, dims in resolve_shapes(input_shapes, batch).items()
    )


def engine_cache_subdir(root: str | os.PathLike, model_version: str) -> str:
    """`root/<model_version>/onnxruntime-<v>[-tensorrt-<v>]`: TensorRT engines are valid for one model
    and one runtime build only, so each gets its own directory (compute capability is in the file names)."""
    import onnxruntime

    if not model_version or any(c in model_version for c in "/\\") or model_version in (".", ".."):
        raise ValueError(f"model_version {model_version!r} cannot name a cache directory")
    runtime = f"onnxruntime-{onnxruntime.__version__}"
    try:
        import tensorrt  # only on GPU hosts with the TensorRT wheel

        runtime += f"-tensorrt-{tensorrt.__version__}"
    except ImportError:
        pass
    return os.path.join(os.fspath(root), model_version, runtime)


def available_providers() -> list[str]:
    """The execution providers this onnxruntime build offers."""
    import onnxruntime

    return list(onnxruntime.get_available_providers())


def _flag(value: bool) -> str:
    # onnxruntime's Python binding only accepts "True"/"False" for boolean TensorRT options.
    return "True" if value else "False"


def _tensorrt_options(config: ProviderConfig, input_shapes: InputShapes) -> dict[str, str]:
    options = {"device_id": str(config.device_id), "trt_fp16_enable": _flag(config.fp16)}
    if config.engine_cache_dir:
        cache_dir = os.path.abspath(config.engine_cache_dir)
        os.makedirs(cache_dir, exist_ok=True)
        options.update(
            trt_engine_cache_enable="True",
            trt_engine_cache_path=cache_dir,
            trt_timing_cache_enable="True",
            trt_timing_cache_path=cache_dir,
        )
    else:
        # Without a cache dir nothing is persisted (the timing cache would otherwise land in the cwd).
        options.update(trt_engine_cache_enable="False", trt_timing_cache_enable="False")
    if input_shapes:
        options.update(
            trt_profile_min_shapes=profile_shapes(input_shapes, config.min_batch),
            trt_profile_opt_shapes=profile_shapes(input_shapes, config.opt_batch),
            trt_profile_max_shapes=profile_shapes(input_shapes, config.max_batch),
        )
    return options


def select_providers(
    config: ProviderConfig, input_shapes: InputShapes, available: Sequence[str] | None = None
) -> list[Provider]:
    """Ordered ``(provider name, options)`` pairs for ``onnxruntime.InferenceSession(providers=...)``.

    Follows ``config.preferred``; providers missing from ``available`` (default: this
    onnxruntime build) are skipped with a warning. The list always ends with the CPU provider;
    names listed after ``"cpu"`` are ignored since the CPU provider runs every operator.
    """
    allowed = ", ".join(PROVIDER_NAMES)
    unknown = [name for name in config.preferred if str(name).lower() not in PROVIDER_NAMES]
    if unknown:
        raise ValueError(f"unknown execution provider name(s) {unknown}; allowed: {allowed}")
    available_set = set(available_providers() if available is None else available)

    selected: list[Provider] = []
    seen: set[str] = set()
    for position, short in enumerate(name.lower() for name in config.preferred):
        if short in seen:
            continue
        seen.add(short)
        if short == "cpu":
            ignored = [n for n in config.preferred[position + 1 :] if n.lower() != "cpu"]
            if ignored:
                log.warning("providers %s come after 'cpu' in the preference list and are ignored", ignored)
            break
        provider = PROVIDER_NAMES[short]
        if provider not in available_set:
            log.warning("%s requested but not available (available: %s); skipping", provider, sorted(available_set))
            continue
        if short == "tensorrt":
            selected.append((provider, _tensorrt_options(config, input_shapes)))
        else:  # cuda
            selected.append((provider, {"device_id": str(config.device_id)}))
    selected.append((CPU_PROVIDER, {}))
    return selected


_SHARED_CPU_ARENA = False


def share_cpu_arena() -> None:
    """Register one CPU arena allocator in onnxruntime's environment (once per process).

    Sessions created with `session.use_env_allocators` then draw their working memory from it
    instead of each keeping its own arena at its own peak: the two graphs that run the foundation
    (condition_encoder, grounding) run one after the other, so they can reuse the same memory.
    OWLv2 B/16 at 960 px, batch 1: 2.4 GB resident after both graphs ran, against 3.7 GB.
    """
    global _SHARED_CPU_ARENA
    if _SHARED_CPU_ARENA:
        return
    import onnxruntime

    info = onnxruntime.OrtMemoryInfo("Cpu", onnxruntime.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0,
                                     onnxruntime.OrtMemType.DEFAULT)
    try:
        # onnxruntime's defaults: unlimited, grown to the next power of two. Growing by exactly what is
        # asked (kSameAsRequested) fragments on a real model: OWLv2 batch 1 held 3.6 GB instead of 2.4.
        onnxruntime.create_and_register_allocator(info, onnxruntime.OrtArenaCfg(0, -1, -1, -1))
    except Exception as e:  # onnxruntime raises its own types; "already registered" is fine
        if "already" not in str(e).lower():
            raise
    _SHARED_CPU_ARENA = True


def session_options(config: ProviderConfig) -> onnxruntime.SessionOptions:
    """Session options: all graph optimisations, the configured intra-op thread count and spinning, and
    the process-wide CPU arena (`share_cpu_arena`) instead of one arena per session."""
    import onnxruntime

    share_cpu_arena()
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.use_env_allocators", "1")
    if config.intra_op_threads is not None:
        options.intra_op_num_threads = config.intra_op_threads
    if not config.spin_wait:  # idle threads sleep at once: they leave the CPU to the HTTP side of the process
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return options


def describe(providers: Sequence[Provider | str]) -> str:
    """Short summary, e.g. ``TensorrtExecutionProvider(fp16, cache) > CPUExecutionProvider``."""
    parts: list[str] = []
    for entry in providers:
        name, options = (entry, {}) if isinstance(entry, str) else entry
        tags = _describe_options(options)
        parts.append(f"{name}({', '.join(tags)})" if tags else name)
    return " > ".join(parts)


def _describe_options(options: Mapping[str, Any]) -> list[str]:
    def on(key: str) -> bool:
        return str(options.get(key, "")).lower() in {"true", "1"}

    tags: list[str] = []
    if on("trt_fp16_enable"):
        tags.append("fp16")
    if on("trt_engine_cache_enable"):
        tags.append("cache")
    if str(options.get("device_id", "0")) != "0":
        tags.append(f"device {options['device_id']}")
    return tags
