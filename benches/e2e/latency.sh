#!/usr/bin/env bash
# Open-loop latency benchmark (issue 17): the tail each proxy adds, at fixed
# offered rates, measured so that queueing is not hidden.
#
#   make bench-latency        (builds the release binaries first)
#   benches/e2e/latency.sh    (uses target/release/{tollgate,ozeki-sim})
#
# Why open loop: a closed-loop generator (wrk, and run.sh's throughput
# phase) sends a connection's next request only after the previous answer,
# so when the server stalls the generator stops sending and the requests
# that would have waited are never measured ("coordinated omission"). Here
# requests are due on a fixed schedule (one every 1/RATE s) whatever the
# server does, and each latency runs from the request's due time, not from
# when a connection got round to sending it: a stall shows up in every
# request that was due during it.
#
# The generator is oha (the `oha` crate), installed into target/tools when absent,
# run as `oha -z DURATION -q RATE --latency-correction -c CONNECTIONS -w`:
# a ticker task emits one due time every 1/RATE s into an unbounded queue,
# the CONNECTIONS keep-alive connections take them in turn, and with
# --latency-correction a latency is answer time − due time (without it, −
# send time). -w waits for the requests in flight at the deadline instead of
# aborting them, so that the end of a run causes no error on either side.
# Limits, all the same for every scenario: oha's ticker runs on tokio's
# 1 ms timer, so due times come in bursts of RATE/1000 once a millisecond
# (burstier than a perfectly even schedule), and a due time is stamped when
# the ticker wakes, so a ticker that wakes late (the generator itself
# starved of CPU) hides that lateness; CONNECTIONS bounds the requests in
# flight (RATE × latency must stay well below it, or due requests queue in
# the generator, which is then counted in their latency).
#
# Rates: RATES percent (default 25 50 75) of nginx's peak, measured first in
# the same run with wrk as run.sh does (PEAK_RUNS runs of PEAK_DURATION,
# median), so the rates follow the machine. Scenarios (same set-ups as
# run.sh, from common.sh): direct to ozeki-sim, nginx proxy_pass, tollgate
# passthrough, tollgate sendmessage async and sync (EXTRA=getcredits adds
# local getcredits). Every (scenario, rate) runs ROUNDS times, interleaved
# (round 1: every rate × every scenario, then round 2, ...), each time on a
# freshly started proxy, after a WARMUP run at the same rate.
#
# Errors of every kind are kept per run: the generator's (transport errors
# and non-2xx answers), tollgate's tollgate_requests_total outcomes other
# than forwarded/settled/ok (/metrics scraped before and after the measured
# run), new lines in tollgate's stderr (RUST_LOG=warn) and in nginx's error
# log.
#
# Knobs (environment): ROUNDS (3), DURATION (10s), WARMUP (2s),
# CONNECTIONS (64), RATES ("25 50 75"), PEAK_RUNS (3), PEAK_DURATION (5s),
# WRK_THREADS (1), OHA_THREADS (1: the generator's tokio threads),
# TOLLGATE_THREADS (1), SIM_THREADS (2), BATCH_AGE_MS (2), EXTRA
# (e.g. getcredits), ONLY (a subset, e.g. ONLY="direct nginx async"; the
# added-p99 columns need direct), OHA (a ready oha binary), OHA_VERSION,
# BIN_DIR (target/release), RESULTS (benches/e2e/latency.md), QUIET_WAIT.
set -euo pipefail

