#!/usr/bin/env bash
# Benchmark: the cost of isolating failing rows (bisection) on PostgreSQL.
# `infill run --batch-size 1000` over a ROWS-row table where a CHECK
# constraint rejects exactly POISON rows, against the same table without
# poison rows (the baseline, timed in the same run).
#
#   bench/bisection.sh                    # 100,000 rows, 10 poison rows, 3 repetitions
#   ROWS=20000 REPEAT=1 bench/bisection.sh   # quick run
#
# Knobs (environment):
#   ROWS          rows in the table                        (default 100000)
#   POISON        rows the CHECK constraint rejects        (default 10)
#   REPEAT        runs of each contender (median reported) (default 3)
#   BATCH_SIZE    infill --batch-size                      (default 1000)
#   MAX_FAILURES  max_failures in the spec                 (default 100)
#   OUT           raw results file                         (default bench/results/bisection.txt)
#   PGHOST PGPORT PGUSER   the server                      (default 127.0.0.1 5432 postgres)
#
# The table is tests/failures.rs's: CHECK (poison = 0 OR val IS NULL), and the
# job fills val. The poison rows are spread evenly over the keys, one per
# ROWS/POISON keys. Each repetition makes fresh copies of both tables and
# drops infill's state tables, and the order alternates. A poison run must end
# with exactly POISON rows in infill_failures (their keys, SQLSTATE 23514)
# and val still NULL there; a clean run with none. The database is dropped at
# the end. See bench/README.md.
set -euo pipefail
shopt -s inherit_errexit

ROWS=${ROWS:-100000}
POISON=${POISON:-10}
REPEAT=${REPEAT:-3}
BATCH_SIZE=${BATCH_SIZE:-1000}
MAX_FAILURES=${MAX_FAILURES:-100}
export PGHOST=${PGHOST:-127.0.0.1}
export PGPORT=${PGPORT:-5432}
export PGUSER=${PGUSER:-postgres}
export PGOPTIONS="${PGOPTIONS:-} -c client_min_messages=warning"
DB=infill_bench_bisection

cd "$(dirname "$0")/.."
ROOT=$(pwd)
OUT=${OUT:-$ROOT/bench/results/bisection.txt}
BIN=${BIN:-}   # set: use that binary, build nothing

log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { printf 'bench: FAILED: %s\n' "$*" >&2; exit 1; }

for k in ROWS POISON REPEAT BATCH_SIZE MAX_FAILURES; do
  [[ ${!k} =~ ^[1-9][0-9]*$ ]] || die "$k must be a positive integer (got '${!k}')"
done
(( POISON <= ROWS )) || die "POISON ($POISON) must not exceed ROWS ($ROWS)"
(( POISON <= MAX_FAILURES )) || die "POISON ($POISON) must not exceed MAX_FAILURES ($MAX_FAILURES), or the run stops early"
command -v psql >/dev/null || die "psql is not installed"
command -v python3 >/dev/null || die "python3 is not installed"

psql_admin() { psql -X -q -v ON_ERROR_STOP=1 -d postgres "$@"; }
psql_db() { psql -X -q -v ON_ERROR_STOP=1 -d "$DB" "$@"; }
scalar() { psql_db -At -c "$1"; }

WORK=$(mktemp -d "${TMPDIR:-/tmp}/infill-bisection.XXXXXX")
log "work dir (specs, audit logs, raw outputs): $WORK"

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

# --- database and base table (dropped on exit) ---------------------------
drop_db() { psql_admin -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null 2>&1 || true; }
trap drop_db EXIT
STEP=$(( ROWS / POISON ))
# Poison ids: the middle of each of the POISON equal slices of 1..ROWS.
POISON_WHERE="id % $STEP = $(( STEP / 2 )) AND id <= $(( STEP * POISON ))"
log "creating database $DB with bisect_base ($ROWS rows, $POISON poison: $POISON_WHERE)"
psql_admin -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)"
psql_admin -c "CREATE DATABASE $DB"
psql_db <<SQL
CREATE TABLE bisect_base (id bigint PRIMARY KEY, a int NOT NULL, b int NOT NULL, val bigint, poison int NOT NULL);
INSERT INTO bisect_base (id, a, b, val, poison)
  SELECT i, (i % 1000)::int, ((i * 7919) % 100003)::int, NULL, 0
  FROM generate_series(1::bigint, $ROWS::bigint) AS s(i);
