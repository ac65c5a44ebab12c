#!/usr/bin/env bash
# Benchmark for source.diff (issue 5): rows of a PostgreSQL table whose key
# is missing from a MariaDB table (1% missing), inserted there by
# `infill run`, against reading both key sets by hand in the same run
# (psql and mariadb dumping every key, then `comm`): the least work any
# diff must do. Reports rows/s and infill's peak RSS (/usr/bin/time -v).
#
#   bench/diff.sh                 # 1,000,000 keys
#   ROWS=100000 bench/diff.sh     # quick
#
# Needs psql, mariadb, comm and /usr/bin/time; builds the release binary
# unless BIN=/path/to/infill is given.
set -euo pipefail
shopt -s inherit_errexit

ROWS=${ROWS:-1000000}
export PGHOST=${PGHOST:-127.0.0.1} PGPORT=${PGPORT:-5432} PGUSER=${PGUSER:-postgres}
DB=infill_bench_diff
cd "$(dirname "$0")/.."
if [[ -z ${BIN:-} ]]; then   # BIN=/path/to/infill: use it, build nothing
  cargo build --release --quiet --bin infill
  BIN=$(pwd)/target/release/infill
fi
WORK=$(mktemp -d "${TMPDIR:-/tmp}/infill-diff.XXXXXX")
log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
my() { mariadb -h 127.0.0.1 -u root "$@"; }
cleanup() {
  psql -X -q -d postgres -c "DROP DATABASE IF EXISTS $DB" >/dev/null 2>&1 || true
  my -e "DROP DATABASE IF EXISTS $DB" >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT
cleanup; mkdir -p "$WORK"

log "loading $ROWS rows into PostgreSQL and MariaDB (1% missing there)"
psql -X -q -d postgres -c "CREATE DATABASE $DB"
psql -X -q -v ON_ERROR_STOP=1 -d "$DB" -c "CREATE TABLE sessions (id bigint PRIMARY KEY, user_id bigint NOT NULL, score int NOT NULL);
INSERT INTO sessions SELECT i, i % 977, i % 100 FROM generate_series(1, $ROWS) i;" -c "VACUUM ANALYZE sessions"
my -e "CREATE DATABASE $DB"
my "$DB" -e "CREATE TABLE sessions (id bigint PRIMARY KEY, user_id bigint NOT NULL, score int NOT NULL);
INSERT INTO sessions SELECT seq, seq % 977, seq % 100 FROM seq_1_to_$ROWS WHERE seq % 100 <> 0;"
missing=$(( ROWS / 100 ))

log "baseline: dump both key sets and compare them"
start=$(date +%s.%N)
psql -X -q -At -d "$DB" -c "SELECT id FROM sessions ORDER BY id::text" > "$WORK/old.txt"
my -N "$DB" -e "SELECT id FROM sessions ORDER BY CAST(id AS CHAR)" > "$WORK/new.txt"
found=$(LC_ALL=C comm -23 "$WORK/old.txt" "$WORK/new.txt" | wc -l)
end=$(date +%s.%N)
[[ $found == "$missing" ]] || { echo "baseline found $found, expected $missing" >&2; exit 1; }
base_s=$(python3 -c "print(round($end - $start, 2))")

cat > "$WORK/infill.toml" <<TOML
[databases]
target = "mysql://root@127.0.0.1:3306/$DB"
old = "postgres://$PGUSER@$PGHOST:$PGPORT/$DB"

[jobs.copy]
source.diff = { from = "old", query = "SELECT id, user_id, score FROM sessions", key = "id", missing_in = "sessions" }
action.table = "sessions"
action.insert.id = ":id"
action.insert.user_id = ":user_id"
action.insert.score = ":score"
TOML
log "infill: diff and insert"
start=$(date +%s.%N)
/usr/bin/time -v "$BIN" run "$WORK/infill.toml" --yes --json > "$WORK/run.json" 2> "$WORK/time.txt"
end=$(date +%s.%N)
inserted=$(python3 -c "import json; print(json.load(open('$WORK/run.json'))['rows_changed'])")
[[ $inserted == "$missing" ]] || { echo "infill inserted $inserted, expected $missing" >&2; exit 1; }
total=$(my -N "$DB" -e "SELECT COUNT(*) FROM sessions")
[[ $total == "$ROWS" ]] || { echo "the target holds $total rows, expected $ROWS" >&2; exit 1; }
rss=$(awk -F': ' '/Maximum resident/ {print $2}' "$WORK/time.txt")
infill_s=$(python3 -c "print(round($end - $start, 2))")
echo "| contender | keys | missing | seconds | source keys/s | peak RSS |"
echo "|---|---|---|---|---|---|"
echo "| dump both key sets + comm (baseline) | $ROWS | $found | $base_s | $(python3 -c "print(round($ROWS / $base_s))") | - |"
echo "| infill run (diff + insert, checkpointed) | $ROWS | $inserted | $infill_s | $(python3 -c "print(round($ROWS / $infill_s))") | $(( rss / 1024 )) MiB |"
echo
echo "infill / baseline time: $(python3 -c "print(round($infill_s / $base_s, 2))")x"
