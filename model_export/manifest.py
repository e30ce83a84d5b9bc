"""The artifact manifest: what an exported directory holds, and its validation at load time.

`manifest.json` records versions, the graphs with their input/output names, shapes and dtypes,
the fixed DDIM step count and its schedule table, the prompt depth/length, the image
preprocessing, and a sha256 per file. `validate_artifact` checks every file against it; any
missing, truncated or altered file is an `ArtifactError` naming the file. No torch here.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 1


class ArtifactError(ValueError):
    """An artifact directory is missing, incomplete, altered, or used against its manifest."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_entry(path: Path) -> dict[str, Any]:
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def read_manifest(directory: str | Path) -> dict[str, Any]:
    directory = Path(directory)
    path = directory / MANIFEST_FILE
    if not directory.is_dir():
        raise ArtifactError(f"{directory}: artifact directory does not exist")
    if not path.exists():
        raise ArtifactError(f"{path}: missing (not an exported artifact directory?)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path}: not valid JSON ({e})") from e
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{path}: format_version {manifest.get('format_version')!r}, expected {FORMAT_VERSION}")
    for key in ("files", "graphs", "ddim_steps", "image", "tokenizer"):
        if key not in manifest:
            raise ArtifactError(f"{path}: no {key!r} entry")
    return manifest


def validate_artifact(directory: str | Path, check_hashes: bool = True) -> dict[str, Any]:
    """The manifest, after checking every listed file exists with its recorded size and sha256."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    for name, entry in manifest["files"].items():
        path = directory / name
        if not path.exists():
            raise ArtifactError(f"{path}: missing (listed in {MANIFEST_FILE})")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise ArtifactError(f"{path}: {size} bytes, manifest says {entry['bytes']} (truncated or replaced?)")
        if check_hashes and sha256_file(path) != entry["sha256"]:
            raise ArtifactError(f"{path}: sha256 differs from {MANIFEST_FILE} (file altered or corrupt)")
    for graph in manifest["graphs"].values():
        if graph["file"] not in manifest["files"]:
            raise ArtifactError(f"{directory / MANIFEST_FILE}: graph file {graph['file']} has no hash entry")
    return manifest


def check_steps(manifest: dict[str, Any], steps: int | None) -> int:
    """The artifact's step count; asking for another one is an error (one artifact per count)."""
    fixed = int(manifest["ddim_steps"])
    if steps is not None and int(steps) != fixed:
        raise ArtifactError(f"this artifact was exported for {fixed} DDIM steps, not {steps}: "
                            f"export another one with `diffprompt export --steps {steps}`")
    return fixed
