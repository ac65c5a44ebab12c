#!/usr/bin/env bash
# `infill undo`: how long putting a run back takes, against the run itself
# and against the set-based UPDATE a hand-written rollback would be
# (`UPDATE ... SET c = NULL WHERE c IS NOT NULL`, no check that a row still
# holds what the run wrote).
#
#   bench/undo.sh                                       # PostgreSQL, 1,000,000 rows, 3 repetitions
#   ROWS=500000 BIN_BEFORE=/tmp/infill-old bench/undo.sh
#   BACKEND=mariadb ROWS=200000 bench/undo.sh
#
# Knobs (environment):
#   BACKEND     postgres, mariadb or sqlite              (default postgres)
#   ROWS        rows in the table                        (default 1000000)
#   REPEAT      repetitions                              (default 3)
#   BIN         infill binary to use; set, nothing is built
#   BIN_BEFORE  another infill binary whose undo is timed too, on images of
#               its own run of the same table, in the same repetitions
#   OUT         report file                              (default bench/results/undo.BACKEND.txt)
#   PGHOST PGPORT PGUSER   the PostgreSQL server         (default 127.0.0.1 5432 postgres)
#   MYSQL_HOST MYSQL_PORT MYSQL_USER   the MariaDB server (default 127.0.0.1 3306 root)
#
# Each repetition: a fresh copy of the table; `infill run` (default
# settings, undo images on), timed; `infill undo` of that run, timed and
# checked (every row back to NULL, every image restored); with BIN_BEFORE,
# its own run and undo on another fresh copy; and the single UPDATE
# setting the column back to NULL on a filled copy. infill is timed around
# the whole process; the single UPDATE by psql's \timing (PostgreSQL), the
# sqlite3 CLI's .timer (SQLite), or around the mysql client process
# (MariaDB: a connection more than the statement).
source "$(dirname "$0")/lib.sh"

BACKEND=${BACKEND:-postgres}
ROWS=${ROWS:-1000000}
REPEAT=${REPEAT:-3}
DB=infill_bench_undo
OUT=${OUT:-$RESULTS/undo.$BACKEND.txt}
MYSQL_HOST=${MYSQL_HOST:-127.0.0.1}
MYSQL_PORT=${MYSQL_PORT:-3306}
MYSQL_USER=${MYSQL_USER:-root}
posint ROWS
posint REPEAT
cd "$BENCH_ROOT"

bench_workdir undo
case $BACKEND in
  postgres)
    need psql python3
    sql() { psql -X -q -v ON_ERROR_STOP=1 -d "$DB" "$@"; }
    scalar() { sql -At -c "$1"; }
    admin() { psql -X -q -v ON_ERROR_STOP=1 -d postgres -c "$1"; }
    URL="postgres://$PGUSER@$PGHOST:$PGPORT/$DB"
    VERSION() { scalar 'SHOW server_version'; } ;;
  mariadb)
    need mysql python3
    my() { mysql -h "$MYSQL_HOST" -P "$MYSQL_PORT" -u "$MYSQL_USER" "$@"; }
    sql() { my "$DB" -e "$1"; }
    scalar() { my -N -B "$DB" -e "$1"; }
    admin() { my -e "$1"; }
    URL="mysql://$MYSQL_USER@$MYSQL_HOST:$MYSQL_PORT/$DB"
    VERSION() { scalar 'SELECT VERSION()'; } ;;
  sqlite)
    need sqlite3 python3
    sql() { sqlite3 "$WORK/$DB.db" "$1"; }
    scalar() { sql "$1"; }
    URL="sqlite://$WORK/$DB.db"
    VERSION() { echo "SQLite $(sqlite3 --version | cut -d' ' -f1) (CLI)"; } ;;
  *) die "BACKEND must be postgres, mariadb or sqlite (got '$BACKEND')" ;;
esac
infill_bin
if [[ -n ${BIN_BEFORE:-} ]]; then
  [[ -x $BIN_BEFORE && -f $BIN_BEFORE ]] || die "BIN_BEFORE=$BIN_BEFORE is not an executable file"
  BIN_BEFORE=$(realpath "$BIN_BEFORE")
fi
drop_db() {
  case $BACKEND in
    postgres) admin "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null 2>&1 || true ;;
    mariadb) admin "DROP DATABASE IF EXISTS $DB" >/dev/null 2>&1 || true ;;
    sqlite) rm -f "$WORK/$DB".db* "$WORK/base.db" ;;
  esac
}
trap drop_db EXIT

log "creating the $BACKEND database $DB with bench_base ($ROWS rows)"
case $BACKEND in
  postgres)
    admin "DROP DATABASE IF EXISTS $DB WITH (FORCE)"
    admin "CREATE DATABASE $DB"
    sql <<SQL
