#!/usr/bin/env bash
# Build and run the saliency-audit Flex Template on Dataflow.
#
#   PROJECT=p REGION=europe-west4 BUCKET=b deploy/dataflow/launch.sh build
#   PROJECT=p REGION=europe-west4 BUCKET=b deploy/dataflow/launch.sh run \
#       input='gs://b/shards/*.tar' model=gs://b/model.pt methods=sal,grad,intg output=gs://b/audits/1
#   ... launch.sh build-and-run NAME=VALUE ...
#
# NAME=VALUE pairs are template parameters (metadata.json: the options of `saliency-audit run`,
# underscores for dashes) or Beam/Dataflow pipeline options; they override the defaults below.
# Settings (environment): PROJECT, REGION, BUCKET (required); REPOSITORY (Artifact Registry
# Docker repository, default saliency-audit), TAG (default latest), IMAGE, TEMPLATE;
# ACCELERATOR (default nvidia-l4; empty for CPU workers), MACHINE_TYPE (default g2-standard-8,
# the L4 machine with 8 vCPUs), MAX_WORKERS (default 4), HARNESS_THREADS (default 4);
# DRY_RUN=1 prints the commands instead of running them.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
action="${1:?usage: launch.sh build|run|build-and-run [NAME=VALUE ...]}"
shift
: "${PROJECT:?set PROJECT to the Google Cloud project}"
: "${REGION:?set REGION, e.g. europe-west4 (one with the GPUs you ask for)}"
: "${BUCKET:?set BUCKET to a Cloud Storage bucket for the template, staging and temp files}"
REPOSITORY="${REPOSITORY:-saliency-audit}"
IMAGE="${IMAGE:-$REGION-docker.pkg.dev/$PROJECT/$REPOSITORY/saliency-audit:${TAG:-latest}}"
TEMPLATE="${TEMPLATE:-gs://$BUCKET/templates/saliency-audit.json}"
ACCELERATOR="${ACCELERATOR-nvidia-l4}"
MAX_WORKERS="${MAX_WORKERS:-4}"
HARNESS_THREADS="${HARNESS_THREADS:-4}"

run() {  # print (DRY_RUN=1) or run one command
  if [[ "${DRY_RUN:-}" == 1 ]]; then printf '%q ' "$@"; echo; else "$@"; fi
}

build() {
  run gcloud builds submit "$root" --project="$PROJECT" --region="$REGION" \
    --config="$here/cloudbuild.yaml" --substitutions="_IMAGE=$IMAGE"
  run gcloud dataflow flex-template build "$TEMPLATE" --project="$PROJECT" \
    --image="$IMAGE" --sdk-language=PYTHON --metadata-file="$here/metadata.json"
}

launch() {
  local -a defaults=("sdk_container_image=$IMAGE" "number_of_worker_harness_threads=$HARNESS_THREADS")
  local -a gpu_flags=()
  if [[ -n "$ACCELERATOR" ]]; then
    # One SDK process per VM, so one model copy per GPU; its harness threads read, decode and
    # write while one of them explains (the explain step holds the model under a lock).
    defaults+=("device=cuda" "dataflow_service_options=worker_accelerator=type:$ACCELERATOR;count:1;install-nvidia-driver")
    gpu_flags=(--worker-machine-type="${MACHINE_TYPE:-g2-standard-8}" --additional-experiments=no_use_multiple_sdk_containers)
  else
    defaults+=("device=cpu")
    gpu_flags=(--worker-machine-type="${MACHINE_TYPE:-n2-standard-8}")
  fi
  local parameters="" pair name
  for pair in "${defaults[@]}"; do  # a default the caller sets is left out
    name="${pair%%=*}"
    if ! printf '%s\n' "$@" | grep -q "^$name="; then parameters+="~$pair"; fi
  done
  for pair in "$@"; do parameters+="~$pair"; done
  # ^~^: gcloud splits --parameters on ~ instead of commas, which values such as methods hold.
  run gcloud dataflow flex-template run "saliency-audit-$(date -u +%Y%m%d-%H%M%S)" --project="$PROJECT" \
    --region="$REGION" --template-file-gcs-location="$TEMPLATE" --max-workers="$MAX_WORKERS" \
    --temp-location="gs://$BUCKET/tmp" --staging-location="gs://$BUCKET/staging" "${gpu_flags[@]}" \
    --parameters="^~^${parameters#\~}"
}

case "$action" in
  build) build ;;
  run) launch "$@" ;;
  build-and-run) build; launch "$@" ;;
  *) echo "launch.sh: unknown action $action (build, run or build-and-run)" >&2; exit 2 ;;
esac
