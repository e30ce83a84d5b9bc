"""POST /v1/ground against a real server: happy paths (multipart and JSON), options, determinism, auth."""

from __future__ import annotations

import base64
import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image
from service_testkit import ServerProcess, assert_error, encode, rgb_image, sample_png


def _check_response(body: dict, width: int, height: int, top_k: int = 5) -> None:
    assert body["box_format"] == "xyxy_pixels"
    assert (body["width"], body["height"]) == (width, height)
    assert body["ddim_steps"] == 3 and body["model_version"].startswith("tiny-")
    boxes = body["boxes"]
    assert 1 <= len(boxes) <= top_k
    assert [b["rank"] for b in boxes] == list(range(1, len(boxes) + 1))
    scores = [b["score"] for b in boxes]
    assert scores == sorted(scores, reverse=True) and all(0.0 <= s <= 1.0 for s in scores)
    for b in boxes:
        x0, y0, x1, y1 = b["xyxy"]
        assert 0 <= x0 <= x1 <= width and 0 <= y0 <= y1 <= height


def test_multipart_happy_path(server):
    r = server.ground(sample_png(), "the second square from the left", top_k=3, seed=7)
    assert r.status_code == 200, r.text
    body = r.json()
    _check_response(body, 128, 128, top_k=3)
    assert len(body["boxes"]) == 3 and body["seed"] == 7 and body["mask_png_base64"] is None
    assert body["expression"] == "the second square from the left"


def test_the_default_export_serves_fused_attention(server, tiny_artifact):
    """The shared server's artifact is exported with the default --attention fused: the vision tower's
    attention is onnxruntime's com.microsoft::MultiHeadAttention, and the torch-free service runs it."""
    from diffprompt.core.manifest import validate_artifact

    assert validate_artifact(tiny_artifact, False).attention == "fused"
    assert b"MultiHeadAttention" in (tiny_artifact / "grounding.onnx").read_bytes()
    r = server.ground(sample_png(), "the red circle", seed=1)
    assert r.status_code == 200, r.text
    _check_response(r.json(), 128, 128)


def test_json_body_matches_multipart(server):
    image = encode(rgb_image(160, 90, seed=3), "PNG")
    a = server.ground(image, "the blue star", seed=11, return_mask=True)
    b = server.ground_json(image, "  the blue star ", seed=11, return_mask=True)
    assert a.status_code == b.status_code == 200, (a.text, b.text)
    assert a.json() == b.json()
    _check_response(b.json(), 160, 90)
    data_url = "data:image/png;base64," + base64.b64encode(image).decode()
    c = server.client.post("/v1/ground", json={"image_base64": data_url, "expression": "the blue star", "seed": 11,
                                               "return_mask": True})
    assert c.status_code == 200 and c.json() == a.json()


def test_mask_is_a_png_of_the_image_size(server):
    image = encode(rgb_image(150, 100), "JPEG")
    body = server.ground(image, "the red circle", return_mask=True).json()
    mask = Image.open(io.BytesIO(base64.b64decode(body["mask_png_base64"])))
    assert mask.format == "PNG" and mask.size == (150, 100) and mask.mode == "1"
    assert server.ground(image, "the red circle", return_mask=False).json()["mask_png_base64"] is None


