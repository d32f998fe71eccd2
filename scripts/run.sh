#!/usr/bin/env bash
# `make run`: a local etcd on 127.0.0.1:2379 and etcdmux (config/milo.toml) on
# 127.0.0.1:23790, both left running in the background. State, logs and pid files
# live in ./.run/; `make clean-run` stops both and removes it.
#
# `make run-tls` (TLS=1): the same with TLS everywhere, in ./.run-tls/ on other ports
# (etcd 127.0.0.1:22379, etcdmux 127.0.0.1:23792, metrics 23793). A test CA is
# generated with openssl; etcd requires client certificates (--client-cert-auth),
# etcdmux presents its own to etcd and requires one from its clients (mTLS), whose CN
# names the principal: CN=apiserver is the admin (Milo's trusted apiserver, tenants
# from key paths), CN=project:<p> is tenant <p> and reaches only its own keys.
#
# A still-running etcd from a previous run is reused (its data is kept);
# a still-running etcdmux is restarted so that a fresh build is picked up.
set -euo pipefail
cd "$(dirname "$0")/.."

TLS=${TLS:-0}
# BACKEND=sql (make run BACKEND=sql): etcdmux on a local PostgreSQL (127.0.0.1:5433,
# data in .run/pg) instead of etcd; its schema from `etcdmux backend init`.
BACKEND=${BACKEND:-etcd}
PG_PORT=5433
MUX_HOST=127.0.0.1
CONFIG=config/milo.toml
BIN="${CARGO_TARGET_DIR:-target}/release/etcdmux"
if [[ $TLS == 1 ]]; then
    RUN_DIR=.run-tls
    SCHEME=https
    ETCD_PORT=22379
    PEER_PORT=22380
    MUX_PORT=23792
    METRICS_PORT=23793
else
    RUN_DIR=.run
    SCHEME=http
    ETCD_PORT=2379
    PEER_PORT=2380
    MUX_PORT=23790
    METRICS_PORT=23791
fi
ETCD_URL=$SCHEME://127.0.0.1:$ETCD_PORT
PKI=$RUN_DIR/pki

die() { echo "run: $*" >&2; exit 1; }
port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

