#!/usr/bin/env python3
"""Figures for the benchmark scripts (python3 standard library only).

  stats.py batches SUMMARY.json...
      Per-batch duration_ms from the audit logs of infill runs (the path is
      in each --json summary), pooled over the runs. Prints key=value lines:
      batches, batch_ms_median, batch_ms_p95, batch_ms_max, batch_keys_max.

  stats.py pgbench DIR [FROM TO]
      pgbench per-transaction logs (-l) in DIR (every file named tx.*).
      Prints key=value lines: transactions, failed, latency_ms_median/p95/
      p99/max, first/last (epoch seconds of the first start and the last
      end). With FROM and TO (epoch seconds), the same figures for the
      transactions that started in [FROM, TO] follow, prefixed with
      "during_", and during_tps: their number over the seconds from FROM to
      TO or to pgbench's last transaction, whichever is first.

Percentiles are nearest-rank: the smallest value with at least q% of the
values at or below it.
"""
import glob
import json
import math
import os
import statistics
import sys


def pct(sorted_xs, q):
    if not sorted_xs:
        return float("nan")
    k = max(1, math.ceil(q / 100.0 * len(sorted_xs)))
    return sorted_xs[k - 1]


def batches(paths):
    d, keys = [], []
    for p in paths:
        summary = json.load(open(p))
        for line in open(summary["audit_log"]):
            if '"event":"batch"' not in line:
                continue
            b = json.loads(line)
            d.append(b["duration_ms"])
            keys.append(b.get("batch_size") or 0)
    if not d:
        sys.exit("no batch lines in the audit logs of %s" % " ".join(paths))
    d.sort()
    print("batches=%d" % len(d))
    print("batch_ms_median=%g" % statistics.median(d))
    print("batch_ms_p95=%g" % pct(d, 95))
    print("batch_ms_max=%g" % d[-1])
    print("batch_keys_max=%d" % max(keys))


def pgbench(directory, lo=None, hi=None):
    # pgbench 15 log line: client_id transaction_no time script_no time_epoch time_us [...]
    # time is the latency in microseconds, or "failed"/"skipped"; time_epoch
    # and time_us give the moment the transaction ended.
    rows, failed = [], 0
    files = sorted(glob.glob(os.path.join(directory, "tx.*")))
    if not files:
        sys.exit("no pgbench log (tx.*) in %s" % directory)
    for f in files:
        for line in open(f):
            parts = line.split()
            if len(parts) < 6:
                continue
            if not parts[2].isdigit():
                failed += 1
                continue
            lat = int(parts[2]) / 1000.0
            end = int(parts[4]) + int(parts[5]) / 1e6
            rows.append((end, lat))
    if not rows:
        sys.exit("no transaction in the pgbench logs of %s" % directory)

    def emit(prefix, sel):
        lats = sorted(l for _, l in sel)
        print("%stransactions=%d" % (prefix, len(lats)))
        if lats:
            print("%slatency_ms_median=%.3f" % (prefix, statistics.median(lats)))
            print("%slatency_ms_p95=%.3f" % (prefix, pct(lats, 95)))
            print("%slatency_ms_p99=%.3f" % (prefix, pct(lats, 99)))
            print("%slatency_ms_max=%.3f" % (prefix, lats[-1]))

    emit("", rows)
    print("failed=%d" % failed)
    print("first=%.3f" % min(e - l / 1000.0 for e, l in rows))
    print("last=%.3f" % max(e for e, _ in rows))
    if lo is not None:
        # Transactions that started while the writer ran: one blocked on
        # the writer's locks counts with its whole wait, even when it ends
        # after the writer commits. TPS over the part of that span in
        # which pgbench ran.
        sel = [(e, l) for e, l in rows if lo <= e - l / 1000.0 <= hi]
        emit("during_", sel)
        span = min(hi, max(e for e, _ in rows)) - lo
        print("during_tps=%.1f" % (len(sel) / span if span > 0 else float("nan")))


def main(argv):
    if len(argv) >= 3 and argv[1] == "batches":
        batches(argv[2:])
    elif len(argv) in (3, 5) and argv[1] == "pgbench":
        if len(argv) == 5:
            pgbench(argv[2], float(argv[3]), float(argv[4]))
        else:
            pgbench(argv[2])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv)
