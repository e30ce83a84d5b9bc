"""Run `python -m diffprompt.service` in this process; at exit write what it imported to the report file.

    python tests/service/run_server.py REPORT.json [service options]

The report (`exit_code`, `torch_imported`, `torch_modules`) is written after uvicorn has shut
down, so it covers everything the live server loaded while it served the test's requests.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from diffprompt.service.__main__ import main

if __name__ == "__main__":
    report = Path(sys.argv[1])
    code = main(sys.argv[2:])
    torch_modules = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
    report.write_text(json.dumps({"exit_code": code, "torch_imported": "torch" in sys.modules,
                                  "torch_modules": torch_modules[:20]}))
    sys.exit(code)
