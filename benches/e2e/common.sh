# shellcheck shell=bash
# Variables set here are read by the sourcing scripts:
# shellcheck disable=SC2034
# What benches/e2e/run.sh (throughput) and benches/e2e/latency.sh
# (open-loop latency) share: the installs, the process bookkeeping, ports,
# and how ozeki-sim, nginx and tollgate are started for a scenario, so both
# benchmarks measure the very same set-ups. Sourced, never run.
#
# The sourcing script sets BENCH (its name, for messages) and may set the
# knobs below before sourcing; everything it starts goes into PIDS and is
# killed by the EXIT trap installed by bench_init.

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
BIN_DIR="${BIN_DIR:-$ROOT/target/release}"
# One worker thread: on the 2-core reference VM, where the load generator
# and ozeki-sim take a core's worth between them, threads: 1 beat threads: 2
# in every tollgate scenario (less cross-thread waking; see results.md).
TOLLGATE_THREADS="${TOLLGATE_THREADS:-1}"
SIM_THREADS="${SIM_THREADS:-2}"
BATCH_AGE_MS="${BATCH_AGE_MS:-2}"   # store.batch_age_max_ms (the default)
QUIET_WAIT="${QUIET_WAIT:-0}"
SUDO=""
[ "$(id -u)" = 0 ] || SUDO=sudo

log() { printf '%s\n' "$*" >&2; }
die() { log "$BENCH: $*"; exit 1; }

# apt_install PKG... : Debian packages, installed when a command is missing.
apt_install() {
    log "installing $*"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get install -y -qq "$@" >/dev/null 2>&1 ||
        { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq "$@" >/dev/null; }
}

