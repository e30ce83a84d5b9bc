"""float16 graphs for GPU execution providers (`diffprompt export --precision fp16`).

`to_float16` rewrites one exported graph with onnxruntime's own converter
(`onnxruntime.transformers.float16.convert_float_to_float16`): weights and compute in float16,
inputs and outputs kept float32 (a Cast at each end), so the pipeline and clients feed the
same arrays as for a float32 artifact. Its default block list keeps the ops that lose too much in
float16 in float32. Weights take half the bytes. Such an artifact is for CUDA / TensorRT:
diffprompt.core.runtime refuses to serve it on the CPU provider alone, where float16 runs through
casts and is slower than float32.
"""

from __future__ import annotations

from pathlib import Path

PRECISIONS = {"fp32": "float32", "fp16": "float16"}  # --precision -> manifest "dtype"


def to_float16(path: Path) -> None:
    """Rewrite the ONNX graph at `path` (initializers inside it) in float16, float32 at its inputs / outputs."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = OnnxModel(convert_float_to_float16(onnx.load(str(path)), keep_io_types=True))
    model.topological_sort()  # the converter appends its input Casts at the end; onnx.checker wants order
    onnx.save(model.model, str(path))
