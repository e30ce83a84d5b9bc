#!/usr/bin/env bash
# A Docker engine and this repository's images on a machine that reaches no image registry (this one, CI):
# every image starts from a Debian base built here with debootstrap from the mirror apt already uses, and pip
# steps reach the package index pip already uses. deploy/README.md section 7 explains the choices.
#
#   bash deploy/local-engine.sh start        start dockerd if no engine answers (needs root and Debian's docker.io)
#   bash deploy/local-engine.sh build        start, then build, each step cached: the Debian base image (once per
#                                            hash of its inputs), the torch wheel image, the CPU serving image
#                                            (../Dockerfile), the Prometheus image (prometheus/Dockerfile);
#                                            prints the DEPLOY_* variables naming them (image IDs and tags)
#   bash deploy/local-engine.sh run CMD...   build, run CMD with those DEPLOY_* variables, then stop the engine if
#                                            this run started it and no other run is using it; exits with CMD's code
#   bash deploy/local-engine.sh stop         stop the engine if this script started it (never another one)
#
# Environment (all optional): DOCKER (the client; default: the first one on PATH or /usr/bin/docker that can
# build with BuildKit), DOCKERD_FLAGS (extra dockerd flags, e.g. --storage-driver=vfs), PYTHON (whose pip
# configuration and pip are used; default python3), TORCH_VERSION (default: the Makefile's), TORCH_INDEX_URL
# (an extra index for the host's `pip download` of the CPU torch wheel), DEBIAN_MIRROR / DEBIAN_SECURITY_MIRROR
# (default: the ones apt uses here, else deb.debian.org), SERVING_IMAGE (default diffprompt:cpu),
# PROMETHEUS_IMAGE (default diffprompt-prometheus:local).
#
# It removes nothing it did not create: temporary folders of its own, dangling images carrying its build label,
# and the dockerd it started. Logs: logs/local-engine/ (the daemon's: /var/log/diffprompt-dockerd.log).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STATE=/run/diffprompt-engine            # machine-wide: one engine per machine, whichever checkout started it
DOCKERD_LOG=/var/log/diffprompt-dockerd.log
LOGS="$REPO/logs/local-engine"
PYTHON=${PYTHON:-python3}
BUILD_LABEL=io.diffprompt.local-engine=1
SERVING_IMAGE=${SERVING_IMAGE:-diffprompt:cpu}
PROMETHEUS_IMAGE=${PROMETHEUS_IMAGE:-diffprompt-prometheus:local}
TORCH_VERSION=${TORCH_VERSION:-$(sed -n 's/^TORCH *?= *torch==//p' "$REPO/Makefile")}
BASE_SUITE=bookworm                     # Python 3.11, the tag of the torch wheel (cp311)
BASE_PACKAGES=python3,python3-venv,ca-certificates
export DOCKER_BUILDKIT=1

say() { echo "local-engine: $*" >&2; }
die() { echo "local-engine: error: $*" >&2; exit 1; }

# -- the client ----------------------------------------------------------------------------------------

