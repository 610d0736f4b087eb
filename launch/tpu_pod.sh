#!/usr/bin/env bash
# Cloud TPU VM pod slice: the same command on every worker (gcloud ... tpu-vm ssh --worker=all).
#
#   launch/tpu_pod.sh TPU_NAME ZONE setup                       # copy this checkout, install jax[tpu] + diffjax
#   launch/tpu_pod.sh TPU_NAME ZONE run --config experiments/configs/cifar10_ddpmpp_vp.py \
#       --workdir gs://BUCKET/runs/c10
#
# On every worker DIFFJAX_DISTRIBUTED=auto makes diffjax.distributed call jax.distributed.initialize()
# with JAX's TPU cluster detection (coordinator, worker count and id from the TPU metadata). One
# process per host drives all of its local TPU chips; the mesh spans every chip of the slice. The
# workdir should be a gs:// bucket (orbax and TensorBoard write there) or a shared file system.
# Not run from this repository's CI (no TPU access); the commands are the documented gcloud ones.
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: $0 TPU_NAME ZONE setup | run <diffjax.main arguments>" >&2
  exit 2
fi
TPU_NAME=$1 ZONE=$2 ACTION=$3
shift 3
REMOTE_DIR=${DIFFJAX_REMOTE_DIR:-diffjax}
ssh_all() { gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "$1"; }

case "$ACTION" in
  setup)
    tar czf /tmp/diffjax-src.tgz --exclude=.git --exclude=runs --exclude=.venv .
    gcloud compute tpus tpu-vm scp /tmp/diffjax-src.tgz "$TPU_NAME":/tmp/ --zone "$ZONE" --worker=all
    ssh_all "mkdir -p $REMOTE_DIR && tar xzf /tmp/diffjax-src.tgz -C $REMOTE_DIR && cd $REMOTE_DIR && \
             pip install -U 'jax[tpu]' && pip install -e '.[train]'"
    ;;
  run)
    args=$(printf '%q ' "$@")
    ssh_all "cd $REMOTE_DIR && DIFFJAX_DISTRIBUTED=auto PYTHONUNBUFFERED=1 python -m diffjax.main --noprogress $args"
    ;;
  *)
    echo "$0: unknown action '$ACTION' (setup | run)" >&2
    exit 2
    ;;
esac
