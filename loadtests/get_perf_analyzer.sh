#!/usr/bin/env bash
# Install a working Triton perf_analyzer into a cache directory and print the
# path of a wrapper script that runs it.
#
# Usage:
#   PA=$(loadtests/get_perf_analyzer.sh) && "$PA" -m mymodel -u 127.0.0.1:8001 -i grpc ...
#
# Only the wrapper path is written to stdout; progress goes to stderr.
#
# Why this dance (see the appendix of /work/shared/protocol/OPEN_INFERENCE_PROTOCOL.md):
# PyPI's `perf-analyzer` needs glibc >= 2.38, but the tritonclient==2.50.0 wheel
# ships tritonclient-2.50.0.data/data/bin/perf_analyzer, which runs on glibc 2.36
# once it can load libb64.so.0d (Debian: libb64-0d) and libcudart.so.12
# (PyPI: nvidia-cuda-runtime-cu12), even without a GPU.
#
# Environment:
#   ONNXGATE_TOOLS   tools cache root (default: $HOME/.cache/onnxgate-tools);
#                    the install goes to $ONNXGATE_TOOLS/perf_analyzer/
#   PYTHON           python interpreter used for pip (default: python3)
#
# Exit codes:
#   0  success (wrapper path printed on stdout)
#   1  unexpected failure (set -e)
#   2  download / extraction / pip failure
#   3  libb64-0d missing and could not be installed with apt-get
#   4  perf_analyzer still has unresolved shared libraries (ldd "not found")
#   5  the wrapper was written but `perf_analyzer --help` did not work
set -euo pipefail

SCRIPT_PATH="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)/$(basename "${BASH_SOURCE[0]}")"
TRITONCLIENT_VERSION=2.50.0
WHEEL_MEMBER="tritonclient-${TRITONCLIENT_VERSION}.data/data/bin/perf_analyzer"
PYTHON_BIN="${PYTHON:-python3}"

log() { printf '[get_perf_analyzer] %s\n' "$*" >&2; }
die() {
    local code=$1
    shift
    printf '[get_perf_analyzer] ERROR: %s\n' "$*" >&2
    exit "$code"
}

# Absolute cache dir, so the wrapper works from any cwd even if ONNXGATE_TOOLS is relative.
TOOLS_ROOT="${ONNXGATE_TOOLS:-$HOME/.cache/onnxgate-tools}"
mkdir -p "$TOOLS_ROOT/perf_analyzer"
CACHE_DIR="$(cd "$TOOLS_ROOT/perf_analyzer" && pwd -P)"
WRAPPER="$CACHE_DIR/perf_analyzer"
REAL_BIN="$CACHE_DIR/bin/perf_analyzer.real"
CUDART_TARGET="$CACHE_DIR/cudart"

# check_wrapper PATH: succeed if `PATH --help` printed usage/options and the
# dynamic loader did not fail. perf_analyzer may exit non-zero after --help.
check_wrapper() {
    local wrapper=$1 out
    [[ -x "$wrapper" ]] || return 1
    out="$("$wrapper" --help 2>&1 </dev/null || true)"
    if grep -qE 'error while loading shared libraries|cannot open shared object file|GLIBC_[0-9.]+. not found|No such file or directory' <<<"$out"; then
        printf '%s\n' "$out" | head -n 5 >&2
        return 1
    fi
    grep -qiE 'usage|options' <<<"$out"
}

# Fast path: already installed and working.
if check_wrapper "$WRAPPER" 2>/dev/null; then
    printf '%s\n' "$WRAPPER"
    exit 0
fi

# Serialise concurrent installs into the same cache dir.
if command -v flock >/dev/null 2>&1; then
    exec 9>"$CACHE_DIR/.install.lock"
    flock 9
    # Someone else may have finished while we waited.
    if check_wrapper "$WRAPPER" 2>/dev/null; then
        printf '%s\n' "$WRAPPER"
        exit 0
    fi
fi

log "installing perf_analyzer (tritonclient==$TRITONCLIENT_VERSION) into $CACHE_DIR"

case "$(uname -m)" in
    x86_64 | aarch64) ;;
    *) log "warning: architecture $(uname -m) is untested; tritonclient may not ship perf_analyzer for it" ;;
esac

# --- 1. libb64.so.0d (system package) ---------------------------------------
have_libb64() { ldconfig -p 2>/dev/null | grep -q 'libb64\.so\.0d'; }

if have_libb64; then
    log "libb64.so.0d: already present"
