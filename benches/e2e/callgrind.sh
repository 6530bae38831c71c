#!/usr/bin/env bash
# Instructions per request under callgrind, per scenario: valid on a busy
# machine, where wall-clock numbers are not (issue 17).
#
#   benches/e2e/callgrind.sh [passthrough | async | sync | getcredits] [keepalive | close]
#
# Starts ozeki-sim and tollgate (under `valgrind --tool=callgrind
# --instr-atstart=no`, every thread counted: workers, the store writer,
# timers) as run.sh's scenarios do. A wrk warm-up, then collection on for
# DUR (10s) of wrk -t1 -cCONNS (16), collection off. `close` sends
# `Connection: close` on every request, so each request is a new
# connection (accept, the per-connection set-up, the close): the
# difference to `keepalive` is what a connection costs. Prints Ir per
# request; the profile stays in the printed directory
# (callgrind_annotate --inclusive=yes cg.out.1). EXTRA_YAML is appended to
# tollgate.yaml (e.g. EXTRA_YAML='pingora: { work_stealing: false }').
# Knobs: DUR, CONNS, THREADS (1), BIN_DIR (target/release). Needs
# valgrind, wrk, curl.
set -euo pipefail
SCENARIO=${1:-async}
CONN=${2:-keepalive}
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
BIN=${BIN_DIR:-$HERE/../../target/release}
CONNS=${CONNS:-16}
W="$(mktemp -d "${TMPDIR:-/tmp}/tollgate-callgrind.XXXXXX")"
mkdir -p "$W/conf" "$W/var"
SIMP=$((20000 + RANDOM % 10000)); P=$((SIMP + 1)); A=$((SIMP + 2))
"$BIN/ozeki-sim" --listen "127.0.0.1:$SIMP" --no-record --threads 1 --user bench:benchpw:1000000 >"$W/sim.out" 2>&1 &
SIM=$!
MODE=enforce DUR_=async
case "$SCENARIO" in
    passthrough) MODE=passthrough ;;
    sync) DUR_=sync ;;
    async | getcredits) ;;
    *) echo "unknown scenario $SCENARIO" >&2; exit 2 ;;
esac
cp "$HERE/tariffs.yaml" "$W/conf/"
sed -e "s|@MODE@|$MODE|" -e "s|@DURABILITY@|$DUR_|" -e "s|@THREADS@|${THREADS:-1}|" \
    -e "s|@LISTEN@|127.0.0.1:$P|" -e "s|@ADMIN@|127.0.0.1:$A|" -e "s|@UPSTREAM@|127.0.0.1:$SIMP|" \
    -e "s|@STORE_YAML@|store: { path: ../var/tollgate.db, batch_age_max_ms: 2 }|" \
    "$HERE/tollgate.yaml.tmpl" >"$W/conf/tollgate.yaml"
[ -z "${EXTRA_YAML:-}" ] || printf '%s\n' "$EXTRA_YAML" >>"$W/conf/tollgate.yaml"
echo benchpw | RUST_LOG=warn "$BIN/tollgate" accounts -c "$W/conf/tollgate.yaml" add bench --anytime 1000000000000 >/dev/null
cd "$W"
RUST_LOG=warn valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$W/cg.out" \
    "$BIN/tollgate" run -c "$W/conf/tollgate.yaml" >"$W/tg.out" 2>&1 &
TG=$!
trap 'kill $TG $SIM 2>/dev/null || true' EXIT
for _ in $(seq 1 300); do (exec 3<>"/dev/tcp/127.0.0.1/$P") 2>/dev/null && break; sleep 0.2; done
PATHQ="/api?action=sendmessage&username=bench&password=benchpw&recipient=RCPT&messagetype=SMS:TEXT&messagedata=Hello+from+the+tollgate+benchmark"
[ "$SCENARIO" = getcredits ] && PATHQ="/api?action=getcredits&username=bench&password=benchpw"
HDR=()
[ "$CONN" = close ] && HDR=(-H "Connection: close")
wrk -t1 -c"$CONNS" -d3s "${HDR[@]}" -s "$HERE/requests.lua" "http://127.0.0.1:$P" -- "$PATHQ" >/dev/null 2>&1 || true
sleep 1
callgrind_control -i on $TG >/dev/null
wrk -t1 -c"$CONNS" -d"${DUR:-10s}" "${HDR[@]}" -s "$HERE/requests.lua" "http://127.0.0.1:$P" -- "$PATHQ" >"$W/wrk.txt" 2>&1 || true
sleep 1
callgrind_control -i off $TG >/dev/null
callgrind_control -d $TG >/dev/null
REQ=$(awk '/requests in/{print $1}' "$W/wrk.txt")
OUT=$(curl -s "http://127.0.0.1:$A/metrics" | awk '/^tollgate_requests_total\{/ && $NF > 0 {
    match($0, /outcome="[^"]*"/); printf "%s%s=%d", sep, substr($0, RSTART+9, RLENGTH-10), $NF; sep=" " }')
kill $TG; wait $TG 2>/dev/null || true; kill $SIM; wait $SIM 2>/dev/null || true
TOT=$(callgrind_annotate "$W/cg.out.1" 2>/dev/null | awk '/PROGRAM TOTALS/{v=$1; gsub(",","",v); print v}')
echo "scenario=$SCENARIO conn=$CONN requests=$REQ Ir=$TOT Ir/request=$((TOT / REQ)) outcomes: $OUT profile=$W/cg.out.1"
