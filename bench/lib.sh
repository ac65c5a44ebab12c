# bench/lib.sh: helpers shared by the benchmark scripts (bench/suite.sh and
# the parts it runs). It is sourced, not run:
#
#   source "$(dirname "$0")/lib.sh"
#
# It sets BENCH_ROOT (the repository root) and RESULTS (bench/results), and
# defines log, die, need, infill_bin, bench_workdir, measure_rss, ms_to_s,
# check_summary, fill_spec and put (key=value results for bench/summary.py).
set -euo pipefail
shopt -s inherit_errexit

BENCH_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
RESULTS=${RESULTS:-$BENCH_ROOT/bench/results}
export PGHOST=${PGHOST:-127.0.0.1}
export PGPORT=${PGPORT:-5432}
export PGUSER=${PGUSER:-postgres}
export PGOPTIONS="${PGOPTIONS:-} -c client_min_messages=warning"

log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { printf 'bench: FAILED: %s\n' "$*" >&2; exit 1; }
need() { local c; for c in "$@"; do command -v "$c" >/dev/null || die "$c is not installed"; done; }
posint() { [[ ${!1} =~ ^[1-9][0-9]*$ ]] || die "$1 must be a positive integer (got '${!1}')"; }

# infill_bin: sets BIN and REV. With BIN=/path/to/infill in the environment
# it uses that binary and builds nothing; otherwise `cargo build --release`
# in the repository and target/release/infill. REV names the source: the
# checkout's `git describe --always --dirty` (BENCH_REV when bench/suite.sh
# passes it on), plus the binary's path when BIN was given.
infill_bin() {
  REV=${BENCH_REV:-$(git -C "$BENCH_ROOT" describe --always --dirty 2>/dev/null || echo unknown)}
  if [[ -n ${BIN:-} ]]; then
    [[ -x $BIN && -f $BIN ]] || die "BIN=$BIN is not an executable file"
    BIN=$(realpath "$BIN")
    [[ -n ${BENCH_REV:-} ]] || REV="binary $BIN of $(date -r "$BIN" '+%Y-%m-%d %H:%M') (checkout $REV)"
    log "using BIN=$BIN (no build)"
  else
    log "cargo build --release --bin infill (source $REV)"
    (cd "$BENCH_ROOT" && cargo build --release --bin infill >&2)
    BIN=$BENCH_ROOT/target/release/infill
    [[ -x $BIN ]] || die "no binary at $BIN"
  fi
  export BIN
}

# bench_workdir NAME: a fresh temporary directory in WORK, printed.
bench_workdir() {
  WORK=$(mktemp -d "${TMPDIR:-/tmp}/infill-$1.XXXXXX")
  log "work dir (specs, audit logs, raw outputs): $WORK"
}

# measure_rss OUT CMD...: runs CMD, writes its peak RSS in KiB to OUT.
if [[ -x /usr/bin/time ]] && /usr/bin/time -f %M -o /dev/null true 2>/dev/null; then
  RSS_TOOL="GNU time (/usr/bin/time -f %M)"
  measure_rss() { local out=$1; shift; /usr/bin/time -f %M -o "$out" "$@"; }
else
  RSS_TOOL="python3 resource.getrusage(RUSAGE_CHILDREN).ru_maxrss"
  measure_rss() {
    local out=$1; shift
    python3 -c '
import resource, subprocess, sys
rc = subprocess.call(sys.argv[2:])
with open(sys.argv[1], "w") as f:
    f.write("%d\n" % resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
sys.exit(rc)' "$out" "$@"
  }
fi

now() { date +%s.%N; }
# elapsed T0 T1: seconds between two `now` stamps, 3 decimals.
elapsed() { python3 -c "import sys; print('%.3f' % (float(sys.argv[2]) - float(sys.argv[1])))" "$1" "$2"; }

# check_summary JSON ROWS: infill's --json summary says succeeded with
# rows_changed = ROWS, or the script fails.
check_summary() {
  python3 - "$1" "$2" <<'PY' || die "unexpected infill summary in $1 (want status succeeded, rows_changed $2)"
import json, sys
s = json.load(open(sys.argv[1]))
assert s["status"] == "succeeded", s
assert s["rows_changed"] == int(sys.argv[2]), s
PY
}

# run_infill SPEC JSON ROWS [ARGS...]: `infill run SPEC --yes --json`, timed
# around the whole process, peak RSS measured, summary checked. Prints
# "seconds rss_kib".
run_infill() {
  local spec=$1 json=$2 rows=$3; shift 3
  local err=${json%.json}.err rss=${json%.json}.rss t0 t1 rc=0
  t0=$(now)
  measure_rss "$rss" "$BIN" run "$spec" "$@" --yes --json > "$json" 2> "$err" || rc=$?
  t1=$(now)
  [[ $rc == 0 ]] || { tail -20 "$err" >&2; die "infill run exited with $rc (stderr above, output in $json)"; }
  check_summary "$json" "$rows"
  echo "$(elapsed "$t0" "$t1") $(tail -1 "$rss")"
}

# fill_spec FILE URL TABLE [LINE...]: the benchmarks' job `fill` (c = a * 31
# + b where c is NULL, keyed by id) on TABLE of the database at URL, with
# any further job lines, written to FILE.
fill_spec() {
  local file=$1 url=$2 table=$3; shift 3
  {
    printf '[databases]\ntarget = "%s"\n\n[jobs.fill]\n' "$url"
    printf 'source.table = "%s"\nsource.key = ["id"]\nsource.where = "c IS NULL"\naction.update.c = "a * 31 + b"\n' "$table"
    local line
    for line in "$@"; do printf '%s\n' "$line"; done
  } > "$file"
}

# put FILE KEY VALUE: one key=value line of a part's values file, read by
# bench/summary.py.
put() { printf '%s=%s\n' "$2" "$3" >> "$1"; }
