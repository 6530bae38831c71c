#!/usr/bin/env bash
# End-to-end load benchmark (issue 8): tollgate against the plain-proxy
# limit, side by side in one run, against one ozeki-sim upstream.
#
#   make bench-e2e            (builds the release binaries first)
#   benches/e2e/run.sh        (uses target/release/{tollgate,ozeki-sim})
#
# Scenarios, each for the same duration and connection count:
#   1 direct       wrk → ozeki-sim
#   2 nginx        wrk → nginx (proxy_pass, keepalive pool, 1 worker, no
#                  access log) → ozeki-sim
#   3 passthrough  wrk → tollgate `mode: passthrough` → ozeki-sim
#   4 async/sync   wrk → tollgate `sendmessage`: price, reserve, forward,
#                  settle; SQLite store, `durability: async` and `sync`
#   5 getcredits   wrk → tollgate `getcredits`, answered locally
# 1-4 send the same single-recipient GET `sendmessage` (recipients cycle
# through 1000 numbers); 5 sends a GET `getcredits`.
#
# For each: requests/s, p50/p99 latency (wrk --latency), errors, and the CPU
# time the proxy and the upstream spent per request (utime+stime from
# /proc/PID/stat before/after the measured run, summed over nginx's master
# and worker). Then a second phase at a fixed offered rate, half of tollgate
# `sendmessage` async's peak, for the p99 latency a proxy adds over direct.
# wrk 4.1 has no --rate (and Debian has no wrk2/oha), so the rate is fixed
# with think time: requests.lua's delay() makes each connection wait
# WRK_DELAY_MS after an answer (closed loop); the achieved rate is printed.
#
# Nothing is pinned: wrk, the proxy and ozeki-sim share the machine's cores
# (2 on the reference VM), so requests/s is "what this box does with the
# load generator and the upstream on it too". CPU µs per request is the
# fairer cost figure. tollgate runs with RUST_LOG=warn: at info every
# request writes an access line to stderr, which would be the bottleneck.
#
# The machine is shared and runs drift, so the scenarios run ROUNDS times
# (default 3), interleaved (1 2 3 4 5, 1 2 3 4 5, ...), and each figure is
# the median over the rounds.
#
# Knobs (environment): ROUNDS (3), DURATION (10s), WARMUP (2s), CONNECTIONS (64),
# WRK_THREADS (1), TOLLGATE_THREADS (1), SIM_THREADS (2), HALF_DURATION
# (same as DURATION), BATCH_AGE_MS (store.batch_age_max_ms, default 2),
# BIN_DIR (target/release), RESULTS
# (benches/e2e/results.md), QUIET_WAIT (seconds to wait for load average
# < 0.5 before starting; 0 = just warn), SKIP_HALF=1 skips phase 2.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
DURATION="${DURATION:-10s}"
WARMUP="${WARMUP:-2s}"
CONNECTIONS="${CONNECTIONS:-64}"
WRK_THREADS="${WRK_THREADS:-1}"
# One worker thread: on the 2-core reference VM, where wrk and ozeki-sim
# take a core's worth between them, threads: 1 beat threads: 2 in every
# tollgate scenario (less cross-thread waking; see results.md).
TOLLGATE_THREADS="${TOLLGATE_THREADS:-1}"
SIM_THREADS="${SIM_THREADS:-2}"
HALF_DURATION="${HALF_DURATION:-$DURATION}"
BIN_DIR="${BIN_DIR:-$ROOT/target/release}"
RESULTS="${RESULTS:-$HERE/results.md}"
QUIET_WAIT="${QUIET_WAIT:-0}"
SKIP_HALF="${SKIP_HALF:-0}"
ONLY="${ONLY:-}"   # e.g. ONLY="direct async" to run a subset (ratios need all)
ROUNDS="${ROUNDS:-3}"
BATCH_AGE_MS="${BATCH_AGE_MS:-2}"   # store.batch_age_max_ms (the default)
SUDO=""
[ "$(id -u)" = 0 ] || SUDO=sudo

log() { printf '%s\n' "$*" >&2; }
die() { log "bench-e2e: $*"; exit 1; }

