#!/usr/bin/env bash
# berth's whole test suite, for a fresh Debian machine (run as root) or a developer's box.
#
# Installs what the tests need, starts a throwaway PostgreSQL cluster on 127.0.0.1 so the store suite runs against
# both backends, runs fmt, clippy and every test, and stops the cluster whatever happens.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '==> %s\n' "$*" >&2; }

as_root() { [ "$(id -u)" -eq 0 ]; }

# --- packages -------------------------------------------------------------------------------------------------
missing=()
command -v jq >/dev/null 2>&1 || missing+=(jq)
command -v curl >/dev/null 2>&1 || missing+=(curl)
command -v pgrep >/dev/null 2>&1 || missing+=(procps)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
[ -x /usr/sbin/sshd ] || missing+=(openssh-server)
command -v ssh-keygen >/dev/null 2>&1 || missing+=(openssh-client)
command -v rsync >/dev/null 2>&1 || missing+=(rsync)
# Containment: Local runs and the isolated provider are built on bubblewrap.
command -v bwrap >/dev/null 2>&1 || missing+=(bubblewrap)
# The operator console's browser tests drive Debian's chromium over WebDriver.
# (fonts-liberation is only a recommendation of chromium's, and we install without recommendations.)
[ -x /usr/bin/chromium ] || missing+=(chromium fonts-liberation)
[ -x /usr/bin/chromedriver ] || missing+=(chromium-driver)
if [ ${#missing[@]} -gt 0 ]; then
  if as_root; then
    log "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "missing packages: ${missing[*]} (run as root to install them)" >&2
    exit 1
  fi
fi

# --- PostgreSQL -------------------------------------------------------------------------------------------------
# fsync off: a throwaway test cluster trades durability for speed.
export BERTH_PG_EXTRA_OPTIONS="-c fsync=off -c synchronous_commit=off"
# shellcheck source=scripts/lib/postgres.sh
. scripts/lib/postgres.sh
start_throwaway_postgres

# --- checks and tests ---------------------------------------------------------------------------------------------
log "cargo fmt --check"
cargo fmt --all -- --check
log "cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
log "building the berth binary and the plugins the tests run (the fake provider, the example)"
cargo build --locked -p berth-server --bin berth -p berth-fake-provider --bin berth-fake-provider \
  -p berth-example-dir-sandbox --bin berth-example-dir-sandbox
export BERTH_BIN="${CARGO_TARGET_DIR:-$PWD/target}/debug/berth"
export BERTH_FAKE_PLUGIN_BIN="${CARGO_TARGET_DIR:-$PWD/target}/debug/berth-fake-provider"
export BERTH_EXAMPLE_PLUGIN_BIN="${CARGO_TARGET_DIR:-$PWD/target}/debug/berth-example-dir-sandbox"
log "tests (SQLite and PostgreSQL)"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --no-fail-fast
else
  cargo test --workspace --locked --no-fail-fast
fi
cargo test --doc --workspace --locked