# wrk and Debian's nginx, and the two binaries under test.
bench_install() {
    local need_pkgs=()
    command -v wrk >/dev/null || need_pkgs+=(wrk)
    NGINX="$(command -v nginx || true)"
    [ -n "$NGINX" ] || [ -x /usr/sbin/nginx ] || need_pkgs+=(nginx)
    if [ ${#need_pkgs[@]} -gt 0 ]; then
        apt_install "${need_pkgs[@]}"
        # The package starts a system nginx on port 80; we run our own.
        $SUDO systemctl stop nginx >/dev/null 2>&1 || $SUDO service nginx stop >/dev/null 2>&1 || true
    fi
    NGINX="$(command -v nginx || echo /usr/sbin/nginx)"
    [ -x "$NGINX" ] || die "nginx not found after install"
    local b
    for b in tollgate ozeki-sim; do
        [ -x "$BIN_DIR/$b" ] || die "$BIN_DIR/$b missing: run 'cargo build --release --bins' (or make bench-e2e)"
    done
}

# ------------------------------------------------------------- quiet check
loadavg() { cut -d' ' -f1 /proc/loadavg; }
# Waits up to QUIET_WAIT seconds for a load average below 0.5, then sets
# LOAD_AT_START (the 1-minute load average) and warns if it is not quiet.
quiet_check() {
    local waited=0 others
    while awk -v l="$(loadavg)" 'BEGIN{exit !(l >= 0.5)}' && [ "$waited" -lt "$QUIET_WAIT" ]; do
        sleep 5; waited=$((waited + 5))
    done
    LOAD_AT_START="$(loadavg)"
    # What else ran at the start, as top saw it over half a second.
    BUSY_AT_START="$(top -bn2 -d0.5 2>/dev/null | awk '/^ *PID/ { n++; next }
        n == 2 && $9 + 0 >= 10 { printf "%s%s %s %%", sep, $12, $9; sep = ", " }' | head -c 300 || true)"
    others="$(pgrep -c -x rustc || true)"
    RUSTC_AT_START="${others:-0}"
    if awk -v l="$LOAD_AT_START" 'BEGIN{exit !(l >= 0.5)}' || [ "${others:-0}" != 0 ]; then
        log "$BENCH: WARNING: machine not quiet (load $LOAD_AT_START, $others rustc running); ratios are still side by side"
    fi
}

# ------------------------------------------------------ processes and ports
PIDS=()
cleanup() {
    for p in "${PIDS[@]:-}"; do
        if [ -n "$p" ]; then kill "$p" 2>/dev/null || true; fi
    done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
bench_init() { # WORK, the scratch directory, and the trap that ends it all
    WORK="$(mktemp -d "${TMPDIR:-/tmp}/tollgate-$BENCH.XXXXXX")"
    trap cleanup EXIT INT TERM
}

# A loopback port nothing listens on: the kernel's pick (bound, then freed),
# or, without python3, a random high one checked free.
free_port() {
    local p
    p="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])' 2>/dev/null)" && {
        echo "$p"
        return
    }
    while :; do
        p=$((20000 + RANDOM % 20000))
        (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null || { echo "$p"; return; }
    done
}

wait_port() { # host:port [seconds]
    local deadline=$((SECONDS + ${2:-30}))
    until (exec 3<>"/dev/tcp/${1%:*}/${1#*:}") 2>/dev/null; do
        [ $SECONDS -lt $deadline ] || die "nothing listens on $1"
        sleep 0.05
    done
}

stop_pid() {
    kill "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
}

# utime+stime of a pid and its direct children, in clock ticks.
cpu_ticks() {
    local total=0 p
    for p in "$@" $(for q in "$@"; do pgrep -P "$q" 2>/dev/null || true; done); do
        [ -r "/proc/$p/stat" ] || continue
        # Fields after the ")" of the command name: utime is 14, stime 15.
        total=$((total + $(sed 's/.*) //' "/proc/$p/stat" | awk '{print $12 + $13}')))
    done
    echo "$total"
}
TICKS="$(getconf CLK_TCK)"

# ---------------------------------------------------------------- upstream
SEND_PATH="/api?action=sendmessage&username=bench&password=benchpw&recipient=RCPT&messagetype=SMS:TEXT&messagedata=Hello+from+the+tollgate+benchmark"
CREDITS_PATH="/api?action=getcredits&username=bench&password=benchpw"

start_sim() { # sets SIM (host:port) and SIM_PID; SIM_EXTRA_USERS: more --user NAME:PW:CREDITS
    local port
    port="$(free_port)"
    SIM="127.0.0.1:$port"
    "$BIN_DIR/ozeki-sim" --listen "$SIM" --no-record --threads "$SIM_THREADS" \
        --user bench:benchpw:1000000 ${SIM_EXTRA_USERS:-} >"$WORK/sim.out" 2>"$WORK/sim.err" &
    SIM_PID=$!
    PIDS+=("$SIM_PID")
    wait_port "$SIM"
}

# ------------------------------------------------------------- the proxies
# Each sets TARGET (host:port) and TARGET_PIDS (the processes whose CPU is
# the proxy's).
NGINX_PID=""
NGINX_DIR=""
start_nginx() {
    local dir="$WORK/nginx" port
    port="$(free_port)"
    mkdir -p "$dir"
    sed -e "s|@DIR@|$dir|g" -e "s|@UPSTREAM@|$SIM|g" -e "s|@LISTEN@|127.0.0.1:$port|g" \
        "$HERE/nginx.conf.tmpl" >"$dir/nginx.conf"
    "$NGINX" -p "$dir" -c "$dir/nginx.conf" -e "$dir/nginx-error.log" 2>"$dir/stderr" &
    NGINX_PID=$!
    NGINX_DIR="$dir"
    PIDS+=("$NGINX_PID")
    wait_port "127.0.0.1:$port"
    TARGET="127.0.0.1:$port"
    TARGET_PIDS=("$NGINX_PID")
}

TG_PID=""
TG_ADMIN=""
TG_RUNS=0
start_tollgate() { # mode durability [nostore | dlr-accept | dlr-delivery]
    local dir port admin store_yaml dlr_port
    TG_RUNS=$((TG_RUNS + 1))
    dir="$WORK/tollgate-$TG_RUNS-$1-$2"
    port="$(free_port)"
    admin="$(free_port)"
    mkdir -p "$dir/conf" "$dir/var"
    store_yaml="store: { path: ../var/tollgate.db, batch_age_max_ms: ${TG_BATCH_AGE_MS:-$BATCH_AGE_MS} }"
    [ "${3:-}" = nostore ] && store_yaml="# no store: the ledger lives in memory only"
    cp "$HERE/tariffs.yaml" "$dir/conf/"
    sed -e "s|@MODE@|$1|" -e "s|@DURABILITY@|$2|" -e "s|@THREADS@|${TG_THREADS:-$TOLLGATE_THREADS}|" \
        -e "s|@LISTEN@|127.0.0.1:$port|" -e "s|@ADMIN@|127.0.0.1:$admin|" \
        -e "s|@UPSTREAM@|$SIM|" -e "s|@STORE_YAML@|$store_yaml|" \
        "$HERE/tollgate.yaml.tmpl" >"$dir/conf/tollgate.yaml"
    case "${3:-}" in
        dlr-accept | dlr-delivery)
            # Delivery reports on every send (tollgate adds its own
            # reporturl); ozeki-sim, without a rule, reports every accepted
            # message "delivered" at once, on a fresh connection.
            dlr_port="$(free_port)"
            printf 'dlr: { enabled: true, listen: 127.0.0.1:%s, request: always, charge_on: { default: %s } }\n' \
                "$dlr_port" "${3#dlr-}" >>"$dir/conf/tollgate.yaml"
            ;;
    esac
    [ -z "${TG_EXTRA_YAML:-}" ] || printf '%s\n' "$TG_EXTRA_YAML" >>"$dir/conf/tollgate.yaml"
    echo benchpw | RUST_LOG=warn "${TG_BIN:-$BIN_DIR}/tollgate" accounts -c "$dir/conf/tollgate.yaml" \
        add bench --anytime 1000000000000 >/dev/null
    RUST_LOG="${TOLLGATE_RUST_LOG:-warn}" "${TG_BIN:-$BIN_DIR}/tollgate" run -c "$dir/conf/tollgate.yaml" >"$dir/stdout" 2>"$dir/stderr" &
    TG_PID=$!
    PIDS+=("$TG_PID")
    wait_port "127.0.0.1:$port"
    wait_port "127.0.0.1:$admin"
    TARGET="127.0.0.1:$port"
    TARGET_PIDS=("$TG_PID")
    TG_ADMIN="127.0.0.1:$admin"
    TG_DIR="$dir"
}

# Variants of a tollgate scenario, for knobs measured side by side:
# NAME+V1+V2..., e.g. async+t2 or passthrough+ws0+lt2 (EXTRA="async+t2"):
#   tN     threads: N
#   ws0    pingora.work_stealing: false
#   ltN    pingora.listener_tasks_per_fd: N
#   poolN  pingora.upstream_keepalive_pool_size: N
#   ageN   store.batch_age_max_ms: N
#   old    the tollgate binary in OLD_BIN_DIR (a before/after in one run)
variant_env() { # NAME → sets TG_THREADS, TG_BATCH_AGE_MS, TG_EXTRA_YAML
    local v pingora=""
    TG_THREADS="" TG_BATCH_AGE_MS="" TG_EXTRA_YAML="" TG_BIN=""
    [[ "$1" == *+* ]] || return 0
    local IFS=+
    for v in ${1#*+}; do
        case "$v" in
            t[0-9]*) TG_THREADS="${v#t}" ;;
            ws0) pingora+="${pingora:+, }work_stealing: false" ;;
            lt[0-9]*) pingora+="${pingora:+, }listener_tasks_per_fd: ${v#lt}" ;;
            pool[0-9]*) pingora+="${pingora:+, }upstream_keepalive_pool_size: ${v#pool}" ;;
            age[0-9]*) TG_BATCH_AGE_MS="${v#age}" ;;
            old) TG_BIN="${OLD_BIN_DIR:?OLD_BIN_DIR: the directory of the old tollgate binary}" ;;
            *) die "unknown variant $v in $1" ;;
        esac
    done
    [ -z "$pingora" ] || TG_EXTRA_YAML="pingora: { $pingora }"
}

