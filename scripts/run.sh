#!/usr/bin/env bash
# `make run`: a local etcd on 127.0.0.1:2379 and etcdmux (config/milo.toml) on
# 127.0.0.1:23790, both left running in the background. State, logs and pid files
# live in ./.run/; `make clean-run` stops both and removes it.
#
# A still-running etcd from a previous `make run` is reused (its data is kept);
# a still-running etcdmux is restarted so that a fresh build is picked up.
set -euo pipefail
cd "$(dirname "$0")/.."

RUN_DIR=.run
ETCD_URL=http://127.0.0.1:2379
MUX_HOST=127.0.0.1
MUX_PORT=23790
METRICS_PORT=23791
CONFIG=config/milo.toml
BIN="${CARGO_TARGET_DIR:-target}/release/etcdmux"

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

# --- etcd -------------------------------------------------------------------------
etcd_health() { ETCDCTL_API=3 etcdctl --endpoints "$ETCD_URL" --dial-timeout=1s --command-timeout=2s endpoint health >/dev/null 2>&1; }

etcd_pid=$(live_pid etcd)
if [[ -n $etcd_pid ]]; then
    echo "run: reusing etcd from a previous \`make run\` (pid $etcd_pid)"
else
    for port in 2379 2380; do
        if port_open 127.0.0.1 "$port"; then
            die "127.0.0.1:$port is already in use by another process (not started by \`make run\`).
    A system etcd? Stop it with: sudo systemctl disable --now etcd
    Find the owner with:         ss -ltnp 'sport = :$port'"
        fi
    done
    echo "run: starting etcd on $ETCD_URL (data: $RUN_DIR/etcd-data, log: $RUN_DIR/etcd.log)"
    spawn "$RUN_DIR/etcd.log" "$RUN_DIR/etcd.pid" etcd \
        --name etcdmux-dev \
        --data-dir "$RUN_DIR/etcd-data" \
        --listen-client-urls "$ETCD_URL" \
        --advertise-client-urls "$ETCD_URL" \
        --listen-peer-urls http://127.0.0.1:2380 \
        --initial-advertise-peer-urls http://127.0.0.1:2380 \
        --initial-cluster etcdmux-dev=http://127.0.0.1:2380 \
        --logger zap
    etcd_pid=$(<"$RUN_DIR/etcd.pid")
fi

healthy=false
for _ in $(seq 1 60); do
    if etcd_health; then healthy=true; break; fi
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

echo "run: starting etcdmux ($CONFIG, log: $RUN_DIR/etcdmux.log)"
spawn "$RUN_DIR/etcdmux.log" "$RUN_DIR/etcdmux.pid" "$BIN" --config "$CONFIG"
mux_pid=$(<"$RUN_DIR/etcdmux.pid")

up=false
for _ in $(seq 1 100); do
    if port_open "$MUX_HOST" "$MUX_PORT"; then up=true; break; fi
    kill -0 "$mux_pid" 2>/dev/null || { tail_log "$RUN_DIR/etcdmux.log"; die "etcdmux exited"; }
    sleep 0.2
done
$up || { tail_log "$RUN_DIR/etcdmux.log"; die "etcdmux does not accept connections on $MUX_HOST:$MUX_PORT"; }

cat <<EOF

etcdmux is running on http://$MUX_HOST:$MUX_PORT   (pid $mux_pid, log $RUN_DIR/etcdmux.log)
  metrics:  http://$MUX_HOST:$METRICS_PORT/metrics
  upstream: etcd on $ETCD_URL   (pid $etcd_pid, log $RUN_DIR/etcd.log)

Try it (tenant "demo" via /projects/demo/...):
  ETCDCTL_API=3 etcdctl --endpoints http://$MUX_HOST:$MUX_PORT put /projects/demo/pods/default/web hello
  ETCDCTL_API=3 etcdctl --endpoints http://$MUX_HOST:$MUX_PORT get --prefix /projects/demo/
See the shared layout in etcd itself:
  ETCDCTL_API=3 etcdctl --endpoints $ETCD_URL get --prefix /registry/

Stop both with: make clean-run
EOF
