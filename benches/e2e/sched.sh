#!/usr/bin/env bash
# Where the tail comes from (issue 17): the scheduler's view of one
# open-loop run. Runs one scenario of latency.sh at a fixed rate under
# `perf sched record` and prints, per thread of the generator, ozeki-sim
# and the proxy: CPU time, context switches, and the scheduling delay
# (runnable → running: the time a woken thread waited for a core), average
# and maximum, from `perf sched latency`; then the proxy's and the
# generator's delay distribution from `perf sched timehist`.
#
#   benches/e2e/sched.sh SCENARIO RATE      (SCENARIO: direct nginx passthrough async sync)
#
# Knobs: DURATION (3s), CONNECTIONS (64), OHA_THREADS (1), TOLLGATE_THREADS,
# SIM_THREADS, EXTRA_YAML (appended to tollgate.yaml), KEEP (keep the
# perf.data and reports in this directory). Needs perf with the sched
# tracepoints (hardware counters are not needed).
set -euo pipefail
BENCH=sched
SCEN="${1:?scenario}"
RATE="${2:?rate}"
DURATION="${DURATION:-3s}"
CONNECTIONS="${CONNECTIONS:-64}"
OHA_THREADS="${OHA_THREADS:-1}"
# shellcheck source=benches/e2e/common.sh
. "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/common.sh"
OHA="${OHA:-$ROOT/target/tools/bin/oha}"
[ -x "$OHA" ] || die "$OHA missing: run benches/e2e/latency.sh once (it installs oha) or set OHA"
command -v perf >/dev/null || die "perf missing (apt-get install linux-perf)"
bench_init
start_sim
start_scenario "$SCEN"
URL="http://$TARGET${SCENARIO_PATH//RCPT/%2B36201234567}"
# warm-up
timeout 60 "$OHA" --no-tui --output-format json -z 1s -q "$RATE" --latency-correction -w \
    -c "$CONNECTIONS" --worker-threads "$OHA_THREADS" "$URL" >/dev/null 2>&1
OUT="${KEEP:-$WORK}"
mkdir -p "$OUT"
perf sched record -a -o "$OUT/perf.data" -- \
    timeout 60 "$OHA" --no-tui --output-format json -z "$DURATION" -q "$RATE" --latency-correction -w \
    -c "$CONNECTIONS" --worker-threads "$OHA_THREADS" "$URL" >"$OUT/oha.json" 2>"$OUT/perf-record.err"
stop_scenario "$SCEN"
jq -r '"oha: \([.statusCodeDistribution[]] | add) answers, p50 \(.latencyPercentiles.p50*1000) ms, p99 \(.latencyPercentiles.p99*1000) ms, p99.9 \(.latencyPercentiles["p99.9"]*1000) ms"' "$OUT/oha.json"
echo "load average $(cut -d' ' -f1-3 /proc/loadavg); $SCEN at $RATE req/s for $DURATION"
perf sched latency -i "$OUT/perf.data" --sort max 2>/dev/null >"$OUT/latency.txt" || true
echo "perf sched latency (per thread; top 25 by max delay):"
sed -n '1,4p' "$OUT/latency.txt"
grep -E '^ +[^ -]' "$OUT/latency.txt" | grep -v 'Task ' | head -25
perf sched timehist -i "$OUT/perf.data" 2>/dev/null >"$OUT/timehist.txt" || true
# timehist columns: time cpu task[tid] wait sch-delay run-time (ms)
echo
echo "scheduling delay distribution per thread (ms; from timehist: count p50 p99 max, sum of run time):"
# (a task name may hold spaces: the last three fields are the numbers).
awk 'NR > 3 && $3 !~ /^<idle>/ && NF >= 6 {
        t = $3; for (i = 4; i <= NF - 3; i++) t = t "_" $i
        sub(/\[[0-9\/]+\]$/, "", t); d[t] = d[t] " " $(NF-1); n[t]++; r[t] += $NF }
     END { for (t in n) print t, n[t], r[t], d[t] }' "$OUT/timehist.txt" |
    while read -r name count run rest; do
        # shellcheck disable=SC2086
        printf '%s\n' $rest | sort -g | awk -v t="$name" -v c="$count" -v r="$run" '
            { v[NR] = $1 } END { if (NR < 20) exit;
            printf "  %-18s switches %7d  run %8.1f ms  delay p50 %.3f p99 %.3f max %.3f\n",
                t, c, r, v[int(NR*0.5)+1], v[int(NR*0.99)+1], v[NR] }'
    done | sort -k5 -rn | head -20
[ -n "${KEEP:-}" ] && echo "kept in $OUT"
true
