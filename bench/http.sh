#!/usr/bin/env bash
# Benchmarks for action.http (issue 6), against a local receiver
# (examples/http_receiver.rs, answers 200 to everything):
#   1. events per second with checkpointing, at concurrency 64, against the
#      same replay at concurrency 8 and 1 (the baselines, same run);
#   2. the achieved rate against rate = "200/s" over RATE_SECONDS seconds.
# The source is a SQLite table; state goes to .infill/state.db as in use.
#
#   bench/http.sh                      # 100,000 events, 30 s at 200/s
#   EVENTS=20000 RATE_SECONDS=10 bench/http.sh    # quick
#
# Needs sqlite3, curl and python3; builds the release binary and receiver.
set -euo pipefail
shopt -s inherit_errexit

EVENTS=${EVENTS:-100000}
RATE_SECONDS=${RATE_SECONDS:-30}
PORT=${PORT:-18080}
cd "$(dirname "$0")/.."
# BIN=/path/to/infill and RECEIVER_BIN=/path/to/http_receiver: use them, build nothing.
if [[ -z ${BIN:-} || -z ${RECEIVER_BIN:-} ]]; then
  cargo build --release --quiet --bin infill --example http_receiver
fi
BIN=${BIN:-$(pwd)/target/release/infill}
RECEIVER_BIN=${RECEIVER_BIN:-$(pwd)/target/release/examples/http_receiver}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/infill-http.XXXXXX")
log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
"$RECEIVER_BIN" "$PORT" &
RECEIVER=$!
trap 'kill $RECEIVER 2>/dev/null || true; rm -rf "$WORK"' EXIT
for _ in $(seq 50); do curl -sf "http://127.0.0.1:$PORT/stats" >/dev/null && break; sleep 0.1; done

sqlite3 "$WORK/src.db" "CREATE TABLE sessions (id INTEGER PRIMARY KEY, user_id INTEGER NOT NULL, score INTEGER, kind TEXT NOT NULL);
WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < $EVENTS)
INSERT INTO sessions SELECT i, i % 977, i * 3, CASE WHEN i % 2 = 0 THEN 'run' ELSE 'walk' END FROM s;"

spec() { # name, concurrency, extra
  mkdir -p "$WORK/$1"
  cat > "$WORK/$1/infill.toml" <<TOML
[databases]
target = "sqlite://$WORK/src.db"

[jobs.replay]
source.table = "sessions"
source.key = "id"
action.http.url = "http://127.0.0.1:$PORT/hook"
action.http.body = '{"id": {{ row.id }}, "user": {{ row.user_id }}, "score": {{ row.score }}, "kind": {{ row.kind }}}'
concurrency = $2
$3
TOML
  echo "$WORK/$1/infill.toml"
}
stats() { curl -sf "http://127.0.0.1:$PORT/stats"; }
reset() { curl -sf -X POST "http://127.0.0.1:$PORT/reset" >/dev/null; }

echo "| concurrency | events | seconds | events/s | vs concurrency 1 |"
echo "|---|---|---|---|---|"
base=""
for c in 1 8 64; do
  n=$EVENTS
  [[ $c == 1 ]] && n=$(( EVENTS / 10 ))   # the slow baseline on a tenth, scaled
  reset
  s=$(spec "c$c" "$c" "")
  start=$(date +%s.%N)
  "$BIN" run "$s" --limit "$n" --yes --json > "$WORK/c$c.json"
  end=$(date +%s.%N)
  got=$(stats | python3 -c 'import json,sys; print(json.load(sys.stdin)["count"])')
  [[ $got == "$n" ]] || { echo "receiver got $got of $n events" >&2; exit 1; }
  rate=$(python3 -c "print(round($n / ($end - $start)))")
  [[ -z $base ]] && base=$rate
  ratio=$(python3 -c "print(round($rate / $base, 1))")
  echo "| $c | $n | $(python3 -c "print(round($end - $start, 2))") | $rate | ${ratio}x |"
done

n=$(( 200 * RATE_SECONDS ))
reset
s=$(spec rate 16 'rate = "200/s"')
"$BIN" run "$s" --limit "$n" --yes --json > "$WORK/rate.json"
stats | python3 -c "
import json, sys
s = json.load(sys.stdin)
span = (s['last_ms'] - s['first_ms']) / 1000
achieved = (s['count'] - 1) / span
print()
print('| rate asked | events | first to last (s) | achieved | error |')
print('|---|---|---|---|---|')
print(f\"| 200/s | {s['count']} | {span:.2f} | {achieved:.1f}/s | {100 * (achieved - 200) / 200:+.2f}% |\")
"
