"""POST /v1/ground: image + referring expression -> ranked pixel boxes (+ the generated mask)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends

from diffprompt.service.api.deps import EngineDep, GroundInputDep, require_api_key
from diffprompt.service.schemas import ErrorResponse, GroundForm, GroundRequest, GroundResponse

router = APIRouter(prefix="/v1", tags=["grounding"], dependencies=[Depends(require_api_key)])

_ERRORS = {
    400: "not_an_image, image_corrupt, invalid_json, invalid_base64, bad_request (malformed multipart)",
    401: "unauthorized (an api_key is configured)",
    413: "body_too_large, image_too_large, decompression_bomb",
    415: "unsupported_image_format, unsupported_media_type",
    422: "invalid_parameter, expression_empty, expression_too_long, expression_invalid, mask_unavailable",
    503: "queue_full, not_ready, engine_failed, shutting_down (with Retry-After where retrying helps)",
    504: "timeout",
}
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": codes} for status, codes in _ERRORS.items()}

REQUEST_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": GroundRequest.model_json_schema()},
    "multipart/form-data": {"schema": GroundForm.model_json_schema()},
}}}


@router.post("/ground", response_model=GroundResponse, responses=ERROR_RESPONSES, openapi_extra=REQUEST_BODY)
async def ground(body: GroundInputDep, engine: EngineDep) -> GroundResponse:
    """Ground an expression in a PNG/JPEG/WebP image: top-k boxes as xyxy pixels, optionally the mask PNG."""
    prediction = await engine.predict(body.image, body.options)
    return GroundResponse.from_prediction(prediction, body.options.expression)
