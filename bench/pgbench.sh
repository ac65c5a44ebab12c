#!/usr/bin/env bash
# Benchmark B3: what a backfill does to the application. pgbench runs a
# read-write script on pgbench_accounts (CLIENTS clients, DURATION seconds)
# three times:
#   (a) alone;
#   (b) while one set-based UPDATE fills a new nullable column abalance2;
#   (c) while `infill run` (default settings) does the same fill;
#   (d) when TUNED is set: while `infill run` with those job settings
#       (throttles such as sleep_coef or max_batch) does the same fill.
# It reports pgbench's TPS and latency (median, p99, max, from the
# per-transaction log -l) for each phase, the same for the transactions that
# started while the writer ran, how long the writer took and whether it
# finished within the pgbench window. Goal: p99 while infill ran <= 2x the
# p99 of (a).
#
#   bench/pgbench.sh                          # scale 100 (10M accounts), 60 s per phase
#   SCALE=10 DURATION=20 bench/pgbench.sh     # quick
#
# Knobs (environment):
#   SCALE         pgbench scale (100,000 accounts each)       (default 100)
#   CLIENTS       pgbench clients (-c)                        (default 8)
#   THREADS       pgbench threads (-j)                        (default 2)
#   DURATION      seconds of each pgbench phase (-T)          (default 60)
#   WRITER_DELAY  seconds after pgbench starts before the     (default 5)
#                 writer starts, in (b) and (c)
#   RATE          empty: closed loop (each client sends its   (default empty)
#                 next transaction when the last one ends); a
#                 number: pgbench -R RATE (transactions/s in all), whose
#                 latencies count from the scheduled start, so a stall
#                 delays every transaction queued behind it
#   TUNED         job settings for phase (d), TOML lines     (default empty: no (d))
#                 separated by ';', e.g. 'sleep_coef = 1'
#   ONLY_TUNED    1: run (a) and (d) only, to compare settings  (default empty)
#   BIN           infill binary to use; set, nothing is built
#   OUT           report file                                 (default bench/results/pgbench.txt)
#   VALUES        key=value results for bench/summary.py      (default: OUT with .values.txt)
#   PGHOST PGPORT PGUSER   the server                         (default 127.0.0.1 5432 postgres)
#
# Every phase starts from a freshly initialised pgbench database
# (`pgbench -i -I dtGvp`, then CHECKPOINT), so (b) and (c) fill the same
# table in the same physical state. The fill is abalance2 = aid * 2 + bid:
# it reads columns the pgbench script never writes, so the result can be
# checked exactly (no row with abalance2 IS DISTINCT FROM aid * 2 + bid)
# while pgbench keeps changing abalance. A writer that outlasts the window
# is waited for (pgbench's clients blocked on its row locks finish when it
# commits); the report says so. The database infill_bench_pgbench is
# dropped at the end. See bench/README.md.
source "$(dirname "$0")/lib.sh"

SCALE=${SCALE:-100}
CLIENTS=${CLIENTS:-8}
THREADS=${THREADS:-2}
DURATION=${DURATION:-60}
WRITER_DELAY=${WRITER_DELAY:-5}
RATE=${RATE:-}
TUNED=${TUNED:-}
ONLY_TUNED=${ONLY_TUNED:-}
[[ -z $ONLY_TUNED || -n $TUNED ]] || die "ONLY_TUNED needs TUNED"
DB=infill_bench_pgbench
FILL="aid * 2 + bid"
OUT=${OUT:-$RESULTS/pgbench.txt}
VALUES=${VALUES:-${OUT%.txt}.values.txt}
for k in SCALE CLIENTS THREADS DURATION; do posint "$k"; done
[[ -z $RATE ]] || posint RATE
[[ $WRITER_DELAY =~ ^[0-9]+$ ]] && (( WRITER_DELAY < DURATION )) || die "WRITER_DELAY must be an integer below DURATION (got '$WRITER_DELAY')"
need psql pgbench python3
cd "$BENCH_ROOT"
ACCOUNTS=$(( SCALE * 100000 ))

