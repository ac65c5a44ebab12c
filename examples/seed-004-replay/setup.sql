-- Seed 004: activities in the old system (progressor-x) and the new one,
-- which only has what arrived since it went live (2025-09-01). The backfill
-- replays the missing ones as Strava webhook events to the dispatcher.
DROP TABLE IF EXISTS old_activities, new_activities;

CREATE TABLE old_activities (
    id          bigint PRIMARY KEY,
    athlete_id  bigint NOT NULL,
    type        text   NOT NULL,
    start_date  timestamptz NOT NULL,
    distance_m  numeric(10,1) NOT NULL
);

-- 1,200 activities from 2024-01-01 on, one every 12 hours, three types.
INSERT INTO old_activities
SELECT 9000000000 + i,
       1000 + i % 37,
       (ARRAY['Run', 'Ride', 'Swim'])[1 + i % 3],
       timestamptz '2024-01-01 06:00:00+00' + (i - 1) * interval '12 hours',
       round((3000 + (i * 7919) % 40000)::numeric, 1)
FROM generate_series(1, 1200) AS s(i);

-- The new system: everything since it went live, plus a few older
-- activities its users re-synced by hand.
CREATE TABLE new_activities (LIKE old_activities INCLUDING ALL);
INSERT INTO new_activities
SELECT * FROM old_activities
WHERE start_date >= '2025-09-01' OR id % 50 = 0;
