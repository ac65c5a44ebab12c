#!/usr/bin/env bash
# Benchmark B2: one set-based UPDATE against `infill run` (default settings:
# adaptive batches, batch_time 500ms, undo images on) on MariaDB/MySQL, on
# the same narrow table as bench/run.sh.
#
#   bench/mariadb.sh                  # 1,000,000 rows, 3 repetitions
#   ROWS=100000 REPEAT=1 bench/mariadb.sh
#
# Knobs (environment):
#   ROWS     rows in the table                          (default 1000000)
#   REPEAT   repetitions of each contender              (default 3)
#   BIN      infill binary to use; set, nothing is built
#   OUT      report file                                (default bench/results/mariadb.txt)
#   VALUES   key=value results for bench/summary.py     (default: OUT with .values.txt)
#   MYHOST MYPORT MYUSER   the server (empty password)  (default 127.0.0.1 3306 root)
#
# Each repetition loads two fresh, identical copies of bench_base (t_single,
# t_infill: CREATE TABLE ... LIKE, INSERT ... SELECT, ANALYZE TABLE) and runs
# the contenders one after the other, in alternating order. The single
# UPDATE is timed by the mariadb client (its "(N sec)" line, commit
# included: autocommit); infill's whole process by the wall clock. Every
# result is checked (no row with c <=> a * 31 + b false; infill's summary
# succeeded with rows_changed = ROWS). The database infill_bench_mariadb is
# dropped at the end. See bench/README.md.
source "$(dirname "$0")/lib.sh"

ROWS=${ROWS:-1000000}
REPEAT=${REPEAT:-3}
MYHOST=${MYHOST:-127.0.0.1}
MYPORT=${MYPORT:-3306}
MYUSER=${MYUSER:-root}
DB=infill_bench_mariadb
OUT=${OUT:-$RESULTS/mariadb.txt}
VALUES=${VALUES:-${OUT%.txt}.values.txt}
posint ROWS
posint REPEAT
need mariadb python3
cd "$BENCH_ROOT"

my() { mariadb -h "$MYHOST" -P "$MYPORT" -u "$MYUSER" "$@"; }
my_db() { my -N -B "$DB" "$@"; }
scalar() { my_db -e "$1"; }

bench_workdir mariadb
infill_bin

drop_db() { my -e "DROP DATABASE IF EXISTS $DB" >/dev/null 2>&1 || true; }
trap drop_db EXIT

log "creating database $DB with bench_base ($ROWS rows)"
my -e "DROP DATABASE IF EXISTS $DB; CREATE DATABASE $DB"
my_db -e "CREATE TABLE bench_base (id bigint PRIMARY KEY, a int NOT NULL, b int NOT NULL, c bigint) ENGINE=InnoDB;
INSERT INTO bench_base (id, a, b, c) SELECT seq, seq % 1000, (seq * 7919) % 100003, NULL FROM seq_1_to_$ROWS;
ANALYZE TABLE bench_base;" > /dev/null
[[ $(scalar "SELECT COUNT(*) FROM bench_base WHERE c IS NULL") == "$ROWS" ]] || die "bench_base was not loaded"

fill_spec "$WORK/bench.toml" "mysql://$MYUSER@$MYHOST:$MYPORT/$DB" t_infill

copy_table() {
  my_db -e "DROP TABLE IF EXISTS $1; CREATE TABLE $1 LIKE bench_base;
INSERT INTO $1 SELECT * FROM bench_base; ANALYZE TABLE $1;" > /dev/null
}

# Write the copies' dirty pages back before a contender starts, the closest
# thing to PostgreSQL's CHECKPOINT without changing a server setting:
# FLUSH TABLES ... FOR EXPORT flushes both copies' changes to their files.
settle() {
  my_db -e "FLUSH TABLES t_single, t_infill FOR EXPORT; UNLOCK TABLES;"
}