psql_admin() { psql -X -q -v ON_ERROR_STOP=1 -d postgres "$@"; }
psql_db() { psql -X -q -v ON_ERROR_STOP=1 -d "$DB" "$@"; }
scalar() { psql_db -At -c "$1"; }

bench_workdir pgbench
infill_bin

drop_db() { psql_admin -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null 2>&1 || true; }
trap drop_db EXIT

# The application: one account's balance changed and read back, per transaction.
cat > "$WORK/app.sql" <<SQL
\\set aid random(1, $ACCOUNTS)
\\set delta random(-5000, 5000)
BEGIN;
UPDATE pgbench_accounts SET abalance = abalance + :delta WHERE aid = :aid;
SELECT abalance FROM pgbench_accounts WHERE aid = :aid;
END;
SQL

cat > "$WORK/fill.toml" <<TOML
[databases]
target = "postgres://$PGUSER@$PGHOST:$PGPORT/$DB"

[jobs.fill]
source.table = "pgbench_accounts"
source.key = ["aid"]
source.where = "abalance2 IS NULL"
action.update.abalance2 = "$FILL"
TOML
{ cat "$WORK/fill.toml"; tr ';' '\n' <<< "$TUNED"; echo; } > "$WORK/fill_tuned.toml"

fresh_db() {
  local t0 t1
  t0=$(now)
  drop_db
  psql_admin -c "CREATE DATABASE $DB"
  pgbench -i -q -I dtGvp -s "$SCALE" "$DB" > "$WORK/init.out" 2>&1 || { cat "$WORK/init.out" >&2; die "pgbench -i failed"; }
  psql_db -c "ALTER TABLE pgbench_accounts ADD COLUMN abalance2 bigint" -c CHECKPOINT
  t1=$(now)
  [[ $(scalar "SELECT count(*) FROM pgbench_accounts WHERE abalance2 IS NULL") == "$ACCOUNTS" ]] || die "pgbench_accounts does not hold $ACCOUNTS rows"
  log "  fresh pgbench database, scale $SCALE ($ACCOUNTS accounts), in $(elapsed "$t0" "$t1") s"
}

# phase NAME WRITER: pgbench for DURATION seconds; WRITER (none, single or
# infill) starts WRITER_DELAY seconds in and runs to its end.
phase() {
  local name=$1 writer=$2 dir=$WORK/$1 pid rc=0 w0="" w1="" wrss="" bad
  mkdir -p "$dir"
  fresh_db
  log "phase $name: pgbench -c $CLIENTS -j $THREADS -T $DURATION${RATE:+ -R $RATE}, writer: $writer"
  (cd "$dir" && exec pgbench -n -c "$CLIENTS" -j "$THREADS" -T "$DURATION" ${RATE:+-R "$RATE"} -l --log-prefix=tx \
      -f "$WORK/app.sql" "$DB" > "$dir/pgbench.out" 2> "$dir/pgbench.err") &
  pid=$!
  local p0
  p0=$(now)
  if [[ $writer != none ]]; then
    sleep "$WRITER_DELAY"
    w0=$(now)
    case $writer in
      single)
        psql_db -c "UPDATE pgbench_accounts SET abalance2 = $FILL WHERE abalance2 IS NULL" > "$dir/writer.out" \
          || { kill "$pid" 2>/dev/null || true; die "the single UPDATE failed"; }
        ;;
      infill|tuned)
        local r spec=$WORK/fill.toml
        [[ $writer == tuned ]] && spec=$WORK/fill_tuned.toml
        r=$(run_infill "$spec" "$dir/infill.json" "$ACCOUNTS") \
          || { kill "$pid" 2>/dev/null || true; die "infill run failed"; }
        wrss=${r#* }
        ;;
    esac
    w1=$(now)
    log "  writer ($writer) took $(elapsed "$w0" "$w1") s"
  fi
  wait "$pid" || rc=$?
  [[ $rc == 0 ]] || { cat "$dir/pgbench.err" >&2; die "pgbench exited with $rc in phase $name"; }
  ! grep -qi "aborted\|error" "$dir/pgbench.err" || { cat "$dir/pgbench.err" >&2; die "pgbench reported errors in phase $name"; }
  if [[ $writer != none ]]; then
    bad=$(scalar "SELECT count(*) FROM pgbench_accounts WHERE abalance2 IS DISTINCT FROM $FILL")
    [[ $bad == 0 ]] || die "the $writer writer left $bad rows where abalance2 IS DISTINCT FROM $FILL"
  fi
  {
    echo "phase=$name"
    echo "writer=$writer"
    echo "tps=$(sed -n 's/^tps = \([0-9.]*\) .*/\1/p' "$dir/pgbench.out" | tail -1)"
    echo "pgbench_start=$p0"
    if [[ -n $w0 ]]; then
      echo "writer_start=$w0"
      echo "writer_end=$w1"
      echo "writer_s=$(elapsed "$w0" "$w1")"
      [[ -n $wrss ]] && echo "writer_rss_kib=$wrss"
      python3 bench/stats.py pgbench "$dir" "$w0" "$w1"
    else
      python3 bench/stats.py pgbench "$dir"
    fi
  } > "$dir/values.txt"
  log "  $(tr '\n' ' ' < "$dir/values.txt" | cut -c1-400)"
}

