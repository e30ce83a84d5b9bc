"""Thin APIRouters, one module per concern."""
