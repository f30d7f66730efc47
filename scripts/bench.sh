#!/usr/bin/env bash
# berth's benchmarks: builds release binaries, starts a throwaway PostgreSQL (unless BERTH_TEST_POSTGRES_URL is set),
# and runs `cargo bench` for the named benches (default: all). Figures print side by side with their baselines.
set -euo pipefail
cd "$(dirname "$0")/.."
benches=("$@")
[ ${#benches[@]} -gt 0 ] || benches=(api runs bridge ssh isolated)
# The ssh bench runs a real sshd and compares with the ssh CLI and rsync: install them if missing (as root).
if [[ " ${benches[*]} " == *" ssh "* ]]; then
  missing=()
  [ -x /usr/sbin/sshd ] || missing+=(openssh-server)
  command -v ssh >/dev/null 2>&1 && command -v ssh-keygen >/dev/null 2>&1 || missing+=(openssh-client)
  command -v rsync >/dev/null 2>&1 || missing+=(rsync)
  if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" -eq 0 ]; then
      echo "==> installing ${missing[*]}" >&2
      apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    else
      echo "missing packages: ${missing[*]} (run as root to install them)" >&2
      exit 1
    fi
  fi
fi
# Local runs are contained by bubblewrap, and the isolated bench compares with a bare `bwrap`.
if ! command -v bwrap >/dev/null 2>&1; then
  if [ "$(id -u)" -eq 0 ]; then
    echo "==> installing bubblewrap" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends bubblewrap >/dev/null
  else
    echo "missing package: bubblewrap (run as root to install it)" >&2
    exit 1
  fi
fi
if [ -z "${BERTH_TEST_POSTGRES_URL:-}" ]; then
  # shellcheck source=scripts/lib/postgres.sh
  . scripts/lib/postgres.sh
  start_throwaway_postgres
fi
cargo build --release --locked -p berth-server --bin berth
export BERTH_BIN="${CARGO_TARGET_DIR:-$PWD/target}/release/berth"
for bench in "${benches[@]}"; do
  cargo bench --locked -p berth-tests --bench "$bench"
done