# ---------------------------------------------------------------- installs
need_pkgs=()
command -v wrk >/dev/null || need_pkgs+=(wrk)
NGINX="$(command -v nginx || true)"
[ -n "$NGINX" ] || [ -x /usr/sbin/nginx ] || need_pkgs+=(nginx)
if [ ${#need_pkgs[@]} -gt 0 ]; then
    log "installing ${need_pkgs[*]}"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get install -y -qq "${need_pkgs[@]}" >/dev/null 2>&1 ||
        { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq "${need_pkgs[@]}" >/dev/null; }
    # The package starts a system nginx on port 80; we run our own.
    $SUDO systemctl stop nginx >/dev/null 2>&1 || $SUDO service nginx stop >/dev/null 2>&1 || true
fi
NGINX="$(command -v nginx || echo /usr/sbin/nginx)"
[ -x "$NGINX" ] || die "nginx not found after install"
for b in tollgate ozeki-sim; do
    [ -x "$BIN_DIR/$b" ] || die "$BIN_DIR/$b missing: run 'cargo build --release --bins' (or make bench-e2e)"
done

# ------------------------------------------------------------- quiet check
loadavg() { cut -d' ' -f1 /proc/loadavg; }
waited=0
while awk -v l="$(loadavg)" 'BEGIN{exit !(l >= 0.5)}' && [ "$waited" -lt "$QUIET_WAIT" ]; do
    sleep 5; waited=$((waited + 5))
done
LOAD_AT_START="$(loadavg)"
OTHERS="$(pgrep -c -x rustc || true)"
if awk -v l="$LOAD_AT_START" 'BEGIN{exit !(l >= 0.5)}' || [ "${OTHERS:-0}" != 0 ]; then
    log "bench-e2e: WARNING: machine not quiet (load $LOAD_AT_START, $OTHERS rustc running); ratios are still side by side"
fi

WORK="$(mktemp -d "${TMPDIR:-/tmp}/tollgate-e2e.XXXXXX")"
PIDS=()
cleanup() {
    for p in "${PIDS[@]:-}"; do
        [ -n "$p" ] && kill "$p" 2>/dev/null || true
    done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])' 2>/dev/null ||
        echo $((20000 + RANDOM % 20000))
}

