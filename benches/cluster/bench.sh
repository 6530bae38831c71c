#!/usr/bin/env bash
# Cluster benchmark (issue 14): several tollgate nodes on one PostgreSQL
# ledger, side by side in one run against one ozeki-sim.
#
#   make bench-cluster        (builds the release binaries first)
#   benches/cluster/bench.sh  (uses target/release/{tollgate,ozeki-sim})
#
# (a) one node, `sendmessage` throughput (wrk), store × durability:
#     sqlite-async, sqlite-sync (the SQLite store), pg-async, pg-sync (one
#     owner on PostgreSQL, no `cluster:`) and node-sync (one cluster node:
#     grants, lease, `durability: sync`, which a node requires); beside
#     them sqlite-async-ageN and pg-async-ageN (ASYNC_AGES): async with
#     store.batch_age_max_ms N, fewer and larger commits. With each, the
#     CPU per settled send of tollgate, ozeki-sim and PostgreSQL.
# (b) PostgreSQL statements per 1 000 sends, from the deltas of
#     tollgate_store_pg_statements_total and the grant protocol's round
#     trips (tollgate_cluster_pg_seconds_count) over node-sync's run, for a
#     busy account served from grants, and over node-direct's: the same
#     load on an account below `direct_below_milli` (every send takes its
#     cost straight in PostgreSQL).
# (c) one, two and three nodes behind nginx (deploy/cluster/nginx.conf.tmpl):
#     throughput (wrk, closed loop), then p50/p99 (oha open loop, the same
#     offered rate for all three: RATE_PCT % of nginx-1's peak).
# (d) stranded credit: an account with credit for exactly STRAND_N parts,
#     three nodes behind nginx, clients sending until the cluster balance
#     is 0 or STRAND_LIMIT; how many of the N succeeded and when the last
#     did, with the default grant sizing and with small grants.
#
# Scenarios run ROUNDS times interleaved; medians are shown. Every
# scenario starts on a fresh database (tollgate_bench_<n>, dropped after).
# The markdown table goes to stdout (and target/bench-cluster/).
#
# Knobs (environment): ROUNDS (3), DURATION (10s), WARMUP (2s),
# CONNECTIONS (64), WRK_THREADS (1), TOLLGATE_THREADS (1), SIM_THREADS (2),
# RATE_PCT (50), ASYNC_AGES (10: (a) also runs sqlite-async-age10 and
# pg-async-age10, with store.batch_age_max_ms 10; "" for none), STRAND_N (300), STRAND_LIMIT (15), PG (server URL without
# a database; default: postgres or root at 127.0.0.1:5432), OHA (an oha
# binary; else installed into target/tools as benches/e2e/latency.sh does),
# ONLY (a subset of scenario names), BIN_DIR, QUIET_WAIT.
set -euo pipefail

BENCH=bench-cluster
DURATION="${DURATION:-10s}"
WARMUP="${WARMUP:-2s}"
CONNECTIONS="${CONNECTIONS:-64}"
WRK_THREADS="${WRK_THREADS:-1}"
ROUNDS="${ROUNDS:-3}"
RATE_PCT="${RATE_PCT:-50}"
STRAND_N="${STRAND_N:-300}"
STRAND_LIMIT="${STRAND_LIMIT:-15}"
ONLY="${ONLY:-}"
ASYNC_AGES="${ASYNC_AGES-10}"
OHA_VERSION="${OHA_VERSION:-1.16.0}"
# shellcheck source=benches/e2e/common.sh
. "$(cd "$(dirname "${BASH_SOURCE[0]}")/../e2e" && pwd)/common.sh"
CLUSTER_DIR="$ROOT/deploy/cluster"
E2E="$ROOT/benches/e2e"

want() { [ -z "$ONLY" ] || [[ " $ONLY " == *" $1 "* ]]; }
bench_install
OHA="${OHA:-$ROOT/target/tools/bin/oha}"
# oha only for the open-loop phase of (c).
if { want nginx-1 || want nginx-2 || want nginx-3; } && [ ! -x "$OHA" ]; then
    if ! dpkg -s libssl-dev >/dev/null 2>&1 || ! command -v pkg-config >/dev/null; then
        apt_install libssl-dev pkg-config
    fi
    log "installing oha $OHA_VERSION into target/tools (cargo install, several minutes once)"
    cargo install oha --version "$OHA_VERSION" --locked --no-default-features --features native-tls \
        --root "$ROOT/target/tools" >&2 || die "cargo install oha failed"
