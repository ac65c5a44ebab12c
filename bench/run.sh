#!/usr/bin/env bash
# Benchmark B1: one set-based UPDATE against `infill run` on PostgreSQL, and
# optionally a per-row loop (one autocommit UPDATE per row, as a hand-written
# script does it).
#
#   bench/run.sh                                  # 1,000,000 rows, 3 repetitions
#   ROWS=100000 bench/run.sh                      # quick run
#   BATCH_SIZE=auto LOOP_ROWS=100000 bench/run.sh # B1 as bench/suite.sh runs it
#
# Knobs (environment):
#   ROWS        rows in the table                       (default 1000000)
#   REPEAT      repetitions of each contender           (default 3)
#   BATCH_SIZE  infill --batch-size, or `auto` for the   (default 1000)
#               default adaptive batches (batch_time 500ms)
#   UNDO        keep undo images (true/false)           (default true)
#   SETTINGS    more job settings for infill, TOML lines (default empty)
#               separated by ';', e.g. 'busy_sleep_coef = 0'
#   LOOP_ROWS   rows of the per-row loop contender, run (default 0: no loop)
#               once on a table of its own, scaled to ROWS
#   SEED_LOOP   1: with LOOP_ROWS, also the loop as seed  (default 0)
#               001 writes it, in Python (bench/seedloop.py;
#               PYTHON must import psycopg)
#   PYTHON      the Python for SEED_LOOP                (default python3)
#   BIN         infill binary to use; set, nothing is built
#   OUT         report file                             (default bench/results/latest.txt)
#   VALUES      key=value results for bench/summary.py  (default: OUT with .values.txt)
#   KEEP_DB     1: keep the database infill_bench at the end (default: dropped)
#   PGHOST PGPORT PGUSER   the server                   (default 127.0.0.1 5432 postgres)
#
# Each repetition makes two fresh, identical copies of bench_base (t_single,
# t_infill), then times the contenders one after the other; the order
# alternates between repetitions. See bench/README.md.
source "$(dirname "$0")/lib.sh"

ROWS=${ROWS:-1000000}
REPEAT=${REPEAT:-3}
BATCH_SIZE=${BATCH_SIZE:-1000}
UNDO=${UNDO:-true}
LOOP_ROWS=${LOOP_ROWS:-0}
SEED_LOOP=${SEED_LOOP:-0}
PYTHON=${PYTHON:-python3}
KEEP_DB=${KEEP_DB:-0}
DB=infill_bench

cd "$BENCH_ROOT"
ROOT=$BENCH_ROOT
OUT=${OUT:-$ROOT/bench/results/latest.txt}
VALUES=${VALUES:-${OUT%.txt}.values.txt}

posint ROWS
posint REPEAT
[[ $BATCH_SIZE =~ ^[1-9][0-9]*$ || $BATCH_SIZE == auto ]] || die "BATCH_SIZE must be a positive integer or auto (got '$BATCH_SIZE')"
SIZE_ARGS=(--batch-size "$BATCH_SIZE")
[[ $BATCH_SIZE == auto ]] && SIZE_ARGS=()
[[ $UNDO == true || $UNDO == false ]] || die "UNDO must be true or false (got '$UNDO')"
[[ $LOOP_ROWS =~ ^[0-9]+$ ]] && (( LOOP_ROWS <= ROWS )) || die "LOOP_ROWS must be an integer from 0 to ROWS (got '$LOOP_ROWS')"
need psql python3
if [[ $SEED_LOOP == 1 ]]; then
  (( LOOP_ROWS > 0 )) || die "SEED_LOOP=1 needs LOOP_ROWS > 0"
  "$PYTHON" -c "import psycopg" 2>/dev/null ||
    die "SEED_LOOP=1: $PYTHON cannot import psycopg (python3 -m venv /tmp/pgvenv && /tmp/pgvenv/bin/pip install 'psycopg[binary]', then PYTHON=/tmp/pgvenv/bin/python)"
fi

psql_admin() { psql -X -q -v ON_ERROR_STOP=1 -d postgres "$@"; }
psql_db() { psql -X -q -v ON_ERROR_STOP=1 -d "$DB" "$@"; }
scalar() { psql_db -At -c "$1"; }

