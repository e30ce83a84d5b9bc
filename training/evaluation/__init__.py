"""Evaluation of grounding predictions."""
