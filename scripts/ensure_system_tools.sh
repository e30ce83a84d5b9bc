#!/usr/bin/env bash
# Install the Debian tools the test suite drives for real (Prometheus + promtool, headless Chromium,
# docker-compose; with --image also Docker's engine and debootstrap, for `make test IMAGE_TESTS=1`) when
# they are missing. Needs root (CI runs as root); otherwise it only reports what is missing, and the tests
# that need a tool skip with that reason (the image tests fail instead: deploy/local-engine.sh says why).
set -euo pipefail

declare -A PACKAGE_OF=( [prometheus]=prometheus [promtool]=prometheus [chromium]=chromium [docker-compose]=docker-compose )
if [ "${1:-}" = "--image" ]; then
    # docker.io: dockerd + containerd + runc, and a client with BuildKit built in (Docker 20.10).
    PACKAGE_OF+=( [dockerd]=docker.io [debootstrap]=debootstrap )
fi
missing=()
for tool in "${!PACKAGE_OF[@]}"; do
    command -v "$tool" >/dev/null 2>&1 || PATH="$PATH:/usr/sbin:/sbin" command -v "$tool" >/dev/null 2>&1 \
        || missing+=("${PACKAGE_OF[$tool]}")
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
