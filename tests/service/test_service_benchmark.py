"""benchmarks/load_service.py end to end on the tiny artifact: every answer it got is right, and the
requests it reports are the ones the server counted. Speed is not asserted."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from service_testkit import REPO, sample_png

from diffprompt.core.boxes import boxes_to_pixels
from diffprompt.core.providers import ProviderConfig
from diffprompt.core.runtime import GroundingRuntime

REQUESTS = 16


def in_process_top_boxes(artifact, image: bytes, queries: set[tuple[str, int]]) -> dict[tuple[str, int], list]:
    """(expression, seed) -> the runtime's boxes sorted best first, as (score rounded like the service, xyxy px)."""
    runtime = GroundingRuntime.load(artifact, ProviderConfig(preferred=("cpu",), intra_op_threads=1))
    rgb = Image.open(io.BytesIO(image)).convert("RGB")
    pixels = runtime.image_spec.preprocess(rgb)[None]
    out = {}
    for expression, seed in sorted(queries):
        ids, mask = runtime.tokenizer([expression])
        result = runtime.ground(pixels, ids, mask, [seed])
        scores = np.round(result.scores[0].astype(np.float64), 6)
        order = np.argsort(-scores, kind="stable")[:5]
        xyxy = boxes_to_pixels(result.boxes[0][order], rgb.width, rgb.height, runtime.image_spec.resize_mode)
        out[expression, seed] = [(float(scores[i]), box) for i, box in zip(order, xyxy)]
    return out


def assert_same_top_box(answer: dict, reference: list) -> None:
    """The served top box is the runtime's; where the runtime's best scores tie within batching noise
    (onnxruntime's kernels differ in the last bits between batch sizes), any of the tied boxes."""
    best = reference[0][0]
    tied = [box for score, box in reference if best - score <= 1e-4]
    assert abs(answer["score"] - best) <= 1e-4, (answer, reference[0])
    assert any(np.allclose(answer["xyxy"], box, atol=0.05) for box in tied), (answer, reference[:3])


@pytest.mark.slow
def test_load_benchmark_answers_correctly_and_counts_what_the_server_counts(tiny_artifact, tmp_path):
    out = tmp_path / "load.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "load_service.py"), "--artifact",
                           str(tiny_artifact), "--requests", str(REQUESTS), "--duration", "60", "--threads", "1",
                           "--out", str(out)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "batching speed-up at concurrency 32" in proc.stdout
    result = json.loads(out.read_text())
    cells = result["batching_on"] + result["batching_off"]
    assert [c["concurrency"] for c in result["batching_on"]] == [c["concurrency"] for c in result["batching_off"]] \
        == [1, 8, 32]
    for cell in cells:
        assert cell["ok"] == cell["sent"] == REQUESTS and cell["errors"] == {}
        assert len(cell["answers"]) == REQUESTS
        assert sorted(a["seed"] for a in cell["answers"]) == list(range(REQUESTS))  # each request answered once

    # every answer is the in-process runtime's answer to that request (same image, expression and seed)
    answers = [a for cell in cells for a in cell["answers"]]
    reference = in_process_top_boxes(tiny_artifact, sample_png(), {(a["expression"], a["seed"]) for a in answers})
    for answer in answers:
        assert_same_top_box(answer, reference[answer["expression"], answer["seed"]])
    assert len({(a["score"], tuple(a["xyxy"])) for a in answers}) > 1  # the requests differ, so do the answers

    # the requests the benchmark says it sent (4 warm-up + the cells) are what the server's own counter says
    for mode in ("batching_on", "batching_off"):
        counts = result["requests"][mode]
        assert counts["sent"] == 4 + 3 * REQUESTS
        assert counts["server_counted"] == counts["sent"], (mode, counts)
    assert (tmp_path / "server-batching-on.log").exists() and (tmp_path / "server-batching-off.log").exists()