def test_top_k_and_threshold(server):
    image = sample_png("blue_circle.png")
    all_boxes = server.ground(image, "the blue circle", top_k=100).json()["boxes"]
    assert len(all_boxes) == 64  # every query of the tiny model's 8x8 grid
    assert len(server.ground(image, "the blue circle", top_k=1).json()["boxes"]) == 1
    default = server.client.post("/v1/ground", files={"image": ("i", image)}, data={"expression": "the blue circle"})
    assert len(default.json()["boxes"]) == 5  # default_top_k
    scores = sorted(b["score"] for b in all_boxes)
    cut = scores[len(scores) // 2]
    kept = server.ground(image, "the blue circle", top_k=100, score_threshold=cut).json()["boxes"]
    assert kept and all(b["score"] >= cut for b in kept)
    assert len(kept) == sum(s >= cut for s in scores)
    none = server.ground(image, "the blue circle", score_threshold=1.0).json()
    assert none["boxes"] == []


def test_same_seed_same_output_and_seed_changes_the_mask(server):
    image = sample_png("diamond_star.png")
    first = server.ground(image, "the diamond above the star", seed=5, return_mask=True).json()
    again = server.ground(image, "the diamond above the star", seed=5, return_mask=True).json()
    assert first == again
    other = server.ground(image, "the diamond above the star", seed=6, return_mask=True).json()
    assert other["mask_png_base64"] != first["mask_png_base64"]  # another seed, another generated mask
    assert other["boxes"] != first["boxes"]  # and other prompts, so other scores


def test_concurrent_requests_get_their_own_results(server):
    """Requests batched together get the same answers as alone (results are routed to the right request)."""
    cases = [(sample_png(name), expr, seed) for seed, (name, expr) in enumerate(
        [("squares.png", "the blue star"), ("blue_circle.png", "the blue circle"),
         ("diamond_star.png", "the diamond above the star"), ("squares.png", "the orange square")] * 2)]
    alone = [server.ground(img, expr, seed=seed, top_k=10).json() for img, expr, seed in cases]
    with ThreadPoolExecutor(len(cases)) as pool:
        together = list(pool.map(lambda c: server.ground(c[0], c[1], seed=c[2], top_k=10).json(), cases))
    for a, t in zip(alone, together):
        assert (a["seed"], a["expression"]) == (t["seed"], t["expression"])
        np.testing.assert_allclose([b["score"] for b in a["boxes"]], [b["score"] for b in t["boxes"]], atol=1e-4)
        np.testing.assert_allclose([b["xyxy"] for b in a["boxes"]], [b["xyxy"] for b in t["boxes"]], atol=0.05)


def test_non_square_images_map_boxes_to_their_pixels(server):
    for width, height in [(300, 100), (100, 300)]:
        body = server.ground(encode(rgb_image(width, height), "WEBP"), "the red circle", top_k=100).json()
        _check_response(body, width, height, top_k=100)


def test_health_and_docs(server):
    live = server.client.get("/livez")
    ready = server.client.get("/readyz")
    assert live.status_code == ready.status_code == 200
    model = ready.json()["model"]
    assert model["ddim_steps"] == 3 and model["provider"] == "CPUExecutionProvider" and model["makes_masks"]
    assert server.client.get("/docs").status_code == 200
    spec = server.client.get("/openapi.json").json()
    body = spec["paths"]["/v1/ground"]["post"]["requestBody"]["content"]
    assert set(body) == {"application/json", "multipart/form-data"}


def test_unknown_routes_and_methods_use_the_error_shape(server):
    assert_error(server.client.get("/nope"), 404, "not_found")
    assert_error(server.client.get("/v1/ground"), 405, "method_not_allowed")


# -- auth and the foundation-only artifact ---------------------------------------------------------

@pytest.fixture(scope="module")
def auth_server(foundation_artifact, tmp_path_factory):
    srv = ServerProcess(foundation_artifact, tmp_path_factory.mktemp("auth"), api_key="s3cret-key").start()
    yield srv.wait_ready()
    assert srv.stop() == 0, srv.log()


def test_api_key_required_when_configured(auth_server):
    image = sample_png()
    err = assert_error(auth_server.ground(image), 401, "unauthorized")
    assert "Bearer" in err["message"]
    assert auth_server.ground(image).headers["www-authenticate"] == "Bearer"
    assert_error(auth_server.ground(image, headers={"Authorization": "Bearer wrong"}), 401, "unauthorized")
    assert_error(auth_server.ground(image, headers={"Authorization": "Basic s3cret-key"}), 401, "unauthorized")
    ok = auth_server.ground(image, headers={"Authorization": "Bearer s3cret-key"})
    assert ok.status_code == 200, ok.text
    for path in ("/livez", "/readyz", "/metrics"):  # probes and scrapes stay open
        assert auth_server.client.get(path).status_code == 200


def test_foundation_only_artifact_has_no_mask(auth_server):
    key = {"Authorization": "Bearer s3cret-key"}
    body = auth_server.ground(sample_png(), headers=key).json()
    assert body["ddim_steps"] == 0 and body["boxes"]
    assert_error(auth_server.ground(sample_png(), headers=key, return_mask=True), 422, "mask_unavailable")


def test_no_match_is_the_artifacts_calibrated_probability(server, tiny_artifact):
    """The response's no_match is what the one inference pipeline computes from the manifest's calibrator."""
    from diffprompt.core.providers import ProviderConfig
    from diffprompt.core.runtime import GroundingRuntime

    image = sample_png("diamond_star.png")
    got = [server.ground(image, expression, seed=4).json() for expression in ("the blue star", "the red circle")]
    runtime = GroundingRuntime.load(tiny_artifact, ProviderConfig(preferred=("cpu",)), warmup=False)
    pixels = runtime.manifest.image.preprocess(Image.open(io.BytesIO(image)).convert("RGB"))
    ids, mask = runtime.tokenizer(["the blue star", "the red circle"])
    want = runtime.ground(np.stack([pixels, pixels]), ids, mask, [4, 4]).no_match
    for body, p in zip(got, want):
        assert body["no_match"] == pytest.approx(float(p), abs=1e-5)
        assert body["no_match_threshold"] == runtime.manifest.no_match.threshold == 0.5
    assert got[0]["no_match"] != got[1]["no_match"]  # it depends on the expression


def test_no_match_is_documented_in_the_openapi_schema(server):
    schema = server.client.get("/openapi.json").json()["components"]["schemas"]["GroundResponse"]["properties"]
    for field in ("no_match", "no_match_threshold"):
        assert "probab" in schema["no_match"]["description"] and schema[field]["description"]
        assert {"type": "null"} in schema[field]["anyOf"]


def test_an_uncalibrated_artifact_answers_no_match_null(auth_server):
    body = auth_server.ground(sample_png(), headers={"Authorization": "Bearer s3cret-key"}).json()
    assert body["no_match"] is None and body["no_match_threshold"] is None
