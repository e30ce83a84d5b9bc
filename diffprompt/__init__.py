"""Diff-Prompt visual grounding: training, export and serving. See README.md."""

__version__ = "0.1.0"
