"""Secure aggregation in the round: what both drivers share (`federation.secagg`).

With `federation.secagg.enabled` the aggregator learns only the sum of a round's surviving
updates (`fedjax_lm.secagg`, Bonawitz et al. 2017). Each sampled silo turns its pseudo-gradient
Δ_k into its *contribution* x_k (`SecureSum.contribution`):

    x_k = Δ_k                                    no DP
    x_k = clip(Δ_k, C)                           dp.mode='central' (the aggregator cannot re-clip)
    x_k = clip(Δ_k, C) + N(0, σ²C²/t)            dp.mode='distributed' (t: the round's threshold)

encodes it in the fixed-point ring Z/2^b (entries saturated at ±B, `ring.FixedPoint`) and masks
it; the round's unmasked ring sum decodes to Σ_{k in U3} x_k exactly (up to the encoding's rounding,
2^-f·B per entry). The aggregate the outer step sees is (`SecureSum.mean_factor`)

    Σ x_k / |U3|                                 no DP: every silo weighs the same (see below)
    Σ x_k / K  (+ N(0, (σC/K)²) centrally)       DP: K = the expected silos per round (fixed
                                                 denominator, as `federation.dp` without secagg)

Weights: a silo cannot be weighted by the tokens it claims under secure aggregation (the
aggregator never sees its update, and multiplying before encoding lets the silo choose); every
silo trains exactly H x batch x seq_len tokens a round, so the token-weighted mean of the plain
round and this unweighted one are the same estimator.

What cannot run (`check_config` refuses it, naming the field): the robust rules and any
per-update norm bound or clipping by the aggregator (they need individual updates; the ring's
L∞ bound B is the only limit on one silo's influence), lossy compression (int8/bf16 scales do not
sum in a ring; the ring encoding is the upload, 4 bytes per parameter at b = 32), and Photon's
shared inner moments (uploaded in the clear).

Crash safety: the contribution is a deterministic function of the silo's round (its noise comes
from its own secret, `privacy.noise_key`), the masks of its persisted protocol state, so a silo that
restarts re-sends the same masked update; the aggregator's round key is derived from its own
secret (`aggregator_key`), so a restarted aggregator can still open the responses sealed to it.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from cryptography.hazmat.primitives.asymmetric import x25519

from fedjax_lm import privacy
from fedjax_lm import ring
from fedjax_lm import secagg

DEFAULT_PHASE_S = 60.0


def default_config() -> dict[str, Any]:
    return dict(
        enabled=False,
        threshold=0,  # t of the round's K silos; 0: a majority, K // 2 + 1
        ring_bits=32,  # 32 or 64: the ring Z/2^b (4 or 8 bytes per parameter uploaded)
        # L-infinity bound B of one silo's contribution (larger entries saturate and are counted);
        # 0: dp.clip_norm, plus the tail of the distributed noise share.
        bound=0.0,
        phase_s=DEFAULT_PHASE_S,  # deployment: key and unmasking phases wait this long for stragglers once t are in
    )


def check_config(fed: Mapping[str, Any]) -> None:
    """federation.secagg and what it cannot be combined with; errors name the field."""
    s = fed["secagg"]
    unknown = set(s) - set(default_config())
    if unknown:
        raise ValueError(
            f"federation.secagg has unknown fields {sorted(unknown)}; valid: {sorted(default_config())}"
        )
    if not s["enabled"]:
        if fed["dp"]["mode"] == "distributed":
            raise ValueError(
                "federation.dp.mode='distributed' needs secure aggregation: set federation.secagg.enabled=True "
                "(each silo adds only part of the noise, so no one may see a single update)"
            )
        return
    if int(s["ring_bits"]) not in ring.RING_BITS:
        raise ValueError(f"federation.secagg.ring_bits must be one of {ring.RING_BITS}, got {s['ring_bits']}")
    if int(s["threshold"]) < 0 or int(s["threshold"]) == 1:
        raise ValueError(f"federation.secagg.threshold must be 0 (a majority) or >= 2, got {s['threshold']}")
    if not float(s["bound"]) >= 0 or not math.isfinite(float(s["bound"])):
        raise ValueError(f"federation.secagg.bound must be >= 0, got {s['bound']}")
    if float(s["bound"]) == 0 and fed["dp"]["mode"] == "off":
        raise ValueError(
            "federation.secagg.bound: give the L-infinity bound of one silo's update (entries beyond it "
            "saturate), or turn on federation.dp (the bound is then dp.clip_norm)"
        )
    if not float(s["phase_s"]) > 0:
        raise ValueError(f"federation.secagg.phase_s must be > 0, got {s['phase_s']}")
    try:
        secagg.check_combination(str(fed["aggregation"]), str(fed["compression"]))
    except ValueError as e:
        raise ValueError(f"federation.secagg: {e}") from None
    for key in ("max_update_norm", "max_update_norm_ratio", "clip_norm_ratio"):
        if float(fed[key]) != 0:
            raise ValueError(
                f"federation.{key}={fed[key]} checks each update's norm, which secure aggregation hides from "
                f"the aggregator: set it to 0 (the ring's bound federation.secagg.bound limits one silo instead)"
            )
    if fed["aggregate_inner_moments"]:
        raise ValueError(
            "federation.aggregate_inner_moments uploads inner moments in the clear; it cannot run with secure "
            "aggregation"
        )


def ring_dtype(ring_bits: int) -> np.dtype:
    return np.dtype(np.uint32 if int(ring_bits) == 32 else np.uint64)


def threshold_for(configured: int, k: int) -> int:
    """The round's t for K sampled silos: the configured one, or a majority."""
    t = int(configured) or k // 2 + 1
    secagg.check_threshold(t, k)
    return t


