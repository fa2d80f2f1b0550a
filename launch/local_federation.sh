#!/usr/bin/env bash
# A cross-silo federation on one machine: 1 aggregator + one process per silo (and per sub-federation of a
# tree, federation.tree.spec), sharing only a store.
#
#   launch/local_federation.sh experiments/photon.py:size=tiny,silos=4 runs/local [extra flags...]
#
# Logs: RUN/logs/aggregator.log and RUN/logs/<silo>.log. The store is RUN/store, the aggregator's
# metrics and summary.json are in RUN/aggregator. Ctrl-C stops every process.
# The exchange is signed: one Ed25519 key per member in RUN/keys (made by `keygen` on the first run),
# their allow-list RUN/keys/federation.json. UNSIGNED=1 runs without keys.
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
# A tree of federations (federation.tree.spec): one process per sub-federation, between root and silos.
FEDS=$(sed -n 's/^federations: //p' "$RUN/logs/prepare.log")
[ -z "$FEDS" ] || echo "sub-federations: $FEDS"

# One key per member (each organisation would run keygen on its own machine and send the .pub).
KEYS="$RUN/keys"
key_flags() { :; }
if [ "${UNSIGNED:-0}" != "1" ]; then
  for m in aggregator $FEDS $SILOS; do
    [ -f "$KEYS/$m.key" ] || "$PY" -m fedjax_lm keygen --name "$m" --out "$KEYS" --allow_list "$KEYS/federation.json" \
      >>"$RUN/logs/keygen.log"
  done
  key_flags() { echo "--config.federation.deploy.allow_list=$KEYS/federation.json --config.federation.deploy.key=$KEYS/$1.key"; }
fi

pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; }
trap cleanup INT TERM

# shellcheck disable=SC2046
"$PY" -m fedjax_lm aggregate --config "$CONFIG" --store "$RUN/store" --workdir "$RUN/aggregator" $(key_flags aggregator) "$@" \
  >"$RUN/logs/aggregator.log" 2>&1 &
agg=$!
for f in $FEDS; do
  # shellcheck disable=SC2046
  "$PY" -m fedjax_lm federation --config "$CONFIG" --store "$RUN/store" --name "$f" --workdir "$RUN/federation-$f" $(key_flags "$f") "$@" >"$RUN/logs/$f.log" 2>&1 &
  pids+=($!)
done
for s in $SILOS; do
  # shellcheck disable=SC2046
  "$PY" -m fedjax_lm silo --config "$CONFIG" --store "$RUN/store" --silo "$s" --workdir "$RUN/silo-$s" $(key_flags "$s") "$@" >"$RUN/logs/$s.log" 2>&1 &
  pids+=($!)
done
pids+=($agg)
echo "aggregator pid $agg, other pids ${pids[*]:0:${#pids[@]}-1}; logs in $RUN/logs"
status=0
wait "$agg" || status=$?
for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
tail -n 20 "$RUN/logs/aggregator.log"
exit $status