wait_port() { # host:port [seconds]
    local deadline=$((SECONDS + ${2:-30}))
    until (exec 3<>"/dev/tcp/${1%:*}/${1#*:}") 2>/dev/null; do
        [ $SECONDS -lt $deadline ] || die "nothing listens on $1"
        sleep 0.05
    done
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
SIM_PORT="$(free_port)"
SIM="127.0.0.1:$SIM_PORT"
"$BIN_DIR/ozeki-sim" --listen "$SIM" --no-record --threads "$SIM_THREADS" \
    --user bench:benchpw:1000000 >"$WORK/sim.out" 2>"$WORK/sim.err" &
SIM_PID=$!
PIDS+=("$SIM_PID")
wait_port "$SIM"

SEND_PATH="/api?action=sendmessage&username=bench&password=benchpw&recipient=RCPT&messagetype=SMS:TEXT&messagedata=Hello+from+the+tollgate+benchmark"
CREDITS_PATH="/api?action=getcredits&username=bench&password=benchpw"

# ------------------------------------------------------------- the proxies
NGINX_PID=""
start_nginx() {
    local dir="$WORK/nginx" port
    port="$(free_port)"
    mkdir -p "$dir"
    sed -e "s|@DIR@|$dir|g" -e "s|@UPSTREAM@|$SIM|g" -e "s|@LISTEN@|127.0.0.1:$port|g" \
        "$HERE/nginx.conf.tmpl" >"$dir/nginx.conf"
    "$NGINX" -p "$dir" -c "$dir/nginx.conf" -e "$dir/nginx-error.log" 2>"$dir/stderr" &
    NGINX_PID=$!
    PIDS+=("$NGINX_PID")
    wait_port "127.0.0.1:$port"
    TARGET="127.0.0.1:$port"
    TARGET_PIDS=("$NGINX_PID")
}

TG_PID=""
TG_ADMIN=""
TG_RUNS=0
start_tollgate() { # mode durability [nostore]
    local dir port admin store_yaml
    TG_RUNS=$((TG_RUNS + 1))
    dir="$WORK/tollgate-$TG_RUNS-$1-$2"
    port="$(free_port)"
    admin="$(free_port)"
    mkdir -p "$dir/conf" "$dir/var"
    store_yaml="store: { path: ../var/tollgate.db, batch_age_max_ms: $BATCH_AGE_MS }"
    [ "${3:-}" = nostore ] && store_yaml="# no store: the ledger lives in memory only"
    cp "$HERE/tariffs.yaml" "$dir/conf/"
    sed -e "s|@MODE@|$1|" -e "s|@DURABILITY@|$2|" -e "s|@THREADS@|$TOLLGATE_THREADS|" \
        -e "s|@LISTEN@|127.0.0.1:$port|" -e "s|@ADMIN@|127.0.0.1:$admin|" \
        -e "s|@UPSTREAM@|$SIM|" -e "s|@STORE_YAML@|$store_yaml|" \
        "$HERE/tollgate.yaml.tmpl" >"$dir/conf/tollgate.yaml"
    echo benchpw | RUST_LOG=warn "$BIN_DIR/tollgate" accounts -c "$dir/conf/tollgate.yaml" \
        add bench --anytime 1000000000000 >/dev/null
    RUST_LOG=warn "$BIN_DIR/tollgate" run -c "$dir/conf/tollgate.yaml" >"$dir/stdout" 2>"$dir/stderr" &
    TG_PID=$!
    PIDS+=("$TG_PID")
    wait_port "127.0.0.1:$port"
    wait_port "127.0.0.1:$admin"
    TARGET="127.0.0.1:$port"
    TARGET_PIDS=("$TG_PID")
    TG_ADMIN="127.0.0.1:$admin"
    TG_DIR="$dir"
}

stop_pid() {
    kill "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
}

# ---------------------------------------------------------------- measuring
to_ms() { # "1.23ms" / "456.78us" / "1.02s" → milliseconds
    awk -v v="$1" 'BEGIN{
        if (v ~ /us$/) { sub(/us$/,"",v); printf "%.3f", v/1000 }
        else if (v ~ /ms$/) { sub(/ms$/,"",v); printf "%.3f", v }
        else if (v ~ /m$/) { sub(/m$/,"",v); printf "%.3f", v*60000 }
        else { sub(/s$/,"",v); printf "%.3f", v*1000 } }'
}

# run_wrk NAME PATH DURATION → sets RPS P50 P99 REQS ERRS PROXY_US SIM_US
run_wrk() {
    local name="$1" path="$2" dur="$3" out="$WORK/wrk-$1.txt" c0 c1 s0 s1
    wrk -t"$WRK_THREADS" -c"$CONNECTIONS" -d"$WARMUP" -s "$HERE/requests.lua" \
        "http://$TARGET" -- "$path" >/dev/null 2>&1 || true
    c0="$( [ ${#TARGET_PIDS[@]} -gt 0 ] && cpu_ticks "${TARGET_PIDS[@]}" || echo 0)"
    s0="$(cpu_ticks "$SIM_PID")"
    wrk -t"$WRK_THREADS" -c"$CONNECTIONS" -d"$dur" --latency -s "$HERE/requests.lua" \
        "http://$TARGET" -- "$path" >"$out" 2>&1 || die "wrk failed for $name: $(cat "$out")"
    c1="$( [ ${#TARGET_PIDS[@]} -gt 0 ] && cpu_ticks "${TARGET_PIDS[@]}" || echo 0)"
    s1="$(cpu_ticks "$SIM_PID")"
    RPS="$(awk '/^Requests\/sec:/{printf "%.0f", $2}' "$out")"
    REQS="$(awk '/requests in/{print $1}' "$out")"
    P50="$(to_ms "$(awk '$1=="50%"{print $2}' "$out")")"
    P99="$(to_ms "$(awk '$1=="99%"{print $2}' "$out")")"
    ERRS="$(awk '/Non-2xx/{n+=$NF} /Socket errors/{gsub(/,/,""); n+=$4+$6+$8+$10} END{print n+0}' "$out")"
    if [ ${#TARGET_PIDS[@]} -gt 0 ]; then
        PROXY_US="$(awk -v a="$c0" -v b="$c1" -v n="$REQS" -v t="$TICKS" 'BEGIN{printf "%.1f", (b-a)*1e6/t/n}')"
    else
        PROXY_US="–"
    fi
    SIM_US="$(awk -v a="$s0" -v b="$s1" -v n="$REQS" -v t="$TICKS" 'BEGIN{printf "%.1f", (b-a)*1e6/t/n}')"
    log "$(printf '%-13s %8s req/s  p50 %7s ms  p99 %7s ms  proxy %6s µs/req  sim %5s µs/req  errors %s' \
        "$name" "$RPS" "$P50" "$P99" "$PROXY_US" "$SIM_US" "$ERRS")"
}

# The tollgate scenario did what it claims: count answers by outcome.
outcomes() {
    curl -s "http://$TG_ADMIN/metrics" |
        awk '/^tollgate_requests_total\{/ && $NF > 0 {
            match($0, /outcome="[^"]*"/); o = substr($0, RSTART+9, RLENGTH-10)
            match($0, /action="[^"]*"/); a = substr($0, RSTART+8, RLENGTH-9)
            printf "%s%s:%s=%d", sep, a, o, $NF; sep=" " }'
}

declare -A R_RPS R_P50 R_P99 R_ERR R_CPU R_SIM R_NOTE
# Every round's values, space-separated, per scenario.
declare -A A_RPS A_P50 A_P99 A_ERR A_CPU A_SIM

want() { [ -z "$ONLY" ] || [[ " $ONLY " == *" $1 "* ]]; }

median() { # values... → the median ("–" stays "–")
    printf '%s\n' "$@" | { grep -v '^–$' || true; } | sort -g | awk '{v[NR]=$1} END{
        if (NR == 0) { print "–"; exit }
        if (NR % 2) print v[(NR+1)/2]; else print (v[NR/2] + v[NR/2+1]) / 2 }'
}

