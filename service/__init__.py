"""Diff-Prompt grounding service: FastAPI + onnxruntime + Prometheus, never torch (service/README.md)."""
