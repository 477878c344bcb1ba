#!/usr/bin/env bash
# Launch the audit on Dataflow: build an sdist of this repository and ship it to the workers.
# Usage: deploy/dataflow.sh [saliency-audit run options] [Dataflow options]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dist="$(mktemp -d)"
python -m pip wheel --quiet --no-deps --wheel-dir "$dist" "$root"
python -m pipelines.audit --runner DataflowRunner --extra_package "$(ls "$dist"/*.whl)" "$@"