fi
command -v jq >/dev/null || apt_install jq
command -v psql >/dev/null || die "psql not found (apt-get install postgresql-client)"

# ---------------------------------------------------------- PostgreSQL
pg_answers() { psql "$1/postgres" -Atqc 'SELECT 1' >/dev/null 2>&1; }
if [ -z "${PG:-}" ]; then
    for user in postgres root; do
        if pg_answers "postgres://$user@127.0.0.1:5432"; then PG="postgres://$user@127.0.0.1:5432"; break; fi
    done
fi
[ -n "${PG:-}" ] || die "PostgreSQL does not answer at 127.0.0.1:5432 as postgres or root; start it or set PG"

quiet_check
bench_init
# The gateway knows every account that sends (it checks them too).
SIM_EXTRA_USERS="--user small:smallpw:1000000000 --user strand:strandpw:1000000000"
start_sim

DB_N=0
DBS=()
new_db() { # → DB_URL, a fresh database
    DB_N=$((DB_N + 1))
    local name="tollgate_bench_$$_$DB_N"
    psql "$PG/postgres" -qc "DROP DATABASE IF EXISTS $name" >/dev/null
    psql "$PG/postgres" -qc "CREATE DATABASE $name" >/dev/null
    DBS+=("$name")
    DB_URL="$PG/$name"
    DB_NAME="$name"
}
drop_db() { psql "$PG/postgres" -qc "DROP DATABASE IF EXISTS $1 WITH (FORCE)" >/dev/null 2>&1 || true; }
bench_cleanup() {
    cleanup
    for d in "${DBS[@]:-}"; do [ -n "$d" ] && drop_db "$d"; done
}
trap bench_cleanup EXIT INT TERM

# The seed accounts every node reads: bench (a billion credits, served
# from grants), small (100 000 credits; node-direct puts it below
# direct_below_milli) and strand (credit for exactly STRAND_N parts).
SEEDS="$WORK/seeds"
mkdir -p "$SEEDS"
cp "$E2E/tariffs.yaml" "$SEEDS/"
printf 'listen: 127.0.0.1:1\nupstream: { address: 127.0.0.1:2 }\ntariffs: tariffs.yaml\naccounts: accounts.yaml\n' >"$SEEDS/tollgate.yaml"
: >"$SEEDS/accounts.yaml"
add_seed() { # name credits password
    echo "$3" | RUST_LOG=warn "$BIN_DIR/tollgate" accounts -c "$SEEDS/tollgate.yaml" add "$1" --anytime "$2" >/dev/null
}
add_seed bench 1000000000 benchpw
add_seed small 100000 smallpw
# requests.lua's recipients (+3620...) cost 2 credits a part (tariffs.yaml):
# credit for exactly STRAND_N parts.
add_seed strand "$((2 * STRAND_N))" strandpw

# bash 5.2 reads `&` in a ${var//pattern/replacement} as the matched text.
shopt -u patsub_replacement 2>/dev/null || true

# What each tariff prices: tariffs.yaml gives every recipient of
# requests.lua (+3620…) one price; STRAND parts below use it too.
SMALL_PATH="${SEND_PATH//username=bench&password=benchpw/username=small&password=smallpw}"
STRAND_PATH="${SEND_PATH//username=bench&password=benchpw/username=strand&password=strandpw}"
STRAND_CREDITS_PATH="/api?action=getcredits&username=strand&password=strandpw"

