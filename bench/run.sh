#!/usr/bin/env bash
# Benchmark: one set-based UPDATE against `infill run` on PostgreSQL.
#
#   bench/run.sh                      # 1,000,000 rows, 3 repetitions
#   ROWS=100000 bench/run.sh          # quick run
#
# Knobs (environment):
#   ROWS        rows in the table                       (default 1000000)
#   REPEAT      repetitions of each contender           (default 3)
#   BATCH_SIZE  infill --batch-size, or `auto` for the   (default 1000)
#               default adaptive batches (batch_time 500ms)
#   UNDO        keep undo images (true/false)           (default true)
#   OUT         raw results file                        (default bench/results/latest.txt)
#   PGHOST PGPORT PGUSER   the server                   (default 127.0.0.1 5432 postgres)
#
# Each repetition makes two fresh, identical copies of bench_base (t_single,
# t_infill), then times the contenders one after the other; the order
# alternates between repetitions. See bench/README.md.
set -euo pipefail
shopt -s inherit_errexit

ROWS=${ROWS:-1000000}
REPEAT=${REPEAT:-3}
BATCH_SIZE=${BATCH_SIZE:-1000}
UNDO=${UNDO:-true}
export PGHOST=${PGHOST:-127.0.0.1}
export PGPORT=${PGPORT:-5432}
export PGUSER=${PGUSER:-postgres}
export PGOPTIONS="${PGOPTIONS:-} -c client_min_messages=warning"
DB=infill_bench

cd "$(dirname "$0")/.."
ROOT=$(pwd)
OUT=${OUT:-$ROOT/bench/results/latest.txt}
BIN=$ROOT/target/release/infill

log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { printf 'bench: FAILED: %s\n' "$*" >&2; exit 1; }

[[ $ROWS =~ ^[1-9][0-9]*$ ]] || die "ROWS must be a positive integer (got '$ROWS')"
[[ $REPEAT =~ ^[1-9][0-9]*$ ]] || die "REPEAT must be a positive integer (got '$REPEAT')"
[[ $BATCH_SIZE =~ ^[1-9][0-9]*$ || $BATCH_SIZE == auto ]] || die "BATCH_SIZE must be a positive integer or auto (got '$BATCH_SIZE')"
SIZE_ARGS=(--batch-size "$BATCH_SIZE")
[[ $BATCH_SIZE == auto ]] && SIZE_ARGS=()
[[ $UNDO == true || $UNDO == false ]] || die "UNDO must be true or false (got '$UNDO')"
command -v psql >/dev/null || die "psql is not installed"
command -v python3 >/dev/null || die "python3 is not installed"

psql_admin() { psql -X -q -v ON_ERROR_STOP=1 -d postgres "$@"; }
psql_db() { psql -X -q -v ON_ERROR_STOP=1 -d "$DB" "$@"; }
scalar() { psql_db -At -c "$1"; }

WORK=$(mktemp -d "${TMPDIR:-/tmp}/infill-bench.XXXXXX")
log "work dir (spec, audit logs, raw outputs): $WORK"

# --- peak RSS: GNU time when present, else a python3 wrapper -------------
if command -v /usr/bin/time >/dev/null && /usr/bin/time -f %M -o "$WORK/probe" true 2>/dev/null; then
  RSS_TOOL="GNU time (/usr/bin/time -f %M)"
  measure_rss() { local out=$1; shift; /usr/bin/time -f %M -o "$out" "$@"; }
