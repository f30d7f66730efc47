#!/usr/bin/env bash
# berth's benchmarks: builds release binaries, starts a throwaway PostgreSQL (unless BERTH_TEST_POSTGRES_URL is set),
# and runs `cargo bench` for the named benches (default: all). Figures print side by side with their baselines.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${BERTH_TEST_POSTGRES_URL:-}" ]; then
  # shellcheck source=scripts/lib/postgres.sh
  . scripts/lib/postgres.sh
  start_throwaway_postgres
fi
cargo build --release --locked -p berth-server --bin berth
export BERTH_BIN="${CARGO_TARGET_DIR:-$PWD/target}/release/berth"
benches=("$@")
[ ${#benches[@]} -gt 0 ] || benches=(api runs bridge)
for bench in "${benches[@]}"; do
  cargo bench --locked -p berth-tests --bench "$bench"
done