# Docker >= 23 clients build with BuildKit only through the buildx plugin; older ones (Debian's docker.io
# 20.10) have BuildKit built in (DOCKER_BUILDKIT=1). The legacy builder cannot mount secrets.
pick_client() {
    local candidate path version rejected=()
    for candidate in ${DOCKER:-} docker /usr/bin/docker; do
        path=$(command -v "$candidate" 2>/dev/null) || continue
        version=$("$path" version --format '{{.Client.Version}}' 2>/dev/null || true)
        if "$path" buildx version >/dev/null 2>&1 || [[ "${version%%.*}" =~ ^[0-9]+$ && "${version%%.*}" -lt 23 ]]; then
            DOCKER=$path
            [[ ${#rejected[@]} -eq 0 ]] || say "client $DOCKER ($version; not ${rejected[*]}: no buildx plugin)"
            return 0
        fi
        rejected+=("$path ${version:-?}")
    done
    die "no Docker client that builds with BuildKit (${rejected[*]:-none found} lack the buildx plugin): install Debian's docker.io (scripts/ensure_system_tools.sh --image) or the buildx plugin"
}

engine_answers() { timeout 30 "$DOCKER" version >/dev/null 2>&1; }

# -- the engine ------------------------------------------------------------------------------------------

start_engine() {
    mkdir -p "$STATE"
    exec {start_lock}>"$STATE/start.lock"
    flock "$start_lock"                     # one starter at a time
    if engine_answers; then
        flock -u "$start_lock"
        return 0
    fi
    if [[ -n "${DOCKER_HOST:-}" && "$DOCKER_HOST" != unix:///var/run/docker.sock ]]; then
        die "DOCKER_HOST=$DOCKER_HOST does not answer (this script only starts a local engine)"
    fi
    [[ $EUID -eq 0 ]] || die "no Docker engine answers and starting one needs root (or start dockerd yourself)"
    command -v dockerd >/dev/null || die "dockerd is not installed: apt-get install docker.io (scripts/ensure_system_tools.sh --image does, as root)"
    if [[ -f /var/run/docker.pid ]] && kill -0 "$(cat /var/run/docker.pid)" 2>/dev/null; then
        die "a dockerd (pid $(cat /var/run/docker.pid)) runs but does not answer: see its log, or stop it"
    fi
    # No iptables rules, no forwarding sysctl, no default bridge: this engine changes nothing on the host's
    # network. Containers talk over user-defined networks (compose's, the tests'), builds use the host network.
    # The storage driver is dockerd's own choice (overlay2 where the kernel allows, else vfs), unless DOCKERD_FLAGS says.
    say "starting dockerd (log: $DOCKERD_LOG)"
    # The daemon must not inherit this script's lock files (it would hold the locks for its whole life).
    # shellcheck disable=SC2086
    (
        exec {start_lock}>&-
        [[ -n "${users_lock:-}" ]] && exec {users_lock}>&-
        exec setsid dockerd --iptables=false --ip-forward=false --bridge=none ${DOCKERD_FLAGS:-}
    ) </dev/null >>"$DOCKERD_LOG" 2>&1 &
    local launcher=$!
    for _ in $(seq 120); do
        engine_answers && break
        if ! kill -0 "$launcher" 2>/dev/null; then
            tail -n 30 "$DOCKERD_LOG" >&2
            die "dockerd exited during start-up (log above: $DOCKERD_LOG)"
        fi
        sleep 0.5
    done
    engine_answers || { tail -n 30 "$DOCKERD_LOG" >&2; die "dockerd did not answer within 60 s"; }
    cat /var/run/docker.pid >"$STATE/dockerd.pid"   # the mark of "started by this script", read by stop
    STARTED_HERE=1
    say "dockerd $(cat "$STATE/dockerd.pid") answers: $("$DOCKER" info --format 'server {{.ServerVersion}}, storage driver {{.Driver}}, cgroup {{.CgroupDriver}}')"
    flock -u "$start_lock"
}

stop_engine() {
    local pid
    if [[ ! -f "$STATE/dockerd.pid" ]]; then
        say "no engine started by this script: nothing to stop"
        return 0
    fi
    pid=$(cat "$STATE/dockerd.pid")
    if kill -0 "$pid" 2>/dev/null && [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == dockerd ]]; then
        say "stopping dockerd $pid (started by this script)"
        kill -TERM "$pid"
        for _ in $(seq 120); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
        kill -0 "$pid" 2>/dev/null && die "dockerd $pid still runs 60 s after SIGTERM"
    fi
    rm -f "$STATE/dockerd.pid"
}

# -- the Debian base image -------------------------------------------------------------------------------

host_mirror() {  # $1 = suite (bookworm, bookworm-security): the first mirror apt here uses for it
    apt-cache policy 2>/dev/null | awk -v s="$1/main" '$3 == s && $2 ~ /^https?:/ {print $2; exit}'
}

# Everything this function does is part of the base image's hash (declare -f prints it), with the variables it reads.
# It runs as an `if` condition, where `set -e` does not apply: every step that can fail returns.
build_base_rootfs() {  # $1 = empty directory
    local rootfs=$1
    debootstrap --variant=minbase --include="$BASE_PACKAGES" "$BASE_SUITE" "$rootfs" "$DEBIAN_MIRROR" || return
    [[ -x "$rootfs/usr/bin/python3" ]] || { echo "no python3 in the debootstrapped tree" >&2; return 1; }
    printf 'deb %s %s main\ndeb %s %s-updates main\ndeb %s %s-security main\n' \
        "$DEBIAN_MIRROR" "$BASE_SUITE" "$DEBIAN_MIRROR" "$BASE_SUITE" "$DEBIAN_SECURITY_MIRROR" "$BASE_SUITE" \
        >"$rootfs/etc/apt/sources.list" || return
    # Slim, like Debian's -slim images: no manuals, documentation (but the copyright files) or translations,
    # now or in later `apt-get install`s; no package lists or downloaded packages.
    printf '%s\n' 'path-exclude /usr/share/doc/*' 'path-include /usr/share/doc/*/copyright' \
        'path-exclude /usr/share/man/*' 'path-exclude /usr/share/info/*' 'path-exclude /usr/share/locale/*' \
        >"$rootfs/etc/dpkg/dpkg.cfg.d/docker-slim" || return
    find "$rootfs/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete || return
    find "$rootfs/usr/share/doc" -mindepth 1 -type d -empty -delete || return
    rm -rf "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* "$rootfs"/usr/share/locale/* \
        "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/lib/apt/lists/* \
        "$rootfs"/var/log/*.log "$rootfs"/var/log/apt/*
}

base_image() {
    DEBIAN_MIRROR=${DEBIAN_MIRROR:-$(host_mirror "$BASE_SUITE")}
    DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
    DEBIAN_SECURITY_MIRROR=${DEBIAN_SECURITY_MIRROR:-$(host_mirror "$BASE_SUITE-security")}
    DEBIAN_SECURITY_MIRROR=${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
    local arch inputs hash tag rootfs
    arch=$(dpkg --print-architecture 2>/dev/null || uname -m)
    inputs="$(declare -f build_base_rootfs)|$BASE_SUITE|$BASE_PACKAGES|$DEBIAN_MIRROR|$DEBIAN_SECURITY_MIRROR|$arch"
    hash=$(printf '%s' "$inputs" | sha256sum | cut -c1-16)
    tag="local/bookworm-python:$hash"
    if "$DOCKER" image inspect "$tag" >/dev/null 2>&1; then
        say "base image $tag (cached)"
        BASE_IMAGE=$tag
        return 0
    fi
    [[ $EUID -eq 0 ]] || die "the base image $tag is missing and debootstrap needs root"
    command -v debootstrap >/dev/null || die "debootstrap is not installed: apt-get install debootstrap (scripts/ensure_system_tools.sh --image does, as root)"
    rootfs=$(mktemp -d /var/tmp/diffprompt-base.XXXXXX)
    TEMP_DIRS+=("$rootfs")
    say "building the base image $tag: debootstrap $BASE_SUITE from $DEBIAN_MIRROR (log: $LOGS/base.log)"
    local t0=$SECONDS
    if ! build_base_rootfs "$rootfs/rootfs" >"$LOGS/base.log" 2>&1; then
        tail -n 30 "$LOGS/base.log" >&2
        die "debootstrap failed (log above: $LOGS/base.log)"
    fi
    tar --numeric-owner -C "$rootfs/rootfs" -c . | "$DOCKER" import \
        --change 'ENV LANG=C.UTF-8' \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'CMD ["python3"]' \
        --change "LABEL io.diffprompt.base-inputs=$hash" \
        --change "LABEL $BUILD_LABEL" \
        - "$tag" >/dev/null
    say "base image $tag built in $((SECONDS - t0)) s"
    BASE_IMAGE=$tag
}

# -- the CPU torch wheel, as an image the export stage mounts as a find-links folder ---------------------

torch_wheels_image() {
    local dir pyver libc platforms=() minor hash
    read -r pyver libc < <("$DOCKER" run --rm --network none "$BASE_IMAGE" \
        python3 -c 'import platform, sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}", platform.libc_ver()[1])')
    [[ "$pyver" =~ ^3\.[0-9]+$ && "$libc" =~ ^2\.[0-9]+$ ]] || die "cannot read Python and glibc versions from $BASE_IMAGE"
    for minor in $(seq 17 "${libc#2.}"); do platforms+=(--platform "manylinux_2_${minor}_$(uname -m)"); done
    dir=$(mktemp -d /var/tmp/diffprompt-wheels.XXXXXX)
    TEMP_DIRS+=("$dir")
    # The host's pip finds it where it is configured to (here: a find-links folder; elsewhere TORCH_INDEX_URL).
    if ! "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --implementation cp --python-version "$pyver" \
            "${platforms[@]}" ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} \
            --dest "$dir" "torch==${TORCH_VERSION}+cpu" >"$LOGS/torch-download.log" 2>&1; then
        cat "$LOGS/torch-download.log" >&2
        die "pip found no torch==${TORCH_VERSION}+cpu wheel for Python $pyver (glibc $libc): set TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu, or put the wheel in a pip find-links folder"
    fi
    hash=$(cd "$dir" && sha256sum ./*.whl | sha256sum | cut -c1-16)
    WHEELS_IMAGE="local/diffprompt-torch-wheels:$hash"
    if ! "$DOCKER" image inspect "$WHEELS_IMAGE" >/dev/null 2>&1; then
        tar -C "$dir" -c . | "$DOCKER" import --change "LABEL $BUILD_LABEL" - "$WHEELS_IMAGE" >/dev/null
    fi
    say "torch wheel image $WHEELS_IMAGE: $(cd "$dir" && ls ./*.whl)"
}

# -- the images --------------------------------------------------------------------------------------------

# BUILT_ID: the image ID this build produced. The tests get IDs, not tags: another checkout's run on the same
# engine may retag diffprompt:cpu meanwhile, and must not change what this run tests.
docker_build() {  # $1 = log name, then docker build arguments
    local name=$1 t0=$SECONDS
    shift
    say "docker build $name (log: $LOGS/$name.log)"
    if ! "$DOCKER" build --progress plain --network host --label "$BUILD_LABEL" --iidfile "$LOGS/$name.iid" "$@" \
            >"$LOGS/$name.log" 2>&1; then
        tail -n 60 "$LOGS/$name.log" >&2
        die "docker build $name failed (last lines above; whole log: $LOGS/$name.log)"
    fi
    BUILD_SECONDS=$((SECONDS - t0))
    BUILT_ID=$(cat "$LOGS/$name.iid")
    say "docker build $name: $BUILD_SECONDS s, ${BUILT_ID:7:12}"
}

build_images() {
    local secrets
    secrets=$(mktemp -d /var/tmp/diffprompt-secrets.XXXXXX)
    TEMP_DIRS+=("$secrets")
    "$PYTHON" "$REPO/deploy/build_secrets.py" --python "$PYTHON" "$secrets/s"
    local secret_args=(--secret "id=pip-conf,src=$secrets/s/pip.conf" --secret "id=apt-conf,src=$secrets/s/apt.conf")
    [[ -f "$secrets/s/ca-bundle" ]] && secret_args+=(--secret "id=ca-bundle,src=$secrets/s/ca-bundle")

    docker_build serving "${secret_args[@]}" \
        --build-arg "BASE_IMAGE=$BASE_IMAGE" --build-arg "EXPORT_IMAGE=$BASE_IMAGE" \
        --build-arg "WHEELS_IMAGE=$WHEELS_IMAGE" --build-arg "TORCH_VERSION=$TORCH_VERSION" \
        --build-arg "TORCH_INDEX_URL=" --build-arg "EXTRAS=serve,cpu" \
        -t "$SERVING_IMAGE" -f "$REPO/Dockerfile" "$REPO"
    SERVING_BUILD_SECONDS=$BUILD_SECONDS SERVING_ID=$BUILT_ID
    docker_build prometheus "${secret_args[@]}" --build-arg "BASE_IMAGE=$BASE_IMAGE" \
        -t "$PROMETHEUS_IMAGE" "$REPO/deploy/prometheus"
    PROMETHEUS_ID=$BUILT_ID
    # Earlier builds of these tags, now untagged: only images carrying this script's label, and only after a
    # day (a concurrent run may still be testing the one it built).
    "$DOCKER" image prune --force --filter "label=$BUILD_LABEL" --filter "until=24h" >/dev/null
}

build() {
    mkdir -p "$LOGS"
    pick_client
    start_engine
    base_image
    torch_wheels_image
    build_images
    DEPLOY_VARS=(
        "DEPLOY_DOCKER=$DOCKER"
        "DEPLOY_SERVING_IMAGE=$SERVING_ID"
        "DEPLOY_SERVING_TAG=$SERVING_IMAGE"
        "DEPLOY_PROMETHEUS_IMAGE=$PROMETHEUS_ID"
        "DEPLOY_PROMETHEUS_TAG=$PROMETHEUS_IMAGE"
        "DEPLOY_BASE_IMAGE=$BASE_IMAGE"
        "DEPLOY_SERVING_BUILD_SECONDS=$SERVING_BUILD_SECONDS"
    )
}

TEMP_DIRS=()
STARTED_HERE=
RUN_LOCK=
# At exit, also on a failed build or a signal: the temporary folders, and in `run` the engine it started
# (unless another run holds the users lock, i.e. still uses it).
cleanup() {
    local dir
    if [[ -n "$RUN_LOCK" && -n "$STARTED_HERE" ]]; then
        flock -u "$RUN_LOCK"
        if flock -n -x "$RUN_LOCK"; then
            stop_engine || true
        else
            say "another run uses the engine: left running"
        fi
    fi
    for dir in "${TEMP_DIRS[@]}"; do
        # debootstrap mounts /proc and /sys in its target while it runs; never follow a mount while deleting.
        if [[ -d "$dir" ]]; then
            findmnt -rn -o TARGET | grep -F "$dir/" | sort -r | xargs -r umount -l 2>/dev/null || true
            rm -rf --one-file-system "$dir"
        fi
    done
}
trap cleanup EXIT
trap 'exit 143' TERM
trap 'exit 130' INT

case "${1:-}" in
    start)
        pick_client
        start_engine
        ;;
    stop)
        stop_engine
        ;;
    build)
        build
        printf '%s\n' "${DEPLOY_VARS[@]}"
        ;;
    run)
        shift
        [[ "${1:-}" == -- ]] && shift
        [[ $# -gt 0 ]] || die "usage: $0 run CMD..."
        mkdir -p "$STATE"
        exec {users_lock}>"$STATE/users.lock"
        flock -s "$users_lock"              # held while CMD uses the engine
        RUN_LOCK=$users_lock
        build
        rc=0
        env "${DEPLOY_VARS[@]}" "$@" || rc=$?
        exit "$rc"                          # cleanup stops the engine if this run started it
        ;;
    *)
        sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2
        exit 2
        ;;
esac
