"""Input safety over HTTP: every bad input is a clear 4xx with its code, never a 5xx; odd images are converted."""

from __future__ import annotations

import base64
import socket

import pytest
from PIL import Image
from service_testkit import (
    assert_error,
    bomb_png,
    cmyk_jpeg,
    encode,
    exif_rotated_jpeg,
    metric,
    png_16bit,
    rgb_image,
    sample_png,
    wait_until,
)

# -- images the service must accept and convert ----------------------------------------------------


def test_exif_rotation_is_applied_and_reported(server):
    body = server.ground(exif_rotated_jpeg(96, 48, orientation=6), top_k=100).json()
    assert (body["width"], body["height"]) == (48, 96)  # the upright size, not the stored 96 x 48
    assert all(b["xyxy"][2] <= 48 and b["xyxy"][3] <= 96 for b in body["boxes"])


@pytest.mark.parametrize("make, size", [
    (lambda: cmyk_jpeg(80, 60), (80, 60)),
    (lambda: png_16bit(64, 48), (64, 48)),
    (lambda: encode(rgb_image(50, 40).convert("L"), "PNG"), (50, 40)),
    (lambda: encode(rgb_image(50, 40).convert("RGBA"), "PNG"), (50, 40)),
    (lambda: encode(rgb_image(50, 40).convert("P"), "PNG"), (50, 40)),
    (lambda: encode(rgb_image(50, 40).convert("1"), "PNG"), (50, 40)),
    (lambda: encode(rgb_image(50, 40).convert("RGBA"), "WEBP", lossless=True), (50, 40)),
], ids=["cmyk-jpeg", "16bit-png", "gray-png", "rgba-png", "palette-png", "1bit-png", "rgba-webp"])
def test_image_modes_are_converted(server, make, size):
    r = server.ground(make())
    assert r.status_code == 200, r.text
    assert (r.json()["width"], r.json()["height"]) == size


# -- images the service must refuse -------------------------------------------------------------------


def test_decompression_bomb_is_refused_without_decoding(server):
    bomb = bomb_png(30_000)  # 900 megapixels in ~110 KB
    assert len(bomb) < 200_000
    err = assert_error(server.ground(bomb), 413, "decompression_bomb")
    assert err["detail"]["max_pixels"] == 1_000_000
    assert server.client.get("/livez").status_code == 200  # and the server is fine


def test_image_over_the_pixel_cap(server):
    big = encode(Image.new("RGB", (1200, 1000), (10, 20, 30)), "PNG")  # 1.2 MP: over 1 MP, under the bomb limit
    err = assert_error(server.ground(big), 413, "image_too_large")
    assert err["detail"] == {"width": 1200, "height": 1000, "pixels": 1_200_000, "max_pixels": 1_000_000}


