"""`python -m diffprompt.service [--host H] [--port P]`: serve the artifact named by DIFFPROMPT_ARTIFACT_DIR."""

from __future__ import annotations

import argparse
import logging
import sys

from pydantic import ValidationError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m diffprompt.service", description=__doc__)
    p.add_argument("--host", help="bind address (default: DIFFPROMPT_HOST or 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default: DIFFPROMPT_PORT or 8000)")
    p.add_argument("--artifact", help="artifact directory (default: DIFFPROMPT_ARTIFACT_DIR)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from diffprompt.service.server import serve
    from diffprompt.service.settings import Settings

    overrides = {k: v for k, v in {"host": args.host, "port": args.port, "artifact_dir": args.artifact}.items()
                 if v is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as e:
        print(f"invalid service settings (DIFFPROMPT_* variables, .env or options):\n{e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return serve(settings)


if __name__ == "__main__":
    sys.exit(main())
