#!/usr/bin/env bash
# The two entry points of README.md: `./run.sh demo` (the main job) and `./run.sh test`.
# Each first installs what it needs (scripts/setup.sh is idempotent and quick when done).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"

usage() { echo "usage: ./run.sh demo|test|setup [args...]" >&2; exit 2; }
[ $# -ge 1 ] || usage
what="$1"; shift

bash scripts/setup.sh
py="$here/.venv/bin/python"

case "$what" in
    setup) ;;
    test)
        "$here/.venv/bin/logwrites" guest build
        exec "$py" -m pytest "$@"
        ;;
    demo)
        "$here/.venv/bin/logwrites" guest build
        exec "$here/.venv/bin/logwrites" demo "$@"
        ;;
    *) usage ;;
esac