def test_truncated_png(server):
    data = sample_png()
    assert_error(server.ground(data[: len(data) // 2]), 400, "image_corrupt")


def test_truncated_header_is_not_an_image(server):
    assert_error(server.ground(sample_png()[:20]), 400, "not_an_image")


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF", "ICO"])
def test_unsupported_formats(server, fmt):
    err = assert_error(server.ground(encode(rgb_image(32, 32), fmt)), 415, "unsupported_image_format")
    assert err["detail"]["format"] == fmt


@pytest.mark.parametrize("data", [b"", b"hello, world", b"\x00" * 100, b"<html></html>"],
                         ids=["empty", "text", "zeros", "html"])
def test_not_an_image(server, data):
    assert_error(server.ground(data), 400, "not_an_image")


def test_invalid_base64(server):
    r = server.client.post("/v1/ground", json={"image_base64": "not base64 !!!", "expression": "the star"})
    assert_error(r, 400, "invalid_base64")


# -- the body -------------------------------------------------------------------------------------------


def test_body_over_the_cap_by_content_length(server):
    payload = base64.b64encode(b"x" * 800_000).decode()  # ~1.07 MB of JSON > 1 MB
    r = server.client.post("/v1/ground", json={"image_base64": payload, "expression": "the star"})
    err = assert_error(r, 413, "body_too_large")
    assert "Content-Length" in err["message"] and err["detail"] == {"max_bytes": 1_000_000}


def test_body_over_the_cap_while_streaming(server):
    def chunks():  # no Content-Length: chunked transfer encoding
        for _ in range(40):
            yield b"x" * 50_000

    r = server.client.post("/v1/ground", content=chunks(), headers={"Content-Type": "application/json"})
    err = assert_error(r, 413, "body_too_large")
    assert "streamed" in err["message"]


def test_wrong_content_type(server):
    assert_error(server.client.post("/v1/ground", content=b"expression=x", headers={"Content-Type": "text/plain"}),
                 415, "unsupported_media_type")
    assert_error(server.client.post("/v1/ground", data={"expression": "x"}), 415, "unsupported_media_type")


def test_invalid_json(server):
    r = server.client.post("/v1/ground", content=b"{not json", headers={"Content-Type": "application/json"})
    assert_error(r, 400, "invalid_json")
    r = server.client.post("/v1/ground", content=b"[" * 200_000, headers={"Content-Type": "application/json"})
    assert_error(r, 400, "invalid_json")  # nesting deep enough to blow the parser's recursion limit
    r = server.client.post("/v1/ground", json=["a", "list"])
    assert_error(r, 422, "invalid_parameter")


# -- the expression and the parameters ------------------------------------------------------------------


@pytest.mark.parametrize("expression, code", [
    ("", "expression_empty"),
    ("   \t ", "expression_empty"),
    ("x" * 65, "expression_too_long"),
    ("the red\x00 circle", "expression_invalid"),
    ("the red\x1b[31m circle", "expression_invalid"),
    ("line one\nline two", "expression_invalid"),
])
def test_bad_expressions(server, expression, code):
    assert_error(server.ground(sample_png(), expression), 422, code)
    assert_error(server.ground_json(sample_png(), expression), 422, code)


def test_expression_at_the_limit_and_unicode_pass(server):
    assert server.ground(sample_png(), "x" * 64).status_code == 200
    assert server.ground(sample_png(), "der rote Kreis ünd ☆").status_code == 200


def test_lone_surrogate_in_json_is_refused(server):
    raw = b'{"expression": "bad \\ud800 text", "image_base64": "' + base64.b64encode(sample_png()) + b'"}'
    r = server.client.post("/v1/ground", content=raw, headers={"Content-Type": "application/json"})
    assert_error(r, 422, "expression_invalid")


@pytest.mark.parametrize("params", [
    {"top_k": 0}, {"top_k": 101}, {"top_k": "many"}, {"score_threshold": -0.1}, {"score_threshold": 1.5},
    {"score_threshold": "nan"}, {"seed": -1}, {"seed": 2**31}, {"seed": 1.5}, {"return_mask": "perhaps"},
    {"colour": "red"},
], ids=lambda p: "-".join(f"{k}={v}" for k, v in p.items()))
def test_bad_parameters(server, params):
    err = assert_error(server.ground(sample_png(), **params), 422, "invalid_parameter")
    assert err["detail"][0]["loc"] == ["body", next(iter(params))]
    json_params = {k: v for k, v in params.items()}
    assert_error(server.ground_json(sample_png(), **json_params), 422, "invalid_parameter")


def test_parameter_bounds_are_inclusive(server):
    r = server.ground(sample_png(), top_k=100, score_threshold=0.0, seed=2**31 - 1)
    assert r.status_code == 200, r.text
    assert server.ground(sample_png(), top_k=1, score_threshold=1.0, seed=0).status_code == 200


def test_missing_fields(server):
    r = server.client.post("/v1/ground", files={"other": ("x", b"1")}, data={"expression": "x"})
    err = assert_error(r, 422, "invalid_parameter")
    assert ["body", "image"] in [d["loc"] for d in err["detail"]]
    err = assert_error(server.client.post("/v1/ground", files={"image": ("i", sample_png())}), 422,
                       "invalid_parameter")
    assert err["detail"][0]["loc"] == ["body", "expression"]
    assert_error(server.client.post("/v1/ground", json={"expression": "x"}), 422, "invalid_parameter")


def test_malformed_multipart(server):
    for content_type in ("multipart/form-data", "multipart/form-data; boundary=abc"):
        r = server.client.post("/v1/ground", content=b"--x\r\ngarbage", headers={"Content-Type": content_type})
        assert_error(r, 400, "bad_request")


def test_client_disconnecting_mid_body_is_counted_not_a_500(server):
    before = server.metrics()
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"POST /v1/ground HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100000\r\n\r\n" + b"{" * 1000)
        wait_until(lambda: metric(server.metrics(), "diffprompt_requests_in_flight") == 1, what="the request")
    wait_until(lambda: metric(server.metrics(), "diffprompt_errors_total", reason="client_disconnected")
               == metric(before, "diffprompt_errors_total", reason="client_disconnected") + 1, what="the count")
    assert metric(server.metrics(), "diffprompt_errors_total", reason="internal_error") == 0


def test_two_image_parts_are_refused(server):
    files = [("image", ("a", sample_png())), ("image", ("b", sample_png()))]
    r = server.client.post("/v1/ground", files=files, data={"expression": "x"})
    assert 400 <= r.status_code < 500
    assert set(r.json()) == {"error"}


def test_errors_are_counted_by_reason(server):
    before = server.metrics()
    assert_error(server.ground(b"GIF89a" + bytes(20)), 415, "unsupported_image_format")
    assert_error(server.ground(sample_png(), ""), 422, "expression_empty")
    assert_error(server.ground(sample_png(), ""), 422, "expression_empty")
    after = server.metrics()
    for reason, n in [("unsupported_image_format", 1), ("expression_empty", 2)]:
        assert metric(after, "diffprompt_errors_total", reason=reason) - \
            metric(before, "diffprompt_errors_total", reason=reason) == n
