#!/usr/bin/env bash
# Benchmark B6: one set-based UPDATE through the sqlite3 CLI against
# `infill run` (default settings) on SQLite, on the narrow table of
# bench/run.sh, each on its own copy of the same database file.
#
#   bench/sqlite.sh                   # 1,000,000 rows, 3 repetitions
#   ROWS=100000 REPEAT=1 bench/sqlite.sh
#
# Knobs (environment):
#   ROWS     rows in the table                          (default 1000000)
#   REPEAT   repetitions of each contender              (default 3)
#   BIN      infill binary to use; set, nothing is built
#   OUT      report file                                (default bench/results/sqlite.txt)
#   VALUES   key=value results for bench/summary.py     (default: OUT with .values.txt)
#
# The base file is made once (sqlite3, a recursive CTE); each contender of
# each repetition gets a `cp` of it. The single UPDATE is timed by the CLI
# (`.timer on`, real time); infill's whole process by the wall clock. Both
# use the file's journal mode and the default synchronous setting of their
# client; the report prints the journal mode each file was left in. Every
# result is checked. The database files live in the work dir and are
# removed as soon as they are checked (and on exit); the specs, summaries
# and audit logs stay there.
source "$(dirname "$0")/lib.sh"

ROWS=${ROWS:-1000000}
REPEAT=${REPEAT:-3}
OUT=${OUT:-$RESULTS/sqlite.txt}
VALUES=${VALUES:-${OUT%.txt}.values.txt}
posint ROWS
posint REPEAT
need sqlite3 python3
cd "$BENCH_ROOT"

bench_workdir sqlite
infill_bin
cleanup() { rm -f "$WORK"/*.db "$WORK"/*.db-wal "$WORK"/*.db-shm "$WORK"/*.db-journal; }
trap cleanup EXIT

log "creating $WORK/base.db with t_fill ($ROWS rows)"
sqlite3 "$WORK/base.db" <<SQL
CREATE TABLE t_fill (id INTEGER PRIMARY KEY, a INTEGER NOT NULL, b INTEGER NOT NULL, c INTEGER);
WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < $ROWS)
INSERT INTO t_fill SELECT i, i % 1000, (i * 7919) % 100003, NULL FROM s;
ANALYZE;
SQL
[[ $(sqlite3 "$WORK/base.db" "SELECT COUNT(*) FROM t_fill WHERE c IS NULL") == "$ROWS" ]] || die "base.db was not loaded"
BASE_MODE=$(sqlite3 "$WORK/base.db" "PRAGMA journal_mode")

check_db() { # file who
  local bad
  bad=$(sqlite3 "$1" "SELECT COUNT(*) FROM t_fill WHERE c IS NOT a * 31 + b")
  [[ $bad == 0 ]] || die "$2 left $bad rows where c is not a * 31 + b"
  [[ $(sqlite3 "$1" "SELECT COUNT(*) FROM t_fill") == "$ROWS" ]] || die "$2: t_fill does not hold $ROWS rows"
}

run_single() { # prints "seconds journal_mode"
  local db=$WORK/single.$1.db out=$WORK/single.$1.out s
  cp "$WORK/base.db" "$db"
  sync
  printf '.timer on\nUPDATE t_fill SET c = a * 31 + b WHERE c IS NULL;\nSELECT changes();\n' | sqlite3 "$db" > "$out"
  check_db "$db" "single UPDATE"
  [[ $(grep -E '^[0-9]+$' "$out" | tail -1) == "$ROWS" ]] || die "single UPDATE did not change $ROWS rows (see $out)"
  s=$(sed -n 's/^Run Time: real \([0-9.]*\).*/\1/p' "$out" | head -1)
  [[ -n $s ]] || die "no timing in $out"
  echo "$s $(sqlite3 "$db" "PRAGMA journal_mode")"
  rm -f "$db"
}

run_infill_rep() { # prints "seconds rss_kib journal_mode"
  local db=$WORK/infill.$1.db r
  cp "$WORK/base.db" "$db"
  sync
  fill_spec "$WORK/infill.$1.toml" "sqlite://$db" t_fill
  r=$(run_infill "$WORK/infill.$1.toml" "$WORK/infill.$1.json" "$ROWS")
  check_db "$db" infill
  echo "$r $(sqlite3 "$db" "PRAGMA journal_mode")"
  rm -f "$db" "$db-wal" "$db-shm"
}