else
  RSS_TOOL="python3 resource.getrusage(RUSAGE_CHILDREN).ru_maxrss"
  measure_rss() {
    local out=$1; shift
    python3 -c '
import resource, subprocess, sys
rc = subprocess.call(sys.argv[2:])
with open(sys.argv[1], "w") as f:
    f.write("%d\n" % resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
sys.exit(rc)' "$out" "$@"
  }
fi

# --- build ---------------------------------------------------------------
# The source version benchmarked, taken before the build ("-dirty": local changes).
REV=$(git describe --always --dirty 2>/dev/null || echo unknown)
log "cargo build --release (source $REV)"
cargo build --release >&2
[[ -x $BIN ]] || die "no binary at $BIN"

# --- database and base table ---------------------------------------------
log "creating database $DB with bench_base ($ROWS rows)"
psql_admin -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)"
psql_admin -c "CREATE DATABASE $DB"
psql_db <<SQL
CREATE TABLE bench_base (id bigint PRIMARY KEY, a int NOT NULL, b int NOT NULL, c bigint);
INSERT INTO bench_base (id, a, b, c)
  SELECT i, (i % 1000)::int, ((i * 7919) % 100003)::int, NULL
  FROM generate_series(1::bigint, $ROWS::bigint) AS s(i);
VACUUM ANALYZE bench_base;
SQL
[[ $(scalar "SELECT count(*) FROM bench_base WHERE c IS NULL") == "$ROWS" ]] || die "bench_base was not loaded"

cat > "$WORK/bench.toml" <<TOML
[databases]
target = "postgres://$PGUSER@$PGHOST:$PGPORT/$DB"

[jobs.fill]
source.table = "t_infill"
source.key = ["id"]
source.where = "c IS NULL"
action.update.c = "a * 31 + b"
undo = $UNDO
TOML

copy_table() {
  psql_db -c "DROP TABLE IF EXISTS $1" \
          -c "CREATE TABLE $1 AS SELECT * FROM bench_base" \
          -c "ALTER TABLE $1 ADD PRIMARY KEY (id)" \
          -c "VACUUM ANALYZE $1"
}

# --- contenders ------------------------------------------------------------
run_single() { # prints seconds
  local out=$WORK/single.$1.out
  psql_db -c CHECKPOINT >/dev/null
  psql_db > "$out" <<'SQL'
\timing on
UPDATE t_single SET c = a * 31 + b WHERE c IS NULL;
SQL
  local ms
  ms=$(sed -n 's/^Time: \([0-9.]*\) ms.*/\1/p' "$out" | tail -1)
  [[ -n $ms ]] || die "no timing in $out"
  local bad
  bad=$(scalar "SELECT count(*) FROM t_single WHERE c IS DISTINCT FROM a * 31 + b")
  [[ $bad == 0 ]] || die "single UPDATE left $bad wrong rows"
  python3 -c "print('%.3f' % ($ms / 1000))"
}

run_infill() { # prints "seconds rss_kib"
  local rep=$1 json=$WORK/infill.$1.json err=$WORK/infill.$1.err rss=$WORK/infill.$1.rss
  # Each run starts from empty state tables, like a first run on a database.
  psql_db -c "DROP TABLE IF EXISTS infill_undo, infill_batches, infill_runs, infill_schema" >/dev/null 2>&1
  psql_db -c CHECKPOINT >/dev/null
  local t0 t1 rc=0
  t0=$(date +%s.%N)
  measure_rss "$rss" "$BIN" run "$WORK/bench.toml" "${SIZE_ARGS[@]}" --yes --json > "$json" 2> "$err" || rc=$?
  t1=$(date +%s.%N)
  [[ $rc == 0 ]] || { cat "$err" >&2; die "infill run exited with $rc (stderr above, output in $json)"; }
  python3 - "$json" "$ROWS" <<'PY' || die "unexpected infill summary in $json"
import json, sys
s = json.load(open(sys.argv[1]))
assert s["status"] == "succeeded", s
assert s["rows_changed"] == int(sys.argv[2]), s
PY
  local bad
  bad=$(scalar "SELECT count(*) FROM t_infill WHERE c IS DISTINCT FROM a * 31 + b")
  [[ $bad == 0 ]] || die "infill left $bad rows where c IS DISTINCT FROM a * 31 + b"
  echo "$(python3 -c "print('%.3f' % ($t1 - $t0))") $(tail -1 "$rss")"
}

