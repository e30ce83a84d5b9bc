"""Input safety over HTTP: every bad input is a clear 4xx with its code, never a 5xx; odd images are converted."""

from __future__ import annotations

import base64
import http.client
import json
import re
import socket
import urllib.error
import urllib.request
from pathlib import Path

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


def _post_whole_body_then_read(url: str, body: bytes) -> tuple[int, dict, dict]:
    """POST with the standard library's urllib, which writes the whole body before it reads a byte of the
    answer: (status, headers, JSON body). Raises URLError (ConnectionResetError inside) if the socket resets."""
    request = urllib.request.Request(url + "/v1/ground", data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, dict(response.headers), json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read())


@pytest.mark.parametrize("size", [11_000_000, 40_000_000], ids=["11MB", "40MB"])
def test_a_client_that_sends_the_whole_body_first_still_reads_the_413(server, size):
    """The 413 goes out at once, then the server reads and drops the rest of the body before it closes:
    closing with unread bytes would reset the connection under a client that is still writing."""
    status, headers, body = _post_whole_body_then_read(server.url, b"x" * size)
    assert status == 413 and body["error"]["code"] == "body_too_large", body
    assert body["error"]["detail"] == {"max_bytes": 1_000_000} and headers["connection"] == "close"
    assert server.client.get("/livez").status_code == 200


def test_a_chunked_body_over_the_cap_is_drained_too(server):
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    chunks = (b"x" * 1_000_000 for _ in range(12))  # no Content-Length: refused once past 1 MB, read to its end
    connection.request("POST", "/v1/ground", body=chunks, headers={"Content-Type": "application/json"},
                       encode_chunked=True)
    response = connection.getresponse()
    body = json.loads(response.read())
    connection.close()
    assert response.status == 413 and body["error"]["code"] == "body_too_large"
    assert "streamed" in body["error"]["message"]


def _memory(pid: int, key: str) -> int:
    """VmRSS (resident now) or VmHWM (peak resident) of a process, in bytes."""
    return int(re.search(rf"^{key}:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.M).group(1)) * 1024


@pytest.mark.slow
def test_draining_is_bounded_in_bytes_time_and_memory(start_server):
    """What is drained is dropped as it comes (the server's memory does not grow with it); a body declared
    longer than body_drain_bytes is not drained, and a stalled one is given up after body_drain_timeout_s."""
    srv = start_server(max_body_bytes=1_000_000, body_drain_bytes=48_000_000, body_drain_timeout_s=1)
    Path(f"/proc/{srv.proc.pid}/clear_refs").write_text("5")  # the peak starts again from what is resident now
    before = _memory(srv.proc.pid, "VmRSS")
    status, _, body = _post_whole_body_then_read(srv.url, b"x" * 40_000_000)
    assert status == 413 and body["error"]["code"] == "body_too_large"
    assert _memory(srv.proc.pid, "VmHWM") - before < 16_000_000  # 40 MB went through, a sliver was ever held

    with pytest.raises((urllib.error.URLError, ConnectionError)):  # over the drain limit: closed, so reset
        _post_whole_body_then_read(srv.url, b"x" * 60_000_000)

    with socket.create_connection(("127.0.0.1", srv.port), timeout=60) as sock:  # declares 3 MB, sends 1.5 MB
        sock.sendall(b"POST /v1/ground HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 3000000\r\n\r\n" + b"x" * 1_500_000)
        received = b""
        while chunk := sock.recv(65536):  # the answer, then the end of the stream once the drain gives up
            received += chunk
    head, _, payload = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413") and json.loads(payload)["error"]["code"] == "body_too_large"
    assert srv.client.get("/livez").status_code == 200


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


def _multipart(*parts: tuple[str, bytes, str | None], boundary: bytes = b"b0undary") -> tuple[bytes, dict]:
    """A hand-made multipart/form-data body of (name, bytes, filename or None) parts, and its headers."""
    body = b""
    for name, data, filename in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        body += b"--" + boundary + b"\r\nContent-Disposition: " + disposition.encode() + b"\r\n\r\n" + data + b"\r\n"
    return body + b"--" + boundary + b"--\r\n", {"Content-Type": "multipart/form-data; boundary=" + boundary.decode()}


@pytest.mark.parametrize("field, value", [("expression", b"the r\xe9d circle"), ("expression", b"\xff\xfe"),
                                          ("top_k", b"\xc3")], ids=["latin-1", "bom-like", "truncated-utf8"])
def test_form_field_that_is_not_utf8_is_422(server, field, value):
    """Not decoded as Latin-1 and grounded: refused, naming the field (the JSON body's equivalent is invalid_json)."""
    fields = {"expression": b"the red circle", field: value}
    body, headers = _multipart(("image", sample_png(), "a.png"), *((k, v, None) for k, v in fields.items()))
    err = assert_error(server.client.post("/v1/ground", content=body, headers=headers), 422, "invalid_parameter")
    assert err["detail"] == [{"loc": ["body", field], "msg": err["detail"][0]["msg"], "type": "string_unicode"}]
    assert "UTF-8" in err["detail"][0]["msg"]


def test_form_fields_in_utf8_and_an_image_part_without_filename_pass(server):
    body, headers = _multipart(("image", sample_png(), None), ("expression", "der rote Kreis ☆".encode(), None),
                               ("top_k", b"2", None))
    r = server.client.post("/v1/ground", content=body, headers=headers)
    assert r.status_code == 200, r.text
    assert r.json()["expression"] == "der rote Kreis ☆" and len(r.json()["boxes"]) == 2


def test_multipart_framing_errors_are_400(server):
    body, headers = _multipart(("image", sample_png(), "a.png"), ("expression", b"the star", None))
    truncated = body[: -len(b"--b0undary--\r\n")]  # no closing boundary
    assert_error(server.client.post("/v1/ground", content=truncated, headers=headers), 400, "bad_request")
    many, headers = _multipart(("image", sample_png(), "a.png"), *((f"f{i}", b"1", None) for i in range(16)))
    err = assert_error(server.client.post("/v1/ground", content=many, headers=headers), 400, "bad_request")
    assert "16 parts" in err["message"]
    nameless = body.replace(b'form-data; name="expression"', b"form-data")
    assert_error(server.client.post("/v1/ground", content=nameless, headers=headers), 400, "bad_request")


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