bench_workdir bench

# --- build (or BIN) --------------------------------------------------------
infill_bin

drop_db() { [[ $KEEP_DB == 1 ]] || psql_admin -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null 2>&1 || true; }
trap drop_db EXIT

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

IFS=';' read -ra EXTRA <<< "${SETTINGS:-}"
fill_spec "$WORK/bench.toml" "postgres://$PGUSER@$PGHOST:$PGPORT/$DB" t_infill "undo = $UNDO" "${EXTRA[@]}"

copy_table() { # name [where]
  psql_db -c "DROP TABLE IF EXISTS $1" \
          -c "CREATE TABLE $1 AS SELECT * FROM bench_base ${2:-}" \
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

run_infill_rep() { # prints "seconds rss_kib"
  # Each run starts from empty state tables, like a first run on a database.
  psql_db -c "DROP TABLE IF EXISTS infill_undo, infill_batches, infill_failures, infill_approvals, infill_runs, infill_schema" >/dev/null 2>&1
  psql_db -c CHECKPOINT >/dev/null
  local r bad
  r=$(run_infill "$WORK/bench.toml" "$WORK/infill.$1.json" "$ROWS" "${SIZE_ARGS[@]}")
  bad=$(scalar "SELECT count(*) FROM t_infill WHERE c IS DISTINCT FROM a * 31 + b")
  [[ $bad == 0 ]] || die "infill left $bad rows where c IS DISTINCT FROM a * 31 + b"
  echo "$r"
}

# The per-row loop, as a hand-written script does it: select the ids still
# to fill, then one UPDATE per row, each its own statement, round trip and
# commit (psql -f sends the statements one at a time, autocommit). Timed
# from the SELECT to the last commit. On a table of its own holding the first
# LOOP_ROWS rows of bench_base; prints seconds.
run_loop() {
  local ids=$WORK/loop.ids sql=$WORK/loop.sql t0 t1 n bad
  psql_db -c CHECKPOINT >/dev/null
  t0=$(now)
  psql_db -At -c "SELECT id FROM t_loop WHERE c IS NULL ORDER BY id" > "$ids"
  python3 -c '
import sys
out = sys.stdout
for line in open(sys.argv[1]):
    out.write("UPDATE t_loop SET c = a * 31 + b WHERE id = %d;\n" % int(line))' "$ids" > "$sql"
  psql_db -f "$sql" > "$WORK/loop.out"
  t1=$(now)
  n=$(wc -l < "$sql")
  [[ $n == "$LOOP_ROWS" ]] || die "per-row loop: $n statements, expected $LOOP_ROWS"
  bad=$(scalar "SELECT count(*) FROM t_loop WHERE c IS DISTINCT FROM a * 31 + b")
  [[ $bad == 0 ]] || die "per-row loop left $bad wrong rows"
  [[ $(scalar "SELECT count(*) FROM t_loop") == "$LOOP_ROWS" ]] || die "t_loop does not hold $LOOP_ROWS rows"
  elapsed "$t0" "$t1"
}

# The same loop as seed 001's Django command has it: the rows fetched into
# Python, each value computed there, one autocommit UPDATE per row and a
# progress line per row (bench/seedloop.py). Prints seconds.
run_seed_loop() {
  local t0 t1 bad
  psql_db -c CHECKPOINT >/dev/null
  t0=$(now)
  "$PYTHON" "$ROOT/bench/seedloop.py" "host=$PGHOST port=$PGPORT user=$PGUSER dbname=$DB" t_loop "$LOOP_ROWS" \
    > "$WORK/seedloop.out" 2> "$WORK/seedloop.err" || { cat "$WORK/seedloop.err" >&2; die "seed-shaped loop failed"; }
  t1=$(now)
  bad=$(scalar "SELECT count(*) FROM t_loop WHERE c IS DISTINCT FROM a * 31 + b")
  [[ $bad == 0 ]] || die "seed-shaped loop left $bad wrong rows"
  elapsed "$t0" "$t1"
}

single_s=() infill_s=() infill_rss=() loop_s="" seed_s=""
raw=$WORK/raw.txt
: > "$raw"
for rep in $(seq 1 "$REPEAT"); do
  log "repetition $rep/$REPEAT: fresh copies t_single, t_infill"
  copy_table t_single
  copy_table t_infill
  if (( rep % 2 )); then order="single infill"; else order="infill single"; fi
  if (( rep == 1 && LOOP_ROWS > 0 )); then
    order="loop $order"
    [[ $SEED_LOOP == 1 ]] && order="seed $order"
  fi
  for who in $order; do
    case $who in
      single)
        s=$(run_single "$rep")
        single_s+=("$s")
        log "  single UPDATE: ${s}s"
        echo "rep=$rep contender=single seconds=$s" >> "$raw"
        ;;
      infill)
        r=$(run_infill_rep "$rep")
        read -r s k <<< "$r"
        infill_s+=("$s")
        infill_rss+=("$k")
        stats=$(python3 "$ROOT/bench/stats.py" batches "$WORK/infill.$rep.json" | tr '\n' ' ')
        log "  infill run: ${s}s, peak RSS ${k} KiB; $stats"
        echo "rep=$rep contender=infill seconds=$s peak_rss_kib=$k run_duration_ms=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["duration_ms"])' "$WORK/infill.$rep.json") $stats" >> "$raw"
        ;;
      seed)
        copy_table t_loop "WHERE id <= $LOOP_ROWS"
        log "  seed-shaped loop (Python, psycopg) over $LOOP_ROWS rows..."
        seed_s=$(run_seed_loop)
        log "  seed-shaped loop: ${seed_s}s for $LOOP_ROWS rows"
        echo "rep=$rep contender=seedloop rows=$LOOP_ROWS seconds=$seed_s" >> "$raw"
        psql_db -c "DROP TABLE t_loop"
        ;;
      loop)
        copy_table t_loop "WHERE id <= $LOOP_ROWS"
        log "  per-row loop over $LOOP_ROWS rows (one autocommit UPDATE per row)..."
        loop_s=$(run_loop)
        log "  per-row loop: ${loop_s}s for $LOOP_ROWS rows"
        echo "rep=$rep contender=loop rows=$LOOP_ROWS seconds=$loop_s" >> "$raw"
        psql_db -c "DROP TABLE t_loop"
        ;;
    esac
  done
