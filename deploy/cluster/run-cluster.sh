#!/usr/bin/env bash
# `make run-cluster`: ozeki-sim, three tollgate nodes on one PostgreSQL
# ledger (database tollgate_cluster on the local server, created when
# missing) and nginx in front of them as the load balancer. Prints where to
# point clients (nginx) and each node's admin port; Ctrl-C stops everything.
#
# Knobs (environment): LISTEN (nginx, default 127.0.0.1:9501), UPSTREAM
# (ozeki-sim, 127.0.0.1:9502), NODES (3), NODE_PORT_BASE (9511: node i
# listens on base+i), ADMIN_PORT_BASE (9611), PG (server URL without a
# database; default postgres://postgres@127.0.0.1:5432, else root@),
# DB (tollgate_cluster), BIN_DIR (target/release).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
BIN_DIR="${BIN_DIR:-$ROOT/target/release}"
LISTEN="${LISTEN:-127.0.0.1:9501}"
UPSTREAM="${UPSTREAM:-127.0.0.1:9502}"
NODES="${NODES:-3}"
NODE_PORT_BASE="${NODE_PORT_BASE:-9511}"
ADMIN_PORT_BASE="${ADMIN_PORT_BASE:-9611}"
DB="${DB:-tollgate_cluster}"
ADMIN_TOKEN="${ADMIN_TOKEN:-change-me-to-a-long-random-token}"
WORK="${WORK:-$ROOT/target/run-cluster}"
SUDO=""
[ "$(id -u)" = 0 ] || SUDO=sudo

log() { printf '%s\n' "$*" >&2; }
die() { log "run-cluster: $*"; exit 1; }

for b in tollgate ozeki-sim; do
    [ -x "$BIN_DIR/$b" ] || die "$BIN_DIR/$b missing: run 'cargo build --release --bins' (or make run-cluster)"
done

# ------------------------------------------------------------- nginx
NGINX="$(command -v nginx || true)"
[ -n "$NGINX" ] || [ ! -x /usr/sbin/nginx ] || NGINX=/usr/sbin/nginx
if [ -z "$NGINX" ]; then
    log "installing nginx"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get install -y -qq nginx >/dev/null 2>&1 ||
        { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq nginx >/dev/null; }
    # The package starts a system nginx on port 80; we run our own.
    $SUDO systemctl stop nginx >/dev/null 2>&1 || $SUDO service nginx stop >/dev/null 2>&1 || true
    NGINX="$(command -v nginx || echo /usr/sbin/nginx)"
fi
[ -x "$NGINX" ] || die "nginx not found"

# --------------------------------------------------------- PostgreSQL
command -v psql >/dev/null || die "psql not found: apt-get install postgresql"
pg_answers() { psql "$1/postgres" -Atqc 'SELECT 1' >/dev/null 2>&1; }
if [ -z "${PG:-}" ]; then
    for user in postgres root; do
        if pg_answers "postgres://$user@127.0.0.1:5432"; then PG="postgres://$user@127.0.0.1:5432"; break; fi
    done
    if [ -z "${PG:-}" ]; then
        log "starting the local PostgreSQL"
        v="$(ls /etc/postgresql 2>/dev/null | sort -n | tail -1)"
        { [ -n "$v" ] && $SUDO pg_ctlcluster "$v" main start; } 2>/dev/null || $SUDO service postgresql start >/dev/null
        for _ in $(seq 1 100); do
            for user in postgres root; do
                if pg_answers "postgres://$user@127.0.0.1:5432"; then PG="postgres://$user@127.0.0.1:5432"; break 2; fi
            done
            sleep 0.2
        done
    fi
fi
[ -n "${PG:-}" ] || die "PostgreSQL does not answer at 127.0.0.1:5432 as postgres or root (trust auth); set PG"
if [ "$(psql "$PG/postgres" -Atqc "SELECT 1 FROM pg_database WHERE datname = '$DB'")" != 1 ]; then
    log "creating database $DB"
    psql "$PG/postgres" -qc "CREATE DATABASE $DB" >/dev/null
fi
STORE_URL="$PG/$DB"

