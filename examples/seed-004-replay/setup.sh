#!/usr/bin/env bash
# Creates the example's database (if missing) and loads setup.sql into it.
#   DATABASE_URL=postgres://postgres@127.0.0.1:5432/infill_example ./setup.sh
set -euo pipefail
export PGOPTIONS="${PGOPTIONS:-} -c client_min_messages=warning"
: "${DATABASE_URL:=postgres://postgres@127.0.0.1:5432/infill_example}"
export DATABASE_URL
db=${DATABASE_URL##*/}
db=${db%%\?*}
server=${DATABASE_URL%/*}
psql -X -q "$server/postgres" -tc "SELECT 1 FROM pg_database WHERE datname = '$db'" | grep -q 1 \
  || psql -X -q "$server/postgres" -c "CREATE DATABASE \"$db\""
psql -X -q -v ON_ERROR_STOP=1 "$DATABASE_URL" -f "$(dirname "$0")/setup.sql"
echo "loaded $(dirname "$0")/setup.sql into $db; now: export DATABASE_URL=$DATABASE_URL"
