#!/usr/bin/env bash
# Build the Dockerfile with podman where no image registry can be reached, run the image, and
# check it with tritonclient on both transports and a SIGTERM drain under load.
#
#   deploy/podman/run-image-check.sh          # from the repository root, as root, after `make test`
#
# Steps: (1) podman, debootstrap and runc from the distribution's packages, if missing (Debian or
# Ubuntu, apt-get); (2) a base image made locally: debootstrap of Debian bookworm (minbase, with
# python3 3.11 and python3-venv) imported with `podman import` as localhost/debian-bookworm-python;
# (3) `podman build --build-arg BASE_IMAGE=<that image>` (the builder stage pip-installs from
# PyPI); (4) the image run as built (default CMD: its config, tokens from the mounted file),
# answers checked with tritonclient over HTTP and gRPC, HEALTHCHECK, user 10001, `podman stop`
# exits 0; (5) a second container (the same CMD plus --drain-delay-s 1) under 8 clients gets
# SIGTERM: readiness false, every request in flight answered, nothing accepted fails, exit 0.
#
# Cached between runs under $ONNXGATE_PODMAN_CACHE (default /var/tmp/onnxgate-podman): the
# debootstrap rootfs; podman's own store keeps the base image and the build's layers.
#
# Environment:
#   ONNXGATE_PODMAN_CACHE       cache directory (default /var/tmp/onnxgate-podman)
#   ONNXGATE_PODMAN_REBUILD=1   make the rootfs and the base image again
#   ONNXGATE_PODMAN_IMAGE       tag of the built image (default localhost/onnxgate:image-check)
#   DEBIAN_MIRROR               debootstrap mirror (default http://deb.debian.org/debian)
#   PYTHON                      interpreter with tritonclient, onnx, onnxruntime (default .venv/bin/python)
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
CACHE="${ONNXGATE_PODMAN_CACHE:-/var/tmp/onnxgate-podman}"
BASE="localhost/debian-bookworm-python:latest"
IMAGE="${ONNXGATE_PODMAN_IMAGE:-localhost/onnxgate:image-check}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
DRIVER="$ROOT/deploy/podman/check_image.py"
WORK="$CACHE/run"
NAME="onnxgate-image-check-$$"
START=$SECONDS

step() { printf '\n== [%3ds] %s\n' "$((SECONDS - START))" "$*"; }
die() { printf 'run-image-check: %s\n' "$*" >&2; exit 1; }

cleanup() {
    local rc=$?
    if podman container exists "$NAME" 2>/dev/null; then
        if [ "$rc" -ne 0 ]; then
            printf '\n-- container log (%s), last 40 lines:\n' "$NAME" >&2
            podman logs "$NAME" 2>&1 | tail -n 40 >&2 || true
        fi
        podman rm -f "$NAME" >/dev/null 2>&1 || true
    fi
    if [ "$rc" -eq 0 ]; then
        printf '\nrun-image-check: all checks passed in %ds\n' "$((SECONDS - START))"
    else
        printf '\nrun-image-check: FAILED (exit %d) after %ds\n' "$rc" "$((SECONDS - START))" >&2
    fi
}
trap cleanup EXIT

[ -x "$PY" ] || die "$PY not found: run \`make test\` first (or set PYTHON to a python with tritonclient, onnx, onnxruntime)"
"$PY" -c 'import tritonclient.grpc, tritonclient.http, onnx, onnxruntime' 2>/dev/null \
    || die "$PY lacks tritonclient[grpc,http], onnx or onnxruntime (the test extra has them)"

# -- 1. tools ---------------------------------------------------------------------------------
step "tools: podman, debootstrap, runc"
missing=()
command -v podman >/dev/null || missing+=(podman)
command -v debootstrap >/dev/null || [ -x /usr/sbin/debootstrap ] || missing+=(debootstrap)
command -v runc >/dev/null || [ -x /usr/sbin/runc ] || missing+=(runc)
if [ "${#missing[@]}" -gt 0 ]; then
    [ "$(id -u)" -eq 0 ] || die "missing ${missing[*]}; install them (apt-get install podman debootstrap runc) or run as root"
    command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get to install them"
    echo "installing ${missing[*]} with apt-get"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
