#!/usr/bin/env bash
# Benchmark B5 (and B4's memory figures): does infill's cost per row grow
# with the table? `infill run` with default settings (adaptive batches,
# batch_time 500ms, undo images on) on PostgreSQL over fresh tables of
# several sizes, like bench/run.sh's; rows/s and peak RSS for each.
#
#   bench/growth.sh                                   # 1M, 3M and 10M rows
#   SIZES="100000 300000 1000000" bench/growth.sh     # quick
#
# Knobs (environment):
#   SIZES    table sizes, ascending                   (default "1000000 3000000 10000000")
#   REPEAT   runs per size (median reported)          (default 1)
#   BIN      infill binary to use; set, nothing is built
#   OUT      report file                              (default bench/results/growth.txt)
#   VALUES   key=value results for bench/summary.py   (default: OUT with .values.txt)
#   PGHOST PGPORT PGUSER   the server                 (default 127.0.0.1 5432 postgres)
#
# A base table of the largest size is loaded once; each run gets a fresh
# copy of its first N rows (CTAS, primary key, VACUUM ANALYZE, CHECKPOINT)
# and empty state tables. Each run is checked (summary succeeded with
# rows_changed = N, no row with c IS DISTINCT FROM a * 31 + b). Growth is
# the rows/s at the largest size over the rows/s at the smallest: 1.0 is
# flat; the goal taken here is >= 0.80 (at most 20 % slower per row). The
# database infill_bench_growth is dropped at the end. See bench/README.md.
source "$(dirname "$0")/lib.sh"

SIZES=${SIZES:-1000000 3000000 10000000}
REPEAT=${REPEAT:-1}
DB=infill_bench_growth
OUT=${OUT:-$RESULTS/growth.txt}
VALUES=${VALUES:-${OUT%.txt}.values.txt}
posint REPEAT
read -r -a sizes <<< "$SIZES"
(( ${#sizes[@]} >= 1 )) || die "SIZES is empty"
prev=0
for n in "${sizes[@]}"; do
  [[ $n =~ ^[1-9][0-9]*$ ]] && (( n > prev )) || die "SIZES must be ascending positive integers (got '$SIZES')"
  prev=$n
done
MAX=$prev
need psql python3
cd "$BENCH_ROOT"

psql_admin() { psql -X -q -v ON_ERROR_STOP=1 -d postgres "$@"; }
psql_db() { psql -X -q -v ON_ERROR_STOP=1 -d "$DB" "$@"; }
scalar() { psql_db -At -c "$1"; }

bench_workdir growth
infill_bin

drop_db() { psql_admin -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null 2>&1 || true; }
trap drop_db EXIT

log "creating database $DB with bench_base ($MAX rows)"
drop_db
psql_admin -c "CREATE DATABASE $DB"
psql_db <<SQL
CREATE TABLE bench_base (id bigint PRIMARY KEY, a int NOT NULL, b int NOT NULL, c bigint);
INSERT INTO bench_base (id, a, b, c)
  SELECT i, (i % 1000)::int, ((i * 7919) % 100003)::int, NULL
  FROM generate_series(1::bigint, $MAX::bigint) AS s(i);
VACUUM ANALYZE bench_base;
SQL

fill_spec "$WORK/growth.toml" "postgres://$PGUSER@$PGHOST:$PGPORT/$DB" t_infill

raw=$WORK/raw.txt
: > "$raw"
for n in "${sizes[@]}"; do
  for rep in $(seq 1 "$REPEAT"); do
    log "size $n, run $rep/$REPEAT: fresh copy of the first $n rows"
    psql_db -c "DROP TABLE IF EXISTS t_infill, infill_undo, infill_batches, infill_failures, infill_approvals, infill_runs, infill_schema" \
            -c "CREATE TABLE t_infill AS SELECT * FROM bench_base WHERE id <= $n" \
            -c "ALTER TABLE t_infill ADD PRIMARY KEY (id)" \
            -c "VACUUM ANALYZE t_infill" -c CHECKPOINT
    json=$WORK/infill.$n.$rep.json
    r=$(run_infill "$WORK/growth.toml" "$json" "$n")
    read -r s k <<< "$r"
    bad=$(scalar "SELECT count(*) FROM t_infill WHERE c IS DISTINCT FROM a * 31 + b")
    [[ $bad == 0 ]] || die "infill left $bad rows where c IS DISTINCT FROM a * 31 + b ($n rows)"
    stats=$(python3 bench/stats.py batches "$json" | tr '\n' ' ')
    log "  infill run: ${s}s, $(python3 -c "print(round($n / $s))") rows/s, peak RSS $k KiB; $stats"
    echo "rows=$n rep=$rep seconds=$s peak_rss_kib=$k $stats" >> "$raw"
  done
done
psql_db -c "DROP TABLE IF EXISTS t_infill, bench_base"

mkdir -p "$(dirname "$OUT")"
python3 - "$raw" "$VALUES" > "$WORK/report.txt" <<'PY'
import collections, statistics, sys
runs = collections.OrderedDict()
for line in open(sys.argv[1]):
    kv = dict(x.split("=", 1) for x in line.split())
    runs.setdefault(int(kv["rows"]), []).append(kv)
print("%12s %10s %12s %14s %14s" % ("rows", "seconds", "rows/s", "vs smallest", "peak RSS MiB"))
values = open(sys.argv[2], "w")
base = None
for n, rs in runs.items():
    s = statistics.median(float(r["seconds"]) for r in rs)
    rss = max(int(r["peak_rss_kib"]) for r in rs)
    rps = n / s
    base = base or rps
    print("%12d %10.2f %12.0f %14.3f %14.1f" % (n, s, rps, rps / base, rss / 1024))
    values.write("rows_%d_s=%.3f\nrows_%d_rps=%.0f\nrows_%d_rss_kib=%d\nrows_%d_batch_p95_ms=%s\n" % (
        n, s, n, rps, n, rss, n, max(float(r["batch_ms_p95"]) for r in rs)))
growth = rps / base
values.write("sizes=%s\ngrowth=%.3f\n" % (" ".join(str(n) for n in runs), growth))
print()
print("rows/s at %d rows / rows/s at %d rows: %.3f (flat is 1.0; goal >= 0.80: %s)" % (
    list(runs)[-1], list(runs)[0], growth, "met" if growth >= 0.80 else "NOT met"))
print()
print(open(sys.argv[1]).read().rstrip())
PY
{
  echo "# infill bench B5 (cost growth, PostgreSQL), $(date -u +%Y-%m-%dT%H:%M:%SZ), $(nproc) cores, $(psql_db -At -c 'SHOW server_version'), infill source $REV"
  echo "# command: SIZES='$SIZES' REPEAT=$REPEAT bench/growth.sh"
  cat "$WORK/report.txt"
} > "$OUT"
cat "$OUT"
log "report written to $OUT, values to $VALUES; spec and audit logs kept in $WORK"
