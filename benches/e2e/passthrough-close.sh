#!/usr/bin/env bash
# Reproducer (issue 17): tollgate in `mode: passthrough` counts
# `upstream_error` outcomes that are clients closing their connection with a
# request in flight, at the end of a load-generator run.
#
#   benches/e2e/passthrough-close.sh     (uses target/release/{tollgate,ozeki-sim})
#
# Against one tollgate passthrough (RUST_LOG=warn) in front of ozeki-sim,
# three kinds of run, RUNS times each, and after every run the delta of
# tollgate_requests_total and of pingora's "Fail to proxy" error lines:
#   wrk        closed loop, -c CONNECTIONS; wrk stops at its deadline and
#              closes every connection, answered or not
#   oha-abort  open loop at RATE req/s (oha -z, no -w): requests in flight
#              at the deadline are aborted (oha counts them as "aborted due
#              to deadline") and their connections dropped
#   oha-wait   the same with -w: oha waits for the answers in flight, then
#              closes idle connections only
# Clients going away are `client_closed`, never `upstream_error` (this
# script was first written when they were counted as upstream errors):
# upstream_error stays 0 in every run, oha-wait has no client_closed
# either, and for oha-abort the books balance: aborted = client_closed (the
# client left before tollgate wrote the answer's header) + forwarded −
# answers (tollgate wrote the answer, the client was no longer reading).
# Nothing here depends on the upstream failing.
#
# Knobs: RUNS (3), DURATION (3s), CONNECTIONS (64), RATE (10000), OHA
# (target/tools/bin/oha, as installed by latency.sh), BIN_DIR.
set -euo pipefail

BENCH=pt-close   # short: the upgrade socket path under $TMPDIR must stay < 100 bytes
RUNS="${RUNS:-3}"
DURATION="${DURATION:-3s}"
CONNECTIONS="${CONNECTIONS:-64}"
RATE="${RATE:-10000}"
# shellcheck source=benches/e2e/common.sh
. "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/common.sh"
OHA="${OHA:-$ROOT/target/tools/bin/oha}"

bench_install
command -v jq >/dev/null || apt_install jq
[ -x "$OHA" ] || die "$OHA missing: run benches/e2e/latency.sh once (it installs oha) or set OHA"
bench_init
start_sim
start_tollgate passthrough async
URL="http://$TARGET/api?action=sendmessage&username=bench&password=benchpw&recipient=%2B36201234567&messagetype=SMS:TEXT&messagedata=Hello"

count() { # outcome → tollgate_requests_total{outcome=...} summed
    curl -s "http://$TG_ADMIN/metrics" |
        awk -v o="outcome=\"$1\"" 'index($0, "tollgate_requests_total{") == 1 && index($0, o) { n += $NF } END{print n+0}'
}
fails() { grep -c "Fail to proxy" "$TG_DIR/stderr" || true; }

printf '%-10s %3s  %10s  %14s  %13s  %14s  %s\n' run "#" forwarded upstream_error client_closed "Fail to proxy" "generator says" >&2
for kind in wrk oha-abort oha-wait; do
    for i in $(seq 1 "$RUNS"); do
        f0="$(count forwarded)" u0="$(count upstream_error)" c0="$(count client_closed)" l0="$(fails)"
        case "$kind" in
            wrk)
                says="$(wrk -t1 -c"$CONNECTIONS" -d"$DURATION" "$URL" 2>&1 |
                    awk '/requests in/{r=$1} /Socket errors/{e=$0} END{print r " answers" (e ? ", " e : ", no socket errors")}')" ;;
            oha-abort | oha-wait)
                wflag=()
                [ "$kind" = oha-wait ] && wflag=(-w)
                timeout 60 "$OHA" --no-tui --output-format json -z "$DURATION" -q "$RATE" \
                    --latency-correction "${wflag[@]}" -c "$CONNECTIONS" --worker-threads 1 "$URL" \
                    >"$WORK/oha.json" 2>/dev/null
                says="$(jq -r '"\([.statusCodeDistribution[]] | add // 0) answers; errors: " +
                    ((.errorDistribution | to_entries | map("\(.key)=\(.value)") | join(", ")) | if . == "" then "none" else . end)' "$WORK/oha.json")" ;;
        esac
        sleep 0.5   # let tollgate log the requests the client left
        printf '%-10s %3s  %10s  %14s  %13s  %14s  %s\n' "$kind" "$i" \
            $(($(count forwarded) - f0)) $(($(count upstream_error) - u0)) \
            $(($(count client_closed) - c0)) $(($(fails) - l0)) "$says" >&2
    done
done

echo >&2
echo "pingora's error lines, by what they say (URL and peer cut off):" >&2
grep "Fail to proxy" "$TG_DIR/stderr" |
    sed -E 's/.*Fail to proxy: //; s/, status: ([0-9]+).*/ (status \1)/; s/ context: Peer: .* context: / — /' |
    sort | uniq -c | sort -rn >&2