# Pid from .run/<name>.pid if that process is alive and is <name>; empty otherwise.
live_pid() {
    local f="$RUN_DIR/$1.pid" pid
    [[ -s $f ]] || return 0
    pid=$(<"$f")
    if [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null && grep -qa "$1" "/proc/$pid/cmdline" 2>/dev/null; then
        echo "$pid"
    fi
}

# Runs "$@" detached (own session, immune to hangup), output appended to log $1,
# and waits until pid file $2 is written.
spawn() {
    local log=$1 pidfile=$2
    shift 2
    rm -f "$pidfile"
    local detach=()
    command -v setsid >/dev/null 2>&1 && detach=(setsid)
    # shellcheck disable=SC2016
    "${detach[@]}" bash -c 'echo $$ >"$0"; exec nohup "$@"' "$pidfile" "$@" >>"$log" 2>&1 </dev/null &
    for _ in $(seq 1 50); do
        [[ -s $pidfile ]] && return 0
        sleep 0.1
    done
    die "could not start $1"
}

tail_log() { echo "--- last lines of $1 ---" >&2; tail -n 30 "$1" >&2 || true; }

for bin in etcd etcdctl; do
    command -v "$bin" >/dev/null 2>&1 || die "$bin not found: run \`make deps\` (apt-get install etcd-server etcd-client)"
done
[[ -x $BIN ]] || die "$BIN not found: run \`make build\` first (or \`make run\`, which builds)"

mkdir -p "$RUN_DIR"

# --- certificates (TLS=1) -----------------------------------------------------------
# One test CA signs every certificate. Kept across runs (a restarted etcd keeps
# trusting them); delete $PKI to get new ones.
cert() { # name, subject CN, extensions (openssl -addext value or empty)
    local name=$1 cn=$2 ext=$3 args=()
    [[ -s $PKI/$name.pem ]] && return 0
    if [[ -n $ext ]]; then
        printf '%s\n' "$ext" >"$PKI/$name.ext"
        args=(-extfile "$PKI/$name.ext")
    fi
    openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
        -keyout "$PKI/$name-key.pem" -subj "/CN=$cn" -out "$PKI/$name.csr" 2>/dev/null
    openssl x509 -req -in "$PKI/$name.csr" -CA "$PKI/ca.pem" -CAkey "$PKI/ca-key.pem" -CAcreateserial \
        -days 30 -sha256 "${args[@]}" -out "$PKI/$name.pem" 2>/dev/null
    rm -f "$PKI/$name.csr" "$PKI/$name.ext"
}
if [[ $TLS == 1 ]]; then
    command -v openssl >/dev/null 2>&1 || die "openssl not found: apt-get install openssl"
    mkdir -p "$PKI"
    if [[ ! -s $PKI/ca.pem ]]; then
        openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 30 \
            -subj "/CN=etcdmux dev CA" -keyout "$PKI/ca-key.pem" -out "$PKI/ca.pem" 2>/dev/null
    fi
    server_ext="subjectAltName=IP:127.0.0.1,DNS:localhost
extendedKeyUsage=serverAuth,clientAuth"
    client_ext="extendedKeyUsage=clientAuth"
    cert etcd etcd "$server_ext"
    cert etcdmux etcdmux "$server_ext"
    cert apiserver apiserver "$client_ext"
    cert demo project:demo "$client_ext"
    chmod 600 "$PKI"/*-key.pem
fi

# etcdctl's TLS flags for etcd itself (etcdmux's own certificate is accepted by etcd).
etcd_tls=()
[[ $TLS == 1 ]] && etcd_tls=(--cacert "$PKI/ca.pem" --cert "$PKI/etcdmux.pem" --key "$PKI/etcdmux-key.pem")

# --- PostgreSQL (BACKEND=sql) -----------------------------------------------------
start_postgres() {
    local bin
    bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
    [[ -x $bin/postgres ]] || die "PostgreSQL not found: run \`make deps BACKEND=sql\` (apt-get install postgresql)"
    # PostgreSQL refuses to run as root: then it runs as nobody.
    local as=()
    [[ $(id -u) == 0 ]] && as=(setpriv --reuid=nobody --regid=nogroup --clear-groups)
    PG_DSN="host=127.0.0.1 port=$PG_PORT user=etcdmux dbname=postgres"
    if [[ -n $(live_pid postgres) ]]; then
        echo "run: reusing PostgreSQL from a previous run"
        return
    fi
    mkdir -p "$RUN_DIR/pg"
    [[ $(id -u) == 0 ]] && chown nobody:nogroup "$RUN_DIR/pg"
    if [[ ! -f $RUN_DIR/pg/data/PG_VERSION ]]; then
        "${as[@]}" "$bin/initdb" -D "$RUN_DIR/pg/data" -U etcdmux --auth=trust -E UTF8 >"$RUN_DIR/pg-init.log" 2>&1 \
            || { tail_log "$RUN_DIR/pg-init.log"; die "initdb failed"; }
    fi
    echo "run: starting PostgreSQL on 127.0.0.1:$PG_PORT (data: $RUN_DIR/pg/data, log: $RUN_DIR/postgres.log)"
    spawn "$RUN_DIR/postgres.log" "$RUN_DIR/postgres.pid" "${as[@]}" "$bin/postgres" -D "$RUN_DIR/pg/data" \
        -p "$PG_PORT" -h 127.0.0.1 -k "$(cd "$RUN_DIR/pg" && pwd)"
    for _ in $(seq 1 100); do
        "$bin/pg_isready" -h 127.0.0.1 -p "$PG_PORT" -q && break
        sleep 0.2
    done
    "$bin/pg_isready" -h 127.0.0.1 -p "$PG_PORT" -q || { tail_log "$RUN_DIR/postgres.log"; die "PostgreSQL did not start"; }
}
if [[ $BACKEND == sql ]]; then
    start_postgres
    "$BIN" backend init --backend-dsn "$PG_DSN" || die "etcdmux backend init failed"
fi

# --- etcd -------------------------------------------------------------------------
etcd_health() { ETCDCTL_API=3 etcdctl --endpoints "$ETCD_URL" "${etcd_tls[@]}" --dial-timeout=1s --command-timeout=2s endpoint health >/dev/null 2>&1; }

etcd_pid=$(live_pid etcd)
if [[ $BACKEND == sql ]]; then
    : # no etcd: keys live in PostgreSQL
elif [[ -n $etcd_pid ]]; then
    echo "run: reusing etcd from a previous run (pid $etcd_pid)"
else
    for port in "$ETCD_PORT" "$PEER_PORT"; do
        if port_open 127.0.0.1 "$port"; then
            die "127.0.0.1:$port is already in use by another process (not started by \`make run\`).
    A system etcd? Stop it with: sudo systemctl disable --now etcd
    Find the owner with:         ss -ltnp 'sport = :$port'"
        fi
    done
    etcd_args=()
    if [[ $TLS == 1 ]]; then
        etcd_args=(--client-cert-auth --trusted-ca-file "$PKI/ca.pem"
            --cert-file "$PKI/etcd.pem" --key-file "$PKI/etcd-key.pem")
    fi
    echo "run: starting etcd on $ETCD_URL (data: $RUN_DIR/etcd-data, log: $RUN_DIR/etcd.log)"
    spawn "$RUN_DIR/etcd.log" "$RUN_DIR/etcd.pid" etcd \
        --name etcdmux-dev \
        --data-dir "$RUN_DIR/etcd-data" \
        --listen-client-urls "$ETCD_URL" \
        --advertise-client-urls "$ETCD_URL" \
        --listen-peer-urls "http://127.0.0.1:$PEER_PORT" \
        --initial-advertise-peer-urls "http://127.0.0.1:$PEER_PORT" \
        --initial-cluster "etcdmux-dev=http://127.0.0.1:$PEER_PORT" \
        "${etcd_args[@]}" \
        --logger zap
    etcd_pid=$(<"$RUN_DIR/etcd.pid")
fi

healthy=false
for _ in $(seq 1 60); do
    if [[ $BACKEND == sql ]] || etcd_health; then healthy=true; break; fi
    kill -0 "$etcd_pid" 2>/dev/null || { tail_log "$RUN_DIR/etcd.log"; die "etcd exited"; }
    sleep 0.5
done
$healthy || { tail_log "$RUN_DIR/etcd.log"; die "etcd at $ETCD_URL is not healthy"; }

# --- etcdmux ----------------------------------------------------------------------
mux_pid=$(live_pid etcdmux)
if [[ -n $mux_pid ]]; then
    echo "run: restarting etcdmux (pid $mux_pid) to pick up the current build"
    kill "$mux_pid" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$mux_pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$mux_pid" 2>/dev/null && { kill -9 "$mux_pid" 2>/dev/null || true; sleep 0.2; }
fi
for port in "$MUX_PORT" "$METRICS_PORT"; do
    if port_open "$MUX_HOST" "$port"; then
        die "$MUX_HOST:$port is already in use by another process; find it with: ss -ltnp 'sport = :$port'"
    fi
done

mux_args=(--config "$CONFIG")
if [[ $TLS == 1 ]]; then
    # config/milo.toml with its listener, metrics port and upstream replaced by TLS ones.
    CONFIG=$RUN_DIR/milo-tls.toml
    {
        echo "# Generated by scripts/run.sh (make run-tls) from config/milo.toml."
        sed -e '/^\[\[listener\]\]/,/^$/d' -e '/^\[upstream\]/,/^$/d' -e 's/^metrics_listen = .*/metrics_listen = "'"$MUX_HOST:$METRICS_PORT"'"/' config/milo.toml
        cat <<EOF

[[listener]]
addr = "$MUX_HOST:$MUX_PORT"
cert_file = "$PKI/etcdmux.pem"
key_file = "$PKI/etcdmux-key.pem"
trusted_ca_file = "$PKI/ca.pem"
client_cert_auth = true

[upstream]
endpoints = ["$ETCD_URL"]
connections = 2
cacert = "$PKI/ca.pem"
cert = "$PKI/etcdmux.pem"
key = "$PKI/etcdmux-key.pem"

[tenancy.identity]
from = "cn"
pattern = "project:{tenant}"
map = { "apiserver" = "root" }
EOF
    } >"$CONFIG"
    mux_args=(--config "$CONFIG")
