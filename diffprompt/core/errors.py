"""`UserError`: the base of every error that is the user's to fix (a path, a file, a flag value).

The `diffprompt` command prints such an error as one line and exits with status 2, no traceback;
anything else is a bug and keeps its traceback. Subclasses say which input was wrong:
`ArtifactError` (an exported directory), `CheckpointError` (a model directory), `DatasetError`
(annotations or images), `OutputExistsError` (a non-empty output directory without --overwrite).
"""

from __future__ import annotations


class UserError(ValueError):
    """A mistake in what the user gave; the message names the input and what to do."""


class OutputExistsError(UserError):
    """An output directory that is not empty, written to without --overwrite."""


class CheckpointError(UserError):
    """A checkpoint directory is missing files or does not match the architecture."""