# start_scenario NAME: the target of a scenario, up and listening; sets
# TARGET, TARGET_PIDS and SCENARIO_PATH. stop_scenario NAME ends it.
start_scenario() {
    SCENARIO_PATH="$SEND_PATH"
    TARGET_PIDS=()
    variant_env "$1"
    case "${1%%+*}" in
        direct) TARGET="$SIM" ;;
        nginx) start_nginx ;;
        passthrough) start_tollgate passthrough async ;;
        async) start_tollgate enforce async ;;
        sync) start_tollgate enforce sync ;;
        nostore) start_tollgate enforce async nostore ;;
        getcredits) start_tollgate enforce async; SCENARIO_PATH="$CREDITS_PATH" ;;
        dlr) start_tollgate enforce async dlr-accept ;;
        dlrhold) start_tollgate enforce async dlr-delivery ;;
        *) die "unknown scenario $1" ;;
    esac
}
is_tollgate() { [[ "${1%%+*}" =~ ^(passthrough|async|sync|nostore|getcredits|dlr|dlrhold)$ ]]; }
stop_scenario() {
    case "${1%%+*}" in
        nginx) stop_pid "$NGINX_PID" ;;
        direct) ;;
        *) stop_pid "$TG_PID" ;;
    esac
}

# The tollgate scenario did what it claims: count answers by outcome.
outcomes() {
    curl -s "http://$TG_ADMIN/metrics" |
        awk '/^tollgate_requests_total\{/ && $NF > 0 {
            match($0, /outcome="[^"]*"/); o = substr($0, RSTART+9, RLENGTH-10)
            match($0, /action="[^"]*"/); a = substr($0, RSTART+8, RLENGTH-9)
            printf "%s%s:%s=%d", sep, a, o, $NF; sep=" " }
            /^tollgate_dlr_reports_total\{/ && $NF > 0 {
            match($0, /outcome="[^"]*"/); o = substr($0, RSTART+9, RLENGTH-10)
            match($0, /result="[^"]*"/); r = substr($0, RSTART+8, RLENGTH-9)
            printf "%sreports:%s:%s=%d", sep, o, r, $NF; sep=" " }'
}