PHASES="a_alone"
phase a_alone none
if [[ -z $ONLY_TUNED ]]; then
  phase b_single single
  phase c_infill infill
  PHASES="$PHASES b_single c_infill"
fi
if [[ -n $TUNED ]]; then
  phase d_tuned tuned
  PHASES="$PHASES d_tuned"
fi

mkdir -p "$(dirname "$OUT")"
python3 - "$WORK" "$DURATION" "$VALUES" "$ACCOUNTS" "$PHASES" "$TUNED" <<'PY' > "$WORK/report.txt"
import sys
work, duration, values, accounts = sys.argv[1], float(sys.argv[2]), sys.argv[3], int(sys.argv[4])
phases, tuned = sys.argv[5].split(), sys.argv[6]
ph = {}
for name in phases:
    ph[name] = dict(l.strip().split("=", 1) for l in open("%s/%s/values.txt" % (work, name)) if "=" in l)
label = {"a_alone": "(a) pgbench alone", "b_single": "(b) + single UPDATE", "c_infill": "(c) + infill run",
         "d_tuned": "(d) + infill, tuned"}
print("whole window (every transaction of the phase):")
print("%-22s %9s %9s %9s %10s %11s %10s" % ("phase", "TPS", "p50 ms", "p99 ms", "max ms", "writer s", "in window"))
out = {}
for name, v in ph.items():
    first = float(v["first"])
    wr, inw = "-", "-"
    if "writer_s" in v:
        wr = "%.1f" % float(v["writer_s"])
        inw = "yes" if float(v["writer_end"]) <= first + duration else "NO"
    print("%-22s %9.1f %9.2f %9.2f %10.1f %11s %10s" % (label[name], float(v["tps"]), float(v["latency_ms_median"]),
          float(v["latency_ms_p99"]), float(v["latency_ms_max"]), wr, inw))
    short = name.split("_")[0]
    for k in ("tps", "latency_ms_median", "latency_ms_p99", "latency_ms_max", "transactions", "failed", "writer_s",
              "writer_rss_kib", "during_tps", "during_latency_ms_median", "during_latency_ms_p99",
              "during_latency_ms_max", "during_transactions"):
        if k in v:
            out["%s_%s" % (short, k)] = v[k]
    if "writer_s" in v:
        out["%s_in_window" % short] = inw
