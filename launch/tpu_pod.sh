#!/usr/bin/env bash
# A cross-silo federation on Cloud TPU: one TPU VM slice per silo, the aggregator on a CPU VM,
# the store on GCS. Every worker of a slice runs the same `python -m fedjax_lm silo` with
# FEDJAX_DISTRIBUTED=1 (jax.distributed.initialize() discovers the slice's coordinator).
#
#   launch/tpu_pod.sh --project P --zone us-central2-b --store gs://BUCKET/run1 \
#       --config experiments/photon.py:size=1.3b \
#       --silo quotes-en=fed-tpu-a:v4-32 --silo bible-en=fed-tpu-b:v5litepod-16 \
#       --aggregator fed-agg [--create] [--repo URL] [--rev REV] [--dry-run]
#
# --dry-run prints every gcloud command instead of running it. See launch/README.md.
set -euo pipefail

PROJECT="" ZONE="" STORE="" CONFIG="" AGG="" CREATE=0 DRY=0
REPO="${FEDJAX_REPO:-$(git -C "$(dirname "$0")" config --get remote.origin.url 2>/dev/null || true)}"
REV="$(git -C "$(dirname "$0")" rev-parse HEAD 2>/dev/null || echo main)"
RUNTIME="${TPU_RUNTIME:-tpu-ubuntu2204-base}"
SILOS=()
EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --project) PROJECT=$2; shift 2 ;;
    --zone) ZONE=$2; shift 2 ;;
    --store) STORE=$2; shift 2 ;;
    --config) CONFIG=$2; shift 2 ;;
    --silo) SILOS+=("$2"); shift 2 ;;
    --aggregator) AGG=$2; shift 2 ;;
    --repo) REPO=$2; shift 2 ;;
    --rev) REV=$2; shift 2 ;;
    --create) CREATE=1; shift ;;
    --dry-run) DRY=1; shift ;;
    --config.*) EXTRA+=("$1"); shift ;;
    -h|--help) sed -n 2,13p "$0"; exit 0 ;;
    *) echo "tpu_pod.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
for v in PROJECT ZONE STORE CONFIG AGG; do
  [ -n "${!v}" ] || { echo "tpu_pod.sh: --$(echo "$v" | tr 'A-Z' 'a-z') is required" >&2; exit 2; }
done
[ -n "$REPO" ] || { echo "tpu_pod.sh: --repo URL is required (no git remote to default to)" >&2; exit 2; }
[ ${#SILOS[@]} -gt 0 ] || { echo "tpu_pod.sh: give at least one --silo NAME=TPU_VM:ACCELERATOR" >&2; exit 2; }
case "$STORE" in gs://*) ;; *) echo "tpu_pod.sh: --store must be a gs:// path shared by all VMs" >&2; exit 2 ;; esac

run() {  # print, then run unless --dry-run
  printf '+'; printf ' %q' "$@"; printf '\n'
  [ "$DRY" = 1 ] || "$@"
}

GC=(gcloud --project "$PROJECT")
SETUP="set -e; [ -d fedjax_lm ] || git clone $REPO fedjax_lm; cd fedjax_lm; git fetch -q; git checkout -q $REV; \
python3 -m venv ~/fedjax_venv; ~/fedjax_venv/bin/pip install -q -r requirements.txt; ~/fedjax_venv/bin/pip install -q --no-deps -e ."
ARGS="--config $CONFIG --store $STORE ${EXTRA[*]:-}"

for spec in "${SILOS[@]}"; do
  name=${spec%%=*}; rest=${spec#*=}; vm=${rest%%:*}; accel=${rest#*:}
  [ -n "$name" ] && [ -n "$vm" ] && [ -n "$accel" ] && [ "$rest" != "$spec" ] || {
    echo "tpu_pod.sh: --silo $spec must be NAME=TPU_VM:ACCELERATOR (e.g. quotes-en=fed-tpu-a:v4-32)" >&2; exit 2; }
  if [ "$CREATE" = 1 ]; then
    run "${GC[@]}" compute tpus tpu-vm create "$vm" --zone "$ZONE" --accelerator-type "$accel" --version "$RUNTIME"
  fi
  run "${GC[@]}" compute tpus tpu-vm ssh "$vm" --zone "$ZONE" --worker=all \
    --command "$SETUP; ~/fedjax_venv/bin/pip install -q 'jax[tpu]==0.10.2'"
  run "${GC[@]}" compute tpus tpu-vm ssh "$vm" --zone "$ZONE" --worker=all \
    --command "cd fedjax_lm && FEDJAX_DISTRIBUTED=1 nohup ~/fedjax_venv/bin/python -m fedjax_lm silo $ARGS --silo $name --workdir ~/fedjax_silo > silo-$name.log 2>&1 &"
done

run "${GC[@]}" compute ssh "$AGG" --zone "$ZONE" --command "$SETUP"
run "${GC[@]}" compute ssh "$AGG" --zone "$ZONE" \
  --command "cd fedjax_lm && nohup ~/fedjax_venv/bin/python -m fedjax_lm aggregate $ARGS --workdir ~/fedjax_agg > aggregator.log 2>&1 &"
echo "started ${#SILOS[@]} silo slice(s) and the aggregator; progress: gsutil ls $STORE/global/"