# start_node KIND NAME [CLUSTER_EXTRA] → NODE_ADDR NODE_ADMIN NODE_PID NODE_DIR
# KIND: sqlite-async | sqlite-sync | pg-async | pg-sync | node (cluster,
# sync) on DB_URL.
start_node() {
    local kind="$1" name="$2" extra="${3:-}" dir port admin store durability cluster="" age="$BATCH_AGE_MS"
    # NAME-ageN: the same with store.batch_age_max_ms N (async's batch size).
    if [[ "$kind" =~ ^(.*)-age([0-9]+)$ ]]; then kind="${BASH_REMATCH[1]}" age="${BASH_REMATCH[2]}"; fi
    dir="$WORK/$name-$RANDOM"
    port="$(free_port)"
    admin="$(free_port)"
    mkdir -p "$dir/conf" "$dir/var"
    cp "$SEEDS/accounts.yaml" "$SEEDS/tariffs.yaml" "$dir/conf/"
    case "$kind" in
        sqlite-*) store="store: { path: ../var/tollgate.db, batch_age_max_ms: $age }"; durability="${kind#sqlite-}" ;;
        pg-*) store="store: { url: '$DB_URL', batch_age_max_ms: $age }"; durability="${kind#pg-}" ;;
        node)
            store="store: { url: '$DB_URL', batch_age_max_ms: $BATCH_AGE_MS, statement_timeout_ms: 2000 }"
            durability=sync
            cluster="cluster: { node_id: $name, lease_ms: 3000, lease_renew_ms: 1000, lease_margin_ms: 1000, grant_ttl_ms: 6000${extra:+, $extra} }"
            ;;
        *) die "unknown node kind $kind" ;;
    esac
    cat >"$dir/conf/tollgate.yaml" <<EOF
listen: 127.0.0.1:$port
threads: $TOLLGATE_THREADS
shutdown_grace_s: 0
upstream: { address: $SIM, read_timeout_ms: 10000 }
admin: { listen: 127.0.0.1:$admin, token: bench-admin-token-0123456789 }
durability: $durability
$store
$cluster
tariffs: tariffs.yaml
accounts: accounts.yaml
EOF
    RUST_LOG="${TOLLGATE_RUST_LOG:-warn}" "$BIN_DIR/tollgate" run -c "$dir/conf/tollgate.yaml" >"$dir/stdout" 2>"$dir/stderr" &
    NODE_PID=$!
    PIDS+=("$NODE_PID")
    local deadline=$((SECONDS + 60))
    until (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && (exec 3<>"/dev/tcp/127.0.0.1/$admin") 2>/dev/null; do
        kill -0 "$NODE_PID" 2>/dev/null || die "$name ($kind) exited at start: $(tail -5 "$dir/stderr")"
        [ $SECONDS -lt $deadline ] || die "$name ($kind) does not listen: $(tail -5 "$dir/stderr")"
        sleep 0.05
    done
    NODE_ADDR="127.0.0.1:$port"
    NODE_ADMIN="127.0.0.1:$admin"
    NODE_DIR="$dir"
}

# nginx in front of NODE_ADDRS → LB_ADDR LB_PID
start_lb() {
    local dir="$WORK/nginx-$RANDOM" port servers="" a user=""
    port="$(free_port)"
    mkdir -p "$dir"
    for a in "${NODE_ADDRS[@]}"; do servers+="        server $a max_fails=1 fail_timeout=2s;"$'\n'; done
    [ "$(id -u)" = 0 ] && user="user root;"
    SERVERS="$servers" awk '$0 == "@SERVERS@" { printf "%s", ENVIRON["SERVERS"]; next } { print }' \
        "$CLUSTER_DIR/nginx.conf.tmpl" |
        sed -e "s|@DIR@|$dir|g" -e "s|@LISTEN@|127.0.0.1:$port|" -e "s|@USER@|$user|" >"$dir/nginx.conf"
    "$NGINX" -p "$dir" -c "$dir/nginx.conf" -e "$dir/error.log" 2>"$dir/stderr" &
    LB_PID=$!
    PIDS+=("$LB_PID")
    wait_port "127.0.0.1:$port"
    LB_ADDR="127.0.0.1:$port"
}

# start_scenario NAME → TARGET, TARGET_PIDS, ADMINS (every node's admin)
NODE_ADDRS=()
ADMINS=()
start_scenario() {
    local name="$1" n i pids=()
    NODE_ADDRS=()
    ADMINS=()
    LB_PID=""
    case "$name" in
        sqlite-async | sqlite-sync | sqlite-async-age*) start_node "$name" tg ;;
        pg-async | pg-sync | pg-async-age*) new_db; start_node "$name" tg ;;
        node-sync) new_db; start_node node node-a ;;
        node-direct) new_db; start_node node node-a "grant_max_milli: 1000000000000, direct_below_milli: 1000000000000" ;;
        nginx-1 | nginx-2 | nginx-3 | strand-default | strand-small)
            new_db
            n="${name#nginx-}"
            [[ "$name" == strand-* ]] && n=3
            for i in $(seq 1 "$n"); do
                case "$name" in
                    strand-small) start_node node "node-$i" "grant_min_milli: 1000, grant_max_milli: 3000, direct_below_milli: 1000, grant_idle_ms: 2000" ;;
                    *) start_node node "node-$i" ;;
                esac
                NODE_ADDRS+=("$NODE_ADDR")
                ADMINS+=("$NODE_ADMIN")
                pids+=("$NODE_PID")
            done
            start_lb
            TARGET="$LB_ADDR"
            TARGET_PIDS=("${pids[@]}" "$LB_PID")
            return
            ;;
        *) die "unknown scenario $name" ;;
    esac
    ADMINS=("$NODE_ADMIN")
    TARGET="$NODE_ADDR"
    TARGET_PIDS=("$NODE_PID")
}
stop_scenario() {
    local p
    for p in "${TARGET_PIDS[@]}"; do stop_pid "$p"; done
    [ -n "${DB_NAME:-}" ] && drop_db "$DB_NAME"
    DB_NAME=""
}

