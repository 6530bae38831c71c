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
#   6 dlr/dlrhold  4a with delivery reports: `dlr.request: always` (tollgate
#                  adds its reporturl), ozeki-sim calls it back "delivered"
#                  for every message (a fresh connection each, as it comes);
#                  `charge_on: accept` (dlr) and `charge_on: delivery`
#                  (dlrhold: hold on the answer, post on the report). Their
#                  proxy CPU per send minus 4a's is the report round trip.
# 1-4 and 6 send the same single-recipient GET `sendmessage` (recipients
# cycle through 1000 numbers); 5 sends a GET `getcredits`.
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

BENCH=bench-e2e
DURATION="${DURATION:-10s}"
WARMUP="${WARMUP:-2s}"
CONNECTIONS="${CONNECTIONS:-64}"
WRK_THREADS="${WRK_THREADS:-1}"
HALF_DURATION="${HALF_DURATION:-$DURATION}"
SKIP_HALF="${SKIP_HALF:-0}"
ONLY="${ONLY:-}"   # e.g. ONLY="direct async" to run a subset (ratios need all)
ROUNDS="${ROUNDS:-3}"
# Installs, ports, processes and the scenarios' set-ups (TOLLGATE_THREADS,
# SIM_THREADS, BATCH_AGE_MS, BIN_DIR, QUIET_WAIT are read there).
# shellcheck source=benches/e2e/common.sh
. "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/common.sh"
RESULTS="${RESULTS:-$HERE/results.md}"

bench_install
quiet_check
bench_init
start_sim

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

declare -A R_RPS R_P50 R_P99 R_ERR R_CPU R_SIM R_NOTE
# Every round's values, space-separated, per scenario.
declare -A A_RPS A_P50 A_P99 A_ERR A_CPU A_SIM

want() { [ -z "$ONLY" ] || [[ " $ONLY " == *" $1 "* ]]; }

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
    local name="$1"
    start_scenario "$name"
    measure "$name" "$SCENARIO_PATH" "${2:-$DURATION}"
    if is_tollgate "$name"; then
        R_NOTE[$name]="${R_NOTE[$name]:+${R_NOTE[$name]}; }$(outcomes)"
        log "              outcomes: ${R_NOTE[$name]}"
        stop_scenario "$name"
        # wrk closing its connections at the end logs "Downstream
        # ConnectionClosed"; anything else is worth a look.
        grep -iE "error|panic" "$TG_DIR/stderr" | grep -v ConnectionClosed | head -3 >&2 || true
    else
        stop_scenario "$name"
    fi
}

log "bench-e2e: wrk -t$WRK_THREADS -c$CONNECTIONS -d$DURATION (warm-up $WARMUP), tollgate threads $TOLLGATE_THREADS, ozeki-sim threads $SIM_THREADS; load $LOAD_AT_START"
ALL=(direct nginx passthrough async sync getcredits dlr dlrhold)
# EXTRA=nostore adds tollgate `sendmessage` without a store (the cost of
# the credit logic without SQLite), for a breakdown.
if [ -n "${EXTRA:-}" ]; then read -ra extra <<<"$EXTRA"; ALL+=("${extra[@]}"); fi
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
            start_scenario "$s"
            run_wrk "half-$s" "$SEND_PATH" "$HALF_DURATION"
            HA_RPS[$s]+=" $RPS"; HA_P50[$s]+=" $P50"; HA_P99[$s]+=" $P99"
            # shellcheck disable=SC2086
            {
                H_RPS[$s]="$(median ${HA_RPS[$s]})"; H_P50[$s]="$(median ${HA_P50[$s]})"
                H_P99[$s]="$(median ${HA_P99[$s]})"
            }
            stop_scenario "$s"
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
{
    echo "# tollgate end-to-end benchmark"
    echo
    echo "$(date -u '+%Y-%m-%d %H:%M UTC'), tollgate $(revision), $(machine_line),"
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
    echo "| 6a/4a send + report (accept) / async | $(ratio "${R_RPS[dlr]:-}" "${R_RPS[async]:-}") | $(ratio "${R_CPU[dlr]:-}" "${R_CPU[async]:-}") |"
    echo "| 6b/4a send + report (delivery) / async | $(ratio "${R_RPS[dlrhold]:-}" "${R_RPS[async]:-}") | $(ratio "${R_CPU[dlrhold]:-}" "${R_CPU[async]:-}") |"
    for s in dlr dlrhold; do
        if [ -n "${R_CPU[$s]:-}" ] && [ -n "${R_CPU[async]:-}" ]; then
            echo
            echo "Report round trip ($s): $(awk -v a="${R_CPU[$s]}" -v b="${R_CPU[async]}" 'BEGIN{printf "%.1f", a-b}') µs more tollgate CPU per send than 4a (medians; per round: ${A_CPU[$s]} vs ${A_CPU[async]})."
        fi
    done
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
    for s in passthrough async sync getcredits nostore dlr dlrhold; do
        [ -n "${R_NOTE[$s]:-}" ] && echo "- $s: ${R_NOTE[$s]}"
    done
} >"$WORK/results.md"

cat "$WORK/results.md"
mkdir -p "$ROOT/target/bench-e2e"
cp "$WORK/results.md" "$ROOT/target/bench-e2e/results-$(date -u +%Y%m%dT%H%M%SZ).md"
cp "$WORK/results.md" "$RESULTS"
log "written to $RESULTS (and target/bench-e2e/)"
