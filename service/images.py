"""Untrusted image bytes -> an upright RGB PIL image, or a 4xx `ServiceError` saying why not.

Order of checks, cheapest first, nothing decoded before the size is known to be safe:
1. magic bytes: PNG, JPEG, WebP pass; GIF, BMP, TIFF, ICO, PDF, ... are `unsupported_image_format`;
   anything else is `not_an_image`. Only the three allowed Pillow plugins ever parse the bytes.
2. header only (`Image.open` is lazy): width x height over 2 x max_image_pixels is a
   `decompression_bomb` (Pillow's own rule), over max_image_pixels `image_too_large`.
3. full decode: truncated or damaged data is `image_corrupt`.
4. EXIF orientation applied (width/height are the rotated ones), first frame of animations,
   alpha composited on white, grayscale / palette / CMYK / 16-bit converted to 8-bit RGB.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from diffprompt.service.errors import DecompressionBomb, ImageCorrupt, ImageTooLarge, NotAnImage, UnsupportedImageFormat

ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP")

# (offset, signature, format name) of formats we recognise but do not accept.
_REFUSED_SIGNATURES = [
    (0, b"GIF87a", "GIF"), (0, b"GIF89a", "GIF"), (0, b"BM", "BMP"), (0, b"II*\x00", "TIFF"),
    (0, b"MM\x00*", "TIFF"), (0, b"\x00\x00\x01\x00", "ICO"), (0, b"%PDF", "PDF"), (0, b"8BPS", "PSD"),
    (0, b"\x00\x00\x00\x0cjP  ", "JPEG 2000"), (0, b"\xff\x4f\xff\x51", "JPEG 2000"), (0, b"qoif", "QOI"),
    (4, b"ftypavif", "AVIF"), (4, b"ftypheic", "HEIC"), (4, b"ftypmif1", "HEIF"), (0, b"%!PS", "PostScript"),
    (0, b"\xc5\xd0\xd3\xc6", "EPS"), (0, b"DDS ", "DDS"), (0, b"icns", "ICNS"),
]


@dataclass(frozen=True)
class DecodedImage:
    """An upright 8-bit RGB image and the format it came in."""

    image: Image.Image
    format: str

    @property
    def width(self) -> int:
        return self.image.width

    @property
    def height(self) -> int:
        return self.image.height


def configure_pillow(max_image_pixels: int) -> None:
    """Set Pillow's process-wide bomb limit to ours (it raises beyond 2x) and silence its 1x-2x warning."""
    Image.MAX_IMAGE_PIXELS = max_image_pixels
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)


def sniff_format(data: bytes) -> str:
    """'PNG' / 'JPEG' / 'WEBP' from the magic bytes, else a 4xx error naming what it is."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    for offset, signature, name in _REFUSED_SIGNATURES:
        if data[offset: offset + len(signature)] == signature:
            raise UnsupportedImageFormat(f"{name} images are not accepted; send PNG, JPEG or WebP",
                                         detail={"format": name, "allowed": list(ALLOWED_FORMATS)})
    if data.lstrip()[:5].lower() in (b"<svg ", b"<?xml"):
        raise UnsupportedImageFormat("SVG images are not accepted; send PNG, JPEG or WebP",
                                     detail={"format": "SVG", "allowed": list(ALLOWED_FORMATS)})
    raise NotAnImage("the data is not a PNG, JPEG or WebP image", detail={"allowed": list(ALLOWED_FORMATS)})


def check_pixels(width: int, height: int, max_pixels: int) -> None:
    """Raise unless width x height is within max_pixels (decompression bomb beyond 2x)."""
    pixels = width * height
    detail = {"width": width, "height": height, "pixels": pixels, "max_pixels": max_pixels}
    if pixels > 2 * max_pixels:
        raise DecompressionBomb(f"{width}x{height} = {pixels} pixels is over twice the limit of {max_pixels}: "
                                "refused as a decompression bomb", detail=detail)
    if pixels > max_pixels:
        raise ImageTooLarge(f"{width}x{height} = {pixels} pixels is over the limit of {max_pixels}", detail=detail)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB: alpha over white, 16/32-bit integer scaled, CMYK / palette / gray converted."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
        image = Image.fromarray(np.clip(values * (255.0 / top) + 0.5, 0, 255).astype(np.uint8), mode="L")
    elif image.mode == "F":
        image = Image.fromarray(np.clip(np.asarray(image) * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P" or image.mode in ("LA", "PA", "La", "RGBa"):
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    return image.convert("RGB") if image.mode != "RGB" else image


def decode_image(data: bytes, max_pixels: int) -> DecodedImage:
    """Validate and decode untrusted bytes (see the module docstring for the order of checks)."""
    if not data:
        raise NotAnImage("the image is empty (0 bytes)")
    fmt = sniff_format(data)
    try:
        image = Image.open(io.BytesIO(data), formats=[fmt])
    except Image.DecompressionBombError as e:
        raise DecompressionBomb(f"refused as a decompression bomb: {e}", detail={"max_pixels": max_pixels}) from e
    except Exception as e:  # UnidentifiedImageError, SyntaxError, OSError, ... from a malformed header
        raise NotAnImage(f"the data starts like {fmt} but Pillow cannot read it ({e})") from e
    check_pixels(image.width, image.height, max_pixels)
    try:
        image.seek(0)  # the first frame of an animated PNG / WebP
        image.load()
        image = to_rgb(ImageOps.exif_transpose(image))
    except Image.DecompressionBombError as e:
        raise DecompressionBomb(f"refused as a decompression bomb: {e}", detail={"max_pixels": max_pixels}) from e
    except Exception as e:  # untrusted bytes: whatever the decoder trips on is the input's fault, not a 5xx
        raise ImageCorrupt(f"the {fmt} image is truncated or damaged ({type(e).__name__}: {e})",
                           detail={"format": fmt}) from e
    return DecodedImage(image, fmt)
