"""Export trained checkpoints to deployable artifacts: ONNX graphs, TensorRT engines, runtime provider selection."""