measure() { # name path [duration]
    run_wrk "$1" "$2" "${3:-$DURATION}"
    A_RPS[$1]+=" $RPS"; A_P50[$1]+=" $P50"; A_P99[$1]+=" $P99"; A_ERR[$1]+=" $ERRS"
    A_CPU[$1]+=" $PROXY_US"; A_SIM[$1]+=" $SIM_US"
    # shellcheck disable=SC2086
    {
        R_RPS[$1]="$(median ${A_RPS[$1]})"; R_P50[$1]="$(median ${A_P50[$1]})"
        R_P99[$1]="$(median ${A_P99[$1]})"; R_ERR[$1]="$(median ${A_ERR[$1]})"
        R_CPU[$1]="$(median ${A_CPU[$1]})"; R_SIM[$1]="$(median ${A_SIM[$1]})"
    }
}

scenario() { # name → start target, measure, stop
    local name="$1" path="$SEND_PATH"
    TARGET_PIDS=()
    case "$name" in
        direct) TARGET="$SIM" ;;
        nginx) start_nginx ;;
        passthrough) start_tollgate passthrough async ;;
        async) start_tollgate enforce async ;;
        sync) start_tollgate enforce sync ;;
        nostore) start_tollgate enforce async nostore ;;
        getcredits) start_tollgate enforce async; path="$CREDITS_PATH" ;;
    esac
    measure "$name" "$path" "${2:-$DURATION}"
    case "$name" in
        nginx) stop_pid "$NGINX_PID" ;;
        passthrough|async|sync|nostore|getcredits)
            R_NOTE[$name]="${R_NOTE[$name]:+${R_NOTE[$name]}; }$(outcomes)"
            log "              outcomes: ${R_NOTE[$name]}"
            stop_pid "$TG_PID"
            # wrk closing its connections at the end logs "Downstream
            # ConnectionClosed"; anything else is worth a look.
            grep -iE "error|panic" "$TG_DIR/stderr" | grep -v ConnectionClosed | head -3 >&2 || true
            ;;
    esac
}

log "bench-e2e: wrk -t$WRK_THREADS -c$CONNECTIONS -d$DURATION (warm-up $WARMUP), tollgate threads $TOLLGATE_THREADS, ozeki-sim threads $SIM_THREADS; load $LOAD_AT_START"
ALL=(direct nginx passthrough async sync getcredits)
# EXTRA=nostore adds tollgate `sendmessage` without a store (the cost of
# the credit logic without SQLite), for a breakdown.
[ -n "${EXTRA:-}" ] && ALL+=($EXTRA)
for round in $(seq 1 "$ROUNDS"); do
    log "-- round $round of $ROUNDS"
    for s in "${ALL[@]}"; do
        want "$s" && scenario "$s"
    done
