"""Diff-Prompt training code."""
