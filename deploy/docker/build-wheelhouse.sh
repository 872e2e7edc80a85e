#!/usr/bin/env bash
# Build the wheelhouse the image installs from (pinned requirements.txt, wheels for this Python).
# Run on the host, where the package index is reachable; `docker build` then needs no network.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
PY=${PYTHON:-.venv/bin/python}
mkdir -p deploy/docker/wheelhouse
"$PY" -m pip wheel --quiet --disable-pip-version-check -r requirements.txt -w deploy/docker/wheelhouse
ls deploy/docker/wheelhouse | wc -l | xargs echo "wheels:"