else
    command -v apt-get >/dev/null 2>&1 ||
        die 3 "libb64.so.0d is missing and apt-get is not available; install the Debian/Ubuntu package 'libb64-0d' (or an equivalent providing libb64.so.0d) and re-run"
    SUDO=()
    if [[ $(id -u) -ne 0 ]]; then
        command -v sudo >/dev/null 2>&1 ||
            die 3 "libb64.so.0d is missing; run 'apt-get install -y libb64-0d' as root and re-run"
        SUDO=(sudo -n)
    fi
    apt() { "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get "$@" >&2; }
    log "libb64.so.0d missing: apt-get install -y libb64-0d"
    if ! apt install -y --no-install-recommends libb64-0d; then
        # Fresh containers often have no package lists yet.
        log "apt-get install failed; retrying after apt-get update"
        { apt update && apt install -y --no-install-recommends libb64-0d; } ||
            die 3 "could not install libb64-0d with apt-get; install it manually ('apt-get install -y libb64-0d') and re-run"
    fi
    have_libb64 || die 3 "libb64-0d was installed but libb64.so.0d is still not in the ldconfig cache"
fi

# --- 2. perf_analyzer binary from the tritonclient wheel --------------------
command -v "$PYTHON_BIN" >/dev/null 2>&1 || die 2 "python interpreter '$PYTHON_BIN' not found (set PYTHON=...)"

TMP_DIR="$(mktemp -d "${TMPDIR:-/tmp}/get_perf_analyzer.XXXXXX")"
trap 'rm -rf "$TMP_DIR"' EXIT

REUSED=0
if [[ -x "$REAL_BIN" && "$(head -c 4 "$REAL_BIN" | od -An -c | tr -d ' ')" == '177ELF' ]]; then
    log "perf_analyzer binary: already present ($REAL_BIN)"
    REUSED=1
else
    log "downloading tritonclient==$TRITONCLIENT_VERSION wheel"
    "$PYTHON_BIN" -m pip download --disable-pip-version-check --quiet --no-deps \
        --only-binary=:all: --dest "$TMP_DIR/wheel" "tritonclient==$TRITONCLIENT_VERSION" >&2 ||
        die 2 "pip download of tritonclient==$TRITONCLIENT_VERSION failed"
    shopt -s nullglob
    wheels=("$TMP_DIR"/wheel/tritonclient-"$TRITONCLIENT_VERSION"-*.whl)
    shopt -u nullglob
    [[ ${#wheels[@]} -ge 1 ]] || die 2 "no tritonclient wheel found after pip download"
    wheel="${wheels[0]}"
    log "extracting $WHEEL_MEMBER from $(basename "$wheel")"
    mkdir -p "$TMP_DIR/x"
    # Use python's zipfile rather than unzip(1) so there is no extra dependency.
    "$PYTHON_BIN" - "$wheel" "$WHEEL_MEMBER" "$TMP_DIR/x/perf_analyzer" <<'PY' ||
import shutil, sys, zipfile
whl, member, dest = sys.argv[1:4]
with zipfile.ZipFile(whl) as zf, zf.open(member) as src, open(dest, "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
        die 2 "$(basename "$wheel") does not contain $WHEEL_MEMBER (wrong platform wheel?)"
    chmod 0755 "$TMP_DIR/x/perf_analyzer"
    mkdir -p "$(dirname "$REAL_BIN")"
    mv -f "$TMP_DIR/x/perf_analyzer" "$REAL_BIN"
fi

# --- 3. libcudart.so.12 from PyPI -------------------------------------------
find_cudart_dir() {
    [[ -d "$CUDART_TARGET" ]] || return 0
    find "$CUDART_TARGET" -name 'libcudart.so.12' \( -type f -o -type l \) -printf '%h\n' 2>/dev/null | head -n 1
}

CUDART_DIR="$(find_cudart_dir)"
if [[ -n "$CUDART_DIR" ]]; then
    log "libcudart.so.12: already present ($CUDART_DIR)"
    REUSED=1
else
    log "pip install --target $CUDART_TARGET nvidia-cuda-runtime-cu12"
    rm -rf "$CUDART_TARGET"
    "$PYTHON_BIN" -m pip install --disable-pip-version-check --quiet --no-deps \
        --only-binary=:all: --target "$CUDART_TARGET" nvidia-cuda-runtime-cu12 >&2 ||
        die 2 "pip install nvidia-cuda-runtime-cu12 failed"
    CUDART_DIR="$(find_cudart_dir)"
    [[ -n "$CUDART_DIR" ]] || die 2 "libcudart.so.12 not found under $CUDART_TARGET after pip install"
fi

# --- 4. unresolved shared libraries ------------------------------------------
if command -v ldd >/dev/null 2>&1; then
    missing="$(LD_LIBRARY_PATH="$CUDART_DIR${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" ldd "$REAL_BIN" 2>&1 |
        grep -E 'not found' || true)"
    if [[ -n "$missing" ]]; then
        log "perf_analyzer has unresolved shared libraries:"
        while IFS= read -r line; do
            printf '    %s\n' "${line#"${line%%[![:space:]]*}"}" >&2
        done <<<"$missing"
        die 4 "install the packages providing the libraries above and re-run"
    fi
    log "ldd: all shared libraries resolved"
else
    log "warning: ldd not available, skipping shared-library check"
fi

# --- 5. wrapper ---------------------------------------------------------------
# Write to a temp file and rename, so a concurrent reader never sees half a wrapper.
# shellcheck disable=SC2016  # the ${LD_LIBRARY_PATH...} / "$@" must expand when the wrapper runs
{
    printf '#!/usr/bin/env bash\n'
    printf '# Generated by onnxgate loadtests/get_perf_analyzer.sh -- do not edit.\n'
    printf 'export LD_LIBRARY_PATH=%q"${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"\n' "$CUDART_DIR"
    printf 'exec %q "$@"\n' "$REAL_BIN"
} >"$WRAPPER.tmp.$$"
chmod 0755 "$WRAPPER.tmp.$$"
mv -f "$WRAPPER.tmp.$$" "$WRAPPER"

# --- 6. verify ----------------------------------------------------------------
if ! check_wrapper "$WRAPPER"; then
    if [[ $REUSED -eq 1 && -z "${_GET_PERF_ANALYZER_RETRY:-}" ]]; then
        # A cached component may be corrupt: wipe them and start over once.
        log "check failed with cached components; removing them and reinstalling"
        rm -rf "${CACHE_DIR:?}/bin" "${CUDART_TARGET:?}" "${WRAPPER:?}"
        exec 9>&- # release the install lock before re-running ourselves
        rm -rf "$TMP_DIR"
        _GET_PERF_ANALYZER_RETRY=1 exec bash "$SCRIPT_PATH"
    fi
    die 5 "wrapper $WRAPPER was written but '$WRAPPER --help' did not print usage (see output above)"
fi
log "perf_analyzer is working"
printf '%s\n' "$WRAPPER"
