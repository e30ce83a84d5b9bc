"""Write the BuildKit secrets of the image builds from this host's package configuration.

    python deploy/build_secrets.py OUT_DIR

deploy/local-engine.sh passes them to `docker build --secret`; the Dockerfiles mount them only while pip or
apt run, so nothing of them lands in a layer. Files written (mode 0600):

- `pip.conf`: the index settings of this host's pip (`pip config list` plus PIP_* / proxy variables) that a
  build container can use: http(s) `index-url` / `extra-index-url`, `trusted-host`, `proxy`, `timeout`,
  `retries`, and `cert = /run/secrets/ca-bundle` when a CA bundle is found. Host paths (file:// indexes,
  `find-links` folders, `constraint` files) do not exist in a build container and are left out; the torch
  wheel reaches the build as an image instead (WHEELS_IMAGE in the Dockerfile).
- `ca-bundle`: the CA bundle pip is configured with (`cert`), else $PIP_CERT, $REQUESTS_CA_BUNDLE,
  $SSL_CERT_FILE, /etc/ssl/certs/ca-certificates.crt: the first that exists.
- `apt.conf`: the Acquire:: settings of this host's apt that concern reaching a mirror (proxies,
  Check-Valid-Until for snapshot mirrors, retries, timeouts), and `Acquire::https::CaInfo` for the CA bundle.

What was kept and dropped is printed (values that look like credentials are not).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

SECRET_CA = "/run/secrets/ca-bundle"  # where `RUN --mount=type=secret,id=ca-bundle` puts it
PIP_KEYS = ("index-url", "extra-index-url", "trusted-host", "proxy", "timeout", "retries", "cert")
# pip reads the [global] section, then the command's own ([install], [wheel], [download]), then PIP_* variables.
SECTION_ORDER = ("global", "download", "wheel", "install", ":env:")
APT_KEYS = re.compile(r"^Acquire::((https?|ftp)::(Proxy|Timeout)|Check-Valid-Until|Check-Date|Retries|ForceIPv4)\b")


def pip_config(python: str) -> dict[str, str]:
    """The effective value of each key in PIP_KEYS (+ find-links, constraint, for the report)."""
    proc = subprocess.run([python, "-m", "pip", "config", "list"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"build_secrets: `{python} -m pip config list` failed:\n{proc.stderr}")
    found: dict[str, dict[str, str]] = {}
    for line in proc.stdout.splitlines():
        m = re.match(r"^(?P<section>[^.]*|:env:)\.(?P<key>[\w-]+)=(?P<q>['\"])(?P<value>.*)(?P=q)$", line.strip())
        if m:
            found.setdefault(m["key"].replace("_", "-"), {})[m["section"]] = m["value"]
    out = {}
    for key, by_section in found.items():
        ranked = sorted(by_section.items(), key=lambda kv: SECTION_ORDER.index(kv[0]) if kv[0] in SECTION_ORDER else 0)
        out[key] = ranked[-1][1]
    return out


def redact(url: str) -> str:
    return re.sub(r"//[^/@]+@", "//***@", url)


def reachable(url: str) -> bool:
    return url.startswith(("http://", "https://"))


def find_ca_bundle(config: dict[str, str]) -> Path | None:
    candidates = [config.get("cert"), os.environ.get("PIP_CERT"), os.environ.get("REQUESTS_CA_BUNDLE"),
                  os.environ.get("SSL_CERT_FILE"), "/etc/ssl/certs/ca-certificates.crt"]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


def write_pip_conf(config: dict[str, str], ca: Path | None, report: list[str]) -> str:
    lines = ["[global]"]
    index = config.get("index-url")
    if index and reachable(index):
        lines.append(f"index-url = {index}")
        report.append(f"pip: index-url {redact(index)}")
    elif index:
        report.append(f"pip: index-url {index} dropped (not reachable from a build container): PyPI is used")
    extras = config.get("extra-index-url", "").split()
    kept = [u for u in extras if reachable(u)]
    if kept:
        lines.append("extra-index-url = " + " ".join(kept))
    report += [f"pip: extra-index-url {redact(u)}" for u in kept]
    report += [f"pip: extra-index-url {u} dropped (a host path)" for u in extras if not reachable(u)]
    proxy = config.get("proxy") or os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    if proxy:
        lines.append(f"proxy = {proxy}")
        report.append(f"pip: proxy {redact(proxy)}")
    for key in ("trusted-host", "timeout", "retries"):
        if config.get(key):
            lines.append(f"{key} = {config[key]}")
            report.append(f"pip: {key} {config[key]}")
    for key in ("find-links", "constraint", "requirement"):
        if config.get(key):
            report.append(f"pip: {key} {config[key]} dropped (a host path)")
    if ca is not None:
        lines.append(f"cert = {SECRET_CA}")
    return "\n".join(lines) + "\n"


def write_apt_conf(ca: Path | None, report: list[str]) -> str:
    lines = []
    if shutil.which("apt-config"):
        dump = subprocess.run(["apt-config", "dump"], capture_output=True, text=True).stdout
        for line in dump.splitlines():
            if APT_KEYS.match(line) and line.rstrip().endswith(";"):
                lines.append(line.strip())
                report.append("apt: " + redact(line.strip()))
    for var, key in (("http_proxy", "Acquire::http::Proxy"), ("https_proxy", "Acquire::https::Proxy")):
        value = os.environ.get(var) or os.environ.get(var.upper())
        if value and not any(line.startswith(key + " ") for line in lines):
            lines.append(f'{key} "{value}";')
            report.append(f"apt: {key} {redact(value)} (from ${var})")
    if ca is not None:
        lines.append(f'Acquire::https::CaInfo "{SECRET_CA}";')
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="directory for pip.conf, ca-bundle, apt.conf")
    p.add_argument("--python", default=sys.executable, help="whose pip configuration to read (default: this one)")
    args = p.parse_args(argv)

    args.out.mkdir(parents=True, exist_ok=True)
    os.chmod(args.out, 0o700)
    config = pip_config(args.python)
    ca = find_ca_bundle(config)
    report: list[str] = []
    files = {"pip.conf": write_pip_conf(config, ca, report), "apt.conf": write_apt_conf(ca, report)}
    for name, text in files.items():
        path = args.out / name
        path.write_text(text)
        os.chmod(path, 0o600)
    if ca is not None:
        shutil.copyfile(ca, args.out / "ca-bundle")
        os.chmod(args.out / "ca-bundle", 0o600)
        report.append(f"ca-bundle: {ca}")
    else:
        report.append("ca-bundle: none found (pip and apt in the build use their own)")
    for line in report:
        print(f"build_secrets: {line}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