done
# Batch durations pooled over every infill run.
jsons=()
for rep in $(seq 1 "$REPEAT"); do jsons+=("$WORK/infill.$rep.json"); done
python3 "$ROOT/bench/stats.py" batches "${jsons[@]}" > "$WORK/batches.txt"

# --- report ------------------------------------------------------------------
mkdir -p "$(dirname "$OUT")"
: > "$VALUES"
python3 - "$ROWS" "$REPEAT" "$BATCH_SIZE" "$RSS_TOOL" "$raw" "${single_s[*]}" "${infill_s[*]}" "${infill_rss[*]}" \
    "$LOOP_ROWS" "$loop_s" "$WORK/batches.txt" "$VALUES" "$seed_s" > "$WORK/report.txt" <<'PY'
import statistics, sys
rows, repeat, bs, tool, raw = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
single = [float(x) for x in sys.argv[6].split()]
infill = [float(x) for x in sys.argv[7].split()]
rss = [int(x) for x in sys.argv[8].split()]
loop_rows, loop_s = int(sys.argv[9]), (float(sys.argv[10]) if sys.argv[10] else None)
bat = dict(l.strip().split("=", 1) for l in open(sys.argv[11]) if "=" in l)
values = open(sys.argv[12], "w")
seed_s = float(sys.argv[13]) if sys.argv[13] else None
ms, mi = statistics.median(single), statistics.median(infill)
ratio = ms / mi  # throughput ratio: (rows/s infill) / (rows/s single)
peak = max(rss) / 1024
p95 = float(bat["batch_ms_p95"])
print("rows=%d repeat=%d batch_size=%s (medians of %d interleaved runs; order alternates)" % (rows, repeat, bs, repeat))
print()
print("%-30s %10s %12s %16s %14s" % ("contender", "seconds", "rows/s", "ratio vs single", "peak RSS MiB"))
print("%-30s %10.2f %12.0f %16s %14s" % ("single UPDATE (psql)", ms, rows / ms, "1.00", "-"))
label = "infill run (adaptive)" if bs == "auto" else "infill run --batch-size " + bs
print("%-30s %10.2f %12.0f %16.3f %14.1f" % (label, mi, rows / mi, ratio, peak))
if loop_s is not None:
    lr = loop_rows / loop_s
    est = rows / lr
    print("%-30s %10.2f %12.0f %16.4f %14s" % ("per-row loop, est. (scaled)", est, lr, lr / (rows / ms), "-"))
    print()
    print("per-row loop: measured on %d rows in %.2f s (%.0f rows/s), scaled to %d rows: %.0f s estimated." % (
        loop_rows, loop_s, lr, rows, est))
    print("infill vs per-row loop: %.1fx the loop's rows/s" % ((rows / mi) / lr))
