"""GET /: the self-contained demo page (no CDN; its sample images are under /static/samples), and the favicon."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

STATIC_DIR = Path(__file__).resolve().parents[2] / "static"
FAVICON_URL = "/favicon.ico"

router = APIRouter(include_in_schema=False)


@router.get("/")
async def demo_page() -> FileResponse:
    """The demo page: pick or upload an image, type an expression, see boxes and mask."""
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html")


@router.get(FAVICON_URL)
async def favicon() -> FileResponse:
    """The icon browsers ask for on every page (the demo page and /docs link to it too)."""
    return FileResponse(STATIC_DIR / "favicon.ico", media_type="image/x-icon")