export PATH="$PATH:/usr/sbin:/sbin"
podman --version

# -- 2. base image ----------------------------------------------------------------------------
mkdir -p "$CACHE"
if [ "${ONNXGATE_PODMAN_REBUILD:-0}" = "1" ]; then
    rm -rf "$CACHE/rootfs" "$CACHE/rootfs.ok"
    podman rmi -f "$BASE" >/dev/null 2>&1 || true
fi
if podman image exists "$BASE"; then
    step "base image: $BASE (cached in podman's store)"
else
    if [ ! -f "$CACHE/rootfs.ok" ]; then
        step "base rootfs: debootstrap bookworm (minbase + python3 python3-venv ca-certificates) from $MIRROR"
        [ "$(id -u)" -eq 0 ] || die "debootstrap needs root"
        rm -rf "$CACHE/rootfs"
        if ! nice -n 10 debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
                bookworm "$CACHE/rootfs" "$MIRROR" > "$CACHE/debootstrap.log" 2>&1; then
            tail -n 20 "$CACHE/debootstrap.log" >&2
            die "debootstrap failed (log: $CACHE/debootstrap.log)"
        fi
        # what an image needs no copy of: downloaded packages, package lists, documentation
        rm -rf "$CACHE"/rootfs/var/cache/apt/archives/*.deb "$CACHE"/rootfs/var/lib/apt/lists/* \
            "$CACHE"/rootfs/usr/share/doc/* "$CACHE"/rootfs/usr/share/man/*
        touch "$CACHE/rootfs.ok"
    fi
    step "base image: podman import -> $BASE"
    # The image trusts what this host trusts, so pip in the build gets through a TLS-inspecting
    # proxy the host is configured for; PIP_CERT makes pip (which has its own bundle) use it.
    host_ca="${PIP_CERT:-${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}}"
    [ -f "$host_ca" ] && cp "$host_ca" "$CACHE/rootfs/etc/ssl/certs/ca-certificates.crt"
    tar -C "$CACHE/rootfs" -c . | podman import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
        --change 'CMD ["/bin/bash"]' \
        --message "debootstrap bookworm minbase + python3 (run-image-check.sh)" - "$BASE" >/dev/null
fi

# -- engine options: what this machine lets the OCI runtime do ---------------------------------
# Tried in order; the first that runs `true` in the base image is used for build and run.
# - podman's defaults;
# - explicit rlimits: rootful podman asks for RLIMIT_NOFILE/RLIMIT_NPROC 1048576, which crun and
#   runc cannot set without CAP_SYS_RESOURCE ("setrlimit `RLIMIT_NOFILE`: Operation not permitted");
#   so this host's hard limits instead (podman itself runs with RLIMIT_NPROC at most 32768);
# - runc with those limits: crun refuses a hybrid cgroup v1 + v2 host whose v2 hierarchy has a
#   controller ("cgroups in hybrid mode not supported, drop all controllers from cgroupv2"), even
#   with --cgroups=disabled. (Where step 1 installed podman and runc together, runc is podman's
#   runtime already and the second attempt is the one that works.)
step "engine: probing what runs here"
nofile="$(ulimit -Hn)"; [ "$nofile" = unlimited ] && nofile=1048576
nproc="$(ulimit -Hu)"; { [ "$nproc" = unlimited ] || [ "$nproc" -gt 32768 ]; } && nproc=32768
limits=(--ulimit "nofile=$nofile:$nofile" --ulimit "nproc=$nproc:$nproc")
ENGINE=()
errors=""
for attempt in default limits runc; do
    case "$attempt" in
        default) opts=() ;;
        limits) opts=("${limits[@]}") ;;
        runc) opts=(--runtime runc "${limits[@]}") ;;
    esac
    if out="$(podman run --rm "${opts[@]}" "$BASE" python3 -c 'import venv' 2>&1)"; then
        ENGINE=("${opts[@]}")
        [ -z "$errors" ] || echo "engine: what failed before:$errors"
        echo "engine: ${attempt}${opts[*]:+ (${opts[*]})}"
        break
    fi
    errors+=$'\n'"  ${attempt}${opts[*]:+ (${opts[*]})}: $(printf '%s' "$out" | tail -n 2)"
    ENGINE=(none)
done
[ "${ENGINE[*]:-}" != none ] || die "podman cannot run a container here; tried:$errors"

# -- 3. build ---------------------------------------------------------------------------------
step "build: podman build --build-arg BASE_IMAGE=$BASE -t $IMAGE"
# --format docker keeps HEALTHCHECK (the OCI format has none); --pull=never: no registry at all.
# The builder stage is tagged too (the same build, from the layer cache), so that pruning the
# images earlier builds left untagged keeps the layers the next build can reuse.
: > "$CACHE/build.log"
for target in builder runtime; do
    tag="$IMAGE"; [ "$target" = builder ] && tag="$IMAGE-builder"
    if ! nice -n 10 podman build --format docker --pull=never "${ENGINE[@]}" --target "$target" \
            --build-arg "BASE_IMAGE=$BASE" -t "$tag" "$ROOT" >> "$CACHE/build.log" 2>&1; then
        tail -n 30 "$CACHE/build.log" >&2
        die "podman build failed (log: $CACHE/build.log)"
    fi
done
podman image prune -f >/dev/null
echo "build: $(grep -c 'Using cache' "$CACHE/build.log" || true) steps from the layer cache"
podman image inspect --format 'image: {{.Id}} {{.Size}} bytes, user {{.Config.User}}' "$IMAGE" | cut -c1-120

# -- 4. the image as built ----------------------------------------------------------------------
step "run: $IMAGE with its default CMD, the demo repository and a tokens file"
"$PY" "$DRIVER" prepare "$WORK"
run_container() {  # extra arguments replace CMD
    podman run -d --name "$NAME" "${ENGINE[@]}" \
        -p 127.0.0.1::8000 -p 127.0.0.1::8001 -p 127.0.0.1::8002 \
        -v "$WORK/models:/models:ro" -v "$WORK/tokens:/etc/onnxgate/tokens:ro" \
        "$IMAGE" "$@" >/dev/null
    HTTP_PORT="$(podman port "$NAME" 8000/tcp | head -n1)"; HTTP_PORT="${HTTP_PORT##*:}"
    GRPC_PORT="$(podman port "$NAME" 8001/tcp | head -n1)"; GRPC_PORT="${GRPC_PORT##*:}"
    METRICS_PORT="$(podman port "$NAME" 8002/tcp | head -n1)"; METRICS_PORT="${METRICS_PORT##*:}"
    [ -n "$HTTP_PORT" ] && [ -n "$GRPC_PORT" ] && [ -n "$METRICS_PORT" ] || die "no published ports for $NAME"
    echo "container $NAME: http 127.0.0.1:$HTTP_PORT, grpc 127.0.0.1:$GRPC_PORT, metrics 127.0.0.1:$METRICS_PORT"
}
run_container
"$PY" "$DRIVER" serve --http "$HTTP_PORT" --grpc "$GRPC_PORT" --metrics "$METRICS_PORT" --token-file "$WORK/token" \
    || die "tritonclient checks failed against the container"
uid="$(podman exec "$NAME" id -u)"
[ "$uid" = 10001 ] || die "the gateway runs as uid $uid, not 10001"
podman healthcheck run "$NAME" 2>/dev/null || die "the image's HEALTHCHECK reports unhealthy while /v2/health/ready is 200"
echo "uid 10001, HEALTHCHECK healthy"
podman stop -t 40 "$NAME" >/dev/null
code="$(podman inspect --format '{{.State.ExitCode}}' "$NAME")"
[ "$code" = 0 ] || die "podman stop: the container exited with code $code, not 0"
echo "podman stop: exit 0"
podman rm "$NAME" >/dev/null

# -- 5. SIGTERM drain under load --------------------------------------------------------------
step "drain: SIGTERM under load (CMD + --drain-delay-s 1 --cpu-threads 1)"
run_container --config /etc/onnxgate/gateway.yaml --model-repository /models --host 0.0.0.0 \
    --drain-delay-s 1 --cpu-threads 1
"$PY" "$DRIVER" drain --http "$HTTP_PORT" --grpc "$GRPC_PORT" --token-file "$WORK/token" --work "$WORK" \
    --container "$NAME" || die "the SIGTERM drain check failed"
