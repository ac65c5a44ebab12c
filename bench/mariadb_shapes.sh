#!/usr/bin/env bash
# MariaDB batch shapes, at the SQL level: what each statement of an
# engine-imaged batch costs, without infill. A stored procedure writes the
# table in batches of BATCH keys (c = a * 31 + b where c IS NULL, as B2
# does), one transaction per batch, with one of these shapes, and sums the
# time of each kind of statement:
#
#   0  one set-based UPDATE of the whole table (the baseline)
#   1  a range UPDATE per batch, no images (batching alone)
#   2  infill at 7405524: locking read with sorted JSON_ARRAYAGGs, UPDATE
#      joined to the locked keys (JSON_TABLE), images joined to them, sorted
#   3  as 2, the read's aggregates unsorted
#   4  as 2, the UPDATE over the range (not joined)
#   6  read unsorted, UPDATE over the range, images joined to the keys, unsorted
#   7  read unsorted, UPDATE over the range, images over the range, unsorted:
#      infill's shape for a range whose keys are all candidates (7edb1c7)
#
#   bench/mariadb_shapes.sh                    # 2,000,000 rows, shapes 0 1 2 4 6 7
#   ROWS=500000 SHAPES="0 7" bench/mariadb_shapes.sh
#
# Knobs: ROWS (default 2000000), BATCH (50000), SHAPES (default "0 1 2 4 6 7"),
# MYHOST MYPORT MYUSER (127.0.0.1 3306 root). Each shape runs on a fresh copy
# of the same table (CREATE TABLE ... LIKE, INSERT ... SELECT, ANALYZE,
# FLUSH TABLES ... FOR EXPORT), and every result is checked. Prints one line
# per shape: seconds per kind of statement and the wall time. The database
# infill_bench_shapes is dropped at the end.
source "$(dirname "$0")/lib.sh"

ROWS=${ROWS:-2000000}
BATCH=${BATCH:-50000}
SHAPES=${SHAPES:-0 1 2 4 6 7}
MYHOST=${MYHOST:-127.0.0.1}
MYPORT=${MYPORT:-3306}
MYUSER=${MYUSER:-root}
DB=infill_bench_shapes
posint ROWS
posint BATCH
need mariadb
my() { mariadb -h "$MYHOST" -P "$MYPORT" -u "$MYUSER" -N -B "$@"; }
trap 'my -e "DROP DATABASE IF EXISTS $DB" >/dev/null 2>&1 || true' EXIT

log "loading $ROWS rows into $DB.base"
my -e "DROP DATABASE IF EXISTS $DB; CREATE DATABASE $DB"
my "$DB" <<SQL
CREATE TABLE base (id bigint PRIMARY KEY, a int NOT NULL, b int NOT NULL, c bigint) ENGINE=InnoDB;
INSERT INTO base SELECT seq, seq % 1000, (seq * 7919) % 100003, NULL FROM seq_1_to_$ROWS;
CREATE TABLE infill_undo (run_id VARCHAR(36) NOT NULL, batch_no BIGINT NOT NULL, seq BIGINT NOT NULL,
  row_key LONGTEXT, before_image LONGTEXT, after_image LONGTEXT, PRIMARY KEY (run_id, batch_no, seq)) ENGINE=InnoDB;