check_table() { # table who
  local bad
  bad=$(scalar "SELECT COUNT(*) FROM $1 WHERE NOT (c <=> a * 31 + b)")
  [[ $bad == 0 ]] || die "$2 left $bad rows where c is not a * 31 + b"
}

run_single() { # prints seconds, as the client timed it
  local out=$WORK/single.$1.out t0 t1
  settle
  t0=$(now)
  my -vvv "$DB" -e "UPDATE t_single SET c = a * 31 + b WHERE c IS NULL" > "$out"
  t1=$(now)
  check_table t_single "single UPDATE"
  grep -q "Query OK, $ROWS rows affected" "$out" || die "single UPDATE did not report $ROWS rows (see $out)"
  python3 - "$out" "$(elapsed "$t0" "$t1")" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
m = re.search(r"rows affected[^(]*\(((?:(\d+) hours? )?(?:(\d+) min )?([\d.]+) sec)\)", text)
if not m:  # no client timing: fall back on the wall clock around the client
    print(sys.argv[2]); sys.exit(0)
h, mi, s = m.group(2), m.group(3), m.group(4)
print("%.3f" % (int(h or 0) * 3600 + int(mi or 0) * 60 + float(s)))
PY
}

run_infill_rep() { # prints "seconds rss_kib"
  my_db -e "DROP TABLE IF EXISTS infill_undo, infill_batches, infill_failures, infill_approvals, infill_runs, infill_schema, infill_locks"
  settle
  local r
  r=$(run_infill "$WORK/bench.toml" "$WORK/infill.$1.json" "$ROWS")
  check_table t_infill infill
  echo "$r"
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
      r=$(run_infill_rep "$rep")
      read -r s k <<< "$r"
      infill_s+=("$s")
      infill_rss+=("$k")
      stats=$(python3 bench/stats.py batches "$WORK/infill.$rep.json" | tr '\n' ' ')
      log "  infill run: ${s}s, peak RSS ${k} KiB; $stats"
      echo "rep=$rep contender=infill seconds=$s peak_rss_kib=$k $stats" >> "$raw"
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
print("%-30s %10.2f %12.0f %16s %14s" % ("single UPDATE (mariadb client)", ms, rows / ms, "1.00", "-"))
print("%-30s %10.2f %12.0f %16.3f %14.1f" % ("infill run (defaults)", mi, rows / mi, ratio, max(rss) / 1024))
print()
print("infill batches (pooled): %s, median %s ms, p95 %s ms, max %s ms" % (
    bat["batches"], bat["batch_ms_median"], bat["batch_ms_p95"], bat["batch_ms_max"]))
print("goal: ratio >= 0.70 -> %s" % ("met" if ratio >= 0.70 else "NOT met"))
print()
print("raw seconds: single %s; infill %s" % (" ".join("%.3f" % x for x in single), " ".join("%.3f" % x for x in infill)))
print(open(sys.argv[8]).read().rstrip())
with open(sys.argv[7], "w") as f:
    for k, v in dict(rows=rows, repeat=repeat, single_s="%.3f" % ms, single_rps="%.0f" % (rows / ms),
                     infill_s="%.3f" % mi, infill_rps="%.0f" % (rows / mi), ratio="%.3f" % ratio,
                     infill_rss_kib=max(rss), batch_p95_ms=bat["batch_ms_p95"], batches=bat["batches"]).items():
        f.write("%s=%s\n" % (k, v))
PY
{
  echo "# infill bench B2 (MariaDB), $(date -u +%Y-%m-%dT%H:%M:%SZ), $(nproc) cores, $(my -N -B -e 'SELECT VERSION()'), infill source $REV"
  echo "# command: ROWS=$ROWS REPEAT=$REPEAT bench/mariadb.sh"
  cat "$WORK/report.txt"
} > "$OUT"
cat "$OUT"
log "report written to $OUT, values to $VALUES; spec and audit logs kept in $WORK"
