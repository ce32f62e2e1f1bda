#!/usr/bin/env bash
# bench/profile.sh: where the server CPU of one variant goes under wrk load.
# Usage: bench/profile.sh [VARIANT] [MODE]   VARIANT: standalone | rr | rr-w1 | shared | reuseport
#        (cluster-cli, 2 workers) [rr]; MODE: close | keepalive [close]
# Environment: PORT [18481] DURATION [8] s of recorded load, CALLGRAPH [dwarf] (perf --call-graph).
# Starts target/release/cluster-cli (build it first), applies 1 s of warm-up load, records
# `perf record -g` over the master and every worker while wrk runs, prints the top symbols per
# process (master, workers) and the syscall counts per process (perf trace -s), then stops the
# server by PID. Output: bench/results/profile-<variant>-<mode>-<time>/.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
VARIANT=${1:-rr}
MODE=${2:-close}
PORT=${PORT:-18481}
DURATION=${DURATION:-8}
CALLGRAPH=${CALLGRAPH:-dwarf}
CLI="$ROOT/target/release/cluster-cli"
OUT="$HERE/results/profile-$VARIANT-$MODE-$(date -u +%Y%m%dT%H%M%SZ)"
mkdir -p "$OUT"
[[ -n $(ss -Htln "sport = :$PORT") ]] && { echo "port $PORT in use" >&2; exit 1; }
case $VARIANT in
  standalone) cmd=("$CLI" hello --host 127.0.0.1 --port "$PORT") ;;
  rr-w1) cmd=("$CLI" spawn -n 2 --port "$PORT" --policy rr --window 1) ;;
  rr | shared | reuseport) cmd=("$CLI" spawn -n 2 --port "$PORT" --policy "$VARIANT") ;;
  *) echo "unknown variant $VARIANT" >&2; exit 2 ;;
esac
hdr=()
[[ $MODE == close ]] && hdr=(-H 'Connection: close')
"${cmd[@]}" >"$OUT/server.log" 2>&1 &
SERVER=$!
trap 'kill -TERM $SERVER 2>/dev/null || true; wait $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 100); do curl -fsS -o /dev/null --max-time 1 "http://127.0.0.1:$PORT/" 2>/dev/null && break; sleep 0.05; done
sleep 0.2
pids=$SERVER
for c in $(cat /proc/$SERVER/task/*/children 2>/dev/null); do pids+=",$c"; done
echo "server pids: $pids (first = master/process)" | tee "$OUT/pids.txt"
timeout 20 wrk -t1 -c64 -d1s "${hdr[@]}" "http://127.0.0.1:$PORT/" >/dev/null
timeout $((DURATION + 20)) wrk -t1 -c64 -d$((DURATION + 2))s "${hdr[@]}" "http://127.0.0.1:$PORT/" >"$OUT/wrk.txt" &
WRK=$!
sleep 1
timeout $((DURATION + 10)) perf record -F 499 --call-graph "$CALLGRAPH" -o "$OUT/perf.data" -p "$pids" -- sleep "$DURATION" >"$OUT/perf-record.log" 2>&1 || true
wait $WRK || true
grep -E 'Requests/sec' "$OUT/wrk.txt"
timeout 20 wrk -t1 -c64 -d3s "${hdr[@]}" "http://127.0.0.1:$PORT/" >/dev/null &
WRK=$!
timeout 10 perf trace -s -p "$pids" -- sleep 2 >"$OUT/syscalls.txt" 2>&1 || true
wait $WRK || true
for p in ${pids//,/ }; do
  echo "== pid $p: top symbols (self) =="
  perf report -i "$OUT/perf.data" --pid "$p" --stdio --no-children --sort dso,sym -g none --percent-limit 1.5 2>/dev/null | grep -v '^#' | grep -v '^$' | head -30
done | tee "$OUT/top.txt"
perf report -i "$OUT/perf.data" --stdio --children --sort sym -g caller,0.5,callee --percent-limit 3 2>/dev/null >"$OUT/callgraph.txt" || true
echo "call graph: $OUT/callgraph.txt; syscalls: $OUT/syscalls.txt"