BENCH=bench-latency
ROUNDS="${ROUNDS:-3}"
DURATION="${DURATION:-10s}"
WARMUP="${WARMUP:-2s}"
CONNECTIONS="${CONNECTIONS:-64}"
RATES="${RATES:-25 50 75}"
PEAK_RUNS="${PEAK_RUNS:-3}"
PEAK_DURATION="${PEAK_DURATION:-5s}"
WRK_THREADS="${WRK_THREADS:-1}"
OHA_THREADS="${OHA_THREADS:-1}"
OHA_VERSION="${OHA_VERSION:-1.16.0}"
ONLY="${ONLY:-}"
# shellcheck source=benches/e2e/common.sh
. "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/common.sh"
RESULTS="${RESULTS:-$HERE/latency.md}"
# The command as it can be re-run: every knob that shapes the numbers.
COMMAND="ROUNDS=$ROUNDS DURATION=$DURATION WARMUP=$WARMUP CONNECTIONS=$CONNECTIONS RATES=\"$RATES\" PEAK_RUNS=$PEAK_RUNS PEAK_DURATION=$PEAK_DURATION OHA_THREADS=$OHA_THREADS TOLLGATE_THREADS=$TOLLGATE_THREADS SIM_THREADS=$SIM_THREADS${EXTRA:+ EXTRA=\"$EXTRA\"}${ONLY:+ ONLY=\"$ONLY\"}${OLD_BIN_DIR:+ OLD_BIN_DIR=$OLD_BIN_DIR} ${BENCH_COMMAND:-benches/e2e/latency.sh}"

secs() { # "10s" / "2m" / "500ms" → seconds (decimal)
    awk -v v="$1" 'BEGIN{
        if (v ~ /ms$/) { sub(/ms$/,"",v); print v/1000 }
        else if (v ~ /m$/) { sub(/m$/,"",v); print v*60 }
        else { sub(/s$/,"",v); print v+0 } }'
}
DURATION_S="$(secs "$DURATION")"

# ---------------------------------------------------------------- installs
bench_install
command -v jq >/dev/null || apt_install jq
OHA="${OHA:-$ROOT/target/tools/bin/oha}"
if [ ! -x "$OHA" ]; then
    # oha needs one TLS back-end to build at all; native-tls links the
    # system OpenSSL (Debian's libssl-dev), quicker to build than the
    # default rustls + aws-lc. Only plain HTTP is used here.
    if ! dpkg -s libssl-dev >/dev/null 2>&1 || ! command -v pkg-config >/dev/null; then
        apt_install libssl-dev pkg-config
    fi
    log "installing oha $OHA_VERSION into target/tools (cargo install, several minutes once)"
    cargo install oha --version "$OHA_VERSION" --locked --no-default-features --features native-tls \
        --root "$ROOT/target/tools" >&2 || die "cargo install oha failed"
fi
"$OHA" --help | grep -q -- --latency-correction || die "$OHA has no --latency-correction"
OHA_V="$("$OHA" --version | head -1)"

quiet_check
bench_init
start_sim

# The same 1000 recipients as requests.lua, one URL per line, for
# `oha --urls-from-file` (it picks one at random per request).
urls_for() { # host:port path → file
    local file="$WORK/urls-$1.txt" head tail k
    if [ ! -s "$file" ]; then
        if [[ "$2" == *RCPT* ]]; then
            head="${2%%RCPT*}" tail="${2#*RCPT}"
            for k in $(seq 1 1000); do
                printf 'http://%s%s%%2B3620%07d%s\n' "$1" "$head" "$k" "$tail"
            done >"$file"
        else
            printf 'http://%s%s\n' "$1" "$2" >"$file"
        fi
    fi
    echo "$file"
}

# ------------------------------------------------------ nginx's peak (wrk)
peak_rps() { # PEAK: the median req/s of PEAK_RUNS closed-loop wrk runs against nginx
    local i out rps=()
    start_nginx
    wrk -t"$WRK_THREADS" -c"$CONNECTIONS" -d"$WARMUP" -s "$HERE/requests.lua" \
        "http://$TARGET" -- "$SEND_PATH" >/dev/null 2>&1 || true
    for i in $(seq 1 "$PEAK_RUNS"); do
        out="$WORK/peak-$i.txt"
        wrk -t"$WRK_THREADS" -c"$CONNECTIONS" -d"$PEAK_DURATION" -s "$HERE/requests.lua" \
            "http://$TARGET" -- "$SEND_PATH" >"$out" 2>&1 || die "wrk failed: $(cat "$out")"
        rps+=("$(awk '/^Requests\/sec:/{printf "%.0f", $2}' "$out")")
    done
    stop_pid "$NGINX_PID"
    PEAK_ALL="${rps[*]}"
    PEAK="$(median "${rps[@]}")"
}

