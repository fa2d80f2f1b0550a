#!/usr/bin/env bash
# A cross-silo federation on one machine: 1 aggregator + one process per silo, sharing only a store.
#
#   launch/local_federation.sh experiments/photon.py:size=tiny,silos=4 runs/local [extra flags...]
#
# Logs: RUN/logs/aggregator.log and RUN/logs/<silo>.log. The store is RUN/store, the aggregator's
# metrics and summary.json are in RUN/aggregator. Ctrl-C stops every process.
set -euo pipefail
CONFIG=${1:?usage: launch/local_federation.sh CONFIG RUN_DIR [flags...]}
RUN=${2:?usage: launch/local_federation.sh CONFIG RUN_DIR [flags...]}
shift 2
PY=${PYTHON:-python}
mkdir -p "$RUN/logs"
# Each process gets one host CPU device and a fair share of the cores.
export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=1"
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}

# Build the corpus once, before the silos start reading it.
"$PY" -m fedjax_lm prepare --config "$CONFIG" "$@" >"$RUN/logs/prepare.log" 2>&1
SILOS=$(tail -n 1 "$RUN/logs/prepare.log" | sed -n 's/^silos: //p')
[ -n "$SILOS" ] || { echo "prepare failed: see $RUN/logs/prepare.log" >&2; exit 1; }
echo "silos: $SILOS"

pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; }
trap cleanup INT TERM

"$PY" -m fedjax_lm aggregate --config "$CONFIG" --store "$RUN/store" --workdir "$RUN/aggregator" "$@" \
  >"$RUN/logs/aggregator.log" 2>&1 &
agg=$!
for s in $SILOS; do
  "$PY" -m fedjax_lm silo --config "$CONFIG" --store "$RUN/store" --silo "$s" "$@" >"$RUN/logs/$s.log" 2>&1 &
  pids+=($!)
done
pids+=($agg)
echo "aggregator pid $agg, silo pids ${pids[*]:0:${#pids[@]}-1}; logs in $RUN/logs"
status=0
wait "$agg" || status=$?
for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
tail -n 20 "$RUN/logs/aggregator.log"
exit $status
