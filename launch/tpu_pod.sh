#!/usr/bin/env bash
# mmjax on every worker of a Cloud TPU VM slice (e.g. v4-32, v5p-64).
#
#   TPU_NAME=my-v4-32 ZONE=us-central2-b launch/tpu_pod.sh configs/clip_b16.py /mnt/shared/runs/clip \
#       --config.parallel.mesh.fsdp=16
#
# Installs mmjax from this checkout's git remote on each worker (once), then starts
# the same command on all workers at the same time. JAX finds the coordinator and
# the worker ids from the TPU metadata (MMJAX_DISTRIBUTED=auto asks for that).
# The workdir must be shared by all workers (Filestore / a GCS FUSE mount).
set -euo pipefail
CONFIG=${1:?usage: TPU_NAME=.. ZONE=.. $0 CONFIG WORKDIR [overrides...]}
WORKDIR=${2:?usage: TPU_NAME=.. ZONE=.. $0 CONFIG WORKDIR [overrides...]}
shift 2
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
REPO=${MMJAX_REPO:-$(git config --get remote.origin.url)}
REF=${MMJAX_REF:-$(git rev-parse HEAD)}
OVERRIDES=$(printf ' %q' "$@")
REMOTE="set -e
if [ ! -d ~/mmjax ]; then git clone $REPO ~/mmjax; fi
cd ~/mmjax && git fetch -q origin && git checkout -q $REF
pip install -q -e '.[data]' 'jax[tpu]'
MMJAX_DISTRIBUTED=auto mmjax train --config $CONFIG --workdir $WORKDIR --no-progress \
  --config.parallel.step_timeout_s=900$OVERRIDES"
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "$REMOTE"
