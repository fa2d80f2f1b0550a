"""Compressed download (`federation.download_compression`): the global model sent as a compressed delta.

The aggregator keeps the exact global θ_r and the *broadcast copy* θ̂_r that every up-to-date silo holds.
Silos train from θ̂_r (their pseudo-gradients are θ̂_r − θ_k); the outer step updates θ; then

    θ̂_{r+1} = θ̂_r + decode(compress(θ_{r+1} − θ̂_r))        (bf16 or int8, `compression`)

Round 0's global is the model's initialisation from `train.seed`, which every silo can compute:
with `federation.download_from_seed` (the default) a silo builds θ̂_0 itself, checks it against the
signed hash, and downloads nothing in round 0; one that joins later starts from that copy and the
deltas since (or the full copy when cheaper). A run that starts from other weights turns it off.

What one round does not send (θ_{r+1} − θ̂_{r+1}, the quantisation error) is part of the next round's
delta: error feedback on the server side, so the residual stays at one quantisation step and is never
dropped. A silo that last held θ̂_q downloads the deltas q+1..r, or the full f32 θ̂_r when that is
smaller (a silo that joins, or fell behind by more rounds than the full model costs). The traffic
ledger counts exactly that per silo. Evaluation, export and the summary use the exact θ.

"none" (the default) sends θ itself in f32, as before: no broadcast copy exists.

Both drivers compute θ̂ with the same two compiled functions (`encode`, `apply`). In a deployment
global/<r> carries the items `broadcast` (θ̂_r) and `download` (the payload that took θ̂_{r-1} to
θ̂_r), and its signed meta their hashes; a silo applies the deltas since the copy it holds (kept in
its private state) and checks the result against the signed hash, or reads the full copy when that
is cheaper, it holds none, or the check fails (a platform whose float rounding differs from the
aggregator's, e.g. one that fuses the multiply-add).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax

from fedjax_lm import compression

PyTree = Any


class Downloads:
    """The broadcast copy's update and what each silo's download costs."""

    def __init__(
        self,
        method: str,
        block_size: int,
        abstract_params: PyTree,
        shardings: PyTree = None,
        *,
        from_seed: bool = False,
    ):
        if method not in compression.METHODS:
            raise ValueError(
                f"federation.download_compression must be one of {compression.METHODS}, got {method!r}"
            )
        self.method, self.block_size = method, int(block_size)
        self.from_seed = bool(from_seed) and method != "none"
        self.full_bytes = compression.raw_nbytes(abstract_params)
        self.abstract_payload = jax.eval_shape(
            lambda p: compression.compress(p, None, method, self.block_size)[0], abstract_params
        )
        self.delta_bytes = compression.payload_nbytes(self.abstract_payload)

        def encode(broadcast, params):
            delta = jax.tree.map(lambda p, b: p - b, params, broadcast)
            return compression.compress(delta, None, method, self.block_size)[0]

        def apply(broadcast, payload):
            return jax.tree.map(lambda b, d: b + d, broadcast, compression.decompress(payload, broadcast))

        self.encode = jax.jit(encode)  # (θ̂_r, θ_{r+1}) -> the round's payload
        # (θ̂_r, payload) -> θ̂_{r+1}: the aggregator's and every silo's, laid out like the params
        self.apply = jax.jit(apply, out_shardings=shardings)

    @property
    def on(self) -> bool:
        return self.method != "none"

    def next_broadcast(self, broadcast: PyTree, params: PyTree) -> tuple[PyTree, PyTree]:
        """(the payload, θ̂_{r+1}) from θ̂_r and the exact θ_{r+1}."""
        payload = self.encode(broadcast, params)
        return payload, self.apply(broadcast, payload)

    def start(self, held: int | None) -> int | None:
        """The round of the copy a silo that holds θ̂_held can start from: with `from_seed` a silo that
        holds nothing builds θ̂_0 (round 0's global is the seed's initialisation)."""
        return 0 if held is None and self.from_seed else held

    def plan(self, held: int | None, r: int) -> list[int] | None:
        """The rounds whose deltas a silo holding θ̂_held (None: nothing) applies to reach θ̂_r, starting
        from `start(held)`; None: it reads θ̂_r whole."""
        held = self.start(held)
        if held is None or held > r or (r - held) * self.delta_bytes >= self.full_bytes:
            return None
        return list(range(held + 1, r + 1))

    def cost(self, held: int | None, r: int) -> int:
        """Bytes silo downloads to hold θ̂_r, having held θ̂_held (None: nothing yet)."""
        if not self.on:
            return self.full_bytes
        steps = self.plan(held, r)
        return self.full_bytes if steps is None else len(steps) * self.delta_bytes

    def costs(self, held: Mapping[str, int | None], silos, r: int) -> dict[str, int]:
        return {s: self.cost(held.get(s), r) for s in silos}
