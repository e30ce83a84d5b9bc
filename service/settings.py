"""Service settings: one `Settings` (pydantic-settings), read from `DIFFPROMPT_*` variables and `.env`.

    DIFFPROMPT_ARTIFACT_DIR=artifacts/diffprompt-5steps DIFFPROMPT_PROVIDERS=cpu python -m diffprompt.service

Lists take JSON or commas (`DIFFPROMPT_PROVIDERS=tensorrt,cuda,cpu`). Everything is validated when
the process starts (`get_settings()`), so a typo fails before the server listens. Units are in the
names: `_ms`, `_s`, `_bytes`, `_pixels`, `_chars`.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from diffprompt.core.manifest import MANIFEST_FILE
from diffprompt.core.providers import PROVIDER_NAMES

DEFAULT_ARTIFACT = Path("artifacts/diffprompt-5steps")


def _split_list(value: object) -> object:
    """'a, b' -> ['a', 'b']; JSON lists and real lists pass through."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            import json

            return json.loads(text)
        return [part.strip() for part in text.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    """Every knob of the service; env var = `DIFFPROMPT_` + the upper-case field name."""

    model_config = SettingsConfigDict(env_prefix="DIFFPROMPT_", env_file=".env", env_file_encoding="utf-8",
                                      extra="ignore", frozen=True)

    # -- model -----------------------------------------------------------------------------------
    artifact_dir: Path = Field(DEFAULT_ARTIFACT, description="exported artifact directory (has manifest.json)")
    providers: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["tensorrt", "cuda", "cpu"],
        description="onnxruntime execution providers to try, in order (tensorrt, cuda, cpu)")
    fp16: bool = Field(True, description="TensorRT fp16 kernels")
    engine_cache_dir: Path | None = Field(None, description="TensorRT engine/timing cache directory")
    intra_op_threads: int | None = Field(None, ge=0, description="onnxruntime threads per graph (None = all cores)")
    spin_wait: bool = Field(False, description="let onnxruntime's idle intra-op threads spin before sleeping "
                            "(its own default; off here: on a few cores the spinning takes CPU from decoding, "
                            "batching and HTTP, benchmarks/service_overhead.py)")
    check_hashes: bool = Field(True, description="verify the sha256 of every artifact file at start")
    warmup_batch_sizes: Annotated[list[int], NoDecode] = Field(
        default_factory=list, description="batch sizes run once before ready (empty = 1, 2 and the batch cap, "
        "measured against free memory; the cap only when it runs in seconds)")

    # -- batching and back-pressure --------------------------------------------------------------
    max_batch_size: int = Field(16, ge=1, le=1024, description="most requests in one runtime.ground call "
                                "(on CPU lowered at start-up to what memory_fraction of the free memory holds)")
    memory_fraction: float = Field(0.6, gt=0, le=1.0, description="share of the memory free after warm-up "
                                   "that a batch may take (sizes the batch cap; ignored with warmup_batch_sizes)")
    max_wait_ms: float = Field(5.0, ge=0, le=60_000, description="how long a batch waits to fill up")
    max_queue: int = Field(64, ge=1, description="requests admitted but not yet running; more -> 503")
    request_timeout_s: float = Field(30.0, gt=0, description="queue wait + inference budget per request; -> 504 "
                                     "(if not set, raised at start-up to 4 full batches on a slow CPU model)")
    retry_after_s: int = Field(1, ge=0, description="Retry-After header on 503")
    preprocess_threads: int = Field(2, ge=1, le=64, description="threads decoding images and encoding masks")

    # -- input limits ----------------------------------------------------------------------------
    max_body_bytes: int = Field(10 * 1024 * 1024, ge=1024, description="request body cap (413 beyond)")
    body_drain_bytes: int = Field(
        64 * 1024 * 1024, ge=0, description="after a 413 body_too_large, read and discard the rest of a body up to "
                                            "this size (so clients that send all before reading see the 413)")
    body_drain_timeout_s: float = Field(30.0, ge=0, description="longest time spent discarding such a body")
    max_image_pixels: int = Field(25_000_000, ge=64 * 64, description="width x height cap (413 beyond)")
    max_expression_chars: int = Field(256, ge=1, le=10_000, description="expression length cap")
    default_top_k: int = Field(5, ge=1, le=100, description="boxes returned when top_k is not given")

    # -- HTTP ------------------------------------------------------------------------------------
    host: str = Field("127.0.0.1", description="bind address of `python -m diffprompt.service`")
    port: int = Field(8000, ge=0, le=65535, description="port of `python -m diffprompt.service`")
    api_key: SecretStr | None = Field(None, description="if set, /v1/* needs `Authorization: Bearer <key>`")
    shutdown_drain_s: float = Field(0.0, ge=0, description="after SIGTERM: answer /readyz 503 but keep serving")
    shutdown_timeout_s: float = Field(60.0, gt=0, description="longest wait for in-flight requests at shutdown")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field("info", description="log level")
    access_log: bool = Field(True, description="uvicorn's one line per request")

    @field_validator("providers", "warmup_batch_sizes", mode="before")
    @classmethod
    def _lists(cls, value: object) -> object:
        return _split_list(value)

    @field_validator("providers")
    @classmethod
    def _known_providers(cls, value: list[str]) -> list[str]:
        names = [v.lower() for v in value]
        unknown = [v for v in names if v not in PROVIDER_NAMES]
        if unknown or not names:
            raise ValueError(f"providers must be a non-empty list of {sorted(PROVIDER_NAMES)}, got {value}")
        return names

    @field_validator("api_key")
    @classmethod
    def _non_empty_key(cls, value: SecretStr | None) -> SecretStr | None:
        return value if value is not None and value.get_secret_value() else None

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if not (self.artifact_dir / MANIFEST_FILE).is_file():
            raise ValueError(f"artifact_dir {self.artifact_dir}: no {MANIFEST_FILE} (export one with "
                             "`diffprompt export`, or set DIFFPROMPT_ARTIFACT_DIR)")
        if any(not 1 <= b <= 4096 for b in self.warmup_batch_sizes):
            raise ValueError(f"warmup_batch_sizes must be in 1..4096, got {self.warmup_batch_sizes}")
        return self

    @property
    def warmup_sizes(self) -> tuple[int, ...]:
        """Batch sizes to warm up by hand: the configured ones, else 1 and max_batch_size (GPU providers)."""
        return tuple(sorted(set(self.warmup_batch_sizes or [1, self.max_batch_size])))


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings, read and validated once."""
    return Settings()
