"""One weights file for all of an artifact's graphs: every distinct initializer stored once.

In the paper's two-pass pipeline the frozen foundation runs twice per query (unprompted, for the
DiT's conditions, in `condition_encoder`; prompted, in `grounding`), so exported naively an
artifact holds the foundation's weights twice (2 x 611 MB for OWL-ViT B/32). `share_weights`
moves every initializer of at least `min_bytes` out of the graphs into `weights.bin` as ONNX
external data, one copy per distinct content (sha256 of dtype, shape and bytes):

    artifact/
      condition_encoder.onnx  denoiser.onnx  prompt_builder.onnx  grounding.onnx   structure + small tensors
      weights.bin                                                                  the large tensors, once

Each .onnx file still loads on its own (its external-data entries point into weights.bin), so
onnx.checker and onnxruntime take it as is. Large tensors start on a page boundary: onnxruntime
memory-maps them, so the sessions of the two graphs that hold the foundation share those pages
(OWL-ViT B/32: 1.07 GB resident after loading the four sessions, against 1.42 GB with the
tensors inside each graph). The Triton writer gives each model its own copy (model_export/triton.py).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

WEIGHTS_FILE = "weights.bin"
PAGE = 4096  # large tensors start on a page boundary, so onnxruntime can memory-map them
LARGE = 1 << 16


def _align(offset: int, length: int) -> int:
    step = PAGE if length >= LARGE else 64
    return (offset + step - 1) // step * step


def share_weights(directory: Path, files: list[str], min_bytes: int = 1024) -> dict[str, int]:
    """Rewrite `files` (ONNX graphs in `directory`) to keep their large initializers in one shared file.

    Returns {"tensors": distinct tensors stored, "references": initializers moved, "bytes": weights.bin size}.
    """
    import numpy as np
    import onnx
    from onnx import external_data_helper, helper

    stored: dict[str, tuple[int, int]] = {}  # content key -> (offset, length)
    references = 0
    with open(directory / WEIGHTS_FILE, "wb") as out:
        for name in files:
            path = directory / name
            model = onnx.load(str(path))
            for tensor in model.graph.initializer:
                data = tensor.raw_data
                if len(data) < min_bytes:
                    continue
                dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
                key = hashlib.sha256(f"{np.dtype(dtype).str}{list(tensor.dims)}".encode() + data).hexdigest()
                if key not in stored:
                    offset = _align(out.tell(), len(data))
                    out.write(b"\0" * (offset - out.tell()))
                    out.write(data)
                    stored[key] = (offset, len(data))
                offset, length = stored[key]
                external_data_helper.set_external_data(tensor, WEIGHTS_FILE, offset, length)
                tensor.data_location = onnx.TensorProto.EXTERNAL
                tensor.ClearField("raw_data")
                references += 1
            onnx.save(model, str(path))
        size = out.tell()
    return {"tensors": len(stored), "references": references, "bytes": size}
