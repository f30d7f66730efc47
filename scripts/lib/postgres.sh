# Sourced by scripts/test.sh and scripts/bench.sh: start a throwaway PostgreSQL cluster on 127.0.0.1 and stop it on
# exit. Exports BERTH_TEST_POSTGRES_URL. Runs the server as the `postgres` user when we are root (initdb refuses root).

pg_as_root() { [ "$(id -u)" -eq 0 ]; }
pg_run() { if pg_as_root; then runuser -u postgres -- "$@"; else "$@"; fi; }

start_throwaway_postgres() {
  pg_bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
  pg_root=$(mktemp -d /tmp/berth-pg.XXXXXX)
  pg_port=${BERTH_TEST_PG_PORT:-54329}
  if pg_as_root; then chown postgres "$pg_root"; fi
  trap stop_throwaway_postgres EXIT
  printf '==> starting PostgreSQL (%s) on 127.0.0.1:%s\n' "$pg_bin" "$pg_port" >&2
  pg_run "$pg_bin/initdb" -D "$pg_root/data" -A trust -U postgres --no-sync >/dev/null
  pg_run "$pg_bin/pg_ctl" -D "$pg_root/data" -l "$pg_root/server.log" -w -o \
    "-k $pg_root -p $pg_port -c listen_addresses=127.0.0.1 -c max_connections=500 ${BERTH_PG_EXTRA_OPTIONS:-}" \
    start >/dev/null
  export BERTH_TEST_POSTGRES_URL="postgres://postgres@127.0.0.1:$pg_port/postgres"
}

stop_throwaway_postgres() {
  pg_run "$pg_bin/pg_ctl" -D "$pg_root/data" -m immediate stop >/dev/null 2>&1 || true
  rm -rf "$pg_root"
}
