"""The seam between HTTP and inference (like vLLM's EngineClient): `Engine.predict` and `check_health`.

    engine = Engine(settings, metrics)
    await engine.validate()        # artifact files and hashes; raises ArtifactError (start-up fails)
    engine.start()                 # load the ONNX sessions + warm up in the background -> READY
    prediction = await engine.predict(image_bytes, GroundOptions("the red circle", top_k=5))
    await engine.close()           # finish admitted requests, stop

Per request: decode + preprocess in a thread pool ("decode" stage), one slot in a micro-batch
(service.batching) whose single `runtime.ground` call runs in the inference thread (condition,
sampler, prompt_builder, grounding stages; P(no match) too when the artifact is calibrated), then
top-k, pixel boxes and the mask PNG in the thread pool ("postprocess"). Routes only see `Engine`;
nothing here imports torch.
"""

from __future__ import annotations

import asyncio
import enum
import io
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from diffprompt.core.boxes import boxes_to_pixels, on_image
from diffprompt.core.images import mask_from_input_frame
from diffprompt.core.manifest import Manifest, validate_artifact
from diffprompt.core.pipeline import sigmoid
from diffprompt.core.providers import ProviderConfig, engine_cache_subdir
from diffprompt.core.runtime import GroundingRuntime
from diffprompt.service.batching import MicroBatcher
from diffprompt.service.errors import EngineFailed, MaskUnavailable, NotReady, RequestTimeout, ShuttingDown
from diffprompt.service.images import configure_pillow, decode_image
from diffprompt.service.memory import available_bytes, batch_cap, rss_bytes
from diffprompt.service.metrics import Metrics
from diffprompt.service.settings import Settings

log = logging.getLogger(__name__)
FULL_WARMUP_MAX_S = 10.0  # warm the full batch up at start-up only when it takes less than this


class EngineState(str, enum.Enum):
    LOADING = "loading"  # validating, creating sessions, warming up
    READY = "ready"
    DRAINING = "draining"  # SIGTERM received: still serving, /readyz answers 503
    STOPPED = "stopped"
    FAILED = "failed"  # loading failed or the batch worker died


@dataclass(frozen=True)
class GroundOptions:
    """What to ground and how much to return (validated by the HTTP layer)."""

    expression: str
    top_k: int = 5
    score_threshold: float = 0.0
    return_mask: bool = False
    seed: int = 0


@dataclass(frozen=True)
class Detection:
    rank: int  # 1 = best
    score: float  # in [0, 1]
    xyxy: tuple[float, float, float, float]  # pixels of the (EXIF-rotated) input image


@dataclass(frozen=True)
class Prediction:
    width: int
    height: int
    detections: list[Detection]
    mask_png: bytes | None  # 1-bit PNG, width x height, white = the generated mask
    model_version: str
    ddim_steps: int
    seed: int
    no_match: float | None = None  # P(the object is not in the image); None without a calibrator
    no_match_threshold: float | None = None  # the calibrator's threshold chosen on val


@dataclass(frozen=True)
class Health:
    state: EngineState
    message: str

    @property
    def ready(self) -> bool:
        return self.state is EngineState.READY

    @property
    def alive(self) -> bool:
        return self.state is not EngineState.FAILED


@dataclass(frozen=True)
class _Item:
    pixels: np.ndarray  # (3, S, S) float32
    expression: str
    seed: int


@dataclass(frozen=True)
class _Raw:
    scores: np.ndarray  # (P,)
    boxes: np.ndarray  # (P, 4) cxcywh in [0, 1] of the input square
    mask_logits: np.ndarray | None  # (m, m)
    no_match: float | None  # P(no match), if the artifact is calibrated