median() { # values... → the median ("–" stays "–")
    printf '%s\n' "$@" | { grep -v '^–$' || true; } | sort -g | awk '{v[NR]=$1} END{
        if (NR == 0) { print "–"; exit }
        if (NR % 2) print v[(NR+1)/2]; else print (v[NR/2] + v[NR/2+1]) / 2 }'
}

label() {
    if [[ "$1" == *+* ]]; then
        echo "$(label "${1%%+*}") [+${1#*+}]"
        return
    fi
    case "$1" in
        direct) echo "1 direct to ozeki-sim" ;;
        nginx) echo "2 nginx proxy_pass (1 worker, keepalive)" ;;
        passthrough) echo "3 tollgate mode: passthrough" ;;
        async) echo "4a tollgate sendmessage, durability: async" ;;
        sync) echo "4b tollgate sendmessage, durability: sync" ;;
        getcredits) echo "5 tollgate getcredits (local)" ;;
        nostore) echo "(extra) tollgate sendmessage, no store" ;;
        dlr) echo "6a tollgate sendmessage + delivery report, charge_on: accept" ;;
        dlrhold) echo "6b tollgate sendmessage + delivery report, charge_on: delivery" ;;
    esac
}

machine_line() { # one line: CPUs and model
    echo "$(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs))"
}
revision() { # short commit, "+changes" when the tree is dirty
    local rev dirty
    rev="$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
    dirty=""
    if git -C "$ROOT" status --porcelain 2>/dev/null | grep -q .; then dirty="+changes"; fi
    echo "$rev$dirty"
}
