"""The per-row loop of B1 in the shape of seed 001's hand-written backfill.

Seed 001 is a Django management command: it selects the records still
missing the value, then for each one computes the value in Python, saves
the record (one UPDATE of that field, autocommit) and prints a line. This
script does the same with psycopg and no ORM, so it is, if anything,
cheaper per row than the seed: no model instances, and psycopg prepares
the repeated UPDATE on the server after a few executions.

    python3 seedloop.py DSN TABLE EXPECTED_ROWS > progress.txt

It prints one progress line per row to stdout (as the seed does), and the
rows updated and failed on stderr. Each failure is caught and counted, and
the loop goes on, as in the seed. The exit code is 1 when the count
updated differs from EXPECTED_ROWS.
"""

import sys

import psycopg
from psycopg import sql


def main() -> int:
    dsn, table, expected = sys.argv[1], sys.argv[2], int(sys.argv[3])
    t = sql.Identifier(table)
    select = sql.SQL("SELECT id, a, b FROM {} WHERE c IS NULL ORDER BY id").format(t)
    update = sql.SQL("UPDATE {} SET c = %s WHERE id = %s").format(t)
    updated = failed = 0
    out = sys.stdout
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(select).fetchall()
        print("Found %d records to process" % len(rows), file=out)
        cur = conn.cursor()
        for rid, a, b in rows:
            c = a * 31 + b
            try:
                cur.execute(update, (c, rid))
            except psycopg.Error as e:
                failed += 1
                print("  x %s %d: %s" % (table, rid, e), file=out)
                continue
            updated += 1
            print("  ok %s %d: c=%d" % (table, rid, c), file=out)
    print("updated=%d failed=%d" % (updated, failed), file=sys.stderr)
    return 0 if updated == expected and failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
