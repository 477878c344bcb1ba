#!/usr/bin/env bash
# Submit the audit to Dataflow from this machine, without a template: build a wheel of this
# repository and ship it to the workers with --extra_package, so they run the code the
# launcher runs. The launcher waits for the job, verifies the counts and publishes the manifest.
# Usage: deploy/dataflow/submit.sh [saliency-audit run options] [Dataflow options]
# DRY_RUN=1 prints the commands instead of running them.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
python="${PYTHON:-python}"
dist="$(mktemp -d)"
trap 'rm -rf "$dist"' EXIT
run() { if [[ "${DRY_RUN:-}" == 1 ]]; then printf '%q ' "$@"; echo; else "$@"; fi; }
run "$python" -m pip wheel --quiet --no-deps --wheel-dir "$dist" "$root"
wheel="$(ls "$dist"/*.whl 2>/dev/null || echo "$dist/saliency_audit-VERSION-py3-none-any.whl")"
run "$python" -m saliency_audit run --runner DataflowRunner --extra_package "$wheel" "$@"