if seed_s is not None:
    sr = loop_rows / seed_s
    print("seed-shaped loop (Python, psycopg): %d rows in %.2f s (%.0f rows/s); infill: %.1fx its rows/s" % (
        loop_rows, seed_s, sr, (rows / mi) / sr))
print()
print("infill batches (all runs pooled, from the audit logs): %s, median %s ms, p95 %s ms, max %s ms, largest %s keys" % (
    bat["batches"], bat["batch_ms_median"], bat["batch_ms_p95"], bat["batch_ms_max"], bat["batch_keys_max"]))
print()
print("goals: ratio >= 0.80 -> %s;  peak RSS < 64 MiB -> %s;  batch p95 <= 600 ms -> %s%s" % (
    "met" if ratio >= 0.80 else "NOT met", "met" if peak < 64 else "NOT met", "met" if p95 <= 600 else "NOT met",
    (";  infill >= 100x per-row loop -> %s" % ("met" if (rows / mi) / (loop_rows / loop_s) >= 100 else "NOT met")) if loop_s else ""))
print()
print("raw (seconds; infill peak RSS via %s):" % tool)
print("  single:", " ".join("%.3f" % x for x in single))
print("  infill:", " ".join("%.3f" % x for x in infill))
print("  infill peak RSS KiB:", " ".join(str(x) for x in rss), "(max %.1f MiB, median %.1f MiB)" % (peak, statistics.median(rss) / 1024))
print()
print(open(raw).read().rstrip())
kv = dict(rows=rows, repeat=repeat, batch_size=bs, single_s="%.3f" % ms, single_rps="%.0f" % (rows / ms),
          infill_s="%.3f" % mi, infill_rps="%.0f" % (rows / mi), ratio="%.3f" % ratio,
          infill_rss_kib=max(rss), batch_p95_ms=bat["batch_ms_p95"], batch_median_ms=bat["batch_ms_median"],
          batch_max_ms=bat["batch_ms_max"], batches=bat["batches"],
          single_runs=" ".join("%.3f" % x for x in single), infill_runs=" ".join("%.3f" % x for x in infill))
if loop_s is not None:
    lr = loop_rows / loop_s
    kv.update(loop_rows=loop_rows, loop_s="%.3f" % loop_s, loop_rps="%.0f" % lr, loop_est_s="%.0f" % (rows / lr),
              infill_vs_loop="%.1f" % ((rows / mi) / lr))
if seed_s is not None:
    kv.update(seed_loop_s="%.3f" % seed_s, seed_loop_rps="%.0f" % (loop_rows / seed_s),
              infill_vs_seed_loop="%.1f" % ((rows / mi) / (loop_rows / seed_s)))
for k, v in kv.items():
    values.write("%s=%s\n" % (k, v))
PY
{
  echo "# infill bench, $(date -u +%Y-%m-%dT%H:%M:%SZ), $(nproc) cores, $(psql_db -At -c 'SHOW server_version'), infill source $REV"
  echo "# command: ROWS=$ROWS REPEAT=$REPEAT BATCH_SIZE=$BATCH_SIZE UNDO=$UNDO SETTINGS='${SETTINGS:-}' LOOP_ROWS=$LOOP_ROWS SEED_LOOP=$SEED_LOOP bench/run.sh"
  cat "$WORK/report.txt"
} > "$OUT"
cat "$OUT"
log "report written to $OUT, values to $VALUES; spec and audit logs kept in $WORK"
