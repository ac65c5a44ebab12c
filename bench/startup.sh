#!/usr/bin/env bash
# Fixed cost of one infill process on PostgreSQL: the wall time of a run
# that has almost nothing to do (1,000 rows, one batch), over TLS (the
# server's default here) and without it, against psql connecting and
# running one statement. What it catches: a connection that takes tens of
# milliseconds too long, as sqlx 0.9.0's sockets without TCP_NODELAY did
# (vendor/README.md).
#
#   bench/startup.sh                                # 20 runs of each
#   BIN_BEFORE=/path/to/older/infill bench/startup.sh  # and an older binary
#
# Knobs (environment):
#   RUNS        runs of each contender (default 20)
#   BIN         infill binary to use; set, nothing is built
#   BIN_BEFORE  a second infill binary, measured the same way (optional)
#   OUT         report file (default bench/results/startup.txt)
#   PGHOST PGPORT PGUSER   the server (default 127.0.0.1 5432 postgres)
#
# Contenders run interleaved (one run of each in turn), so a slow moment
# of the machine touches them all. Reported: the median and the fastest
# wall time of each, and the median over psql's.
source "$(dirname "$0")/lib.sh"

RUNS=${RUNS:-20}
DB=infill_bench_startup
posint RUNS
need psql python3
cd "$BENCH_ROOT"
OUT=${OUT:-$RESULTS/startup.txt}

bench_workdir startup
infill_bin
if [[ -n ${BIN_BEFORE:-} ]]; then
  [[ -x $BIN_BEFORE && -f $BIN_BEFORE ]] || die "BIN_BEFORE=$BIN_BEFORE is not an executable file"
  BIN_BEFORE=$(realpath "$BIN_BEFORE")
fi

psql_admin() { psql -X -q -v ON_ERROR_STOP=1 -d postgres "$@"; }
drop_db() { psql_admin -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null 2>&1 || true; }
trap drop_db EXIT
drop_db
psql_admin -c "CREATE DATABASE $DB"
psql -X -q -v ON_ERROR_STOP=1 -d "$DB" <<'SQL'
CREATE TABLE t (id bigint PRIMARY KEY, a int NOT NULL, c bigint);
INSERT INTO t SELECT i, i % 100, NULL FROM generate_series(1, 1000) AS s(i);
SQL
ssl=$(psql -X -At -d "$DB" -c "SHOW ssl")

spec() { # FILE URL-SUFFIX
  cat > "$1" <<TOML
[databases]
target = "postgres://$PGUSER@$PGHOST:$PGPORT/$DB$2"

[jobs.touch]
source.table = "t"
source.key = ["id"]
action.update.c = "a * 2"
undo = false
TOML
}
spec "$WORK/tls.toml" ""
spec "$WORK/plain.toml" "?sslmode=disable"

# elapsed CMD...: the wall time of CMD in milliseconds (its output dropped;
# a failure stops the benchmark).
elapsed() {
  local t0 t1
  t0=$(date +%s%N)
  "$@" > "$WORK/last.out" 2>&1 || { cat "$WORK/last.out" >&2; die "$* failed"; }
  t1=$(date +%s%N)
  echo $(((t1 - t0) / 1000))
}

names=("psql: connect, SELECT 1" "infill run, TLS (default)" "infill run, sslmode=disable")
cmds=("psql -X -q -d $DB -c 'SELECT 1'"
      "$BIN run $WORK/tls.toml --yes --json"
      "$BIN run $WORK/plain.toml --yes --json")
if [[ -n ${BIN_BEFORE:-} ]]; then
  names+=("BIN_BEFORE run, TLS (default)" "BIN_BEFORE run, sslmode=disable")
  cmds+=("$BIN_BEFORE run $WORK/tls.toml --yes --json"
         "$BIN_BEFORE run $WORK/plain.toml --yes --json")
fi

raw=$WORK/raw.txt
: > "$raw"
log "$RUNS interleaved runs of ${#cmds[@]} contenders (server ssl=$ssl)"
for run in $(seq 1 "$RUNS"); do
  for i in "${!cmds[@]}"; do
    # Word splitting of the command line is intended (no spaces in paths).
    # shellcheck disable=SC2086
    us=$(eval elapsed ${cmds[$i]})
    echo "$i $us" >> "$raw"
  done
done

mkdir -p "$(dirname "$OUT")"
{
  echo "# infill bench startup, $(date -u +%Y-%m-%dT%H:%M:%SZ), $(nproc) cores, PostgreSQL $(psql -X -At -d postgres -c 'SHOW server_version'), ssl=$ssl, infill $REV"
  [[ -n ${BIN_BEFORE:-} ]] && echo "# BIN_BEFORE: $BIN_BEFORE of $(date -r "$BIN_BEFORE" '+%Y-%m-%d %H:%M')"
  echo "# command: RUNS=$RUNS${BIN_BEFORE:+ BIN_BEFORE=...} bench/startup.sh"
  python3 - "$raw" "${names[@]}" <<'PY'
import statistics, sys
raw, names = sys.argv[1], sys.argv[2:]
runs = {}
for line in open(raw):
    i, us = line.split()
    runs.setdefault(int(i), []).append(int(us) / 1000)
base = statistics.median(runs[0])
print(f"{'contender':34s} {'median ms':>10s} {'fastest ms':>11s} {'median / psql':>14s}")
for i, name in enumerate(names):
    m = statistics.median(runs[i])
    print(f"{name:34s} {m:10.1f} {min(runs[i]):11.1f} {m / base:14.1f}")
print(f"\n{len(runs[0])} runs of each; an infill run here opens its connections, checks the table, writes 1,000 rows in one batch and records the run.")
PY
} > "$OUT"
cat "$OUT"
log "report written to $OUT"
