#!/usr/bin/env bash
# Instructions per send under callgrind, for the delivery-report round trip
# (scenarios 6a/6b of run.sh): valid on a busy machine, where the CPU times
# of run.sh are not.
#
#   benches/e2e/callgrind-dlr.sh [accept | delivery | none] [BIN_DIR]
#
# Starts ozeki-sim and tollgate (under `valgrind --tool=callgrind
# --instr-atstart=no`) as run.sh's 6a (accept), 6b (delivery) or 4a (none)
# does: `dlr.request: always`, ozeki-sim reporting every message delivered
# on a fresh connection. A wrk warm-up, 3 s for its reports to drain, then
# collection on for DUR (20s) of wrk -c16 and 3 s more for the measured
# sends' reports, collection off. Prints Ir per send; the profile stays in
# the printed directory (callgrind_annotate --inclusive=yes cg.out.1).
# Needs valgrind, wrk, curl.
set -euo pipefail
CHARGE=${1:-accept}
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
BIN=${2:-$HERE/../../target/release}
W="$(mktemp -d "${TMPDIR:-/tmp}/tollgate-callgrind.XXXXXX")"
mkdir -p "$W/conf" "$W/var"
SIMP=$((20000 + RANDOM % 10000)); P=$((SIMP + 1)); A=$((SIMP + 2)); D=$((SIMP + 3))
"$BIN/ozeki-sim" --listen "127.0.0.1:$SIMP" --no-record --threads 1 --user bench:benchpw:1000000 >"$W/sim.out" 2>&1 &
SIM=$!
cp "$HERE/tariffs.yaml" "$W/conf/"
sed -e "s|@MODE@|enforce|" -e "s|@DURABILITY@|async|" -e "s|@THREADS@|1|" \
    -e "s|@LISTEN@|127.0.0.1:$P|" -e "s|@ADMIN@|127.0.0.1:$A|" -e "s|@UPSTREAM@|127.0.0.1:$SIMP|" \
    -e "s|@STORE_YAML@|store: { path: ../var/tollgate.db, batch_age_max_ms: 2 }|" \
    "$HERE/tollgate.yaml.tmpl" >"$W/conf/tollgate.yaml"
if [ "$CHARGE" != none ]; then
    printf 'dlr: { enabled: true, listen: 127.0.0.1:%s, request: always, charge_on: { default: %s } }\n' \
        "$D" "$CHARGE" >>"$W/conf/tollgate.yaml"
fi
echo benchpw | RUST_LOG=warn "$BIN/tollgate" accounts -c "$W/conf/tollgate.yaml" add bench --anytime 1000000000000 >/dev/null
cd "$W"
RUST_LOG=warn valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$W/cg.out" \
    "$BIN/tollgate" run -c "$W/conf/tollgate.yaml" >"$W/tg.out" 2>&1 &
TG=$!
trap 'kill $TG $SIM 2>/dev/null || true' EXIT
for _ in $(seq 1 300); do (exec 3<>"/dev/tcp/127.0.0.1/$P") 2>/dev/null && break; sleep 0.2; done
PATHQ="/api?action=sendmessage&username=bench&password=benchpw&recipient=RCPT&messagetype=SMS:TEXT&messagedata=Hello+from+the+tollgate+benchmark"
reports() { curl -s "http://127.0.0.1:$A/metrics" | awk '/^tollgate_dlr_reports_total\{/{s+=$NF} END{print s+0}'; }
wrk -t1 -c16 -d3s -s "$HERE/requests.lua" "http://127.0.0.1:$P" -- "$PATHQ" >/dev/null 2>&1 || true
sleep 3
R0=$(reports)
callgrind_control -i on $TG >/dev/null
wrk -t1 -c16 -d"${DUR:-20s}" -s "$HERE/requests.lua" "http://127.0.0.1:$P" -- "$PATHQ" >"$W/wrk.txt" 2>&1 || true
sleep 3
callgrind_control -i off $TG >/dev/null
R1=$(reports)
callgrind_control -d $TG >/dev/null
REQ=$(awk '/requests in/{print $1}' "$W/wrk.txt")
kill $TG; wait $TG 2>/dev/null || true; kill $SIM; wait $SIM 2>/dev/null || true
TOT=$(callgrind_annotate "$W/cg.out.1" 2>/dev/null | awk '/PROGRAM TOTALS/{v=$1; gsub(",","",v); print v}')
echo "charge_on=$CHARGE sends=$REQ reports=$((R1 - R0)) Ir=$TOT Ir/send=$((TOT / REQ)) profile=$W/cg.out.1"