CREATE TABLE bench_base (id bigint PRIMARY KEY, a int NOT NULL, b int NOT NULL, c bigint);
INSERT INTO bench_base (id, a, b, c)
  SELECT i, (i % 1000)::int, ((i * 7919) % 100003)::int, NULL
  FROM generate_series(1::bigint, $ROWS::bigint) AS s(i);
VACUUM ANALYZE bench_base;
SQL
    ;;
  mariadb)
    admin "DROP DATABASE IF EXISTS $DB; CREATE DATABASE $DB"
    sql "CREATE TABLE bench_base (id BIGINT PRIMARY KEY, a INT NOT NULL, b INT NOT NULL, c BIGINT NULL) ENGINE=InnoDB;
INSERT INTO bench_base SELECT seq, seq % 1000, (seq * 7919) % 100003, NULL FROM seq_1_to_$ROWS;"
    ;;
  sqlite)
    sqlite3 "$WORK/base.db" "CREATE TABLE t_fill (id INTEGER PRIMARY KEY, a INTEGER NOT NULL, b INTEGER NOT NULL, c INTEGER);
WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < $ROWS)
INSERT INTO t_fill SELECT i, i % 1000, (i * 7919) % 100003, NULL FROM s;"
    ;;
esac

fill_spec "$WORK/bench.toml" "$URL" t_fill

STATE="infill_undo, infill_batches, infill_failures, infill_approvals, infill_runs, infill_schema"
fresh() { # a fresh t_fill, c filled (with an argument) or not, and empty state tables
  case $BACKEND in
    postgres)
      sql -c "DROP TABLE IF EXISTS t_fill" \
          -c "CREATE TABLE t_fill AS SELECT id, a, b, ${1:-c} AS c FROM bench_base" \
          -c "ALTER TABLE t_fill ADD PRIMARY KEY (id)" \
          -c "VACUUM ANALYZE t_fill" \
          -c "DROP TABLE IF EXISTS $STATE" \
          -c CHECKPOINT >/dev/null ;;
    mariadb)
      sql "DROP TABLE IF EXISTS t_fill, $STATE, infill_locks; CREATE TABLE t_fill LIKE bench_base;
INSERT INTO t_fill SELECT id, a, b, ${1:-c} FROM bench_base; ANALYZE TABLE t_fill; FLUSH TABLES t_fill FOR EXPORT; UNLOCK TABLES;" >/dev/null ;;
    sqlite)
      rm -f "$WORK/$DB".db*
      cp "$WORK/base.db" "$WORK/$DB.db"
      [[ -z ${1:-} ]] || sql "UPDATE t_fill SET c = $1"
      sync ;;
  esac
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
  [[ $BACKEND == postgres ]] && sql -c CHECKPOINT >/dev/null
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
  local out=$WORK/single.$1.out ms t0 t1
  fresh "a * 31 + b"
  case $BACKEND in
    postgres)
      printf '\\timing on\nUPDATE t_fill SET c = NULL WHERE c IS NOT NULL;\n' | sql > "$out"
      ms=$(sed -n 's/^Time: \([0-9.]*\) ms.*/\1/p' "$out" | tail -1) ;;
    mariadb)
      t0=$(now); sql "UPDATE t_fill SET c = NULL WHERE c IS NOT NULL" > "$out"; t1=$(now)
      ms=$(python3 -c "import sys; print((float(sys.argv[2]) - float(sys.argv[1])) * 1000)" "$t0" "$t1") ;;
    sqlite)
      printf '.timer on\nUPDATE t_fill SET c = NULL WHERE c IS NOT NULL;\n' | sqlite3 "$WORK/$DB.db" > "$out"
      ms=$(sed -n 's/^Run Time: real \([0-9.]*\).*/\1/p' "$out" | tail -1)
      ms=$(python3 -c "import sys; print(float(sys.argv[1]) * 1000)" "$ms") ;;
  esac
  [[ -n $ms ]] || die "no timing in $out"
  [[ $(scalar "SELECT count(*) FROM t_fill WHERE c IS NOT NULL") == 0 ]] || die "single UPDATE left filled rows"
  python3 -c "print('%.3f' % (float('$ms') / 1000))"
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
  echo "# infill undo bench, $(date -u +%Y-%m-%dT%H:%M:%SZ), $(nproc) cores, $BACKEND $(VERSION), infill $REV"
  echo "# command: BACKEND=$BACKEND ROWS=$ROWS REPEAT=$REPEAT${BIN_BEFORE:+ BIN_BEFORE=$BIN_BEFORE} bench/undo.sh"
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
