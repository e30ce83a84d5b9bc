"""Serve an exported artifact over HTTP: FastAPI + onnxruntime, one uvicorn process; torch is never imported.

    diffprompt serve --artifact artifacts/diffprompt-5steps --port 8000
    DIFFPROMPT_ARTIFACT_DIR=artifacts/diffprompt-5steps python -m diffprompt.service     # the same

Every setting comes from a `DIFFPROMPT_*` variable or `.env` (service/README.md lists them); the
options below override their variable. The artifact is checked (every file, its size and sha256)
before anything listens: a bad setting or a missing or altered artifact file ends in one
`error:` line and exit status 2. After a clean shutdown (SIGTERM, Ctrl-C) the status is 0; 3 if
the server could not start (e.g. the port is taken).
"""

from __future__ import annotations

import argparse
import logging

from pydantic import ValidationError

from diffprompt.core.errors import UserError
from diffprompt.core.manifest import validate_artifact
from diffprompt.core.providers import PROVIDER_NAMES


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="python -m diffprompt.service", description=__doc__,
                                          formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifact", help="artifact directory (default: DIFFPROMPT_ARTIFACT_DIR or "
                                      "artifacts/diffprompt-5steps)")
    p.add_argument("--host", help="bind address (default: DIFFPROMPT_HOST or 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default: DIFFPROMPT_PORT or 8000)")
    p.add_argument("--providers", type=lambda s: [v.strip() for v in s.split(",") if v.strip()],
                   help=f"onnxruntime providers to try in order, comma-separated, of {sorted(PROVIDER_NAMES)} "
                        "(default: DIFFPROMPT_PROVIDERS or tensorrt,cuda,cpu)")
    p.add_argument("--log-level", choices=["critical", "error", "warning", "info", "debug"],
                   help="default: DIFFPROMPT_LOG_LEVEL or info")
    return p


def settings_from(args: argparse.Namespace):
    """`Settings` from DIFFPROMPT_* / .env with the given options on top; UserError naming every bad field."""
    from diffprompt.service.settings import Settings

    overrides = {"artifact_dir": args.artifact, "host": args.host, "port": args.port,
                 "providers": args.providers, "log_level": args.log_level}
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'settings'}: "
                             f"{err['msg'].removeprefix('Value error, ')}" for err in e.errors())
        raise UserError(f"invalid service settings (DIFFPROMPT_* variables, .env or options): {problems}") from e


def main(args: argparse.Namespace) -> int:
    from diffprompt.service.server import serve

    settings = settings_from(args)
    # Every file of the artifact, before the server starts: a broken artifact is the user's to fix.
    validate_artifact(settings.artifact_dir, settings.check_hashes)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return serve(settings.model_copy(update={"check_hashes": False}))  # hashed just now