DELIMITER //
CREATE PROCEDURE fill(shape INT, bs INT, total BIGINT)
BEGIN
  DECLARE lo BIGINT DEFAULT 0;
  DECLARE hi BIGINT;
  DECLARE t0 DATETIME(6);
  DECLARE bno INT DEFAULT 0;
  SET @t_read = 0, @t_upd = 0, @t_img = 0, @t_commit = 0, @mismatch = 0;
  WHILE lo < total DO
    SET hi = lo + bs, bno = bno + 1;
    START TRANSACTION;
    SET t0 = NOW(6);
    IF shape IN (3, 6, 7) THEN
      SELECT COUNT(*), JSON_ARRAYAGG(t.id), JSON_OBJECT('c', JSON_ARRAYAGG(CAST(t.c AS CHAR)))
        INTO @infill_n, @infill_keys, @infill_before FROM t WHERE t.id > lo AND t.id <= hi AND (c IS NULL) FOR UPDATE;
    ELSEIF shape IN (2, 4) THEN
      SELECT COUNT(*), JSON_ARRAYAGG(t.id ORDER BY t.id), JSON_OBJECT('c', JSON_ARRAYAGG(CAST(t.c AS CHAR) ORDER BY t.id))
        INTO @infill_n, @infill_keys, @infill_before FROM t WHERE t.id > lo AND t.id <= hi AND (c IS NULL) FOR UPDATE;
    END IF;
    SET @t_read = @t_read + TIMESTAMPDIFF(MICROSECOND, t0, NOW(6)), t0 = NOW(6);
    IF shape IN (2, 3) THEN
      UPDATE t JOIN JSON_TABLE(@infill_keys, '\$[*]' COLUMNS (k BIGINT PATH '\$')) j ON t.id = j.k
        SET t.c = (a * 31 + b) WHERE t.id > lo AND t.id <= hi AND (c IS NULL);
    ELSE
      UPDATE t SET t.c = (a * 31 + b) WHERE t.id > lo AND t.id <= hi AND (c IS NULL);
    END IF;
    SET @t_upd = @t_upd + TIMESTAMPDIFF(MICROSECOND, t0, NOW(6)), t0 = NOW(6);
    IF shape IN (2, 3, 4) THEN
      INSERT INTO infill_undo SELECT 'r', bno, 0, @infill_keys, @infill_before, JSON_OBJECT('c', JSON_ARRAYAGG(CAST(t.c AS CHAR) ORDER BY t.id))
        FROM t JOIN JSON_TABLE(@infill_keys, '\$[*]' COLUMNS (k BIGINT PATH '\$')) j ON t.id = j.k HAVING COUNT(*) > 0;
    ELSEIF shape = 6 THEN
      INSERT INTO infill_undo SELECT 'r', bno, 0, JSON_ARRAYAGG(t.id), @infill_before, JSON_OBJECT('c', JSON_ARRAYAGG(CAST(t.c AS CHAR)))
        FROM t JOIN JSON_TABLE(@infill_keys, '\$[*]' COLUMNS (k BIGINT PATH '\$')) j ON t.id = j.k HAVING COUNT(*) > 0;
    ELSEIF shape = 7 THEN
      INSERT INTO infill_undo SELECT 'r', bno, 0, JSON_ARRAYAGG(t.id), @infill_before, JSON_OBJECT('c', JSON_ARRAYAGG(CAST(t.c AS CHAR)))
        FROM t WHERE t.id > lo AND t.id <= hi HAVING COUNT(*) > 0;
    END IF;
    SET @t_img = @t_img + TIMESTAMPDIFF(MICROSECOND, t0, NOW(6)), t0 = NOW(6);
    COMMIT;
    SET @t_commit = @t_commit + TIMESTAMPDIFF(MICROSECOND, t0, NOW(6));
    IF shape IN (6, 7) AND (SELECT CAST(row_key AS BINARY) <> CAST(@infill_keys AS BINARY) FROM infill_undo WHERE batch_no = bno) THEN
      SET @mismatch = @mismatch + 1;
    END IF;
    SET lo = hi;
  END WHILE;
  SELECT CONCAT('read ', ROUND(@t_read / 1e6, 2), ' s, update ', ROUND(@t_upd / 1e6, 2), ' s, images ', ROUND(@t_img / 1e6, 2),
                ' s, commit ', ROUND(@t_commit / 1e6, 2), ' s, batches whose image keys differ from the locked keys: ', @mismatch);
END //
DELIMITER ;
SQL

for shape in $SHAPES; do
  my "$DB" -e "DROP TABLE IF EXISTS t; CREATE TABLE t LIKE base; INSERT INTO t SELECT * FROM base; ANALYZE TABLE t;
TRUNCATE infill_undo; FLUSH TABLES t FOR EXPORT; UNLOCK TABLES;" > /dev/null
  t0=$(now)
  if [[ $shape == 0 ]]; then
    my "$DB" -e "UPDATE t SET c = a * 31 + b WHERE c IS NULL"
    detail="one statement"
  else
    detail=$(my "$DB" -e "SET SESSION group_concat_max_len = 4294967295; CALL fill($shape, $BATCH, $ROWS)")
  fi
  t1=$(now)
  bad=$(my "$DB" -e "SELECT COUNT(*) FROM t WHERE NOT (c <=> a * 31 + b)")
  [[ $bad == 0 ]] || die "shape $shape left $bad wrong rows"
  echo "shape $shape: wall $(elapsed "$t0" "$t1") s; $detail"
done