single_s=() infill_s=() infill_rss=()
raw=$WORK/raw.txt
: > "$raw"
for rep in $(seq 1 "$REPEAT"); do
  log "repetition $rep/$REPEAT"
  if (( rep % 2 )); then order="single infill"; else order="infill single"; fi
  for who in $order; do
    if [[ $who == single ]]; then
      r=$(run_single "$rep")
      read -r s m <<< "$r"
      single_s+=("$s")
      log "  single UPDATE (sqlite3): ${s}s (journal_mode $m after)"
      echo "rep=$rep contender=single seconds=$s journal_mode=$m" >> "$raw"
    else
      r=$(run_infill_rep "$rep")
      read -r s k m <<< "$r"
      infill_s+=("$s")
      infill_rss+=("$k")
      stats=$(python3 bench/stats.py batches "$WORK/infill.$rep.json" | tr '\n' ' ')
      log "  infill run: ${s}s, peak RSS ${k} KiB (journal_mode $m after); $stats"
      echo "rep=$rep contender=infill seconds=$s peak_rss_kib=$k journal_mode=$m $stats" >> "$raw"
    fi
  done
done
jsons=()
for rep in $(seq 1 "$REPEAT"); do jsons+=("$WORK/infill.$rep.json"); done
python3 bench/stats.py batches "${jsons[@]}" > "$WORK/batches.txt"

mkdir -p "$(dirname "$OUT")"
: > "$VALUES"
python3 - "$ROWS" "$REPEAT" "${single_s[*]}" "${infill_s[*]}" "${infill_rss[*]}" "$WORK/batches.txt" "$VALUES" "$raw" > "$WORK/report.txt" <<'PY'
import statistics, sys
rows, repeat = int(sys.argv[1]), int(sys.argv[2])
single = [float(x) for x in sys.argv[3].split()]
infill = [float(x) for x in sys.argv[4].split()]
rss = [int(x) for x in sys.argv[5].split()]
bat = dict(l.strip().split("=", 1) for l in open(sys.argv[6]) if "=" in l)
ms, mi = statistics.median(single), statistics.median(infill)
ratio = ms / mi
print("rows=%d repeat=%d, infill with default settings (medians of %d interleaved runs; order alternates)" % (rows, repeat, repeat))
print()
print("%-30s %10s %12s %16s %14s" % ("contender", "seconds", "rows/s", "ratio vs single", "peak RSS MiB"))
print("%-30s %10.2f %12.0f %16s %14s" % ("single UPDATE (sqlite3 CLI)", ms, rows / ms, "1.00", "-"))
print("%-30s %10.2f %12.0f %16.3f %14.1f" % ("infill run (defaults)", mi, rows / mi, ratio, max(rss) / 1024))
print()
print("infill batches (pooled): %s, median %s ms, p95 %s ms, max %s ms" % (
    bat["batches"], bat["batch_ms_median"], bat["batch_ms_p95"], bat["batch_ms_max"]))
print()
print(open(sys.argv[8]).read().rstrip())
with open(sys.argv[7], "w") as f:
    for k, v in dict(rows=rows, repeat=repeat, single_s="%.3f" % ms, single_rps="%.0f" % (rows / ms),
                     infill_s="%.3f" % mi, infill_rps="%.0f" % (rows / mi), ratio="%.3f" % ratio,
                     infill_rss_kib=max(rss), batch_p95_ms=bat["batch_ms_p95"], batches=bat["batches"]).items():
        f.write("%s=%s\n" % (k, v))
PY
{
  echo "# infill bench B6 (SQLite), $(date -u +%Y-%m-%dT%H:%M:%SZ), $(nproc) cores, sqlite3 CLI $(sqlite3 --version | cut -d' ' -f1), base file journal_mode $BASE_MODE, infill source $REV"
  echo "# command: ROWS=$ROWS REPEAT=$REPEAT bench/sqlite.sh"
  cat "$WORK/report.txt"
} > "$OUT"
cat "$OUT"
log "report written to $OUT, values to $VALUES; spec and audit logs kept in $WORK (database files removed)"
