#!/usr/bin/env bash
# k8s.io/apiserver's storage suite (../shared/apiserver-suite/run.sh mux) with etcdmux
# on the SQL backend.
#
# usage: scripts/apiserver-suite-sql.sh [go-test -run regexp]     (from the checkout)
#
# Starts one PostgreSQL (initdb in a temp dir, as nobody when root, as testkit does)
# and hands run.sh a wrapper as ETCDMUX_BIN: every etcdmux the suite spawns (one per
# testserver.RunEtcd call in percall isolation) gets a database of its own
# (CREATE DATABASE, then `etcdmux backend init`), so every test has its own revision
# space, as it has its own etcd when run on etcd. The etcd run.sh still starts is
# unused by those etcdmux (they get --backend sql; --upstream is ignored).
# env: SUITE (default ../shared/apiserver-suite/run.sh), MUX (default
# $CARGO_TARGET_DIR/release/etcdmux or target/release/etcdmux), and run.sh's own
# (PKGS, ISOLATION, KEEP, RUST_LOG, ETCDMUX_CONFIG, ...).
set -euo pipefail
cd "$(dirname "$0")/.."

SUITE=${SUITE:-$(cd .. && pwd)/shared/apiserver-suite/run.sh}
MUX=${MUX:-${CARGO_TARGET_DIR:-target}/release/etcdmux}
[[ $MUX == /* ]] || MUX=$(pwd)/$MUX
[[ -x $MUX ]] || { echo "no etcdmux at $MUX: cargo build --release first" >&2; exit 2; }
[[ -x $SUITE ]] || { echo "no suite at $SUITE" >&2; exit 2; }
PGBIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
[[ -x $PGBIN/postgres ]] || { echo "PostgreSQL not found: make deps (apt-get install postgresql)" >&2; exit 2; }

DIR=$(mktemp -d /tmp/etcdmux-suite-sql.XXXXXX)
PG_PID=
cleanup() {
    if [[ -n $PG_PID ]]; then
        kill "$PG_PID" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$PG_PID" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$PG_PID" 2>/dev/null || true
    fi
    if [[ ${KEEP:-0} == 1 ]]; then echo "database dir kept: $DIR" >&2; else rm -rf "$DIR"; fi
}
trap cleanup EXIT

# PostgreSQL refuses to run as root: then it runs as nobody (setpriv execs, so $! is
# the server itself).
as=()
if [[ $(id -u) == 0 ]]; then
    as=(setpriv --reuid=nobody --regid=nogroup --clear-groups)
    chown nobody:nogroup "$DIR"
fi
"${as[@]}" "$PGBIN/initdb" -D "$DIR/data" -U etcdmux --auth=trust -E UTF8 --no-sync >"$DIR/initdb.log" 2>&1 \
    || { cat "$DIR/initdb.log" >&2; exit 2; }
PORT=$(python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')
# Not durable against a machine crash (a test database), but every commit survives a
# killed server. Each etcdmux holds up to backend.pool_size connections plus its feed's.
"${as[@]}" "$PGBIN/postgres" -D "$DIR/data" -p "$PORT" -h 127.0.0.1 -k "$DIR" \
    -c fsync=off -c full_page_writes=off -c shared_buffers=64MB -c max_connections=1000 \
    >"$DIR/postgres.log" 2>&1 </dev/null &
PG_PID=$!
for _ in $(seq 100); do "$PGBIN/pg_isready" -h 127.0.0.1 -p "$PORT" -q && break; sleep 0.2; done
"$PGBIN/pg_isready" -h 127.0.0.1 -p "$PORT" -q || { tail -20 "$DIR/postgres.log" >&2; exit 2; }
echo "# PostgreSQL $("$PGBIN/postgres" --version | awk '{print $3}') on 127.0.0.1:$PORT ($DIR)" >&2

# The ETCDMUX_BIN run.sh and the test processes spawn: a database per spawn.
cat >"$DIR/etcdmux-sql" <<EOF
#!/usr/bin/env bash
set -euo pipefail
db=suite_\$\$_\$(date +%s%N)
"$PGBIN/psql" -h 127.0.0.1 -p $PORT -U etcdmux -d postgres -qAtc "CREATE DATABASE \$db" >&2
dsn="host=127.0.0.1 port=$PORT user=etcdmux dbname=\$db"
"$MUX" backend init --backend-dsn "\$dsn" >&2
exec "$MUX" "\$@" --backend sql --backend-dsn "\$dsn"
EOF
chmod +x "$DIR/etcdmux-sql"

ETCDMUX_BIN=$DIR/etcdmux-sql "$SUITE" mux "${1:-.}"
