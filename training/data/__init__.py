"""Dataset records and loaders."""