# ----------------------------------------------------------- measuring
to_ms() {
    awk -v v="$1" 'BEGIN{
        if (v ~ /us$/) { sub(/us$/,"",v); printf "%.3f", v/1000 }
        else if (v ~ /ms$/) { sub(/ms$/,"",v); printf "%.3f", v }
        else if (v ~ /m$/) { sub(/m$/,"",v); printf "%.3f", v*60000 }
        else { sub(/s$/,"",v); printf "%.3f", v*1000 } }'
}
# Σ of a metric over every node's /metrics, all label sets;
# `metric_sum NAME 'FILTER'` keeps the lines matching the awk regex FILTER.
metric_sum() {
    local name="$1" filter="${2:-.}" a total=0 v
    for a in "${ADMINS[@]}"; do
        v="$(curl -s "http://$a/metrics" | awk -v n="$name" -v f="$filter" '
            index($0, n) == 1 && (substr($0, length(n)+1, 1) == " " || substr($0, length(n)+1, 1) == "{") && $0 ~ f { s += $NF }
            END { printf "%.0f", s + 0 }')"
        total=$((total + v))
    done
    echo "$total"
}
sends_settled() { metric_sum tollgate_requests_total 'action="sendmessage".*outcome="settled"|outcome="settled".*action="sendmessage"'; }

# CPU time (user + system, in clock ticks) of processes, each with every
# thread; `ticks PID...`. With REAPED=1, also the CPU of their children
# that have exited and been waited for (a PostgreSQL postmaster's
# autovacuum workers and ended backends).
CLK_TCK="$(getconf CLK_TCK)"
ticks() {
    local p total=0 v
    for p in "$@"; do
        # Fields after the command name, which may hold spaces: state is 3,
        # utime 14, stime 15, cutime 16, cstime 17.
        v="$(sed 's/.*) //' "/proc/$p/stat" 2>/dev/null | awk -v r="${REAPED:-0}" '{ print $12 + $13 + (r ? $14 + $15 : 0) }')" || v=0
        total=$((total + ${v:-0}))
    done
    echo "$total"
}
# Every PostgreSQL process: the live ones, and what the postmaster (the
# oldest) has reaped. A process that ends during a run is counted whole
# at its end, and its part before the run was counted at the start.
pg_ticks() {
    local live postmaster
    postmaster="$(pgrep -o -x postgres || true)"
    mapfile -t live < <(pgrep -x postgres || true)
    [ -n "$postmaster" ] || { echo 0; return; }
    echo $(($(ticks "${live[@]}") + $(REAPED=1 ticks "$postmaster") - $(ticks "$postmaster")))
}
# µs of CPU per send from a tick delta.
per_send_us() { awk -v t="$1" -v n="$2" -v hz="$CLK_TCK" 'BEGIN{ if (n > 0) printf "%.1f", t * 1e6 / hz / n; else print "–" }'; }

