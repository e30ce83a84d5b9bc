"""`UserError`: the base of every error that is the user's to fix (a path, a file, a flag value).

The `diffprompt` command prints such an error as one line and exits with status 2, no traceback;
anything else is a bug and keeps its traceback. Subclasses say which input was wrong:
`ArtifactError` (an exported directory), `CheckpointError` (a model directory), `DatasetError`
(annotations or images), `OutputExistsError` (a non-empty output directory without --overwrite),
`MissingFileError` (a named file that does not exist; also a `FileNotFoundError`).
`read_json_object` reads a JSON input file with such an error for every way it can be wrong.
"""

from __future__ import annotations

import json
from pathlib import Path


class UserError(ValueError):
    """A mistake in what the user gave; the message names the input and what to do."""


class OutputExistsError(UserError):
    """An output directory that is not empty, written to without --overwrite."""


class CheckpointError(UserError):
    """A checkpoint directory is missing files or does not match the architecture."""


class MissingFileError(UserError, FileNotFoundError):
    """A file the user named, or one a directory they named must hold, does not exist."""


def one_line(error: BaseException) -> str:
    """The error's message on one line (line breaks and runs of spaces folded into single spaces)."""
    return " ".join(str(error).split()) or type(error).__name__


def read_json_object(path: Path, error: type[UserError], missing: str) -> dict:
    """The JSON object in the file `path`; `error` naming the file if it is missing (saying `missing`),
    not JSON, or not an object."""
    if not path.is_file():
        raise error(f"{path}: missing ({missing})")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise error(f"{path}: not a JSON object")
    return data
