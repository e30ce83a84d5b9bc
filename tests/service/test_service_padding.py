"""The service never answers with a box that lies wholly in the pad-mode padding."""

from __future__ import annotations

import numpy as np


def test_boxes_in_the_padding_are_not_reported(tiny_artifact):
    from diffprompt.core.manifest import validate_artifact
    from diffprompt.service.engine import Engine, GroundOptions, _Raw
    from diffprompt.service.metrics import Metrics
    from diffprompt.service.settings import Settings

    engine = Engine(Settings(artifact_dir=tiny_artifact), Metrics())
    engine.manifest = validate_artifact(tiny_artifact, False)
    assert engine.manifest.image.resize_mode == "pad"
    # 320 x 160 upload: the bottom half of the model's square is padding
    boxes = np.array([[0.5, 0.75, 0.2, 0.2],  # best score, wholly in the padding
                      [0.5, 0.25, 0.2, 0.2],  # on the image
                      [0.5, 0.50, 0.2, 0.2]],  # straddles the bottom edge: clipped
                     dtype=np.float32)
    raw = _Raw(np.array([0.9, 0.8, 0.7], np.float32), boxes, None, None)
    pred = engine._postprocess(raw, 320, 160, GroundOptions("x", top_k=3))
    assert [d.score for d in pred.detections] == [0.8, 0.7]
    assert pred.detections[0].xyxy == (128.0, 48.0, 192.0, 112.0)
    assert pred.detections[1].xyxy == (128.0, 128.0, 192.0, 160.0)
    assert all(d.xyxy[3] - d.xyxy[1] > 0 and d.xyxy[2] - d.xyxy[0] > 0 for d in pred.detections)