# ------------------------------------------------------------- one run
# Counters of tollgate_requests_total as "action:outcome count" lines.
scrape() {
    curl -s "http://$TG_ADMIN/metrics" |
        awk '/^tollgate_requests_total\{/ {
            match($0, /outcome="[^"]*"/); o = substr($0, RSTART+9, RLENGTH-10)
            match($0, /action="[^"]*"/); a = substr($0, RSTART+8, RLENGTH-9)
            print a ":" o, $NF }'
}
# after − before, outcomes that moved, "a:o=n a:o=n".
delta() { # before-file after-file
    awk 'NR == FNR { b[$1] = $2; next } { d = $2 - b[$1]; if (d > 0) { printf "%s%s=%d", sep, $1, d; sep = " " } }' "$1" "$2"
}
lines() { if [ -f "$1" ]; then wc -l <"$1"; else echo 0; fi; }

# oha NAME RATE DURATION JSON: one open-loop run against TARGET.
oha_run() {
    local urls="$1" rate="$2" dur="$3" json="$4" limit
    limit="$(awk -v d="$(secs "$dur")" 'BEGIN{printf "%d", d + 60}')"
    # timeout: a run ends by itself even if the target hangs. bash's time
    # gives the generator's own CPU (user, system seconds) into $json.cpu.
    local TIMEFORMAT='%U %S'
    { time timeout "$limit" "$OHA" --no-tui --output-format json --urls-from-file \
        -z "$dur" -q "$rate" --latency-correction -w -c "$CONNECTIONS" \
        --worker-threads "$OHA_THREADS" "$urls" >"$json" 2>"$json.err"; } 2>"$json.cpu" ||
        die "oha failed against $TARGET: $(tail -3 "$json.err")"
}

# All per-run values, space-separated per "scenario/pct".
declare -A A_P50 A_P99 A_P999 A_ACH A_GEN A_OUT A_LOG A_CPU A_GCPU A_GEN_KINDS
declare -A P99_OF   # "scenario/pct/round" → p99, for the paired differences
declare -A BAD_OUT  # "scenario/pct" → tollgate's error outcomes, every round

