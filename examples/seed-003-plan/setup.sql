-- Seed 003's world, small: assessment sessions, the FC scores and profiles
-- an outage left missing, and the two scoring functions the orchestrator
-- called per session.
DROP TABLE IF EXISTS fc_scores, profiles, sessions;
DROP FUNCTION IF EXISTS score_fc_session(text, text);
DROP FUNCTION IF EXISTS score_prism(text, text);

CREATE TABLE sessions (
  id TEXT PRIMARY KEY,
  status TEXT NOT NULL,
  is_test BOOLEAN NOT NULL DEFAULT false,
  completed_at TIMESTAMPTZ NOT NULL
);
CREATE TABLE fc_scores (
  session_id TEXT NOT NULL REFERENCES sessions (id),
  version TEXT NOT NULL,
  score INTEGER NOT NULL,
  PRIMARY KEY (session_id, version)
);
CREATE TABLE profiles (
  session_id TEXT PRIMARY KEY REFERENCES sessions (id),
  results_version TEXT NOT NULL
);

-- 60 sessions from July to September 2025; two are test sessions; every
-- fifth is still in progress.
INSERT INTO sessions (id, status, is_test, completed_at)
SELECT md5(g::text), CASE WHEN g % 5 = 0 THEN 'in_progress' ELSE 'completed' END,
       g IN (21, 22),
       timestamptz '2025-07-15' + (g || ' days')::interval
FROM generate_series(1, 60) g;
-- The outage: no FC scores at all; profiles only for every third session.
INSERT INTO profiles (session_id, results_version)
SELECT id, 'v1.2.0' FROM sessions WHERE ('x' || substr(id, 1, 4))::bit(16)::int % 3 = 0;

CREATE FUNCTION score_fc_session(sid TEXT, version TEXT) RETURNS INTEGER AS $$
  INSERT INTO fc_scores (session_id, version, score)
  VALUES (sid, version, length(sid) + ascii(sid))
  ON CONFLICT DO NOTHING
  RETURNING 1
$$ LANGUAGE sql;

CREATE FUNCTION score_prism(sid TEXT, engine_version TEXT) RETURNS INTEGER AS $$
  INSERT INTO profiles (session_id, results_version) VALUES (sid, engine_version)
  ON CONFLICT (session_id) DO UPDATE SET results_version = EXCLUDED.results_version
  RETURNING 1
$$ LANGUAGE sql;