@functools.partial(jax.jit, static_argnames=("clip", "noise"))
def _contribute(payload, clip_norm, key, std, *, clip: bool, noise: bool):
    delta = jax.tree.map(
        lambda p: p["x"].astype(jnp.float32),
        payload,
        is_leaf=lambda p: isinstance(p, dict) and set(p) == {"x"},
    )
    norm = privacy.global_norm(delta)
    if clip:
        delta, norm = privacy.clip_update(delta, clip_norm)
    return (privacy.add_noise(delta, key, std) if noise else delta), norm


class SecureSum:
    """A federation's secure-aggregation settings and the arithmetic every driver shares."""

    def __init__(
        self, fed_cfg: Mapping[str, Any], *, expected_silos: int, noise_multiplier: float, num_params: int
    ):
        s = fed_cfg["secagg"]
        self.configured_threshold = int(s["threshold"])
        self.ring_bits, self.phase_s = int(s["ring_bits"]), float(s["phase_s"])
        self.dp_mode = str(fed_cfg["dp"]["mode"])
        self.clip_norm = float(fed_cfg["dp"]["clip_norm"])
        self.expected_silos = int(expected_silos)
        self.threshold(self.expected_silos)  # fails early on a threshold the sample cannot meet
        # Distributed DP: each silo's share of the noise, sized for the threshold of a full sample.
        self.share_std = (
            privacy.distributed_noise_std(
                noise_multiplier, self.clip_norm, self.threshold(self.expected_silos)
            )
            if self.dp_mode == "distributed"
            else 0.0
        )
        bound = float(s["bound"])
        if bound == 0:
            bound = ring.elementwise_bound(self.clip_norm, self.share_std, num_params)
        self.bound = bound

    def threshold(self, k: int) -> int:
        return threshold_for(self.configured_threshold, k)

    def fixed_point(self, k: int) -> ring.FixedPoint:
        """The ring encoding of a round of K sampled silos (any sum of K encodings cannot wrap)."""
        return ring.FixedPoint(self.bound, max_summands=k, ring_bits=self.ring_bits)

    def spec(self, run_id: str, r: int, k: int) -> secagg.RoundSpec:
        return secagg.RoundSpec(
            run_id=run_id, round=r, threshold=self.threshold(k), fixed_point=self.fixed_point(k)
        )

    def contribution(self, payload, r: int, silo: str, secret: bytes | None):
        """(x_k as an f32 tree, ‖Δ_k‖): the silo's clipped (DP) and noised (distributed DP) update."""
        noise = self.share_std > 0
        if noise and secret is None:
            raise ValueError("distributed DP needs the silo's noise secret")
        key = privacy.noise_key(secret, r, silo) if noise else jax.random.key(0)  # no noise drawn without it
        x, norm = _contribute(
            payload,
            jnp.float32(self.clip_norm),
            key,
            jnp.float32(self.share_std),
            clip=self.dp_mode != "off",
            noise=noise,
        )
        return x, float(norm)

    def mean_factor(self, survivors: int) -> float:
        """What the decoded sum is multiplied by: 1/|U3|, or 1/K under DP (fixed denominator)."""
        return 1.0 / (self.expected_silos if self.dp_mode != "off" else survivors)


def aggregator_key(secret: bytes, run_id: str, r: int) -> x25519.X25519PrivateKey:
    """The aggregator's X25519 key for round r, derived from its private secret: a restarted
    aggregator re-derives it and can open the responses sealed to it before the crash."""
    raw = hmac.new(
        secret, f"{secagg.DOMAIN}/aggregator-key/{run_id}/{int(r)}".encode(), hashlib.sha256
    ).digest()
    return x25519.X25519PrivateKey.from_private_bytes(raw)


def row_fields(survivors, dropped, saturated: int) -> dict[str, Any]:
    """A secure round's row fields: who was summed, who dropped out, entries saturated at ±B."""
    return {
        "secagg_survivors": sorted(survivors),
        "secagg_dropped": sorted(dropped),
        "secagg_saturated": int(saturated),
    }
