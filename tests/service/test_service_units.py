"""In-process checks of the pieces under the HTTP layer: settings parsing/validation and image decoding."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError
from service_testkit import bomb_png, cmyk_jpeg, encode, exif_rotated_jpeg, png_16bit, rgb_image, sample_png

from diffprompt.service import errors
from diffprompt.service.images import check_pixels, decode_image, sniff_format
from diffprompt.service.settings import Settings

# -- settings ---------------------------------------------------------------------------------------


def test_settings_from_env_with_comma_and_json_lists(monkeypatch, tiny_artifact):
    monkeypatch.setenv("DIFFPROMPT_ARTIFACT_DIR", str(tiny_artifact))
    monkeypatch.setenv("DIFFPROMPT_PROVIDERS", "CUDA, cpu")
    monkeypatch.setenv("DIFFPROMPT_MAX_WAIT_MS", "2.5")
    monkeypatch.setenv("DIFFPROMPT_API_KEY", "sEcReT-42")
    s = Settings(_env_file=None)
    assert s.providers == ["cuda", "cpu"] and s.max_wait_ms == 2.5 and s.api_key.get_secret_value() == "sEcReT-42"
    assert "sEcReT-42" not in repr(s)  # the key is a SecretStr
    monkeypatch.setenv("DIFFPROMPT_PROVIDERS", '["tensorrt", "cpu"]')
    monkeypatch.setenv("DIFFPROMPT_WARMUP_BATCH_SIZES", "1,4")
    s = Settings(_env_file=None)
    assert s.providers == ["tensorrt", "cpu"] and s.warmup_sizes == (1, 4)


def test_settings_from_a_dotenv_file(tmp_path, tiny_artifact, monkeypatch):
    for key in ("DIFFPROMPT_MAX_BATCH_SIZE", "DIFFPROMPT_ARTIFACT_DIR"):
        monkeypatch.delenv(key, raising=False)
    env = tmp_path / ".env"
    env.write_text(f"DIFFPROMPT_ARTIFACT_DIR={tiny_artifact}\nDIFFPROMPT_MAX_BATCH_SIZE=4\nDIFFPROMPT_API_KEY=\n")
    s = Settings(_env_file=env)
    assert s.max_batch_size == 4 and s.api_key is None  # an empty key means no key
    assert s.warmup_sizes == (1, 4)


@pytest.mark.parametrize("override, field", [
    ({"providers": ["cpu", "gpu"]}, "providers"),
    ({"providers": []}, "providers"),
    ({"max_batch_size": 0}, "max_batch_size"),
    ({"max_queue": 0}, "max_queue"),
    ({"request_timeout_s": 0}, "request_timeout_s"),
    ({"max_body_bytes": 10}, "max_body_bytes"),
    ({"default_top_k": 101}, "default_top_k"),
    ({"warmup_batch_sizes": [0]}, "warmup_batch_sizes"),
    ({"log_level": "loud"}, "log_level"),
])
def test_invalid_settings_are_refused(tiny_artifact, override, field):
    with pytest.raises(ValidationError, match=field):
        Settings(_env_file=None, artifact_dir=tiny_artifact, **override)


def test_artifact_dir_must_hold_a_manifest(tmp_path):
    with pytest.raises(ValidationError, match="no manifest.json"):
        Settings(_env_file=None, artifact_dir=tmp_path)


# -- image decoding -----------------------------------------------------------------------------------------


def test_sixteen_bit_png_is_scaled_not_clipped():
    decoded = decode_image(png_16bit(64, 48), max_pixels=10_000)
    pixels = np.asarray(decoded.image)
    assert decoded.image.mode == "RGB" and pixels.shape == (48, 64, 3)
    assert pixels.min() <= 2 and pixels.max() >= 253 and 100 < pixels.mean() < 155  # a full ramp, not all white


def test_alpha_is_composited_on_white():
    image = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent red
    pixels = np.asarray(decode_image(encode(image, "PNG"), 10_000).image)
    assert (pixels == 255).all()


def test_exif_orientation_and_cmyk():
    assert decode_image(exif_rotated_jpeg(96, 48, 6), 10_000).image.size == (48, 96)
    assert decode_image(exif_rotated_jpeg(96, 48, 3), 10_000).image.size == (96, 48)  # 180 degrees
    cmyk = decode_image(cmyk_jpeg(40, 30), 10_000)
    assert cmyk.image.mode == "RGB" and cmyk.format == "JPEG"


def test_animated_webp_uses_the_first_frame():
    frames = [Image.new("RGB", (16, 16), c) for c in [(255, 0, 0), (0, 0, 255)]]
    buffer = io.BytesIO()
    frames[0].save(buffer, "WEBP", save_all=True, append_images=frames[1:], lossless=True)
    pixels = np.asarray(decode_image(buffer.getvalue(), 10_000).image)
    assert pixels[..., 0].mean() > 200 and pixels[..., 2].mean() < 50


def test_bomb_is_refused_from_the_header_alone():
    with pytest.raises(errors.DecompressionBomb) as info:  # 900 MP: decoding it would need ~2.7 GB
        decode_image(bomb_png(30_000), max_pixels=1_000_000)
    assert info.value.detail["max_pixels"] == 1_000_000


def test_pixel_limits():
    check_pixels(1000, 1000, 1_000_000)
    with pytest.raises(errors.ImageTooLarge):
        check_pixels(1001, 1000, 1_000_000)
    with pytest.raises(errors.ImageTooLarge):
        check_pixels(2000, 1000, 1_000_000)
    with pytest.raises(errors.DecompressionBomb):
        check_pixels(2001, 1000, 1_000_000)


@pytest.mark.parametrize("data, name", [
    (encode(rgb_image(8, 8), "GIF"), "GIF"), (encode(rgb_image(8, 8), "BMP"), "BMP"),
    (encode(rgb_image(8, 8), "TIFF"), "TIFF"), (b"\x00\x00\x00\x1cftypavif" + bytes(20), "AVIF"),
    (b"%PDF-1.7\n", "PDF"), (b"<svg xmlns='http://www.w3.org/2000/svg'/>", "SVG"),
])
def test_refused_formats_are_named(data, name):
    with pytest.raises(errors.UnsupportedImageFormat) as info:
        sniff_format(data)
    assert info.value.detail["format"] == name


def test_allowed_formats_are_sniffed():
    assert sniff_format(sample_png()) == "PNG"
    assert sniff_format(encode(rgb_image(8, 8), "JPEG")) == "JPEG"
    assert sniff_format(encode(rgb_image(8, 8), "WEBP")) == "WEBP"
    with pytest.raises(errors.NotAnImage):
        sniff_format(b"plain text")


def test_a_png_header_with_garbage_after_it():
    with pytest.raises(errors.NotAnImage):
        decode_image(b"\x89PNG\r\n\x1a\n" + bytes(64), 10_000)
    with pytest.raises(errors.ImageCorrupt):
        decode_image(sample_png()[:300], 100_000)