# run_wrk NAME PATH → RPS P99 ERRS (and the statement deltas: ST_STORE ST_CLUSTER SENDS;
# the CPU per settled send in µs: CPU_TG CPU_SIM CPU_PG)
run_wrk() {
    local name="$1" path="$2" out="$WORK/wrk-$1.txt" s0 s1 c0 c1 n0 n1 tg0 tg1 sim0 sim1 pg0 pg1
    wrk -t"$WRK_THREADS" -c"$CONNECTIONS" -d"$WARMUP" -s "$E2E/requests.lua" \
        "http://$TARGET" -- "$path" >/dev/null 2>&1 || true
    s0="$(metric_sum tollgate_store_pg_statements_total)"
    c0="$(metric_sum tollgate_cluster_pg_seconds_count)"
    n0="$(sends_settled)"
    tg0="$(ticks "${TARGET_PIDS[@]}")" sim0="$(ticks "$SIM_PID")" pg0="$(pg_ticks)"
    wrk -t"$WRK_THREADS" -c"$CONNECTIONS" -d"$DURATION" --latency -s "$E2E/requests.lua" \
        "http://$TARGET" -- "$path" >"$out" 2>&1 || die "wrk failed for $name: $(cat "$out")"
    tg1="$(ticks "${TARGET_PIDS[@]}")" sim1="$(ticks "$SIM_PID")" pg1="$(pg_ticks)"
    s1="$(metric_sum tollgate_store_pg_statements_total)"
    c1="$(metric_sum tollgate_cluster_pg_seconds_count)"
    n1="$(sends_settled)"
    RPS="$(awk '/^Requests\/sec:/{printf "%.0f", $2}' "$out")"
    P99="$(to_ms "$(awk '$1=="99%"{print $2}' "$out")")"
    ERRS="$(awk '/Non-2xx/{n+=$NF} /Socket errors/{gsub(/,/,""); n+=$4+$6+$8+$10} END{print n+0}' "$out")"
    SENDS=$((n1 - n0))
    ST_STORE=$((s1 - s0))
    ST_CLUSTER=$((c1 - c0))
    CPU_TG="$(per_send_us $((tg1 - tg0)) "$SENDS")"
    CPU_SIM="$(per_send_us $((sim1 - sim0)) "$SENDS")"
    CPU_PG="$(per_send_us $((pg1 - pg0)) "$SENDS")"
    log "$(printf '%-15s %7s req/s  p99 %8s ms  errors %s  settled sends %s  pg statements: store %s, grant protocol %s' \
        "$name" "$RPS" "$P99" "$ERRS" "$SENDS" "$ST_STORE" "$ST_CLUSTER")"
    log "$(printf '%-15s CPU per settled send: tollgate %s µs, ozeki-sim %s µs, PostgreSQL %s µs' \
        "$name" "$CPU_TG" "$CPU_SIM" "$CPU_PG")"
}

