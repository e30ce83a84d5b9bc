"""Typed dependencies: the settings, the engine, the API key check and the parsed ground request."""

from __future__ import annotations

import base64
import binascii
import hmac
import json
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from diffprompt.service.api.forms import read_multipart
from diffprompt.service.engine import Engine, GroundOptions
from diffprompt.service.errors import InvalidBase64, InvalidJSON, NotReady, Unauthorized, UnsupportedMediaType
from diffprompt.service.metrics import Metrics
from diffprompt.service.schemas import GroundParams, GroundRequest, clean_expression
from diffprompt.service.settings import Settings

MULTIPART_MAX_PARTS = 16


def get_app_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


def get_engine(request: Request) -> Engine:
    engine = getattr(request.app.state, "engine", None)
    if engine is None:
        raise NotReady("the engine is not created yet")
    return engine


SettingsDep = Annotated[Settings, Depends(get_app_settings)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
EngineDep = Annotated[Engine, Depends(get_engine)]

bearer = HTTPBearer(auto_error=False, description="the server's api_key, when one is configured")


def require_api_key(settings: SettingsDep,
                    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
    """Pass when no api_key is configured, or the bearer token equals it (constant-time compare)."""
    if settings.api_key is None:
        return
    expected = settings.api_key.get_secret_value().encode()
    given = credentials.credentials.encode() if credentials is not None else b""
    if not hmac.compare_digest(given, expected):
        raise Unauthorized("missing or wrong API key: send 'Authorization: Bearer <key>'",
                           headers={"WWW-Authenticate": "Bearer"})


@dataclass(frozen=True)
class GroundInput:
    image: bytes
    options: GroundOptions


async def read_ground_input(request: Request, settings: SettingsDep) -> GroundInput:
    """Parse POST /v1/ground: JSON (`image_base64`) or multipart (`image` file part), same parameters."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type == "application/json":
        params, image = await _read_json(request)
    elif media_type == "multipart/form-data":
        params, image = await _read_multipart(request)
    else:
        raise UnsupportedMediaType(f"content-type {media_type or '(none)'!r} is not accepted: send application/json "
                                   "with image_base64, or multipart/form-data with an image file part",
                                   detail={"accepted": ["application/json", "multipart/form-data"]})
    expression = clean_expression(params.expression, settings.max_expression_chars)
    return GroundInput(image, params.options(expression, settings.default_top_k))


async def _read_json(request: Request) -> tuple[GroundParams, bytes]:
    raw = await request.body()
    try:  # a body of megabytes: parse it off the event loop
        data = await run_in_threadpool(json.loads, raw)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, bad UTF-8, absurd nesting
        raise InvalidJSON(f"the body is not valid JSON ({type(e).__name__}: {e})") from None
    body = _validate(GroundRequest, data, loc="body")
    return body, await run_in_threadpool(_decode_base64, body.image_base64)


def _decode_base64(text: str) -> bytes:
    """Standard base64, whitespace ignored, an optional `data:...;base64,` prefix dropped."""
    text = text.strip()
    if text.startswith("data:") and "," in text[:100]:
        text = text.split(",", 1)[1]
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise InvalidBase64(f"image_base64 is not valid base64 ({e})") from None


async def _read_multipart(request: Request) -> tuple[GroundParams, bytes]:
    parts = await read_multipart(request.headers.get("content-type", ""), request.stream(), MULTIPART_MAX_PARTS)
    fields: dict[str, Any] = {}
    image: bytes | None = None
    for part in parts:
        if part.name in fields or (part.name == "image" and image is not None):
            raise RequestValidationError([_error(("body", part.name), f"form field {part.name!r} given twice")])
        if part.name == "image":
            image = bytes(part.data)
        elif part.is_file:
            fields[part.name] = "<file>"
        else:
            try:
                fields[part.name] = part.text()
            except UnicodeDecodeError as e:
                raise RequestValidationError([_error(
                    ("body", part.name), f"not valid UTF-8 text (byte {e.start}: {e.reason})", "string_unicode")],
                ) from None
    params = _validate(GroundParams, fields, loc="body", missing_image=image is None)
    return params, image or b""


def _validate(model: type[GroundParams], data: Any, loc: str, missing_image: bool = False) -> Any:
    errors: list[dict[str, Any]] = []
    try:
        result = model.model_validate(data)
    except ValidationError as e:
        errors = [_error((loc, *err["loc"]), err["msg"], err["type"]) for err in e.errors(include_url=False)]
        result = None
    if missing_image:
        errors.insert(0, _error((loc, "image"), "Field required (a file part named 'image')", "missing"))
    if errors:
        raise RequestValidationError(errors)
    return result


def _error(loc: tuple, msg: str, kind: str = "value_error") -> dict[str, Any]:
    return {"loc": list(loc), "msg": msg, "type": kind}


GroundInputDep = Annotated[GroundInput, Depends(read_ground_input)]
