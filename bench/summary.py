#!/usr/bin/env python3
"""The final table of bench/suite.sh (python3 standard library only).

  summary.py PREFIX

reads the key=value files PREFIX-b1.values.txt (bench/run.sh),
PREFIX-b2.values.txt (bench/mariadb.sh), PREFIX-b3.values.txt
(bench/pgbench.sh), PREFIX-b5.values.txt (bench/growth.sh),
PREFIX-b6.values.txt (bench/sqlite.sh) and PREFIX.values.txt (the suite's
own: size, notes, part durations), whichever exist, and prints one markdown
table: each figure, its goal, and whether it is met. B4 (memory) is read
from B1 and B5; B5's sizes include B1's when B1 ran. Exits 0 whatever the
verdicts: a goal not met is a result, not a failure.
"""
import os
import sys

MIB = 1024.0


def load(path):
    if not os.path.exists(path):
        return None
    out = {}
    for line in open(path):
        line = line.rstrip("\n")
        if "=" in line:
            k, v = line.split("=", 1)
            out.setdefault(k, v)
            if k == "note":
                out.setdefault("notes", []).append(v)
    return out


def n(x):
    return "{:,}".format(int(x))


def main(prefix):
    suite = load(prefix + ".values.txt") or {}
    b1, b2, b3 = load(prefix + "-b1.values.txt"), load(prefix + "-b2.values.txt"), load(prefix + "-b3.values.txt")
    b5, b6 = load(prefix + "-b5.values.txt"), load(prefix + "-b6.values.txt")
    rows = []  # (part, figure, value, goal, verdict)

    def verdict(ok):
        return "met" if ok else "**NOT met**"

    if b1:
        r = int(b1["rows"])
        rows.append(("B1 PostgreSQL", "single UPDATE, %s rows" % n(r), "%s rows/s (%.2f s)" % (n(b1["single_rps"]), float(b1["single_s"])), "-", "-"))
        rows.append(("B1 PostgreSQL", "infill run (defaults), %s rows" % n(r), "%s rows/s (%.2f s)" % (n(b1["infill_rps"]), float(b1["infill_s"])), "-", "-"))
        rows.append(("B1 PostgreSQL", "infill / single UPDATE (throughput)", "%.3f" % float(b1["ratio"]), ">= 0.80", verdict(float(b1["ratio"]) >= 0.80)))
        if "loop_rps" in b1:
            rows.append(("B1 PostgreSQL", "per-row loop, measured on %s rows" % n(b1["loop_rows"]),
                         "%s rows/s (%.1f s; est. %s s for %s rows)" % (n(b1["loop_rps"]), float(b1["loop_s"]), n(b1["loop_est_s"]), n(r)), "-", "-"))
            rows.append(("B1 PostgreSQL", "infill / per-row loop (throughput)", "%.1fx" % float(b1["infill_vs_loop"]), ">= 100x",
                         verdict(float(b1["infill_vs_loop"]) >= 100)))
        rows.append(("B1 PostgreSQL", "p95 batch duration (audit log, %s batches)" % b1["batches"], "%s ms" % b1["batch_p95_ms"], "<= 600 ms",
                     verdict(float(b1["batch_p95_ms"]) <= 600)))
    if b2:
        r = int(b2["rows"])
        rows.append(("B2 MariaDB", "single UPDATE, %s rows" % n(r), "%s rows/s (%.2f s)" % (n(b2["single_rps"]), float(b2["single_s"])), "-", "-"))
        rows.append(("B2 MariaDB", "infill run (defaults), %s rows" % n(r), "%s rows/s (%.2f s)" % (n(b2["infill_rps"]), float(b2["infill_s"])), "-", "-"))
        rows.append(("B2 MariaDB", "infill / single UPDATE (throughput)", "%.3f" % float(b2["ratio"]), ">= 0.70", verdict(float(b2["ratio"]) >= 0.70)))
    if b3:
        acc = n(b3["accounts"])
        rows.append(("B3 pgbench", "(a) alone, %s accounts: TPS / p99 / max" % acc,
                     "%.0f / %.2f ms / %.0f ms" % (float(b3["a_tps"]), float(b3["a_latency_ms_p99"]), float(b3["a_latency_ms_max"])), "-", "-"))
        phases = [("b", "(b) single UPDATE"), ("c", "(c) infill run")]
        if "tuned" in b3:
            phases.append(("d", "(d) infill run with %s" % b3["tuned"]))
        for ph, label in phases:
            rows.append(("B3 pgbench", "%s: writer's time" % label, "%.1f s, %s" % (
                float(b3[ph + "_writer_s"]),
                "within the %s s window" % b3["duration"] if b3[ph + "_in_window"] == "yes" else "**outlasted the %s s window**" % b3["duration"]), "-", "-"))
            if int(b3.get(ph + "_during_transactions", 0)):
                rows.append(("B3 pgbench", "%s: while it ran, TPS / p99 / max" % label, "%.0f / %.2f ms / %.0f ms (%s tx)" % (
                    float(b3[ph + "_during_tps"]), float(b3[ph + "_during_latency_ms_p99"]), float(b3[ph + "_during_latency_ms_max"]),
                    n(b3[ph + "_during_transactions"])), "-", "-"))
            rows.append(("B3 pgbench", "%s: whole window, TPS / p99 / max" % label,
                         "%.0f / %.2f ms / %.0f ms" % (float(b3[ph + "_tps"]), float(b3[ph + "_latency_ms_p99"]), float(b3[ph + "_latency_ms_max"])), "-", "-"))
        if "c_during_p99_vs_a" in b3:
            rows.append(("B3 pgbench", "p99 while infill ran / p99 alone", "%sx" % b3["c_during_p99_vs_a"], "<= 2x",
                         verdict(float(b3["c_during_p99_vs_a"]) <= 2)))
        else:
            rows.append(("B3 pgbench", "p99 while infill ran / p99 alone", "no transaction started while it ran", "<= 2x", "**NOT met**"))
        rows.append(("B3 pgbench", "p99 over the whole window with infill / alone", "%sx" % b3["c_p99_vs_a"], "-", "-"))
        if "d_during_p99_vs_a" in b3:
            # Phase (d) compares settings; the goal is (c)'s, at the defaults.
            rows.append(("B3 pgbench", "p99 while infill with %s ran / p99 alone (for comparison)" % b3["tuned"],
                         "%sx" % b3["d_during_p99_vs_a"], "-", "-"))
        if "b_during_p99_vs_a" in b3:
            rows.append(("B3 pgbench", "p99 while the single UPDATE ran / p99 alone", "%sx" % b3["b_during_p99_vs_a"], "-", "-"))

    # B4 and B5: infill on PostgreSQL, sizes from B5 and B1.
    points = {}
    if b5:
        for s in b5["sizes"].split():
            points[int(s)] = (float(b5["rows_%s_rps" % s]), int(b5["rows_%s_rss_kib" % s]), "B5")
    if b1:
        points.setdefault(int(b1["rows"]), (float(b1["infill_rps"]), int(b1["infill_rss_kib"]), "B1"))
    for size in sorted(points):
        rss = points[size][1] / MIB
        rows.append(("B4 memory", "infill peak RSS, PostgreSQL, %s rows (%s)" % (n(size), points[size][2]), "%.1f MiB" % rss, "< 64 MiB", verdict(rss < 64)))
    for label, vals in (("MariaDB", b2), ("SQLite", b6)):
        if vals:
            rss = int(vals["infill_rss_kib"]) / MIB
            rows.append(("B4 memory", "infill peak RSS, %s, %s rows (B%s, for information)" % (label, n(vals["rows"]), "2" if label == "MariaDB" else "6"),
                         "%.1f MiB" % rss, "< 64 MiB", verdict(rss < 64)))
    if len(points) >= 2:
        sizes = sorted(points)
        for size in sizes:
            rows.append(("B5 growth", "infill rows/s, %s rows (%s)" % (n(size), points[size][2]), n(points[size][0]), "-", "-"))
        g = points[sizes[-1]][0] / points[sizes[0]][0]
        rows.append(("B5 growth", "rows/s at %s / at %s rows" % (n(sizes[-1]), n(sizes[0])), "%.3f" % g, ">= 0.80 (flat = 1.0)", verdict(g >= 0.80)))
    if b6:
        r = int(b6["rows"])
        rows.append(("B6 SQLite", "single UPDATE (sqlite3 CLI), %s rows" % n(r), "%s rows/s (%.2f s)" % (n(b6["single_rps"]), float(b6["single_s"])), "-", "-"))
        rows.append(("B6 SQLite", "infill run (defaults), %s rows" % n(r), "%s rows/s (%.2f s)" % (n(b6["infill_rps"]), float(b6["infill_s"])), "-", "-"))
        rows.append(("B6 SQLite", "infill / single UPDATE (throughput)", "%.3f" % float(b6["ratio"]), "none set", "-"))

    print("| part | figure | value | goal | verdict |")
    print("|---|---|---|---|---|")
    for r in rows:
        print("| %s |" % " | ".join(r))
    met = sum(1 for r in rows if r[4] == "met")
    missed = sum(1 for r in rows if "NOT met" in r[4])
    print()
    print("goals: %d met, %d not met" % (met, missed))
    if suite.get("notes"):
        print()
        print("sizes and scaling (SIZE=%s):" % suite.get("size", "?"))
        for note in suite["notes"]:
            print("- " + note)
    parts = [(k[len("seconds_"):], float(v)) for k, v in suite.items() if k.startswith("seconds_")]
    if parts:
        print()
        print("wall time: " + ", ".join("%s %.0f s" % p for p in parts) + "; total %.0f s" % sum(s for _, s in parts))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
