"""Request and response bodies, named by role (GroundRequest, GroundResponse, ErrorResponse, ...).

`POST /v1/ground` takes either a JSON `GroundRequest` (image as base64) or a multipart form shaped
like `GroundForm` (image as a file part); both carry the same `GroundParams`.
"""

from __future__ import annotations

import base64
import unicodedata
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from diffprompt.service.engine import GroundOptions, Prediction
from diffprompt.service.errors import ExpressionEmpty, ExpressionInvalid, ExpressionTooLong

MAX_SEED = 2**31 - 1
MAX_TOP_K = 100
EXAMPLE_PNG_BASE64 = ("iVBORw0KGgoAAAANSUhEUgAAAAgAAAAICAIAAABLbSncAAAAFUlEQVR42mM8oaHBgA0wMeAAg1MCAOA4ASjhBhuDAAAAAE"
                      "lFTkSuQmCC")
"""An 8 x 8 red PNG: the OpenAPI example, so generated requests include a valid image."""


class GroundParams(BaseModel):
    """Everything but the image."""

    model_config = ConfigDict(extra="forbid")

    expression: str = Field(description="referring expression, e.g. 'the second star from the left'",
                            examples=["the red circle"])
    top_k: int | None = Field(None, ge=1, le=MAX_TOP_K,
                              description="most boxes to return, best first (default: the server's default_top_k)")
    score_threshold: float = Field(0.0, ge=0.0, le=1.0, description="drop boxes scoring below this (0..1)")
    return_mask: bool = Field(False, description="also return the generated mask as a PNG (base64)")
    seed: int = Field(0, ge=0, le=MAX_SEED,
                      description="seed of the diffusion sampler's noise; same seed + same input = same output")

    def options(self, expression: str, default_top_k: int) -> GroundOptions:
        return GroundOptions(expression=expression, top_k=self.top_k or default_top_k,
                             score_threshold=self.score_threshold, return_mask=self.return_mask, seed=self.seed)


class GroundRequest(GroundParams):
    """JSON body of POST /v1/ground."""

    image_base64: str = Field(description="PNG, JPEG or WebP file, base64 ('data:image/...;base64,' prefix allowed)",
                              examples=[EXAMPLE_PNG_BASE64])


class GroundForm(GroundParams):
    """multipart/form-data body of POST /v1/ground (documentation only: fields arrive as form parts)."""

    image: bytes = Field(description="PNG, JPEG or WebP file")


class Box(BaseModel):
    rank: int = Field(ge=1, description="1 = highest score")
    score: float = Field(ge=0.0, le=1.0, description="grounding score in [0, 1]")
    xyxy: list[float] = Field(min_length=4, max_length=4,
                              description="[x0, y0, x1, y1] in pixels of the EXIF-rotated input image")


class GroundResponse(BaseModel):
    """Ranked boxes for one expression, optionally the generated mask, and P(no match) if calibrated."""

    model_version: str
    ddim_steps: int = Field(description="DDIM steps the served artifact runs (0: no diffusion)")
    seed: int
    expression: str = Field(description="the expression as grounded (surrounding whitespace removed)")
    width: int = Field(description="image width in pixels, after EXIF rotation")
    height: int = Field(description="image height in pixels, after EXIF rotation")
    box_format: Literal["xyxy_pixels"] = Field("xyxy_pixels", description="boxes are [x0, y0, x1, y1] pixels")
    boxes: list[Box] = Field(description="best first, at most top_k, each scoring >= score_threshold")
    mask_png_base64: str | None = Field(None, description="1-bit PNG, width x height, white = the generated "
                                                          "mask; null unless return_mask")
    no_match: float | None = Field(
        None, ge=0.0, le=1.0,
        description="probability that the expression's object is not in the image at all, from the artifact's "
                    "no-match calibrator (logistic regression on the pipeline's own features, fitted and measured "
                    "on the synthetic world: docs/results.md); null if the artifact has no calibrator")
    no_match_threshold: float | None = Field(
        None, ge=0.0, le=1.0,
        description="the calibrator's decision threshold, chosen on val: no_match >= no_match_threshold means "
                    "'probably not in the image' (the boxes are still returned); null if no calibrator")

    @classmethod
    def from_prediction(cls, p: Prediction, expression: str) -> GroundResponse:
        return cls(model_version=p.model_version, ddim_steps=p.ddim_steps, seed=p.seed, expression=expression,
                   width=p.width, height=p.height,
                   boxes=[Box(rank=d.rank, score=d.score, xyxy=list(d.xyxy)) for d in p.detections],
                   mask_png_base64=base64.b64encode(p.mask_png).decode("ascii") if p.mask_png else None,
                   no_match=p.no_match, no_match_threshold=p.no_match_threshold)


class ErrorInfo(BaseModel):
    code: str = Field(description="machine-readable, e.g. not_an_image, queue_full (service/README.md lists all)")
    message: str = Field(description="for humans")
    detail: Any = Field(None, description="structured context, e.g. the invalid fields")


class ErrorResponse(BaseModel):
    """The one shape of every error response."""

    error: ErrorInfo


class HealthResponse(BaseModel):
    status: str = Field(description="loading, ready, draining, stopped or failed")
    message: str


class ReadyResponse(HealthResponse):
    model: dict[str, Any] = Field(description="model_version, ddim_steps, provider, ...")


def clean_expression(text: str, max_chars: int) -> str:
    """Strip surrounding whitespace; refuse empty, overlong, or control-character expressions."""
    text = text.strip()
    if not text:
        raise ExpressionEmpty("the expression is empty")
    if len(text) > max_chars:
        raise ExpressionTooLong(f"the expression has {len(text)} characters, the limit is {max_chars}",
                                detail={"length": len(text), "max_chars": max_chars})
    bad = sorted({f"U+{ord(c):04X}" for c in text if unicodedata.category(c) in ("Cc", "Cs")})
    if bad:
        raise ExpressionInvalid(f"the expression contains control characters {', '.join(bad[:5])}",
                                detail={"characters": bad[:20]})
    return text
