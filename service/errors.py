"""The service's errors: one class per machine-readable `code`, one JSON shape for all of them.

Every failure answers `{"error": {"code": ..., "message": ..., "detail": ...}}` (schemas.ErrorResponse),
whether it is raised by our code, by FastAPI's validation, by Starlette's routing, or by a middleware.
"""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse


class ServiceError(Exception):
    """Base class: `status` HTTP status, `code` stable identifier, `message` for humans."""

    status = 500
    code = "internal_error"

    def __init__(self, message: str, detail: Any = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message, self.detail, self.headers = message, detail, headers or {}


# -- bad input (4xx) ------------------------------------------------------------------------------

class InvalidParameter(ServiceError):
    """A parameter is missing, mistyped or out of range."""

    status, code = 422, "invalid_parameter"


class ExpressionEmpty(ServiceError):
    """The expression is empty or only whitespace."""

    status, code = 422, "expression_empty"


class ExpressionTooLong(ServiceError):
    """The expression is longer than max_expression_chars."""

    status, code = 422, "expression_too_long"


class ExpressionInvalid(ServiceError):
    """The expression contains control characters."""

    status, code = 422, "expression_invalid"


class MaskUnavailable(ServiceError):
    """return_mask asked of a model that generates no mask."""

    status, code = 422, "mask_unavailable"


class BadRequest(ServiceError):
    """A malformed body (e.g. multipart/form-data without a boundary or with broken framing)."""

    status, code = 400, "bad_request"


class InvalidJSON(ServiceError):
    """The JSON body does not parse."""

    status, code = 400, "invalid_json"


class InvalidBase64(ServiceError):
    """image_base64 is not valid base64."""

    status, code = 400, "invalid_base64"


class NotAnImage(ServiceError):
    """The bytes are not a recognisable image."""

    status, code = 400, "not_an_image"


class ImageCorrupt(ServiceError):
    """The image is truncated or damaged."""

    status, code = 400, "image_corrupt"


class UnsupportedImageFormat(ServiceError):
    """The image is not PNG, JPEG or WebP."""

    status, code = 415, "unsupported_image_format"


class UnsupportedMediaType(ServiceError):
    """The body is neither application/json nor multipart/form-data."""

    status, code = 415, "unsupported_media_type"


class ImageTooLarge(ServiceError):
    """width x height exceeds max_image_pixels."""

    status, code = 413, "image_too_large"


class DecompressionBomb(ServiceError):
    """The image declares more than 2 x max_image_pixels (Pillow's bomb limit)."""

    status, code = 413, "decompression_bomb"


class BodyTooLarge(ServiceError):
    """The request body exceeds max_body_bytes."""

    status, code = 413, "body_too_large"


class ClientDisconnected(ServiceError):
    """The client went away before sending the whole body (nobody reads this answer; it is counted)."""

    status, code = 400, "client_disconnected"


class Unauthorized(ServiceError):
    """Missing or wrong bearer API key."""

    status, code = 401, "unauthorized"


# -- the service's own state (5xx) ----------------------------------------------------------------

class QueueFull(ServiceError):
    """Too many requests waiting; retry after Retry-After seconds."""

    status, code = 503, "queue_full"


class NotReady(ServiceError):
    """The model is still loading / warming up."""

    status, code = 503, "not_ready"


class EngineFailed(ServiceError):
    """The model failed to load or the engine stopped; see the server log."""

    status, code = 503, "engine_failed"


class ShuttingDown(ServiceError):
    """The server is shutting down and takes no new work."""

    status, code = 503, "shutting_down"


class RequestTimeout(ServiceError):
    """The request did not finish within request_timeout_s."""

    status, code = 504, "timeout"


HTTP_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
              405: "method_not_allowed", 406: "not_acceptable", 413: "body_too_large", 415: "unsupported_media_type"}
"""Starlette HTTPException status -> our code."""


def error_body(code: str, message: str, detail: Any = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "detail": detail}}


def error_response(status: int, code: str, message: str, detail: Any = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(code, message, detail), status_code=status, headers=headers)
