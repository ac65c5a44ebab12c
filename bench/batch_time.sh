#!/usr/bin/env bash
# Benchmark: how close adaptive batches come to their batch_time (500 ms) on
# PostgreSQL. One `infill run` with the default adaptive batches (no
# --batch-size) over a fresh ROWS-row table; the figures come from the run's
# audit log.
#
#   bench/batch_time.sh                               # 1,000,000 rows, plain update
#   ROWS=100000 bench/batch_time.sh                   # quick run
#   EXPR="a * 31 + b + get_byte(sha512(repeat(md5(id::text), 400)::bytea), 0)" bench/batch_time.sh
#                                                     # about 33 us more per row
#
# Knobs (environment):
#   ROWS        rows in the table                        (default 1000000)
#   EXPR        the update: action.update.c = EXPR        (default a * 31 + b)
#   BATCH_TIME  batch_time in the spec                    (default 500ms)
#   MAX_BATCH   max_batch in the spec; empty: not written (default empty, engine default)
#   OUT         raw results file                          (default bench/results/batch_time.txt)
#   PGHOST PGPORT PGUSER   the server                     (default 127.0.0.1 5432 postgres)
#
# The accuracy figures leave out the first 3 batches (warm-up: the size
# starts at 1,000 keys and at most doubles per batch); they are printed
# separately. The database is dropped at the end. See bench/README.md.
set -euo pipefail
shopt -s inherit_errexit

ROWS=${ROWS:-1000000}
EXPR=${EXPR:-a * 31 + b}
BATCH_TIME=${BATCH_TIME:-500ms}
MAX_BATCH=${MAX_BATCH:-}
export PGHOST=${PGHOST:-127.0.0.1}
export PGPORT=${PGPORT:-5432}
export PGUSER=${PGUSER:-postgres}
export PGOPTIONS="${PGOPTIONS:-} -c client_min_messages=warning"
DB=infill_bench_batch_time
WARMUP=3

cd "$(dirname "$0")/.."
ROOT=$(pwd)
OUT=${OUT:-$ROOT/bench/results/batch_time.txt}
BIN=${BIN:-}   # set: use that binary, build nothing

log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { printf 'bench: FAILED: %s\n' "$*" >&2; exit 1; }

[[ $ROWS =~ ^[1-9][0-9]*$ ]] || die "ROWS must be a positive integer (got '$ROWS')"
[[ $BATCH_TIME =~ ^[1-9][0-9]*ms$ ]] || die "BATCH_TIME must be like 500ms (got '$BATCH_TIME')"
[[ -z $MAX_BATCH || $MAX_BATCH =~ ^[1-9][0-9]*$ ]] || die "MAX_BATCH must be empty or a positive integer (got '$MAX_BATCH')"
command -v psql >/dev/null || die "psql is not installed"
command -v python3 >/dev/null || die "python3 is not installed"

psql_admin() { psql -X -q -v ON_ERROR_STOP=1 -d postgres "$@"; }
psql_db() { psql -X -q -v ON_ERROR_STOP=1 -d "$DB" "$@"; }
scalar() { psql_db -At -c "$1"; }

WORK=$(mktemp -d "${TMPDIR:-/tmp}/infill-batch-time.XXXXXX")
log "work dir (spec, audit log, raw outputs): $WORK"

# --- build ---------------------------------------------------------------
REV=$(git describe --always --dirty 2>/dev/null || echo unknown)
if [[ -n $BIN ]]; then
  [[ -x $BIN ]] || die "BIN=$BIN is not executable"
  REV="binary $BIN (checkout $REV)"
  log "using BIN=$BIN (no build)"
else
  log "cargo build --release (source $REV)"
  cargo build --release >&2
  BIN=$ROOT/target/release/infill
fi
[[ -x $BIN ]] || die "no binary at $BIN"

# --- database and table (dropped on exit) --------------------------------
drop_db() { psql_admin -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null 2>&1 || true; }
trap drop_db EXIT
log "creating database $DB with t_batch ($ROWS rows)"
psql_admin -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)"
psql_admin -c "CREATE DATABASE $DB"
psql_db <<SQL
CREATE TABLE t_batch (id bigint PRIMARY KEY, a int NOT NULL, b int NOT NULL, c bigint);
INSERT INTO t_batch (id, a, b, c)
  SELECT i, (i % 1000)::int, ((i * 7919) % 100003)::int, NULL
  FROM generate_series(1::bigint, $ROWS::bigint) AS s(i);
VACUUM ANALYZE t_batch;
SQL
[[ $(scalar "SELECT count(*) FROM t_batch WHERE c IS NULL") == "$ROWS" ]] || die "t_batch was not loaded"

EXTRA=""
[[ -n $MAX_BATCH ]] && EXTRA="max_batch = $MAX_BATCH"
cat > "$WORK/batch_time.toml" <<TOML
[databases]
target = "postgres://$PGUSER@$PGHOST:$PGPORT/$DB"

[jobs.fill]
source.table = "t_batch"
source.key = ["id"]
source.where = "c IS NULL"
action.update.c = "$EXPR"
batch_time = "$BATCH_TIME"
$EXTRA
TOML