print()
print("while the writer ran (transactions that started between its start and its end, or pgbench's end):")
print("%-22s %9s %9s %9s %10s %12s" % ("phase", "TPS", "p50 ms", "p99 ms", "max ms", "transactions"))
a = ph["a_alone"]
print("%-22s %9.1f %9.2f %9.2f %10.1f %12s" % (label["a_alone"] + " (all)", float(a["tps"]), float(a["latency_ms_median"]),
      float(a["latency_ms_p99"]), float(a["latency_ms_max"]), a["transactions"]))
for name in phases[1:]:
    v = ph[name]
    if int(v.get("during_transactions", 0)) == 0:
        print("%-22s   no transaction started while the writer ran" % label[name])
        continue
    print("%-22s %9.1f %9.2f %9.2f %10.1f %12s" % (label[name], float(v["during_tps"]), float(v["during_latency_ms_median"]),
          float(v["during_latency_ms_p99"]), float(v["during_latency_ms_max"]), v["during_transactions"]))
a99 = float(a["latency_ms_p99"])
for name in phases[1:]:
    short = name.split("_")[0]
    v = ph[name]
    out["%s_p99_vs_a" % short] = "%.2f" % (float(v["latency_ms_p99"]) / a99)
    if "during_latency_ms_p99" in v:
        out["%s_during_p99_vs_a" % short] = "%.2f" % (float(v["during_latency_ms_p99"]) / a99)
print()
c_d = out.get("c_during_p99_vs_a")
if "c_infill" in ph:
    print("p99 while infill ran / p99 alone: %sx (goal <= 2x: %s); over the whole window: %sx" % (
        c_d, ("met" if float(c_d) <= 2 else "NOT met") if c_d else "no figure", out["c_p99_vs_a"]))
if "b_single" in ph:
    print("p99 while the single UPDATE ran / p99 alone: %sx; over the whole window: %sx" % (
        out.get("b_during_p99_vs_a", "-"), out["b_p99_vs_a"]))
d_d = out.get("d_during_p99_vs_a")
if "d_tuned" in ph:
    print("p99 while infill with %s ran / p99 alone: %sx (goal <= 2x: %s); over the whole window: %sx" % (
        tuned, d_d, ("met" if float(d_d) <= 2 else "NOT met") if d_d else "no figure", out["d_p99_vs_a"]))
print("the window is pgbench's first transaction + %g s; a writer still running then is waited for" % duration)
with open(values, "w") as f:
    f.write("accounts=%d\nduration=%g\n" % (accounts, duration))
    if tuned:
        f.write("tuned=%s\n" % tuned)
    for k, v in out.items():
        f.write("%s=%s\n" % (k, v))
PY
{
  echo "# infill bench B3 (pgbench), $(date -u +%Y-%m-%dT%H:%M:%SZ), $(nproc) cores, $(psql -X -At -d postgres -c 'SHOW server_version'), infill source $REV"
  echo "# command: SCALE=$SCALE CLIENTS=$CLIENTS THREADS=$THREADS DURATION=$DURATION WRITER_DELAY=$WRITER_DELAY RATE=$RATE TUNED='$TUNED' bench/pgbench.sh"
  if [[ -n $RATE ]]; then
    echo "# load: open loop, pgbench -R $RATE (latency counted from the scheduled start)"
  else
    echo "# load: closed loop (a client waits for its last transaction, so a stall shows in TPS and max more than in p99)"
  fi
  echo "# $ACCOUNTS accounts; fill abalance2 = $FILL; pgbench script: $(tr '\n' ' ' < "$WORK/app.sql")"
  cat "$WORK/report.txt"
  echo
  echo "raw figures per phase:"
  for p in $PHASES; do sed "s/^/  $p: /" "$WORK/$p/values.txt"; done
} > "$OUT"
cat "$OUT"
log "report written to $OUT, values to $VALUES; pgbench logs, spec and audit log kept in $WORK"