run_one() { # scenario pct round
    local s="$1" pct="$2" round="$3" rate="${RATE[$2]}" key="$1/$2"
    local urls json="$WORK/oha-$1-$2-$3.json" c0 c1 log0=0 log1=0 errlog=""
    local p50 p99 p999 ach gen kinds out="" logn=0 cpu="–" gcpu n
    start_scenario "$s"
    urls="$(urls_for "$TARGET" "$SCENARIO_PATH")"
    oha_run "$urls" "$rate" "$WARMUP" "$WORK/warmup.json"
    if is_tollgate "$s"; then
        errlog="$TG_DIR/stderr"
        scrape >"$WORK/before"
    elif [ "$s" = nginx ]; then
        errlog="$NGINX_DIR/nginx-error.log"
    fi
    [ -z "$errlog" ] || log0="$(lines "$errlog")"
    c0="$( [ ${#TARGET_PIDS[@]} -gt 0 ] && cpu_ticks "${TARGET_PIDS[@]}" || echo 0)"
    oha_run "$urls" "$rate" "$DURATION" "$json"
    c1="$( [ ${#TARGET_PIDS[@]} -gt 0 ] && cpu_ticks "${TARGET_PIDS[@]}" || echo 0)"
    if is_tollgate "$s"; then
        scrape >"$WORK/after"
        out="$(delta "$WORK/before" "$WORK/after")"
    fi
    [ -z "$errlog" ] || log1="$(lines "$errlog")"
    logn=$((log1 - log0))
    if [ "$logn" -gt 0 ]; then
        tail -n "$logn" "$errlog" | head -3 | cut -c1-300 >&2
    fi
    stop_scenario "$s"

    # Latencies in seconds in the JSON (successful answers only); errors
    # are transport errors plus non-2xx answers.
    read -r p50 p99 p999 n < <(jq -r '[.latencyPercentiles.p50, .latencyPercentiles.p99,
        .latencyPercentiles["p99.9"], ([.statusCodeDistribution[]] | add // 0)]
        | map(. // 0) | @tsv' "$json")
    p50="$(awk -v v="$p50" 'BEGIN{printf "%.3f", v*1000}')"
    p99="$(awk -v v="$p99" 'BEGIN{printf "%.3f", v*1000}')"
    p999="$(awk -v v="$p999" 'BEGIN{printf "%.3f", v*1000}')"
    ach="$(awk -v n="$n" -v d="$DURATION_S" 'BEGIN{printf "%.0f", n/d}')"
    gen="$(jq -r '([.errorDistribution[]] | add // 0) +
        ([.statusCodeDistribution | to_entries[] | select(.key | test("^2") | not) | .value] | add // 0)' "$json")"
    kinds="$(jq -r '[(.errorDistribution | to_entries[] | "\(.key)=\(.value)"),
        (.statusCodeDistribution | to_entries[] | select(.key | test("^2") | not) | "HTTP \(.key)=\(.value)")]
        | join("; ")' "$json")"
    gcpu="–"
    [ "$n" -gt 0 ] && gcpu="$(awk -v n="$n" '{printf "%.1f", ($1 + $2)*1e6/n}' "$json.cpu")"
    if [ ${#TARGET_PIDS[@]} -gt 0 ] && [ "$n" -gt 0 ]; then
        cpu="$(awk -v a="$c0" -v b="$c1" -v n="$n" -v t="$TICKS" 'BEGIN{printf "%.1f", (b-a)*1e6/t/n}')"
    fi
    A_P50[$key]+=" $p50"; A_P99[$key]+=" $p99"; A_P999[$key]+=" $p999"; A_ACH[$key]+=" $ach"
    A_GEN[$key]+=" $gen"; A_LOG[$key]+=" $logn"; A_CPU[$key]+=" $cpu"; A_GCPU[$key]+=" $gcpu"
    [ -z "$kinds" ] || A_GEN_KINDS[$key]+="${A_GEN_KINDS[$key]:+; }round $round: $kinds"
    # Error outcomes only: forwarded/settled/ok are the successes.
    local bad
    bad="$(tr ' ' '\n' <<<"$out" | grep -vE '^$|:(forwarded|settled|ok)=' | paste -sd' ' - || true)"
    A_OUT[$key]+="${A_OUT[$key]:+ | }round $round: ${out:-–}"
    BAD_OUT[$key]+="${bad:+${BAD_OUT[$key]:+ }$bad}"
    P99_OF[$s/$pct/$round]="$p99"
    log "$(printf '%-12s %3s%% %6s req/s offered, %6s achieved  p50 %8s  p99 %8s  p99.9 %8s ms  cpu %5s µs/req  oha %5s µs/req  gen.err %s  log %s  %s' \
        "$s" "$pct" "$rate" "$ach" "$p50" "$p99" "$p999" "$cpu" "$gcpu" "$gen" "$logn" "$out")"
}

want() { [ -z "$ONLY" ] || [[ " $ONLY " == *" $1 "* ]]; }
ALL=(direct nginx passthrough async sync)
if [ -n "${EXTRA:-}" ]; then read -ra extra <<<"$EXTRA"; ALL+=("${extra[@]}"); fi
SCN=()
for s in "${ALL[@]}"; do want "$s" && SCN+=("$s"); done
read -ra PCTS <<<"$RATES"

log "$BENCH: load $LOAD_AT_START; measuring nginx's peak (wrk -t$WRK_THREADS -c$CONNECTIONS, $PEAK_RUNS × $PEAK_DURATION)"
peak_rps
declare -A RATE
for pct in "${PCTS[@]}"; do
    RATE[$pct]="$(awk -v p="$PEAK" -v q="$pct" 'BEGIN{printf "%d", p*q/100}')"
done
log "$BENCH: nginx peak $PEAK req/s (runs: $PEAK_ALL); rates: $(for p in "${PCTS[@]}"; do printf '%s%%=%s ' "$p" "${RATE[$p]}"; done)"

for round in $(seq 1 "$ROUNDS"); do
    log "-- round $round of $ROUNDS"
    for pct in "${PCTS[@]}"; do
        for s in "${SCN[@]}"; do
            run_one "$s" "$pct" "$round"
        done
    done
done

# ------------------------------------------------------------------ report
spread() { # printf-format values... → "median (min–max)", the median alone for one round
    local fmt="$1" m lo hi
    shift
    m="$(median "$@")"
    [ "$m" = – ] || m="$(awk -v f="$fmt" -v v="$m" 'BEGIN{printf f, v}')"
    [ "$#" -gt 1 ] || { echo "$m"; return; }
    lo="$(printf '%s\n' "$@" | { grep -v '^–$' || true; } | sort -g | head -1)"
    hi="$(printf '%s\n' "$@" | { grep -v '^–$' || true; } | sort -g | tail -1)"
    [ -n "$lo" ] || { echo "$m"; return; }
    echo "$m ($lo–$hi)"
}
# Per round, p99(a) − p99(b) at the same rate: paired, so the drift of the
# machine between rounds cancels out.
diffs() { # a b pct → values
    local r out=()
    for r in $(seq 1 "$ROUNDS"); do
        local x="${P99_OF[$1/$3/$r]:-}" y="${P99_OF[$2/$3/$r]:-}"
        [ -n "$x" ] && [ -n "$y" ] && out+=("$(awk -v a="$x" -v b="$y" 'BEGIN{printf "%.3f", a-b}')")
    done
    echo "${out[*]:-–}"
}
sum() { awk '{for (i = 1; i <= NF; i++) if ($i != "–") n += $i} END{print n+0}' <<<"$*"; }

{
    echo "# tollgate open-loop latency benchmark"
    echo
    echo "$(date -u '+%Y-%m-%d %H:%M UTC'), tollgate $(revision), $(machine_line),"
    echo "load average at start $LOAD_AT_START ($RUSTC_AT_START rustc processes running; busiest processes then: ${BUSY_AT_START:-none above 10 %})."
    echo "$OHA_V (generator),"
    echo "$(wrk --version 2>&1 | head -1 | cut -d' ' -f1-2) (nginx's peak), $("$NGINX" -v 2>&1 | cut -d' ' -f3)."
    echo
    echo "Command: \`$COMMAND\`, i.e. per run"
    echo "\`oha --no-tui --urls-from-file -z $DURATION -q RATE --latency-correction -w -c $CONNECTIONS --worker-threads $OHA_THREADS\`"
    echo "after a $WARMUP warm-up run at the same rate; ROUNDS=$ROUNDS interleaved rounds (every rate × every scenario per round),"
    echo "a fresh proxy per run. Open loop: requests are due at a fixed rate whatever the server does, and each latency is"
    echo "measured from the request's due time (coordinated-omission correction). tollgate threads: $TOLLGATE_THREADS,"
    echo "store.batch_age_max_ms: $BATCH_AGE_MS, RUST_LOG=warn; ozeki-sim --no-record, $SIM_THREADS threads; nothing pinned."
    echo
    echo "nginx's peak (wrk -t$WRK_THREADS -c$CONNECTIONS, closed loop, median of $PEAK_RUNS × $PEAK_DURATION): **$PEAK req/s** ($PEAK_ALL);"
    echo "offered rates: $(for p in "${PCTS[@]}"; do printf '%s %% = %s req/s; ' "$p" "${RATE[$p]}"; done)"
    echo
    echo "Cells: median over the rounds (min–max). Latencies in ms, successful answers only. \"added p99\" = p99 − direct's p99"
    echo "in the same round. Errors: the generator's (transport errors + non-2xx answers) and tollgate's error outcomes"
    echo "(tollgate_requests_total other than forwarded/settled/ok), summed over the rounds; \"log\" = new lines in tollgate's"
    echo "stderr (RUST_LOG=warn) or nginx's error log during the measured runs, summed. CPU per answered request from"
    echo "/proc (proxy: utime+stime; nginx master+worker) and bash's time (oha, the generator: it shares the CPUs too)."
    echo "**overloaded**: the median achieved rate is below 98 % of the offered one: the target cannot keep up, the due"
    echo "requests queue and the latency grows for as long as the run lasts (seconds, not a property of the proxy hop)."
    for pct in "${PCTS[@]}"; do
        echo
        echo "## ${pct} % of nginx's peak: ${RATE[$pct]} req/s offered"
        echo
        echo "| scenario | achieved req/s | p50 ms | p99 ms | p99.9 ms | added p99 ms | proxy CPU µs/req | oha CPU µs/req | errors: generator | errors: tollgate | log |"
        echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|"
        for s in "${SCN[@]}"; do
            key="$s/$pct"
            [ -n "${A_P99[$key]:-}" ] || continue
            added="–"
            if [ "$s" != direct ] && [ -n "${P99_OF[direct/$pct/1]:-}" ]; then
                # shellcheck disable=SC2046
                added="$(spread %.3f $(diffs "$s" direct "$pct"))"
            fi
            bad="${BAD_OUT[$key]:-}"
            is_tollgate "$s" || bad="n/a"
            over=""
            # shellcheck disable=SC2086
            awk -v a="$(median ${A_ACH[$key]})" -v r="${RATE[$pct]}" 'BEGIN{exit !(a < 0.98 * r)}' &&
                over=" **overloaded**"
            # shellcheck disable=SC2086
            echo "| $(label "$s") | $(spread %.0f ${A_ACH[$key]})$over | $(spread %.3f ${A_P50[$key]}) | $(spread %.3f ${A_P99[$key]}) | $(spread %.3f ${A_P999[$key]}) | $added | $(spread %.1f ${A_CPU[$key]}) | $(spread %.1f ${A_GCPU[$key]}) | $(sum ${A_GEN[$key]}) | ${bad:-0} | $(sum ${A_LOG[$key]}) |"
        done
    done
    if [[ " ${SCN[*]} " == *" direct "* ]] && [[ " ${SCN[*]} " == *" nginx "* ]]; then
        echo
        echo "## The distance to nginx: tollgate's added p99 − nginx's added p99 (= p99 − nginx's p99, per round)"
        echo
        echo "Target (issue 17): at 50 % of nginx's peak, async sendmessage ≤ 0.5 ms."
        echo
        printf '| rate |'; for s in "${SCN[@]}"; do [[ "$s" =~ ^(direct|nginx)$ ]] || printf ' %s |' "$s"; done; echo
        printf '|---|'; for s in "${SCN[@]}"; do [[ "$s" =~ ^(direct|nginx)$ ]] || printf -- '---:|'; done; echo
        for pct in "${PCTS[@]}"; do
            printf '| %s %% (%s req/s) |' "$pct" "${RATE[$pct]}"
            for s in "${SCN[@]}"; do
                [[ "$s" =~ ^(direct|nginx)$ ]] && continue
                # shellcheck disable=SC2046
                printf ' %s |' "$(spread %.3f $(diffs "$s" nginx "$pct"))"
            done
            echo
        done
    fi
    echo
    echo "## Every run's outcomes and errors"
    echo
    echo "tollgate_requests_total deltas over each measured run (action:outcome=count), and the generator's error kinds:"
    echo
    for s in "${SCN[@]}"; do
        for pct in "${PCTS[@]}"; do
            key="$s/$pct"
            [ -n "${A_P99[$key]:-}" ] || continue
            if is_tollgate "$s"; then
                echo "- $s at $pct %: ${A_OUT[$key]}${A_GEN_KINDS[$key]:+; generator: ${A_GEN_KINDS[$key]}}"
            elif [ -n "${A_GEN_KINDS[$key]:-}" ]; then
                echo "- $s at $pct %: generator: ${A_GEN_KINDS[$key]}"
            fi
        done
    done
} >"$WORK/latency.md"

cat "$WORK/latency.md"
mkdir -p "$ROOT/target/bench-e2e"
cp "$WORK/latency.md" "$ROOT/target/bench-e2e/latency-$(date -u +%Y%m%dT%H%M%SZ).md"
cp "$WORK/latency.md" "$RESULTS"
log "written to $RESULTS (and target/bench-e2e/)"