# oha_p99 NAME RATE → OHA_P50 OHA_P99 OHA_ACH (ms, ms, req/s)
oha_p99() {
    local name="$1" rate="$2" urls="$WORK/urls-$1.txt" json="$WORK/oha-$1.json" k head tail limit
    head="${SEND_PATH%%RCPT*}" tail="${SEND_PATH#*RCPT}"
    : >"$urls"
    for k in $(seq 1 1000); do printf 'http://%s%s%%2B3620%07d%s\n' "$TARGET" "$head" "$k" "$tail" >>"$urls"; done
    limit="$(awk -v d="${DURATION%s}" 'BEGIN{printf "%d", d + 60}')"
    timeout "$limit" "$OHA" --no-tui --output-format json --urls-from-file -z "$WARMUP" -q "$rate" \
        --latency-correction -w -c "$CONNECTIONS" "$urls" >/dev/null 2>&1 || true
    timeout "$limit" "$OHA" --no-tui --output-format json --urls-from-file -z "$DURATION" -q "$rate" \
        --latency-correction -w -c "$CONNECTIONS" "$urls" >"$json" 2>"$json.err" ||
        die "oha failed against $TARGET: $(tail -3 "$json.err")"
    # Latencies in seconds (successful answers only); achieved = answers / duration.
    local p50 p99 n
    read -r p50 p99 n < <(jq -r '[.latencyPercentiles.p50, .latencyPercentiles.p99,
        ([.statusCodeDistribution[]] | add // 0)] | map(. // 0) | @tsv' "$json")
    OHA_P50="$(awk -v v="$p50" 'BEGIN{printf "%.3f", v*1000}')"
    OHA_P99="$(awk -v v="$p99" 'BEGIN{printf "%.3f", v*1000}')"
    OHA_ACH="$(awk -v n="$n" -v d="${DURATION%s}" 'BEGIN{printf "%.0f", n/d}')"
    log "$(printf '%-15s oha %s req/s offered, %s achieved  p50 %s ms  p99 %s ms' "$name" "$rate" "$OHA_ACH" "$OHA_P50" "$OHA_P99")"
}

# strand NAME → ST_OK (parts that succeeded), ST_LAST (s to the last), ST_REF (refusals)
strand_run() {
    local name="$1" out="$WORK/wrk-$1.txt" start bal last=0 t wrk_pid
    start="$(date +%s.%N)"
    wrk -t"$WRK_THREADS" -c32 -d"${STRAND_LIMIT}s" -s "$E2E/requests.lua" \
        "http://$TARGET" -- "$STRAND_PATH" >"$out" 2>&1 &
    wrk_pid=$!
    PIDS+=("$wrk_pid")
    bal="$STRAND_N"
    while kill -0 "$wrk_pid" 2>/dev/null; do
        bal="$(curl -s "http://$TARGET$STRAND_CREDITS_PATH" | sed -n 's:.*<balance>\(.*\)</balance>.*:\1:p')"
        t="$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN{printf "%.2f", b-a}')"
        if [ "${bal:-x}" = 0 ]; then last="$t"; break; fi
        sleep 0.1
    done
    [ "$last" = 0 ] && last="–"  # never within STRAND_LIMIT
    wait "$wrk_pid" 2>/dev/null || true
    ST_OK="$(sends_settled)"
    ST_LAST="$last"
    ST_REF="$(metric_sum tollgate_requests_total 'outcome="insufficient_credit"')"
    log "$(printf '%-15s %s of %s parts sent; balance 0 after %s s; %s insufficient-credit refusals meanwhile' \
        "$name" "$ST_OK" "$STRAND_N" "$ST_LAST" "$ST_REF")"
}

declare -A A_CTG A_CSIM A_CPG A_RPS A_P99 A_ERR A_SPK A_CPK A_OP50 A_OP99 A_OACH A_SOK A_SLAST A_SREF

AGED=()
for a in $ASYNC_AGES; do AGED+=("sqlite-async-age$a" "pg-async-age$a"); done
PHASE1=(sqlite-async sqlite-sync pg-async pg-sync "${AGED[@]}" node-sync node-direct nginx-1 nginx-2 nginx-3)
log "bench-cluster: wrk -t$WRK_THREADS -c$CONNECTIONS -d$DURATION (warm-up $WARMUP), tollgate threads $TOLLGATE_THREADS, $ROUNDS rounds; load $LOAD_AT_START"
for round in $(seq 1 "$ROUNDS"); do
    log "-- round $round of $ROUNDS"
    for s in "${PHASE1[@]}"; do
        want "$s" || continue
        start_scenario "$s"
        path="$SEND_PATH"
        [ "$s" = node-direct ] && path="$SMALL_PATH"
        run_wrk "$s" "$path"
        A_RPS[$s]+=" $RPS"; A_P99[$s]+=" $P99"; A_ERR[$s]+=" $ERRS"
        A_CTG[$s]+=" $CPU_TG"; A_CSIM[$s]+=" $CPU_SIM"; A_CPG[$s]+=" $CPU_PG"
        if [ "$SENDS" -gt 0 ] && [[ "$s" != sqlite-* ]]; then
            A_SPK[$s]+=" $(awk -v a="$ST_STORE" -v n="$SENDS" 'BEGIN{printf "%.1f", a*1000/n}')"
            A_CPK[$s]+=" $(awk -v a="$ST_CLUSTER" -v n="$SENDS" 'BEGIN{printf "%.1f", a*1000/n}')"
        fi
        stop_scenario
    done
    for s in strand-default strand-small; do
        want "$s" || continue
        start_scenario "$s"
        strand_run "$s"
        A_SOK[$s]+=" $ST_OK"; A_SLAST[$s]+=" $ST_LAST"; A_SREF[$s]+=" $ST_REF"
        stop_scenario
    done
done

# Open loop at one rate for 1, 2 and 3 nodes.
med() { median "$@"; }
# shellcheck disable=SC2086
RATE="$(awk -v r="$(med ${A_RPS[nginx-1]:-0})" -v p="$RATE_PCT" 'BEGIN{printf "%d", r*p/100}')"
if [ "${RATE:-0}" -gt 0 ]; then
    log "open loop: $RATE req/s offered ($RATE_PCT % of nginx-1's median peak)"
    for round in $(seq 1 "$ROUNDS"); do
        for s in nginx-1 nginx-2 nginx-3; do
            want "$s" || continue
            start_scenario "$s"
            oha_p99 "$s" "$RATE"
            A_OP50[$s]+=" $OHA_P50"; A_OP99[$s]+=" $OHA_P99"; A_OACH[$s]+=" $OHA_ACH"
            stop_scenario
        done
    done
fi

# ------------------------------------------------------------- report
ratio() {
    if [ -n "${1:-}" ] && [ -n "${2:-}" ] && [ "${2:-0}" != 0 ] && [ "${1}" != "–" ] && [ "${2}" != "–" ]; then
        awk -v a="$1" -v b="$2" 'BEGIN{printf "%.2f", a/b}'
    else
        echo "–"
    fi
}
m() { local v="${1:-}"; if [ -z "${v// /}" ]; then echo "–"; else # shellcheck disable=SC2086
    median $v; fi; }
{
    echo "# tollgate cluster benchmark"
    echo
    echo "$(date -u '+%Y-%m-%d %H:%M UTC'), tollgate $(revision), $(machine_line), load average at start $LOAD_AT_START."
    echo "$(psql "$PG/postgres" -Atqc 'SHOW server_version' 2>/dev/null | sed 's/^/PostgreSQL /'), $(wrk --version 2>&1 | head -1 | cut -d' ' -f1-2), $("$NGINX" -v 2>&1 | cut -d' ' -f3), $([ -x "$OHA" ] && "$OHA" --version | head -1 || echo "no oha")."
    echo
    echo "Command: \`make bench-cluster\` (= \`benches/cluster/bench.sh\`): wrk -t$WRK_THREADS -c$CONNECTIONS -d$DURATION after a $WARMUP warm-up;"
    echo "$ROUNDS rounds interleaved, medians (every round in the last column); tollgate threads $TOLLGATE_THREADS, RUST_LOG=warn;"
    echo "PostgreSQL on the same machine; nothing pinned (wrk, nodes, nginx, ozeki-sim and PostgreSQL share the CPUs)."
    echo
    echo "## (a) one node: SQLite against PostgreSQL"
    echo
    echo "| scenario | req/s | p99 ms | errors | req/s per round |"
    echo "|---|---:|---:|---:|---|"
    for s in sqlite-async sqlite-sync pg-async pg-sync "${AGED[@]}" node-sync; do
        [ -n "${A_RPS[$s]:-}" ] || continue
        echo "| $s | $(m "${A_RPS[$s]}") | $(m "${A_P99[$s]}") | $(m "${A_ERR[$s]}") |${A_RPS[$s]} |"
    done
    echo
    echo "| ratio | throughput |"
    echo "|---|---:|"
    echo "| pg-async / sqlite-async | $(ratio "$(m "${A_RPS[pg-async]:-}")" "$(m "${A_RPS[sqlite-async]:-}")") |"
    for a in $ASYNC_AGES; do
        echo "| pg-async-age$a / sqlite-async-age$a (\`batch_age_max_ms: $a\` on both) | $(ratio "$(m "${A_RPS[pg-async-age$a]:-}")" "$(m "${A_RPS[sqlite-async-age$a]:-}")") |"
    done
    echo "| pg-sync / sqlite-sync | $(ratio "$(m "${A_RPS[pg-sync]:-}")" "$(m "${A_RPS[sqlite-sync]:-}")") |"
    echo "| node-sync / pg-sync (the grant protocol's cost on one node) | $(ratio "$(m "${A_RPS[node-sync]:-}")" "$(m "${A_RPS[pg-sync]:-}")") |"
    echo
    echo "CPU per settled send (µs; /proc/PID/stat user + system over the measured run; PostgreSQL: every postgres"
    echo "process, with the ended ones its postmaster reaped): on this machine's two cores every µs PostgreSQL spends"
    echo "is a µs tollgate and ozeki-sim do not get, so the throughput ratio follows the sum."
    echo
    echo "| scenario | tollgate | ozeki-sim | PostgreSQL | sum | tollgate per round | PostgreSQL per round |"
    echo "|---|---:|---:|---:|---:|---|---|"
    for s in sqlite-async sqlite-sync pg-async pg-sync "${AGED[@]}" node-sync; do
        [ -n "${A_CTG[$s]:-}" ] || continue
        echo "| $s | $(m "${A_CTG[$s]}") | $(m "${A_CSIM[$s]}") | $(m "${A_CPG[$s]}") | $(awk -v a="$(m "${A_CTG[$s]}")" -v b="$(m "${A_CSIM[$s]}")" -v c="$(m "${A_CPG[$s]}")" 'BEGIN{printf "%.1f", a + b + c}') |${A_CTG[$s]} |${A_CPG[$s]} |"
    done
    echo
    echo "## (b) PostgreSQL statements per 1 000 sends"
    echo
    echo "Deltas over the measured run: the store writer's statements (tollgate_store_pg_statements_total) and the grant"
    echo "protocol's round trips (tollgate_cluster_pg_seconds_count: take, give_back, credit, balance, transfer), per 1 000 settled sends."
    echo
    echo "| scenario | store statements / 1000 sends | grant protocol / 1000 sends | req/s |"
    echo "|---|---:|---:|---:|"
    for s in pg-async pg-sync "${AGED[@]}" node-sync node-direct; do
        [[ "$s" == sqlite-* ]] && continue
        [ -n "${A_RPS[$s]:-}" ] || continue
        echo "| $s | $(m "${A_SPK[$s]:-}") | $(m "${A_CPK[$s]:-}") | $(m "${A_RPS[$s]}") |"
    done
    echo
    echo "node-sync: account \`bench\` (a billion credits) served from grants; node-direct: account \`small\` below"
    echo "\`direct_below_milli\` (set above its balance), so each send takes its cost straight in PostgreSQL."
    echo
    echo "## (c) one, two and three nodes behind nginx"
    echo
    echo "| nodes | wrk req/s | wrk p99 ms | oha offered req/s | oha achieved | oha p50 ms | oha p99 ms | req/s per round | oha p99 per round |"
    echo "|---|---:|---:|---:|---:|---:|---:|---|---|"
    for s in nginx-1 nginx-2 nginx-3; do
        [ -n "${A_RPS[$s]:-}" ] || continue
        echo "| ${s#nginx-} | $(m "${A_RPS[$s]}") | $(m "${A_P99[$s]}") | ${RATE:-–} | $(m "${A_OACH[$s]:-}") | $(m "${A_OP50[$s]:-}") | $(m "${A_OP99[$s]:-}") |${A_RPS[$s]} |${A_OP99[$s]:-} |"
    done
    echo
    echo "| ratio | throughput |"
    echo "|---|---:|"
    echo "| 2 nodes / 1 node | $(ratio "$(m "${A_RPS[nginx-2]:-}")" "$(m "${A_RPS[nginx-1]:-}")") |"
    echo "| 3 nodes / 1 node | $(ratio "$(m "${A_RPS[nginx-3]:-}")" "$(m "${A_RPS[nginx-1]:-}")") |"
    echo
    echo "On one 2-core machine the nodes share the CPUs with nginx, wrk, ozeki-sim and PostgreSQL: more nodes add"
    echo "hops and processes, not cores, so these ratios show the cost of the cluster, not its scaling."
    echo
    echo "## (d) stranded credit"
    echo
    echo "Account \`strand\` with credit for exactly $STRAND_N parts ($((2 * STRAND_N)) credits at 2 a part), three nodes behind nginx, 32 wrk connections sending"
    echo "for up to $STRAND_LIMIT s (refusals are retried at once); when the cluster balance (getcredits) reached 0."
    echo
    echo "| grant sizing | parts sent of $STRAND_N | balance 0 after (s) | insufficient-credit refusals | sent per round | seconds per round |"
    echo "|---|---:|---:|---:|---|---|"
    for s in strand-default strand-small; do
        [ -n "${A_SOK[$s]:-}" ] || continue
        case "$s" in
            strand-default) what="default (grant_target_s 5, min 1 credit, max 1000)" ;;
            strand-small) what="small (grant_max_milli 3000)" ;;
        esac
        echo "| $what | $(m "${A_SOK[$s]}") | $(m "${A_SLAST[$s]}") | $(m "${A_SREF[$s]}") |${A_SOK[$s]} |${A_SLAST[$s]} |"
    done
} >"$WORK/results.md"

cat "$WORK/results.md"
mkdir -p "$ROOT/target/bench-cluster"
cp "$WORK/results.md" "$ROOT/target/bench-cluster/results-$(date -u +%Y%m%dT%H%M%SZ).md"
log "written to target/bench-cluster/"
