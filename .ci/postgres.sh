#!/usr/bin/env bash
# Start a throwaway PostgreSQL cluster for the tests (no systemd): initdb + pg_ctl under /tmp,
# listening on 127.0.0.1 at a free port, with a database "kvagent_test".
# Writes .ci/postgres.env (source it) exporting KVAGENT_TEST_POSTGRES_DSN, and prints the DSN.
#   .ci/postgres.sh         start (installs postgresql with apt-get if it is missing)
#   .ci/postgres.sh stop    stop the cluster started last and delete its files
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ENV_FILE="$HERE/postgres.env"

as_pg() {  # initdb refuses to run as root: use the postgres user then
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

pg_bin() {
  local d
  d="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)"
  if [ -n "$d" ] && [ -x "$d/initdb" ]; then echo "$d"; return; fi
  d="$(dirname "$(command -v initdb 2>/dev/null || echo /nonexistent/x)")"
  [ -x "$d/initdb" ] && echo "$d"
}

if [ "${1:-start}" = stop ]; then
  if [ -f "$ENV_FILE" ]; then
    # shellcheck disable=SC1090
    . "$ENV_FILE"
    as_pg "$(pg_bin)/pg_ctl" -D "$KVAGENT_TEST_POSTGRES_DIR/data" -m fast -w stop || true
    rm -rf "$KVAGENT_TEST_POSTGRES_DIR" "$ENV_FILE"
  fi
  exit 0
fi

BIN="$(pg_bin || true)"
if [ -z "$BIN" ]; then
  echo "postgresql not found; installing it with apt-get" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get -y -qq install postgresql >&2
  BIN="$(pg_bin)"
fi
if [ "$(id -u)" = 0 ] && ! id postgres >/dev/null 2>&1; then
  useradd --system --create-home postgres
fi

PORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
BASE="$(mktemp -d /tmp/kvagent-pg.XXXXXX)"
chmod 755 "$BASE"
[ "$(id -u)" = 0 ] && chown postgres "$BASE"
as_pg "$BIN/initdb" -D "$BASE/data" -A trust -U postgres --no-sync -E UTF8 >"$BASE/initdb.log" 2>&1 \
  || { cat "$BASE/initdb.log" >&2; exit 1; }
as_pg "$BIN/pg_ctl" -D "$BASE/data" -l "$BASE/server.log" -w -t 60 \
  -o "-p $PORT -k $BASE -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off" start >&2 \
  || { cat "$BASE/server.log" >&2; exit 1; }
as_pg "$BIN/createdb" -h 127.0.0.1 -p "$PORT" -U postgres kvagent_test

DSN="postgresql://postgres@127.0.0.1:$PORT/kvagent_test"
cat >"$ENV_FILE" <<ENV
export KVAGENT_TEST_POSTGRES_DSN=$DSN
export KVAGENT_TEST_POSTGRES_DIR=$BASE
ENV
echo "KVAGENT_TEST_POSTGRES_DSN=$DSN"
