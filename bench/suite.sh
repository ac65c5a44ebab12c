#!/usr/bin/env bash
# The whole benchmark suite in one command, then one summary table.
#
#   SIZE=full  bench/suite.sh     # the issue's sizes (10M rows, pgbench scale 100), ~15-22 min
#   SIZE=small bench/suite.sh     # the same parts, scaled down, < 3 min
#   PARTS="b3" SIZE=small bench/suite.sh           # one part alone, at the suite's size
#   BIN=/path/to/infill SIZE=small bench/suite.sh  # no build
#
# Parts (each also runs alone through its script, see bench/README.md):
#   b1  PostgreSQL: single UPDATE vs infill run (defaults) vs a per-row loop  bench/run.sh
#   b2  MariaDB: single UPDATE vs infill run (defaults)                       bench/mariadb.sh
#   b3  pgbench alone / with a single UPDATE / with infill run                bench/pgbench.sh
#   b4  infill's peak RSS: read from b1 and b5, no run of its own
#   b5  infill rows/s as the table grows (b1's size is its largest point)     bench/growth.sh
#   b6  SQLite: single UPDATE (sqlite3) vs infill run (defaults)             bench/sqlite.sh
#
# Knobs (environment): SIZE (full or small, default full), PARTS (default
# "b1 b2 b3 b5 b6"), BIN, and per part, defaults by SIZE (full / small):
#   B1_ROWS 10000000/1000000  B1_REPEAT 3/1  LOOP_ROWS 100000/5000
#   B2_ROWS 10000000/300000   B2_REPEAT 1/1
#   B3_SCALE 100/5  B3_DURATION 60/15  B3_CLIENTS 8/8  B3_WRITER_DELAY 5/3
#   B3_RATE empty/empty (closed loop; a number: pgbench -R, open loop)
#   B3_TUNED "busy_sleep_coef = 0" (a phase (d): infill with these job settings, by default
#            without its rest for a busy application; empty: no (d))
#   B5_SIZES "1000000 3000000"/"100000 300000" (plus B1_ROWS when b1 runs)
#   B6_ROWS 1000000/1000000   B6_REPEAT 3/1
# Results: bench/results/suite-bN.txt (each part's report), suite-bN.values.txt
# (its figures), suite-bN.log.txt (its console output) and suite.txt (the
# summary). Specs, audit logs and pgbench logs stay in the work dir printed
# at the start. A part that fails (a wrong row, an infill run that did not
# succeed, a tool that errs) stops the suite with a non-zero exit.
source "$(dirname "$0")/lib.sh"

SIZE=${SIZE:-full}
PARTS=${PARTS:-b1 b2 b3 b5 b6}
case $SIZE in
  full)
    : "${B1_ROWS:=10000000}" "${B1_REPEAT:=3}" "${LOOP_ROWS:=100000}"
    : "${B2_ROWS:=10000000}" "${B2_REPEAT:=1}"
    : "${B3_SCALE:=100}" "${B3_DURATION:=60}" "${B3_CLIENTS:=8}" "${B3_WRITER_DELAY:=5}" "${B3_TUNED=busy_sleep_coef = 0}"
    : "${B5_SIZES:=1000000 3000000}"
    : "${B6_ROWS:=1000000}" "${B6_REPEAT:=3}"
    ;;
  small)
    : "${B1_ROWS:=1000000}" "${B1_REPEAT:=1}" "${LOOP_ROWS:=5000}"
    : "${B2_ROWS:=300000}" "${B2_REPEAT:=1}"
    : "${B3_SCALE:=5}" "${B3_DURATION:=15}" "${B3_CLIENTS:=8}" "${B3_WRITER_DELAY:=3}" "${B3_TUNED=busy_sleep_coef = 0}"
    : "${B5_SIZES:=100000 300000}"
    : "${B6_ROWS:=1000000}" "${B6_REPEAT:=1}"
    ;;
  *) die "SIZE must be full or small (got '$SIZE')" ;;
esac
for p in $PARTS; do
  [[ $p =~ ^b[12356]$ ]] || die "PARTS takes b1 b2 b3 b5 b6 (b4 comes from b1 and b5), got '$p'"
done
has() { [[ " $PARTS " == *" $1 "* ]]; }
# B5's largest point is B1's run when B1 runs (same table, same settings).
if has b1; then
  for s in $B5_SIZES; do (( s < B1_ROWS )) || die "B5_SIZES ($B5_SIZES) must stay below B1_ROWS ($B1_ROWS), B5's largest point"; done
else
  B5_SIZES="$B5_SIZES $B1_ROWS"
fi
cd "$BENCH_ROOT"

# --- preflight: every tool and server the chosen parts need, before anything long
need python3
if has b1 || has b3 || has b5; then
  need psql
  psql -X -q -d postgres -c "SELECT 1" >/dev/null || die "PostgreSQL at $PGHOST:$PGPORT (user $PGUSER) does not answer"
fi
has b3 && need pgbench
if has b2; then
  need mariadb
  mariadb -h "${MYHOST:-127.0.0.1}" -P "${MYPORT:-3306}" -u "${MYUSER:-root}" -e "SELECT 1" >/dev/null || die "MariaDB does not answer"
fi
has b6 && need sqlite3