done

# ------------------------------------------------- phase 2: half of peak
declare -A H_RPS H_P50 H_P99 HA_RPS HA_P50 HA_P99
HALF_RATE=""
if [ "$SKIP_HALF" != 1 ] && [ -n "${R_RPS[async]:-}" ]; then
    HALF_RATE="$(awk -v r="${R_RPS[async]}" 'BEGIN{printf "%d", r/2}')"
    log "phase 2: offered rate ≈ $HALF_RATE req/s (half of tollgate async's peak)"
    # delay = connections / rate − latency at that load (direct's p50 at
    # peak is an over-estimate of it, so the rate comes out a bit low).
    export WRK_DELAY_MS
    WRK_DELAY_MS="$(awk -v c="$CONNECTIONS" -v r="$HALF_RATE" -v l="${R_P50[direct]:-0.3}" \
        'BEGIN{d = c*1000/r - l; if (d < 0.1) d = 0.1; printf "%.3f", d}')"
    for round in $(seq 1 "$ROUNDS"); do
        for s in direct nginx passthrough async sync; do
            want "$s" || continue
            TARGET_PIDS=()
            case "$s" in
                direct) TARGET="$SIM" ;;
                nginx) start_nginx ;;
                passthrough) start_tollgate passthrough async ;;
                async) start_tollgate enforce async ;;
                sync) start_tollgate enforce sync ;;
            esac
            run_wrk "half-$s" "$SEND_PATH" "$HALF_DURATION"
            HA_RPS[$s]+=" $RPS"; HA_P50[$s]+=" $P50"; HA_P99[$s]+=" $P99"
            # shellcheck disable=SC2086
            {
                H_RPS[$s]="$(median ${HA_RPS[$s]})"; H_P50[$s]="$(median ${HA_P50[$s]})"
                H_P99[$s]="$(median ${HA_P99[$s]})"
            }
            case "$s" in
                nginx) stop_pid "$NGINX_PID" ;;
                direct) ;;
                *) stop_pid "$TG_PID" ;;
            esac
        done
    done
    unset WRK_DELAY_MS
fi

# ------------------------------------------------------------------ report
ratio() { # a b → a/b with 2 decimals, or "–"
    if [ -n "${1:-}" ] && [ -n "${2:-}" ] && [ "${2:-0}" != 0 ]; then
        awk -v a="$1" -v b="$2" 'BEGIN{printf "%.2f", a/b}'
    else
        echo "–"
    fi
}
label() {
    case "$1" in
        direct) echo "1 direct to ozeki-sim" ;;
        nginx) echo "2 nginx proxy_pass (1 worker, keepalive)" ;;
        passthrough) echo "3 tollgate mode: passthrough" ;;
        async) echo "4a tollgate sendmessage, durability: async" ;;
        sync) echo "4b tollgate sendmessage, durability: sync" ;;
        getcredits) echo "5 tollgate getcredits (local)" ;;
        nostore) echo "(extra) tollgate sendmessage, no store" ;;
    esac
}

