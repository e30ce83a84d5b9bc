"""Training plumbing used by the stage runner: resumable atomic checkpoints, EMA weights."""