# ---------------------------------------------------------- processes
PIDS=()
cleanup() {
    trap - EXIT INT TERM
    for p in "${PIDS[@]:-}"; do
        if [ -n "$p" ]; then kill "$p" 2>/dev/null || true; fi
    done
    wait 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM

wait_port() { # host:port [seconds]
    local deadline=$((SECONDS + ${2:-30}))
    until (exec 3<>"/dev/tcp/${1%:*}/${1#*:}") 2>/dev/null; do
        [ $SECONDS -lt $deadline ] || die "nothing listens on $1 (logs in $WORK)"
        sleep 0.05
    done
}

mkdir -p "$WORK"
"$BIN_DIR/ozeki-sim" --listen "$UPSTREAM" --no-record --user johnjr:sub1pass:10 \
    >"$WORK/ozeki-sim.log" 2>&1 &
PIDS+=($!)
wait_port "$UPSTREAM"

# A node under a supervisor loop, as systemd's Restart=always would: a node
# cut off from PostgreSQL longer than its lease exits ("cluster lease
# lost") and rejoins when started again.
supervise() { # dir
    local dir="$1" child="" status
    trap 'if [ -n "$child" ]; then kill "$child" 2>/dev/null; wait "$child" 2>/dev/null; fi; exit 0' TERM INT
    while :; do
        RUST_LOG="${RUST_LOG:-info}" "$BIN_DIR/tollgate" run -c "$dir/tollgate.yaml" >>"$dir/tollgate.log" 2>&1 &
        child=$!
        status=0
        wait "$child" || status=$?
        child=""
        echo "run-cluster: $(date -u +%FT%TZ) node exited (status $status); restarting in 1 s" >>"$dir/tollgate.log"
        sleep 1
    done
}

SERVERS=""
ADMINS=()
for i in $(seq 0 $((NODES - 1))); do
    id="node-$(printf "\\$(printf '%03o' $((97 + i)))")"
    dir="$WORK/$id"
    mkdir -p "$dir"
    cp "$ROOT/conf/accounts.yaml" "$ROOT/conf/tariffs.yaml" "$dir/"
    listen="127.0.0.1:$((NODE_PORT_BASE + i))"
    admin="127.0.0.1:$((ADMIN_PORT_BASE + i))"
    sed -e "s|@LISTEN@|$listen|" -e "s|@ADMIN@|$admin|" -e "s|@UPSTREAM@|$UPSTREAM|" \
        -e "s|@STORE_URL@|$STORE_URL|" -e "s|@NODE_ID@|$id|" -e "s|@ADMIN_TOKEN@|$ADMIN_TOKEN|" \
        "$HERE/node.yaml.tmpl" >"$dir/tollgate.yaml"
    supervise "$dir" &
    PIDS+=($!)
    # The first node creates the seeded accounts; the others find them.
    wait_port "$listen" 60
    wait_port "$admin" 60
    SERVERS+="        server $listen max_fails=1 fail_timeout=2s;"$'\n'
    ADMINS+=("$id: http://$admin (metrics, admin API; log $dir/tollgate.log)")
done

mkdir -p "$WORK/nginx"
user=""
[ "$(id -u)" = 0 ] && user="user root;"
SERVERS="$SERVERS" awk '$0 == "@SERVERS@" { printf "%s", ENVIRON["SERVERS"]; next } { print }' \
    "$HERE/nginx.conf.tmpl" |
    sed -e "s|@DIR@|$WORK/nginx|g" -e "s|@LISTEN@|$LISTEN|" -e "s|@USER@|$user|" >"$WORK/nginx/nginx.conf"
"$NGINX" -p "$WORK/nginx" -c "$WORK/nginx/nginx.conf" -e "$WORK/nginx/error.log" 2>"$WORK/nginx/stderr" &
PIDS+=($!)
wait_port "$LISTEN"

echo
echo "tollgate cluster: point your Ozeki clients at http://$LISTEN/api (nginx in front of $NODES nodes;"
echo "                  upstream ozeki-sim on $UPSTREAM; ledger $STORE_URL)"
for a in "${ADMINS[@]}"; do echo "                  $a"; done
echo "                  try: curl 'http://$LISTEN/api?action=getcredits&username=john&password=secret1'"
echo "                  status: $BIN_DIR/tollgate cluster status -c $WORK/node-a/tollgate.yaml"
echo "                  Ctrl-C stops everything"
echo
wait
