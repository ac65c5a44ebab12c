#!/usr/bin/env bash
# `infill undo` on PostgreSQL: how long putting a run back takes, against
# the run itself and against the set-based UPDATE a hand-written rollback
# would be (`UPDATE ... SET c = NULL WHERE c IS NOT NULL`, no check that a
# row still holds what the run wrote).
#
#   bench/undo.sh                                       # 1,000,000 rows, 3 repetitions
#   ROWS=500000 BIN_BEFORE=/tmp/infill-old bench/undo.sh
#
# Knobs (environment):
#   ROWS        rows in the table                        (default 1000000)
#   REPEAT      repetitions                              (default 3)
#   BIN         infill binary to use; set, nothing is built
#   BIN_BEFORE  another infill binary whose undo is timed too, on images of
#               its own run of the same table, in the same repetitions
#   OUT         report file                              (default bench/results/undo.txt)
#   PGHOST PGPORT PGUSER   the server                    (default 127.0.0.1 5432 postgres)
#
# Each repetition: a fresh copy of the table; `infill run` (default
# settings, undo images on), timed; `infill undo` of that run, timed and
# checked (every row back to NULL, every image restored); with BIN_BEFORE,
# its own run and undo on another fresh copy; and the single UPDATE
# setting the column back to NULL on a filled copy, timed by psql. Every
# process is timed around the whole process, the single UPDATE as psql's
# \timing reports the statement.
source "$(dirname "$0")/lib.sh"

ROWS=${ROWS:-1000000}
REPEAT=${REPEAT:-3}
DB=infill_bench_undo
OUT=${OUT:-$RESULTS/undo.txt}
posint ROWS
posint REPEAT
need psql python3
cd "$BENCH_ROOT"

psql_admin() { psql -X -q -v ON_ERROR_STOP=1 -d postgres "$@"; }
psql_db() { psql -X -q -v ON_ERROR_STOP=1 -d "$DB" "$@"; }
scalar() { psql_db -At -c "$1"; }

bench_workdir undo
infill_bin
if [[ -n ${BIN_BEFORE:-} ]]; then
  [[ -x $BIN_BEFORE && -f $BIN_BEFORE ]] || die "BIN_BEFORE=$BIN_BEFORE is not an executable file"
  BIN_BEFORE=$(realpath "$BIN_BEFORE")
fi
drop_db() { psql_admin -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null 2>&1 || true; }
trap drop_db EXIT

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

cat > "$WORK/bench.toml" <<TOML
[databases]
target = "postgres://$PGUSER@$PGHOST:$PGPORT/$DB"

[jobs.fill]
source.table = "t_fill"
source.key = ["id"]
source.where = "c IS NULL"
action.update.c = "a * 31 + b"
TOML

fresh() { # a fresh t_fill, c filled or not, and empty state tables
  psql_db -c "DROP TABLE IF EXISTS t_fill" \
          -c "CREATE TABLE t_fill AS SELECT id, a, b, ${1:-c} AS c FROM bench_base" \
          -c "ALTER TABLE t_fill ADD PRIMARY KEY (id)" \
          -c "VACUUM ANALYZE t_fill" \
          -c "DROP TABLE IF EXISTS infill_undo, infill_batches, infill_failures, infill_approvals, infill_runs, infill_schema" \
          -c CHECKPOINT >/dev/null
}

timed() { # seconds of a whole process; its stdout to $1
  local out=$1 t0 t1 rc=0; shift
  t0=$(now)
  "$@" > "$out" 2> "${out%.json}.err" || rc=$?
  t1=$(now)
  [[ $rc == 0 ]] || { tail -20 "${out%.json}.err" >&2; die "$* exited with $rc"; }
  elapsed "$t0" "$t1"
}

