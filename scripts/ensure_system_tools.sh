#!/usr/bin/env bash
# Install the Debian tools the test suite drives for real (Prometheus + promtool, headless
# Chromium, docker-compose) when they are missing. Needs root (CI runs as root); otherwise it
# only reports what is missing, and the tests that need a tool skip with that reason.
set -euo pipefail

declare -A PACKAGE_OF=( [prometheus]=prometheus [promtool]=prometheus [chromium]=chromium [docker-compose]=docker-compose )
missing=()
for tool in "${!PACKAGE_OF[@]}"; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("${PACKAGE_OF[$tool]}")
done
if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi
packages=$(printf '%s\n' "${missing[@]}" | sort -u | tr '\n' ' ')
if [ "$(id -u)" -ne 0 ]; then
    echo "ensure_system_tools: missing Debian packages: ${packages}(not root: the tests that need them will skip)" >&2
    exit 0
fi
echo "ensure_system_tools: installing ${packages}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# shellcheck disable=SC2086
apt-get install -y -qq --no-install-recommends ${packages} >/dev/null
