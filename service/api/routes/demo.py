"""GET /: the self-contained demo page (no CDN; its sample images are under /static/samples)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

STATIC_DIR = Path(__file__).resolve().parents[2] / "static"

router = APIRouter(include_in_schema=False)


@router.get("/")
async def demo_page() -> FileResponse:
    """The demo page: pick or upload an image, type an expression, see boxes and mask."""
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html")
