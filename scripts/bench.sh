#!/usr/bin/env bash
# berth's benchmarks: builds release binaries, starts a throwaway PostgreSQL (unless BERTH_TEST_POSTGRES_URL is set,
# or no bench named needs it), and runs `cargo bench` for the named benches (default: all). Figures print side by side
# with their baselines.
set -euo pipefail
cd "$(dirname "$0")/.."
benches=("$@")
[ ${#benches[@]} -gt 0 ] || benches=(api runs bridge ssh isolated plugins)
wants() { [[ " ${benches[*]} " == *" $1 "* ]]; }
# The ssh bench runs a real sshd and compares with the ssh CLI and rsync: install them if missing (as root).
if wants ssh; then
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
# Only the api and runs benches compare with PostgreSQL.
if [ -z "${BERTH_TEST_POSTGRES_URL:-}" ] && { wants api || wants runs; }; then
  # shellcheck source=scripts/lib/postgres.sh
  . scripts/lib/postgres.sh
  start_throwaway_postgres
fi
# The berth binary, for the benches that start it (the plugins bench works at the driver level and needs none).
if [ "${benches[*]}" != plugins ]; then
  cargo build --release --locked -p berth-server --bin berth
  export BERTH_BIN="${CARGO_TARGET_DIR:-$PWD/target}/release/berth"
fi
# The plugins bench hosts the fake provider's plugin binary.
if wants plugins; then
  cargo build --release --locked -p berth-fake-provider --bin berth-fake-provider
  export BERTH_FAKE_PLUGIN_BIN="${CARGO_TARGET_DIR:-$PWD/target}/release/berth-fake-provider"
fi
for bench in "${benches[@]}"; do
  cargo bench --locked -p berth-tests --bench "$bench"
done
