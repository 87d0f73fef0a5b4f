#!/usr/bin/env bash
# capjax on a Cloud TPU VM pod slice: the same command on every worker
# (--worker=all); JAX finds the other hosts itself (jax.distributed).
#
#   TPU_NAME=capjax ZONE=us-west4-a CONFIG=configs/coco.py \
#   WORKDIR=/mnt/shared/runs/coco launch/tpu_vm.sh [--config.batch_size=2048 ...]
#
# With CREATE=1 the slice is created first (ACCELERATOR_TYPE, e.g.
# v5litepod-256, and RUNTIME_VERSION). With SETUP=1 capjax is cloned from
# REPO_URL and installed on every worker. WORKDIR must be a filesystem all
# workers share (e.g. a Filestore or gcsfuse mount).
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME, the TPU VM (slice) name}"
: "${ZONE:?set ZONE, e.g. us-west4-a}"
: "${CONFIG:?set CONFIG, e.g. CONFIG=configs/coco.py}"
: "${WORKDIR:?set WORKDIR to a directory every worker shares}"

run() { echo "+ $*"; "$@"; }

if [ "${CREATE:-0}" = 1 ]; then
  : "${ACCELERATOR_TYPE:?set ACCELERATOR_TYPE, e.g. v5litepod-256}"
  : "${RUNTIME_VERSION:?set RUNTIME_VERSION, e.g. v2-alpha-tpuv5-lite}"
  run gcloud compute tpus tpu-vm create "$TPU_NAME" --zone="$ZONE" \
      --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION"
fi
if [ "${SETUP:-0}" = 1 ]; then
  : "${REPO_URL:?set REPO_URL, where the workers clone capjax from}"
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all \
      --command="git clone $REPO_URL capjax 2>/dev/null || git -C capjax pull; pip install -e ./capjax 'jax[tpu]'"
fi
args=$(printf ' %q' "$@")
run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all \
    --command="cd capjax && python -m capjax.main --config=$CONFIG --workdir=$WORKDIR$args"
