"""Training plumbing: distributed set-up, run folders, resumable checkpoints."""