# Per-batch timings from the run's audit log (batch duration_ms covers the
# batch transaction from BEGIN to COMMIT; the rest of the wall time is the
# boundary query per batch, startup, validation and the state tables).
batch_stats() {
  python3 - "$1" <<'PY'
import json, statistics, sys
summary = json.load(open(sys.argv[1]))
d = [json.loads(l)["duration_ms"] for l in open(summary["audit_log"]) if '"event":"batch"' in l]
d.sort()
p = lambda q: d[min(len(d) - 1, int(q * len(d)))]
print("batches=%d sum_batch_ms=%d run_duration_ms=%d batch_ms_median=%s p95=%s max=%s" % (
    len(d), sum(d), summary["duration_ms"], statistics.median(d), p(0.95), d[-1]))
PY
}

single_s=() infill_s=() infill_rss=()
raw=$WORK/raw.txt
: > "$raw"
for rep in $(seq 1 "$REPEAT"); do
  log "repetition $rep/$REPEAT: fresh copies t_single, t_infill"
  copy_table t_single
  copy_table t_infill
  if (( rep % 2 )); then order="single infill"; else order="infill single"; fi
  for who in $order; do
    if [[ $who == single ]]; then
      s=$(run_single "$rep")
      single_s+=("$s")
      log "  single UPDATE: ${s}s"
      echo "rep=$rep contender=single seconds=$s" >> "$raw"
    else
      r=$(run_infill "$rep")
      read -r s k <<< "$r"
      infill_s+=("$s")
      infill_rss+=("$k")
      stats=$(batch_stats "$WORK/infill.$rep.json")
      log "  infill run: ${s}s, peak RSS ${k} KiB; $stats"
      echo "rep=$rep contender=infill seconds=$s peak_rss_kib=$k $stats" >> "$raw"
    fi
  done
done

# --- report ------------------------------------------------------------------
mkdir -p "$(dirname "$OUT")"
python3 - "$ROWS" "$REPEAT" "$BATCH_SIZE" "$RSS_TOOL" "$raw" "${single_s[*]}" "${infill_s[*]}" "${infill_rss[*]}" > "$WORK/report.txt" <<'PY'
import statistics, sys
rows, repeat, bs, tool, raw = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
single = [float(x) for x in sys.argv[6].split()]
infill = [float(x) for x in sys.argv[7].split()]
rss = [int(x) for x in sys.argv[8].split()]
ms, mi = statistics.median(single), statistics.median(infill)
ratio = ms / mi  # throughput ratio: (rows/s infill) / (rows/s single)
peak = max(rss) / 1024
print("rows=%d repeat=%d batch_size=%s (medians of %d interleaved runs; order alternates)" % (rows, repeat, bs, repeat))
print()
print("%-28s %10s %12s %14s %16s" % ("contender", "seconds", "rows/s", "ratio vs single", "peak RSS MiB"))
print("%-28s %10.2f %12.0f %14s %16s" % ("single UPDATE (psql)", ms, rows / ms, "1.00", "-"))
label = "infill run (adaptive)" if bs == "auto" else "infill run --batch-size " + bs
print("%-28s %10.2f %12.0f %14.3f %16.1f" % (label, mi, rows / mi, ratio, peak))
print()
print("goals: ratio >= 0.80 -> %s;  peak RSS < 64 MiB -> %s" % ("met" if ratio >= 0.80 else "NOT met", "met" if peak < 64 else "NOT met"))
print()
print("raw (seconds; infill peak RSS via %s):" % tool)
print("  single:", " ".join("%.3f" % x for x in single))
print("  infill:", " ".join("%.3f" % x for x in infill))
print("  infill peak RSS KiB:", " ".join(str(x) for x in rss), "(max %.1f MiB, median %.1f MiB)" % (peak, statistics.median(rss) / 1024))
print()
print(open(raw).read().rstrip())
PY
{
  echo "# infill bench, $(date -u +%Y-%m-%dT%H:%M:%SZ), $(nproc) cores, $(psql_db -At -c 'SHOW server_version'), infill source $REV"
  echo "# command: ROWS=$ROWS REPEAT=$REPEAT BATCH_SIZE=$BATCH_SIZE UNDO=$UNDO bench/run.sh"
  cat "$WORK/report.txt"
} > "$OUT"
cat "$OUT"
log "raw results written to $OUT; spec and audit logs kept in $WORK"
