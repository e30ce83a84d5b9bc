"""`python -m diffprompt.service [--artifact DIR] [--host H] [--port P]`: the same as `diffprompt serve`."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from diffprompt.cli import run
    from diffprompt.service.cli import build_parser
    from diffprompt.service.cli import main as serve_main

    return run(serve_main, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