class Engine:
    """Owns the onnxruntime `GroundingRuntime`, the micro-batcher and the thread pools."""

    def __init__(self, settings: Settings, metrics: Metrics):
        self.settings, self.metrics = settings, metrics
        self.state = EngineState.LOADING
        self.message = "not started"
        self.manifest: Manifest | None = None
        self.runtime: GroundingRuntime | None = None
        self.max_batch_size = settings.max_batch_size  # lowered at load time if memory cannot hold it
        self.request_timeout_s = settings.request_timeout_s  # raised at load time for a slow model (_fit_timeout)
        self.batcher: MicroBatcher[_Item, _Raw] | None = None
        self._infer_pool = ThreadPoolExecutor(1, thread_name_prefix="diffprompt-infer")
        self._cpu_pool = ThreadPoolExecutor(settings.preprocess_threads, thread_name_prefix="diffprompt-cpu")
        self._load_task: asyncio.Task | None = None
        configure_pillow(settings.max_image_pixels)

    # -- life cycle -------------------------------------------------------------------------------

    async def validate(self) -> None:
        """Check the artifact's files (and sha256 unless disabled); raises ArtifactError naming the file."""
        s = self.settings
        self.message = f"validating {s.artifact_dir}"
        self.manifest = await asyncio.to_thread(validate_artifact, s.artifact_dir, s.check_hashes)

    def start(self) -> None:
        """Load the sessions and warm up in the background; the state becomes READY (or FAILED)."""
        self._load_task = asyncio.get_running_loop().create_task(self._load(), name="engine-load")

    async def _load(self) -> None:
        s = self.settings
        self.message = f"loading {s.artifact_dir} and warming up"
        log.info("%s", self.message)
        start = time.perf_counter()
        try:
            self.runtime = await asyncio.get_running_loop().run_in_executor(self._infer_pool, self._load_runtime)
        except Exception as e:  # onnxruntime / provider errors: report on /livez, /readyz and in the log
            log.exception("loading %s failed", s.artifact_dir)
            self.state, self.message = EngineState.FAILED, f"loading {s.artifact_dir} failed: {e}"
            return
        rt = self.runtime
        self.metrics.model_info.info({"model_version": self.model_version, "ddim_steps": str(rt.steps),
                                      "provider": rt.provider, "providers": rt.describe(),
                                      "method": self.method})
        self.batcher = MicroBatcher(self._run_batch, self._infer_pool, max_batch_size=self.max_batch_size,
                                    max_wait_s=s.max_wait_ms / 1000.0, max_queue=s.max_queue,
                                    retry_after_s=s.retry_after_s, metrics=self.metrics)
        self.batcher.start()
        served = f"{self.model_version} ({rt.steps} DDIM steps) on {rt.describe()}"
        if self.state is EngineState.LOADING:  # not if SIGTERM came while loading
            self.state, self.message = EngineState.READY, served
        log.info("loaded and warmed up in %.1f s: %s", time.perf_counter() - start, served)

    def _load_runtime(self) -> GroundingRuntime:
        s = self.settings
        top = max(s.max_batch_size, *s.warmup_sizes)
        config = ProviderConfig(preferred=tuple(s.providers), fp16=s.fp16,
                                engine_cache_dir=self._engine_cache_dir(),
                                min_batch=1, opt_batch=s.max_batch_size, max_batch=top,
                                intra_op_threads=s.intra_op_threads, spin_wait=s.spin_wait)
        runtime = GroundingRuntime.load(s.artifact_dir, config, check_hashes=False, warmup=False)  # hashed above
        if s.warmup_batch_sizes or runtime.provider != "CPUExecutionProvider":
            runtime.warmup(s.warmup_sizes)  # sizes set by hand, or device memory that RSS does not show
            self.max_batch_size = s.max_batch_size
            return runtime
        self.max_batch_size = self._fit_batch_to_memory(runtime)
        return runtime

    def _fit_batch_to_memory(self, runtime: GroundingRuntime) -> int:
        """Warm up at 1 and 2, measure what one more item costs, and cap batches to what memory holds.

        A small model keeps `max_batch_size`; OWLv2 at 960 px (GBs per item) gets a cap that fits in
        `memory_fraction` of the memory available after warm-up (service/memory.py). The full batch
        is warmed up too only when it is cheap (under `FULL_WARMUP_MAX_S` by the batch-2 timing): at
        OWLv2 size it would take minutes on a CPU and add nothing the first full batch does not do.
        The request timeout follows the full batch's (measured or extrapolated) seconds. Returns the cap.
        """
        s = self.settings
        before = rss_bytes()
        start = time.perf_counter()
        runtime.warmup((1,))
        per_item_s = time.perf_counter() - start  # a cold run: an upper bound
        one = rss_bytes()
        warmed = 1
        if s.max_batch_size >= 2:
            start = time.perf_counter()
            runtime.warmup((2,))
            per_item_s = (time.perf_counter() - start) / 2
            warmed = 2
        two = rss_bytes()
        if before is None or one is None or two is None:
            cap = s.max_batch_size
        else:
            per_item = max(two - one, (one - before) / 2)
            cap = batch_cap(per_item, available_bytes(), s.memory_fraction, warmed, s.max_batch_size)
            log.info("one batch item holds ~%.0f MB; batches capped at %d (max_batch_size %d)",
                     per_item / 2**20, cap, s.max_batch_size)
        full_batch_s = cap * per_item_s  # linear: batching saves little on a CPU
        if cap > warmed and full_batch_s <= FULL_WARMUP_MAX_S:
            start = time.perf_counter()
            runtime.warmup((cap,))
            full_batch_s = time.perf_counter() - start
        self._fit_timeout(full_batch_s)
        return cap

    def _fit_timeout(self, full_batch_s: float) -> None:
        """Unless request_timeout_s was set, give a request time for 4 full batches (its own and the queue's).

        30 s suits the embedded default (milliseconds per batch); OWLv2 B/16 at 960 px on a CPU takes
        tens of seconds per batch, and every request would time out under the default.
        """
        s = self.settings
        if "request_timeout_s" in s.model_fields_set:
            return
        self.request_timeout_s = max(s.request_timeout_s, round(4 * full_batch_s, 1))
        if self.request_timeout_s > s.request_timeout_s:
            log.info("a full batch takes %.1f s: request timeout raised to %.1f s (set "
                     "DIFFPROMPT_REQUEST_TIMEOUT_S to choose)", full_batch_s, self.request_timeout_s)

    def _engine_cache_dir(self) -> str | None:
        """The TensorRT engine cache of this model and runtime build (deploy/README.md, section 6)."""
        if not self.settings.engine_cache_dir:
            return None
        return engine_cache_subdir(self.settings.engine_cache_dir, self.model_version)

    def begin_shutdown(self) -> None:
        """SIGTERM: keep serving, but tell load balancers to stop sending (readiness 503)."""
        if self.state in (EngineState.LOADING, EngineState.READY):
            self.state, self.message = EngineState.DRAINING, "shutting down: finishing in-flight requests"
            log.info("%s", self.message)

    async def close(self) -> None:
        """Finish every admitted request, then stop the worker and the thread pools."""
        self.begin_shutdown()
        if self._load_task is not None:
            await asyncio.gather(self._load_task, return_exceptions=True)
        if self.batcher is not None:
            await self.batcher.stop()
        if self.state is not EngineState.FAILED:
            self.state, self.message = EngineState.STOPPED, "stopped"
        self._infer_pool.shutdown(wait=True)
        self._cpu_pool.shutdown(wait=True)

    def check_health(self) -> Health:
        """Current state; a dead batch worker turns READY into FAILED."""
        worker_died = self.batcher is not None and not self.batcher.alive and not self.batcher.closed
        if self.state in (EngineState.READY, EngineState.DRAINING) and worker_died:
            self.state, self.message = EngineState.FAILED, "the batch worker stopped unexpectedly"
        return Health(self.state, self.message)

    # -- facts about the model ----------------------------------------------------------------------

    @property
    def model_version(self) -> str:
        return self.manifest.model_version if self.manifest else "unknown"

    @property
    def method(self) -> str:
        return self.manifest.method if self.manifest else ""

    @property
    def ddim_steps(self) -> int:
        return self.manifest.ddim_steps if self.manifest else 0

    @property
    def makes_masks(self) -> bool:
        return self.manifest is not None and self.manifest.makes_masks

    def describe(self) -> dict[str, Any]:
        rt = self.runtime
        return {"model_version": self.model_version, "ddim_steps": self.ddim_steps,
                "method": self.method or None, "provider": rt.provider if rt else None,
                "providers": rt.describe() if rt else None, "makes_masks": self.makes_masks,
                "no_match_threshold": (self.manifest.no_match.threshold
                                       if self.manifest and self.manifest.no_match else None),
                "max_batch_size": self.max_batch_size, "request_timeout_s": self.request_timeout_s}

    # -- inference --------------------------------------------------------------------------------

    async def predict(self, image: bytes, options: GroundOptions) -> Prediction:
        """Ground `options.expression` in the encoded `image`; raises ServiceError (4xx/5xx) on failure."""
        health = self.check_health()
        if health.state is EngineState.FAILED:
            raise EngineFailed(health.message)
        if health.state is EngineState.STOPPED:
            raise ShuttingDown("the server is shutting down")
        if health.state is EngineState.LOADING or self.batcher is None:
            raise NotReady(f"the model is not ready yet ({health.message})",
                           headers={"Retry-After": str(self.settings.retry_after_s)})
        if options.return_mask and not self.makes_masks:
            raise MaskUnavailable(f"{self.model_version} ({self.method}) generates no mask; "
                                  "send return_mask=false")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.request_timeout_s
        with self.batcher.on_the_way():  # a batch being formed waits for this request (service.batching)
            width, height, pixels = await self._timed("decode", self._prepare, image)
        if loop.time() >= deadline:
            raise RequestTimeout(f"decoding took longer than request_timeout_s = {self.request_timeout_s}",
                                 detail={"timeout_s": self.request_timeout_s})
        raw = await self.batcher.submit(_Item(pixels, options.expression, options.seed), deadline - loop.time())
        return await self._timed("postprocess", self._postprocess, raw, width, height, options)

    async def _timed(self, stage: str, fn, *args):
        start = time.perf_counter()
        try:
            return await asyncio.get_running_loop().run_in_executor(self._cpu_pool, fn, *args)
        finally:
            self.metrics.stage_duration.labels(stage=stage).observe(time.perf_counter() - start)

    def _prepare(self, data: bytes) -> tuple[int, int, np.ndarray]:
        """Bytes -> (width, height, normalised pixels (3, S, S)); 4xx errors for bad images."""
        decoded = decode_image(data, self.settings.max_image_pixels)
        assert self.manifest is not None
        pixels = self.manifest.image.preprocess(decoded.image)
        return decoded.width, decoded.height, pixels

    def _run_batch(self, items: list[_Item]) -> list[_Raw]:
        """One runtime.ground call for the whole batch (runs in the inference thread)."""
        assert self.runtime is not None
        ids, mask = self.runtime.tokenizer([it.expression for it in items])
        result = self.runtime.ground(np.stack([it.pixels for it in items]), ids, mask, [it.seed for it in items])
        self.metrics.observe_stages(result.seconds)
        logits, no_match = result.mask_logits, result.no_match
        return [_Raw(result.scores[i], result.boxes[i], None if logits is None else logits[i],
                     None if no_match is None else float(no_match[i])) for i in range(len(items))]

    def _postprocess(self, raw: _Raw, width: int, height: int, options: GroundOptions) -> Prediction:
        """Top-k boxes above the threshold in pixels (rounded to 0.01 px, scores to 1e-6), mask as PNG."""
        assert self.manifest is not None
        resize_mode = self.manifest.image.resize_mode
        scores = np.round(raw.scores.astype(np.float64), 6)  # as reported, so the threshold applies to these
        order = np.argsort(-scores, kind="stable")
        visible = on_image(boxes_to_pixels(raw.boxes, width, height, resize_mode))  # not wholly in the padding
        keep = [int(i) for i in order if scores[i] >= options.score_threshold and visible[i]][: options.top_k]
        xyxy = boxes_to_pixels(raw.boxes[keep], width, height, resize_mode) if keep else np.zeros((0, 4))
        detections = [Detection(rank=r + 1, score=float(scores[i]),
                                xyxy=tuple(round(float(v), 2) for v in box))  # type: ignore[arg-type]
                      for r, (i, box) in enumerate(zip(keep, xyxy))]
        mask_png = None
        if options.return_mask and raw.mask_logits is not None:
            mask = mask_from_input_frame(sigmoid(raw.mask_logits.astype(np.float64)), width, height, resize_mode)
            buffer = io.BytesIO()
            Image.fromarray(mask).save(buffer, format="PNG")  # bool -> mode "1"
            mask_png = buffer.getvalue()
        calibration = self.manifest.no_match
        return Prediction(width, height, detections, mask_png, self.model_version, self.ddim_steps, options.seed,
                          no_match=None if raw.no_match is None else round(raw.no_match, 6),
                          no_match_threshold=None if calibration is None else round(calibration.threshold, 6))