VACUUM ANALYZE bisect_base;
SQL
[[ $(scalar "SELECT count(*) FROM bisect_base WHERE $POISON_WHERE") == "$POISON" ]] || die "the poison rule does not pick $POISON rows"

spec() { # table
  cat > "$WORK/$1.toml" <<TOML
[databases]
target = "postgres://$PGUSER@$PGHOST:$PGPORT/$DB"

[jobs.fill]
source.table = "$1"
source.key = ["id"]
source.where = "val IS NULL"
action.update.val = "a * 31 + b"
max_failures = $MAX_FAILURES
TOML
}
spec t_clean
spec t_poison

copy_table() { # table, poison rule
  psql_db -c "DROP TABLE IF EXISTS $1" \
          -c "CREATE TABLE $1 AS SELECT * FROM bisect_base" \
          -c "UPDATE $1 SET poison = 1 WHERE $2" \
          -c "ALTER TABLE $1 ADD PRIMARY KEY (id), ADD CHECK (poison = 0 OR val IS NULL)" \
          -c "VACUUM ANALYZE $1"
}

# One run; prints "seconds batches". Checks the outcome; $2 = poison rows expected.
run_infill() { # table expected_failures rep
  local t=$1 want=$2 tag=$1.$3
  local json=$WORK/$tag.json err=$WORK/$tag.err
  # Each run starts from empty state tables, like a first run on a database.
  psql_db -c "DROP TABLE IF EXISTS infill_undo, infill_batches, infill_runs, infill_failures, infill_approvals, infill_locks, infill_schema" >/dev/null
  psql_db -c CHECKPOINT >/dev/null
  local t0 t1 rc=0
  t0=$(date +%s.%N)
  "$BIN" run "$WORK/$t.toml" --batch-size "$BATCH_SIZE" --yes --json > "$json" 2> "$err" || rc=$?
  t1=$(date +%s.%N)
  # A run that ends with failed rows exits 1 (README, max_failures); a clean one 0.
  local want_rc=0
  (( want > 0 )) && want_rc=1
  [[ $rc == "$want_rc" ]] || { cat "$err" >&2; die "$t: infill run exited with $rc, expected $want_rc (output in $json)"; }
  python3 - "$json" "$ROWS" "$want" <<'PY' >&2 || die "$t: unexpected infill summary in $json"
import json, sys
s = json.load(open(sys.argv[1]))
rows, want = int(sys.argv[2]), int(sys.argv[3])
assert s["rows_changed"] == rows - want, s
PY
  local failed
  failed=$(scalar "SELECT count(*) FROM infill_failures")
  [[ $failed == "$want" ]] || die "$t: $failed rows in infill_failures, expected exactly $want"
  if (( want > 0 )); then
    local wrong
    wrong=$(scalar "SELECT count(*) FROM infill_failures f FULL JOIN (SELECT id FROM $t WHERE poison = 1) p
                    ON (f.row_key::jsonb->>0)::bigint = p.id WHERE f.row_key IS NULL OR p.id IS NULL OR f.error_code <> '23514'")
    [[ $wrong == 0 ]] || die "$t: infill_failures does not hold exactly the poison rows with SQLSTATE 23514 ($wrong mismatches)"
  fi
  local bad
  bad=$(scalar "SELECT count(*) FROM $t WHERE (poison = 0 AND val IS DISTINCT FROM a * 31 + b) OR (poison = 1 AND val IS NOT NULL)")
  [[ $bad == 0 ]] || die "$t: $bad rows with a wrong val"
  local batches
  batches=$(python3 -c '
import json, sys
s = json.load(open(sys.argv[1]))
print(sum(1 for l in open(s["audit_log"]) if "\"event\":\"batch\"" in l))' "$json")
  echo "$(python3 -c "print('%.3f' % ($t1 - $t0))") $batches"
}

clean_s=() poison_s=()
raw=$WORK/raw.txt
: > "$raw"
for rep in $(seq 1 "$REPEAT"); do
  log "repetition $rep/$REPEAT: fresh copies t_clean, t_poison"
  copy_table t_clean false
  copy_table t_poison "$POISON_WHERE"
  if (( rep % 2 )); then order="clean poison"; else order="poison clean"; fi
  for who in $order; do
    if [[ $who == clean ]]; then
      r=$(run_infill t_clean 0 "$rep")
      read -r s n <<< "$r"
      clean_s+=("$s")
      log "  clean table: ${s}s, $n batches"
      echo "rep=$rep table=clean seconds=$s batches=$n" >> "$raw"
    else
      r=$(run_infill t_poison "$POISON" "$rep")
      read -r s n <<< "$r"
      poison_s+=("$s")
      log "  $POISON poison rows: ${s}s, $n batches, exactly $POISON rows in infill_failures"
      echo "rep=$rep table=poison seconds=$s batches=$n failures=$POISON" >> "$raw"
    fi
  done
done

# --- report --------------------------------------------------------------
mkdir -p "$(dirname "$OUT")"
python3 - "$ROWS" "$POISON" "$REPEAT" "$BATCH_SIZE" "${clean_s[*]}" "${poison_s[*]}" "$raw" > "$WORK/report.txt" <<'PY'
import re, statistics, sys
rows, poison, repeat, bs = (int(x) for x in sys.argv[1:5])
nb = {"clean": set(), "poison": set()}
for l in open(sys.argv[7]):
    nb[re.search(r"table=(\w+)", l).group(1)].add(int(re.search(r"batches=(\d+)", l).group(1)))
nb = {k: "/".join(str(x) for x in sorted(v)) for k, v in nb.items()}
clean = [float(x) for x in sys.argv[5].split()]
dirty = [float(x) for x in sys.argv[6].split()]
mc, md = statistics.median(clean), statistics.median(dirty)
print("rows=%d poison=%d repeat=%d --batch-size %d (medians of %d interleaved runs; order alternates)" % (rows, poison, repeat, bs, repeat))
print()
print("%-30s %10s %10s %18s" % ("table", "seconds", "ratio", "committed batches"))
print("%-30s %10.2f %10s %18s" % ("no poison rows (baseline)", mc, "1.00", nb["clean"]))
print("%-30s %10.2f %10.2f %18s" % ("%d poison rows" % poison, md, md / mc, nb["poison"]))
print()
print("isolating %d rows costs %.2f s more than the clean run: %.0f ms per isolated row" % (poison, md - mc, (md - mc) / poison * 1000))
print("every poison run ended with exactly %d rows in infill_failures (the poison keys, SQLSTATE 23514)" % poison)
print()
print("raw seconds: clean %s; poison %s" % (" ".join("%.3f" % x for x in clean), " ".join("%.3f" % x for x in dirty)))
PY
{
  echo "# infill bisection bench, $(date -u +%Y-%m-%dT%H:%M:%SZ), $(nproc) cores, $(psql_db -At -c 'SHOW server_version'), infill source $REV"
  echo "# command: ROWS=$ROWS POISON=$POISON REPEAT=$REPEAT BATCH_SIZE=$BATCH_SIZE MAX_FAILURES=$MAX_FAILURES bench/bisection.sh"
  cat "$raw"
  echo
  cat "$WORK/report.txt"
} > "$OUT"
echo
cat "$WORK/report.txt"
log "raw results written to $OUT; specs and audit logs kept in $WORK; dropping $DB"