SUITE_WORK=$(mktemp -d "${TMPDIR:-/tmp}/infill-suite.XXXXXX")
log "suite work dir (every part's specs, audit logs, pgbench logs): $SUITE_WORK"
export TMPDIR=$SUITE_WORK

infill_bin                 # BIN given: no build; else cargo build --release, once
export BENCH_REV="$REV"    # the parts record the same source and build nothing

mkdir -p "$RESULTS"
PREFIX=$RESULTS/suite
rm -f "$PREFIX".txt "$PREFIX".values.txt "$PREFIX"-b?.txt "$PREFIX"-b?.values.txt "$PREFIX"-b?.log.txt
SV=$PREFIX.values.txt
put "$SV" size "$SIZE"
put "$SV" parts "$PARTS"

# What differs from the issue's sizes, said in the summary.
note() { # numbers of 4 digits or more get thousands separators
  local t
  t=$(sed -E ':a; s/([0-9])([0-9]{3})($|[^0-9])/\1,\2\3/; ta' <<< "$1")
  put "$SV" note "$t"
  log "note: $t"
}
has b1 && {
  (( B1_ROWS == 10000000 )) || note "B1 on $B1_ROWS rows (issue: 10,000,000)"
  (( LOOP_ROWS == 100000 )) || note "B1 per-row loop measured on $LOOP_ROWS rows (issue: 100,000), scaled to $B1_ROWS"
  note "B1 per-row loop: measured on a table of its own with the first $LOOP_ROWS rows, time scaled linearly to $B1_ROWS rows"
  (( B1_REPEAT >= 3 )) || note "B1: $B1_REPEAT run(s) of each contender (bench/run.sh alone defaults to 3, medians)"
}
has b2 && {
  (( B2_ROWS == 10000000 )) || note "B2 on $B2_ROWS rows (B1's full size: 10,000,000)"
  (( B2_REPEAT >= 3 )) || note "B2: $B2_REPEAT run(s) of each contender"
}
has b3 && {
  (( B3_SCALE == 100 )) || note "B3 at pgbench scale $B3_SCALE ($(( B3_SCALE * 100000 )) accounts; issue: scale 100, 10,000,000)"
  (( B3_DURATION == 60 )) || note "B3 pgbench phases of $B3_DURATION s (issue: 60 s)"
  if [[ -n ${B3_RATE:-} ]]; then note "B3 open loop: pgbench -R $B3_RATE, latency from the scheduled start"
  else note "B3 closed loop (pgbench's default): a stall shows in TPS and max latency more than in p99; B3_RATE=N runs pgbench -R N"; fi
}
has b5 && {
  pts="$B5_SIZES"; has b1 && pts="$B5_SIZES $B1_ROWS (from B1)"
  [[ $pts == "1000000 3000000 10000000 (from B1)" || $pts == "1000000 3000000 10000000" ]] || note "B5 at $pts rows (issue: 1M, 3M, 10M)"
}
has b6 && {
  (( B6_ROWS == 1000000 )) || note "B6 on $B6_ROWS rows (issue: 1,000,000)"
}

run_part() { # name script env...
  local name=$1 script=$2 t0 t1 rc=0
  shift 2
  log "=== $name: $* bench/$script"
  t0=$(now)
  env "$@" OUT="$PREFIX-$name.txt" VALUES="$PREFIX-$name.values.txt" bash "bench/$script" 2>&1 | tee "$PREFIX-$name.log.txt" || rc=$?
  t1=$(now)
  [[ $rc == 0 ]] || die "part $name (bench/$script) failed with exit $rc; its output is in $PREFIX-$name.log.txt"
  [[ -s $PREFIX-$name.values.txt ]] || die "part $name wrote no figures ($PREFIX-$name.values.txt)"
  put "$SV" "seconds_$name" "$(elapsed "$t0" "$t1")"
  log "=== $name done in $(elapsed "$t0" "$t1") s"
}

SUITE_T0=$(now)
has b1 && run_part b1 run.sh ROWS="$B1_ROWS" REPEAT="$B1_REPEAT" BATCH_SIZE=auto LOOP_ROWS="$LOOP_ROWS"
has b5 && run_part b5 growth.sh SIZES="$B5_SIZES" REPEAT=1
has b2 && run_part b2 mariadb.sh ROWS="$B2_ROWS" REPEAT="$B2_REPEAT"
has b6 && run_part b6 sqlite.sh ROWS="$B6_ROWS" REPEAT="$B6_REPEAT"
has b3 && run_part b3 pgbench.sh SCALE="$B3_SCALE" DURATION="$B3_DURATION" CLIENTS="$B3_CLIENTS" WRITER_DELAY="$B3_WRITER_DELAY" RATE="${B3_RATE:-}" TUNED="${B3_TUNED:-}"
SUITE_T1=$(now)

{
  echo "# infill benchmark suite, SIZE=$SIZE, PARTS=\"$PARTS\", $(date -u +%Y-%m-%dT%H:%M:%SZ), $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg) at the end"
  echo "# infill source $REV; total $(elapsed "$SUITE_T0" "$SUITE_T1") s"
  echo
  python3 bench/summary.py "$PREFIX"
} > "$PREFIX.txt"
echo
cat "$PREFIX.txt"
log "summary in $PREFIX.txt; each part's report in $PREFIX-bN.txt; work dir $SUITE_WORK"