# --- the run -------------------------------------------------------------
psql_db -c CHECKPOINT >/dev/null
log "infill run (adaptive batches, batch_time = \"$BATCH_TIME\"${MAX_BATCH:+, max_batch = $MAX_BATCH})"
t0=$(date +%s.%N)
rc=0
"$BIN" run "$WORK/batch_time.toml" --yes --json > "$WORK/run.json" 2> "$WORK/run.err" || rc=$?
t1=$(date +%s.%N)
[[ $rc == 0 ]] || { cat "$WORK/run.err" >&2; die "infill run exited with $rc (stderr above, output in $WORK/run.json)"; }
python3 - "$WORK/run.json" "$ROWS" <<'PY' || die "unexpected infill summary in $WORK/run.json"
import json, sys
s = json.load(open(sys.argv[1]))
assert s["status"] == "succeeded", s
assert s["rows_changed"] == int(sys.argv[2]), s
PY
bad=$(scalar "SELECT count(*) FROM t_batch WHERE c IS DISTINCT FROM ($EXPR)")
[[ $bad == 0 ]] || die "infill left $bad rows where c IS DISTINCT FROM ($EXPR)"

# --- report --------------------------------------------------------------
mkdir -p "$(dirname "$OUT")"
python3 - "$WORK/run.json" "$BATCH_TIME" "$WARMUP" "$t0" "$t1" "$ROWS" "${MAX_BATCH:-20000}" "${MAX_BATCH:+set in the spec}" "$EXPR" "$WORK/batches.txt" > "$WORK/report.txt" <<'PY'
import json, statistics, sys
summary = json.load(open(sys.argv[1]))
target = int(sys.argv[2][:-2])
warmup, wall, rows, max_batch = int(sys.argv[3]), float(sys.argv[5]) - float(sys.argv[4]), int(sys.argv[6]), sys.argv[7]
expr, raw = sys.argv[9], sys.argv[10]
max_label = "%s, %s" % (max_batch, sys.argv[8] or "the engine default")
max_batch = int(max_batch)
lines = [json.loads(l) for l in open(summary["audit_log"])]
batches = [l for l in lines if l.get("event") == "batch"]
assert batches, "no batch lines in the audit log"

def pct(xs, q):  # nearest rank
    xs = sorted(xs)
    return xs[max(0, min(len(xs) - 1, -(-int(q * 100) * len(xs) // 100) - 1))]

lo, hi = 0.8 * target, 1.2 * target
warm, rest = batches[:warmup], batches[warmup:]
with open(raw, "w") as f:
    f.write("per batch (batch_no, keys asked, rows read, duration_ms):\n")
    for b in batches:
        f.write("  %d %d %d %d\n" % (b["batch_no"], b["batch_size"], b["rows_read"], b["duration_ms"]))
print("rows=%d batch_time=%dms max_batch=%s update: c = %s (adaptive batches, no --batch-size)" % (rows, target, max_label, expr))
print("run: %d batches, %.2f s wall clock (process), %d ms in the run, %.0f rows/s" % (
    len(batches), wall, summary["duration_ms"], rows / wall))
print("warm-up (first %d, left out): %s" % (len(warm), ", ".join(
    "%d keys %d ms" % (b["batch_size"], b["duration_ms"]) for b in warm)))
if not rest:
    print()
    print("NOT ENOUGH BATCHES: the run had only %d batches, all warm-up; no accuracy figure." % len(batches))
    sys.exit(0)
d = [b["duration_ms"] for b in rest]
sizes = [b["batch_size"] for b in rest]
within = sum(1 for x in d if lo <= x <= hi)
last = rest[-1]
print("after warm-up: %d batches" % len(rest))
print("  duration_ms: median %s, p95 %s, min %d, max %d" % (statistics.median(d), pct(d, 0.95), min(d), max(d)))
print("  within +-20%% of %d ms (%d..%d ms): %d of %d = %.0f%%" % (target, lo, hi, within, len(d), 100.0 * within / len(d)))
print("  batch_size (keys): min %d, median %d, max %d" % (min(sizes), statistics.median(sizes), max(sizes)))
print("  last batch: %d keys asked, %d rows read, %d ms (the table's end)" % (last["batch_size"], last["rows_read"], last["duration_ms"]))
at_max = sum(1 for s in sizes if s == max(sizes))
print()
med = statistics.median(d)
if lo <= med <= hi:
    print("verdict: the batches reach their target: median %s ms against %d ms." % (med, target))
else:
    print("verdict: TARGET NOT REACHED: median %s ms against %d ms." % (med, target))
    if med < lo and max(sizes) >= max_batch:
        print("  %d of %d batches after warm-up asked for max_batch = %d keys and still took under %d ms:" % (at_max, len(sizes), max_batch, lo))
        print("  the size is capped by max_batch (%s), so this update is too cheap per row" % max_label)
        print("  for batches of %d ms on this table." % target)
    if len(rest) < 10:
        print("  Only %d batches after warm-up: too few for an accuracy figure." % len(rest))
PY
{
  echo "# infill batch-time bench, $(date -u +%Y-%m-%dT%H:%M:%SZ), $(nproc) cores, $(psql_db -At -c 'SHOW server_version'), infill source $REV"
  echo "# command: ROWS=$ROWS EXPR='$EXPR' BATCH_TIME=$BATCH_TIME MAX_BATCH=$MAX_BATCH bench/batch_time.sh"
  cat "$WORK/batches.txt"
  echo
  cat "$WORK/report.txt"
} > "$OUT"
echo
cat "$WORK/report.txt"
log "raw results written to $OUT; spec and audit log kept in $WORK; dropping $DB"
