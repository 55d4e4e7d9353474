#!/usr/bin/env bash
# vargrpo entry point. Creates .venv from requirements.txt on first use (and again whenever
# requirements.txt changes), then runs one subcommand:
#   bash run.sh test [pytest args]   the test suite (what CI runs)
#   bash run.sh bench [args]         speed/memory table of the model layer on this machine
set -euo pipefail
cd "$(dirname "$0")"

want=$(sha256sum requirements.txt | cut -c1-16)
if [ ! -x .venv/bin/python ] || [ "$(cat .venv/.requirements-hash 2>/dev/null)" != "$want" ]; then
  echo "[run.sh] installing requirements.txt into .venv ..." >&2
  python3 -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -r requirements.txt
  echo "$want" > .venv/.requirements-hash
fi
PY=.venv/bin/python

cmd=${1:-help}
shift || true
case "$cmd" in
  test)  exec "$PY" -m pytest -q -o "markers=slow: long tests (CI runs them too)" "$@" ;;
  bench) exec "$PY" vargrpo.py bench "$@" ;;
  *) sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//'; [ "$cmd" = help ] || exit 2 ;;
esac