fi
"$BIN" check-config "$CONFIG" >/dev/null || die "$CONFIG is not valid (see above)"

echo "run: starting etcdmux ($CONFIG, log: $RUN_DIR/etcdmux.log)"
[[ $BACKEND == sql ]] && mux_args+=(--backend sql --backend-dsn "$PG_DSN")
spawn "$RUN_DIR/etcdmux.log" "$RUN_DIR/etcdmux.pid" "$BIN" "${mux_args[@]}"
mux_pid=$(<"$RUN_DIR/etcdmux.pid")

up=false
for _ in $(seq 1 100); do
    if port_open "$MUX_HOST" "$MUX_PORT"; then up=true; break; fi
    kill -0 "$mux_pid" 2>/dev/null || { tail_log "$RUN_DIR/etcdmux.log"; die "etcdmux exited"; }
    sleep 0.2
done
$up || { tail_log "$RUN_DIR/etcdmux.log"; die "etcdmux does not accept connections on $MUX_HOST:$MUX_PORT"; }

MUX_URL=$SCHEME://$MUX_HOST:$MUX_PORT
if [[ $TLS == 1 ]]; then
    as_apiserver="--cacert $PKI/ca.pem --cert $PKI/apiserver.pem --key $PKI/apiserver-key.pem"
    as_demo="--cacert $PKI/ca.pem --cert $PKI/demo.pem --key $PKI/demo-key.pem"
    cat <<EOF