REV="$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
DIRTY="$(git -C "$ROOT" status --porcelain 2>/dev/null | grep -q . && echo "+changes" || true)"
{
    echo "# tollgate end-to-end benchmark"
    echo
    echo "$(date -u '+%Y-%m-%d %H:%M UTC'), tollgate $REV$DIRTY, $(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)),"
    echo "load average at start $LOAD_AT_START. $(wrk --version 2>&1 | head -1 | cut -d' ' -f1-2), $("$NGINX" -v 2>&1 | cut -d' ' -f3)."
    echo
    echo "Command: \`make bench-e2e\` (= \`benches/e2e/run.sh\`): wrk -t$WRK_THREADS -c$CONNECTIONS -d$DURATION --latency after a $WARMUP warm-up,"
    echo "each scenario $ROUNDS times interleaved, medians shown (req/s of every round in the last column);"
    echo "tollgate threads: $TOLLGATE_THREADS, store.batch_age_max_ms: $BATCH_AGE_MS, RUST_LOG=warn (no access log); ozeki-sim --no-record, $SIM_THREADS threads;"
    echo "nothing pinned: wrk, the proxy and ozeki-sim share the CPUs. CPU = utime+stime per request from /proc."
    echo
    echo "| scenario | req/s | p50 ms | p99 ms | proxy CPU µs/req | sim CPU µs/req | errors | req/s per round |"
    echo "|---|---:|---:|---:|---:|---:|---:|---|"
    for s in "${ALL[@]}"; do
        [ -n "${R_RPS[$s]:-}" ] || continue
        echo "| $(label "$s") | ${R_RPS[$s]} | ${R_P50[$s]} | ${R_P99[$s]} | ${R_CPU[$s]} | ${R_SIM[$s]} | ${R_ERR[$s]} |${A_RPS[$s]} |"
    done
    echo
    echo "| ratio | throughput | CPU per request |"
    echo "|---|---:|---:|"
    echo "| 4a/3 async / passthrough (target ≥ 0.95) | $(ratio "${R_RPS[async]:-}" "${R_RPS[passthrough]:-}") | $(ratio "${R_CPU[async]:-}" "${R_CPU[passthrough]:-}") |"
    echo "| 4a/2 async / nginx (target ≥ 0.80) | $(ratio "${R_RPS[async]:-}" "${R_RPS[nginx]:-}") | $(ratio "${R_CPU[async]:-}" "${R_CPU[nginx]:-}") |"
    echo "| 4b/4a sync / async (target ≥ 0.80) | $(ratio "${R_RPS[sync]:-}" "${R_RPS[async]:-}") | $(ratio "${R_CPU[sync]:-}" "${R_CPU[async]:-}") |"
    echo "| 5/2 getcredits / nginx (target ≥ 1.40) | $(ratio "${R_RPS[getcredits]:-}" "${R_RPS[nginx]:-}") | $(ratio "${R_CPU[getcredits]:-}" "${R_CPU[nginx]:-}") |"
    echo "| 3/2 passthrough / nginx (reference) | $(ratio "${R_RPS[passthrough]:-}" "${R_RPS[nginx]:-}") | $(ratio "${R_CPU[passthrough]:-}" "${R_CPU[nginx]:-}") |"
    if [ -n "$HALF_RATE" ]; then
        echo
        echo "At half of peak: offered ≈ $HALF_RATE req/s (half of 4a's peak) with $CONNECTIONS connections, each"
        echo "waiting WRK_DELAY_MS after every answer (wrk 4.1 has no --rate). Added = p99 − direct's p99 (target: tollgate < 1 ms);"
        echo "\"over passthrough\" = p99 − passthrough's p99, what the credit logic adds to the bare pingora hop."
        echo
        echo "| scenario | achieved req/s | p50 ms | p99 ms | added p99 ms | over passthrough | p99 per round |"
        echo "|---|---:|---:|---:|---:|---:|---|"
        for s in direct nginx passthrough async sync; do
            [ -n "${H_RPS[$s]:-}" ] || continue
            added="$(awk -v a="${H_P99[$s]}" -v b="${H_P99[direct]:-0}" 'BEGIN{printf "%.3f", a-b}')"
            over="–"
            [[ "$s" == async || "$s" == sync ]] && [ -n "${H_P99[passthrough]:-}" ] &&
                over="$(awk -v a="${H_P99[$s]}" -v b="${H_P99[passthrough]}" 'BEGIN{printf "%.3f", a-b}')"
            echo "| $(label "$s") | ${H_RPS[$s]} | ${H_P50[$s]} | ${H_P99[$s]} | $added | $over |${HA_P99[$s]} |"
        done
    fi
    echo
    echo "Outcomes counted by tollgate (tollgate_requests_total), per scenario:"
    echo
    for s in passthrough async sync getcredits nostore; do
        [ -n "${R_NOTE[$s]:-}" ] && echo "- $s: ${R_NOTE[$s]}"
    done
} >"$WORK/results.md"

cat "$WORK/results.md"
mkdir -p "$ROOT/target/bench-e2e"
cp "$WORK/results.md" "$ROOT/target/bench-e2e/results-$(date -u +%Y%m%dT%H%M%SZ).md"
cp "$WORK/results.md" "$RESULTS"
log "written to $RESULTS (and target/bench-e2e/)"