# run_and_undo BIN NAME REP: prints "run_seconds undo_seconds"
run_and_undo() {
  local bin=$1 name=$2 rep=$3 rs us id
  fresh
  rs=$(timed "$WORK/$name.run.$rep.json" "$bin" run "$WORK/bench.toml" --yes --json)
  check_summary "$WORK/$name.run.$rep.json" "$ROWS"
  id=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["run_id"])' "$WORK/$name.run.$rep.json")
  psql_db -c CHECKPOINT >/dev/null
  us=$(timed "$WORK/$name.undo.$rep.json" "$bin" undo "$id" --spec "$WORK/bench.toml" --yes --json)
  python3 - "$WORK/$name.undo.$rep.json" "$ROWS" <<'PY' || die "unexpected undo summary in $WORK/$name.undo.$rep.json"
import json, sys
s = json.load(open(sys.argv[1]))
assert s["status"] == "succeeded" and s["restored"] == int(sys.argv[2]) and s["conflicts"] == 0, s
PY
  [[ $(scalar "SELECT count(*) FROM t_fill WHERE c IS NOT NULL") == 0 ]] || die "$name: undo left filled rows"
  echo "$rs $us"
}

run_single() { # prints seconds
  local out=$WORK/single.$1.out ms
  fresh "a * 31 + b"
  psql_db > "$out" <<'SQL'
\timing on
UPDATE t_fill SET c = NULL WHERE c IS NOT NULL;
SQL
  ms=$(sed -n 's/^Time: \([0-9.]*\) ms.*/\1/p' "$out" | tail -1)
  [[ -n $ms ]] || die "no timing in $out"
  [[ $(scalar "SELECT count(*) FROM t_fill WHERE c IS NOT NULL") == 0 ]] || die "single UPDATE left filled rows"
  python3 -c "print('%.3f' % ($ms / 1000))"
}

raw=$WORK/raw.txt
: > "$raw"
for rep in $(seq 1 "$REPEAT"); do
  log "repetition $rep/$REPEAT"
  s=$(run_single "$rep")
  log "  single UPDATE back to NULL: ${s}s"
  echo "single $s" >> "$raw"
  read -r rs us <<< "$(run_and_undo "$BIN" after "$rep")"
  log "  infill run ${rs}s, undo ${us}s"
  echo "run $rs" >> "$raw"
  echo "undo $us" >> "$raw"
  if [[ -n ${BIN_BEFORE:-} ]]; then
    read -r rs us <<< "$(run_and_undo "$BIN_BEFORE" before "$rep")"
    log "  BIN_BEFORE: run ${rs}s, undo ${us}s"
    echo "run_before $rs" >> "$raw"
    echo "undo_before $us" >> "$raw"
  fi
done

mkdir -p "$(dirname "$OUT")"
{
  echo "# infill undo bench, $(date -u +%Y-%m-%dT%H:%M:%SZ), $(nproc) cores, $(psql_db -At -c 'SHOW server_version'), infill $REV"
  echo "# command: ROWS=$ROWS REPEAT=$REPEAT${BIN_BEFORE:+ BIN_BEFORE=$BIN_BEFORE} bench/undo.sh"
  python3 - "$raw" "$ROWS" <<'PY'
import collections, statistics, sys
runs = collections.defaultdict(list)
for line in open(sys.argv[1]):
    k, v = line.split()
    runs[k].append(float(v))
rows = int(sys.argv[2])
single = statistics.median(runs["single"])
print("%-34s %9s %11s %18s  %s" % ("contender (median)", "seconds", "rows/s", "vs single UPDATE", "runs"))
for k, label in [("single", "single UPDATE back to NULL"), ("run", "infill run"), ("undo", "infill undo"),
                 ("run_before", "infill run (BIN_BEFORE)"), ("undo_before", "infill undo (BIN_BEFORE)")]:
    if k in runs:
        m = statistics.median(runs[k])
        print("%-34s %9.2f %11.0f %18.3f  %s" % (label, m, rows / m, single / m, " ".join("%.2f" % x for x in runs[k])))
if "undo_before" in runs:
    print()
    print("undo speed-up over BIN_BEFORE: %.1fx" % (statistics.median(runs["undo_before"]) / statistics.median(runs["undo"])))
PY
} > "$OUT"
cat "$OUT"
log "report written to $OUT; specs, summaries and audit logs kept in $WORK"