etcdmux is running on $MUX_URL with mTLS   (pid $mux_pid, log $RUN_DIR/etcdmux.log)
  metrics:  http://$MUX_HOST:$METRICS_PORT/metrics   readiness: http://$MUX_HOST:$METRICS_PORT/readyz
  upstream: etcd on $ETCD_URL, client certificates required   (pid $etcd_pid, log $RUN_DIR/etcd.log)
  certificates: $PKI/ (CA ca.pem; etcd, etcdmux, apiserver = admin, demo = tenant "demo")

As the apiserver (CN=apiserver, the admin; tenants from key paths):
  ETCDCTL_API=3 etcdctl --endpoints $MUX_URL $as_apiserver put /projects/demo/pods/default/web hello
  ETCDCTL_API=3 etcdctl --endpoints $MUX_URL $as_apiserver get --prefix /projects/demo/
As tenant "demo" (CN=project:demo; its own keys only):
  ETCDCTL_API=3 etcdctl --endpoints $MUX_URL $as_demo get --prefix /projects/demo/
  ETCDCTL_API=3 etcdctl --endpoints $MUX_URL $as_demo get --prefix /projects/other/    # PERMISSION_DENIED
The shared layout in etcd itself:
  ETCDCTL_API=3 etcdctl --endpoints $ETCD_URL ${etcd_tls[*]} get --prefix /registry/

Stop both with: make clean-run
EOF
else
    if [[ $BACKEND == sql ]]; then
        store="PostgreSQL on 127.0.0.1:$PG_PORT   (pid $(<"$RUN_DIR/postgres.pid"), log $RUN_DIR/postgres.log)
  see the tables: psql -h 127.0.0.1 -p $PG_PORT -U etcdmux -d postgres -c 'SELECT * FROM etcdmux_head'"
    else
        store="upstream: etcd on $ETCD_URL   (pid $etcd_pid, log $RUN_DIR/etcd.log)
See the shared layout in etcd itself:
  ETCDCTL_API=3 etcdctl --endpoints $ETCD_URL get --prefix /registry/"
    fi
    cat <<EOF

etcdmux is running on $MUX_URL   (pid $mux_pid, log $RUN_DIR/etcdmux.log)
  metrics:  http://$MUX_HOST:$METRICS_PORT/metrics   readiness: http://$MUX_HOST:$METRICS_PORT/readyz
  $store

Try it (tenant "demo" via /projects/demo/...):
  ETCDCTL_API=3 etcdctl --endpoints $MUX_URL put /projects/demo/pods/default/web hello
  ETCDCTL_API=3 etcdctl --endpoints $MUX_URL get --prefix /projects/demo/
  ETCDCTL_API=3 etcdctl --endpoints $MUX_HOST:$MUX_PORT endpoint status -w table   # (etcdctl 3.4: host:port, no http://)
TLS everywhere (etcd with client certificates, mTLS to etcdmux): make run-tls

Stop both with: make clean-run
EOF
fi
