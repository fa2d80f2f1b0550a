"""Silo-level differential privacy on pseudo-gradients: clipping, Gaussian noise, adaptive clipping and
the fixed-denominator mean (the accountant is `accounting.py`).

What is protected
-----------------
The unit of privacy is a *silo* (one organisation's whole dataset), as in DP-FedAvg (McMahan et
al. 2018) at the client level. Neighbouring federations differ in one silo's data being replaced
by nothing ("zero-out": the silo still takes part and adds its noise shares, but everything it
contributes to a sum — its update and, with adaptive clipping, its centred indicator — is zero).
Participation itself is public in a cross-silo federation (the allow-list names every member). For the Gaussian and the
Poisson-subsampled Gaussian mechanism dp-accounting gives the same ε under zero-out
(`REPLACE_SPECIAL`) and add/remove-one, so the accountant uses the library default
(`ADD_OR_REMOVE_ONE`) and its numbers are the ones Flower / tensorflow_privacy users know.

Sensitivity and the fixed denominator
-------------------------------------
Each sampled silo k releases `x_k = clip(Δ_k, C)` (‖x_k‖₂ ≤ C) with a weight w_k ∈ [0, 1] fixed
before the round and not derived from the round's data (configured per silo, e.g. `capped_weights`
of the corpus sizes, or all 1). Then

    S = Σ_k w_k x_k  changes by at most C (= C · max w) in L2 when one silo's data is zeroed,

so `S + N(0, σ²C² I)` is the Gaussian mechanism with noise multiplier σ (`GaussianDpEvent(σ)`).
The model update is `dp_mean(S + noise, D)` with the FIXED denominator `D = fixed_denominator(
weights_of_all_silos, q) = q · Σ_i w_i` (the expected total weight of a round's sample; K for
equal weights and K of N sampled). Dividing by a public constant is post-processing; dividing by
the weight actually received would let one silo's presence change the scale of every coordinate
(under add/remove) — the reason DP-FedAvg uses the fixed-denominator estimator. The price: a round
with dropouts is shrunk toward zero (the estimate is unbiased only at full participation). If the
weights are not normalised to max 1, the noise must be σ · C · max w (`central_noise_std`).

Central and distributed noise
-----------------------------
* ``central`` — the aggregator (trusted with the sum) adds `N(0, σ²C²)` per coordinate to S.
* ``distributed`` — each silo adds `N(0, σ²C²/t)` to its own clipped update, t = the configured
  minimum number of contributors (the secure-aggregation threshold); the securely aggregated sum
  of m ≥ t contributions carries m/t · σ²C² ≥ σ²C², and nobody sees a less-noised value. With
  t = K and no dropout this is exactly σ. If only m < t silos contribute, the sum carries
  σ_eff = σ·√(m/t) < σ (e.g. 6 of 8: σ_eff = 0.87σ); `accounted_noise_multiplier` gives the value
  to account, σ·min(1, √(m/t)) — never more than σ, so extra survivors give no credit. Against
  c colluding silos (who know their own shares) the hidden noise is (m − c)/t · σ²C²: the guarantee
  σ holds against coalitions of up to m − t silos. Secure aggregation aborts below t survivors,
  so with it every completed round is accounted at σ.

Noise comes from a jax key derived from (a node-private secret, round, node name, purpose) by
`noise_key` (HMAC-SHA256), so a resumed run draws the same noise bit for bit. The secret must be
known only to the party adding the noise (each silo in distributed mode, the aggregator in central
mode; e.g. `new_noise_secret()` kept in the node's private checkpoint, never in the store or the
config): anyone who can regenerate the noise can subtract it.

The silo's round and the aggregator's, and the order with compression / error feedback
------------------------------------------------------------------------------------------
A silo (`privatize_update`; jit with `static_argnames=("method", "block_size")`)::

    y        = Δ_k + e_k                   # e_k: the error-feedback residual, kept by the silo
    x, norm  = clip_update(y, C)           # what is released is bounded by C, whatever e_k is
    z        = x + N(0, σ²C²/t)            # distributed mode only (noise_std=0 in central mode)
    payload, e_{k+1} = compress(z)         # e_{k+1} = z − decode(payload), never released

A central-mode aggregator::

    x_k  = clip_update(decode(payload_k), C)[0]   # re-clip: int8 rounding can add ~C·2^-8 of norm
    S    = Σ_k w_k x_k                            # e.g. outer.mean_of_payloads' mean × total weight
    mean = dp_mean(add_noise(S, key, central_noise_std(σ, C)), D)

A distributed-mode aggregator adds nothing: `mean = dp_mean(secure_sum, D)`.

Why this order keeps sensitivity C every round: the residual e_k is data-dependent state that the
silo keeps and never releases on its own; it enters the next round *before* clipping, so every
release is clip(·) ≤ C plus fresh independent noise, whatever the hidden state. A mechanism whose
input depends on hidden earlier state is, given the public past outputs, a mixture of Gaussian
mechanisms of sensitivity ≤ C, which is dominated by the single Gaussian (joint convexity of the
hockey-stick divergence, quasi-convexity of the Rényi divergence), so the rounds compose as
`rounds × GaussianDpEvent(σ)`. What the residual carries is a utility choice:

* only the compression error of the released value: not the clipping excess y − x (it would grow
  without bound whenever updates exceed C — it is the bias DP asks for, not an error to correct),
  and not the noise (in d = 2M coordinates the noise has norm ≈ σC·√d ≫ C: fed back, it would
  dominate and be clipped away with the signal next round).
* Central mode: compression (int8 / bf16 with error feedback) happens on x, before any noise, and
  its residual is the small quantisation error of a C-bounded vector; the aggregator re-clips each
  decoded payload, so the sum it noises has sensitivity C whatever the rounding did.
* Distributed mode: the noise share is added before compression, so int8/bf16 rounding would act
  on each silo's partly-noised update and the sum would no longer be the Gaussian mechanism the
  accountant counts (each silo alone carries only σ/√t). `check_combination` therefore refuses
  distributed noise with a lossy compression: use "none" (f32) or secure aggregation's fixed-point
  ring, whose rounding (at most 2^-27 of the bound per coordinate for up to 16 silos,
  `ring.FixedPoint`) is treated like floating-point rounding below. Error feedback is then a
  no-op (the residual is exactly 0).

Adaptive clipping (Andrew, Thakkar, McMahan, Ramaswamy, NeurIPS 2021)
--------------------------------------------------------------------
Each contributing silo also reports b_k = [‖y_k‖ ≤ C] − 1/2 (`centered_indicator`; centring makes
one silo's influence on Σ b_k at most 1/2, against a zeroed silo's 0). The server forms b̄ = (Σ b_k + N(0, σ_b²))/m + 1/2,
clipped to [0, 1], with m the expected number of contributors, and updates geometrically
`C ← C · exp(−η (b̄ − γ))` toward the γ-quantile of the update norms (`adaptive_clip_update`;
η = 0.2, γ = 0.5, σ_b = m/20 are the paper's suggestions). Releasing (S + N(0, z_Δ²C²),
Σ b_k + N(0, σ_b²)) is one Gaussian mechanism on the vector (S/(z_Δ C), Σ b_k/σ_b) with unit
noise and L2 sensitivity √(z_Δ⁻² + (2σ_b)⁻²); so with the update noised at

    z_Δ = (σ⁻² − (2σ_b)⁻²)^(-1/2)            (`update_noise_multiplier`; needs σ < 2σ_b)

the round is exactly `GaussianDpEvent(σ)` (Andrew et al., Thm. 1; tensorflow_federated and Flower
use the same formula). The accountant keeps σ; only the noise drawn for S uses z_Δ > σ. With few
silos this is expensive: K = 8 and σ = 1.7 need σ_b > 0.85 (b̄'s noise std σ_b/8 > 0.1).
In distributed mode each silo adds N(0, σ_b²/t) to its b_k and b_k travels in the secure sum.

Accounting
----------
`PrivacyAccountant` composes one event per round with dp-accounting 0.6.0: `GaussianDpEvent(σ)`
when every silo takes part each round (q = 1: there is no sampling to amplify privacy, and the
Poisson event with q = 1 is the same mechanism), `PoissonSampledDpEvent(q, GaussianDpEvent(σ))`
when each silo is sampled independently with probability q. The federation's current sampler
(`federation.sample_silos`) draws exactly K of N without replacement, which Poisson accounting
does not cover: for it use ``sampling="without_replacement"`` (RDP only, dp-accounting's
`SampledWithoutReplacementDpEvent` under replace-one, where a sum's sensitivity is 2C, so the
event's multiplier is σ/2), or make the sampler Poisson. `epsilon_after` answers "what would ε be
after this round" so a budget can stop the run before it is exceeded. PLD is the default (tighter;
δ = 1e-5: ε = 8 needs σ ≈ 1.7 for 8 full rounds); its discretisation is pessimistic, and 1e-3
(default here) agrees with the library's 1e-4 to four decimals in ε at a tenth of the time.

Limitations (documented, as in tensorflow_privacy, Opacus and Flower): noise is floating-point
(f32) Gaussian, which the idealised analysis does not cover (Mironov 2012); fixed-point rounding
under secure aggregation likewise; a threefry key has 64 bits, so the noise is only as hard to
regenerate as a 64-bit key search.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lm import compression

PyTree = Any

MODES = ("central", "distributed")
NOISE_DOMAIN = b"fedjax_lm/dp-noise/v1"


# ------------------------------------------------------------------------------ clipping


def _scale_pow2(x: jax.Array, e: jax.Array) -> jax.Array:
    """x · 2^-e exactly, as two multiplications by normal powers of two (|e| ≤ 127): XLA may turn
    x / 2^e into x · (1 / 2^e), and 2^-127 is subnormal, flushed to zero on CPU."""
    half = e // 2
    return (x * jnp.ldexp(jnp.float32(1.0), -half)) * jnp.ldexp(jnp.float32(1.0), half - e)


def _norm_parts(tree: PyTree) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(all finite, e, r) with ‖tree‖₂ = 2^e · r, e = ⌊log2 max|x|⌋ (so scaling is exact and r
    cannot overflow even when the norm itself exceeds the f32 range)."""
    leaves = [jnp.asarray(x).astype(jnp.float32) for x in jax.tree.leaves(tree) if x.size > 0]
    if not leaves:
        return jnp.array(True), jnp.zeros((), jnp.int32), jnp.zeros((), jnp.float32)
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))
    amax = jnp.max(jnp.stack([jnp.max(jnp.abs(x)) for x in leaves]))
    amax = jnp.where(finite & (amax > 0), amax, 1.0)
    e = jnp.clip(jnp.floor(jnp.log2(amax)), -126, 127).astype(jnp.int32)
    sumsq = sum(jnp.sum(jnp.square(_scale_pow2(x, e))) for x in leaves)
    return finite, e, jnp.sqrt(sumsq)


def global_norm(tree: PyTree) -> jax.Array:
    """f32 L2 norm over every leaf; +inf if any entry is non-finite (or the norm exceeds f32).

    Overflow-safe: leaves are divided by a power of two near max|x| (exact) before squaring.
    Jit-able.
    """
    finite, e, root = _norm_parts(tree)
    return jnp.where(finite, jnp.ldexp(root, e), jnp.inf)


def clip_update(delta: PyTree, clip_norm: float | jax.Array) -> tuple[PyTree, jax.Array]:
    """(clipped f32 tree, norm before clipping): delta · min(1, C / ‖delta‖₂) over the whole tree.

    A zero update is returned unchanged; a non-finite one (norm +inf) becomes zeros, so whatever a
    silo computes its release is bounded by C; finite values up to the f32 limit are scaled
    correctly even when their norm overflows f32. The bound holds up to f32 rounding (relative
    excess ≤ 1e-6 in the tests, measured in f64), which the accounting ignores as every DP library
    does. Jit-able; `clip_norm` may be traced (adaptive clipping).
    """
    finite, e, root = _norm_parts(delta)
    norm = jnp.where(finite, jnp.ldexp(root, e), jnp.inf)
    c = jnp.asarray(clip_norm, jnp.float32)
    clip = norm > c
    # In units of 2^e: x · C / (2^e · r) = (x · 2^-e) · (C / r), no overflow or underflow on the way.
    factor = jnp.where(clip & (root > 0), c / jnp.where(root > 0, root, 1.0), 1.0)

    def leaf(x):
        x = jnp.asarray(x).astype(jnp.float32)
        return jnp.where(finite, jnp.where(clip, _scale_pow2(x, e) * factor, x), jnp.zeros_like(x))

    return jax.tree.map(leaf, delta), norm


# ------------------------------------------------------------------------------ noise


def new_noise_secret() -> bytes:
    """32 random bytes for `noise_key`; keep them in the node's private state (never the store)."""
    return os.urandom(32)


def noise_key(secret: bytes, round_idx: int, node: str, purpose: str = "update") -> jax.Array:
    """A threefry jax key = HMAC-SHA256(secret, domain | purpose | round | node)[:8].

    Deterministic (a resumed run redraws the same noise), different for every (round, node,
    purpose), and unpredictable without `secret`. `purpose` separates e.g. "update" from
    "indicator" (adaptive clipping's bit) so the two noises are independent.
    """
    if not isinstance(secret, (bytes, bytearray)) or len(secret) < 16:
        raise ValueError("the noise secret must be at least 16 random bytes (see new_noise_secret)")
    message = NOISE_DOMAIN + b"\0" + json.dumps([purpose, int(round_idx), node]).encode()
    digest = hmac.new(bytes(secret), message, hashlib.sha256).digest()
    words = np.frombuffer(digest[:8], dtype="<u4").astype(np.uint32)
    return jax.random.wrap_key_data(jnp.asarray(words), impl="threefry2x32")


def gaussian_noise(key: jax.Array, like: PyTree, std: float | jax.Array) -> PyTree:
    """N(0, std²) per coordinate, f32, shaped like `like`; leaf i uses fold_in(key, i). Jit-able."""
    leaves, treedef = jax.tree_util.tree_flatten(like)
    std = jnp.asarray(std, jnp.float32)
    out = [
        std * jax.random.normal(jax.random.fold_in(key, i), jnp.shape(x), jnp.float32)
        for i, x in enumerate(leaves)
    ]
    return jax.tree_util.tree_unflatten(treedef, out)


def add_noise(tree: PyTree, key: jax.Array, std: float | jax.Array) -> PyTree:
    """tree + N(0, std²) per coordinate (f32). Jit-able."""
    noise = gaussian_noise(key, tree, std)
    return jax.tree.map(lambda x, n: jnp.asarray(x).astype(jnp.float32) + n, tree, noise)


def central_noise_std(noise_multiplier: float, clip_norm: float, max_weight: float = 1.0) -> float:
    """The aggregator's noise std on the weighted sum: σ · C · max w (the sum's sensitivity)."""
    return float(noise_multiplier) * float(clip_norm) * float(max_weight)


def distributed_noise_std(
    noise_multiplier: float, clip_norm: float, min_contributors: int, max_weight: float = 1.0
) -> float:
    """One silo's share: σ · C · max w / √t, so that any t contributions sum to the central noise."""
    if min_contributors < 1:
        raise ValueError(f"min_contributors must be >= 1, got {min_contributors}")
    return central_noise_std(noise_multiplier, clip_norm, max_weight) / math.sqrt(min_contributors)


def effective_noise_multiplier(noise_multiplier: float, min_contributors: int, contributors: int) -> float:
    """The noise multiplier the distributed sum of `contributors` shares actually carries: σ·√(m/t)."""
    return float(noise_multiplier) * math.sqrt(contributors / min_contributors)


def accounted_noise_multiplier(noise_multiplier: float, min_contributors: int, contributors: int) -> float:
    """What to pass to `PrivacyAccountant.step` for a distributed round: σ · min(1, √(m/t)).

    Conservative: more than t contributors add noise but earn no credit; fewer (possible only
    without secure aggregation, which aborts below t) are accounted at what they carry.
    """
    return min(
        float(noise_multiplier), effective_noise_multiplier(noise_multiplier, min_contributors, contributors)
    )


def sum_sensitivity(clip_norm: float, max_weight: float = 1.0) -> float:
    """L2 sensitivity of Σ w_k clip(Δ_k, C) to one silo's data: C · max w."""
    return float(clip_norm) * float(max_weight)


# ------------------------------------------------------------------------------ silo side


def check_combination(mode: str | None, compression_method: str) -> None:
    """Refuses DP settings whose guarantee would not hold; the message names the fields.

    Distributed noise needs a lossless upload ("none", or secure aggregation's ring): int8/bf16
    rounding of each silo's partly-noised update breaks the Gaussian sum the accountant counts.
    What secure aggregation itself allows is `secagg.check_combination`.
    """
    if mode is None:
        return
    if mode not in MODES:
        raise ValueError(f"privacy.mode must be one of {MODES} (or off), got {mode!r}")
    if compression_method not in compression.METHODS:
        raise ValueError(
            f"unknown compression method {compression_method!r}; valid: {', '.join(compression.METHODS)}"
        )
    if mode == "distributed" and compression_method != "none":
        raise ValueError(
            f"privacy.mode='distributed' with federation.compression={compression_method!r}: each silo "
            "adds only part of the noise, and lossy rounding of a partly-noised update is not covered "
            "by the accounting; use compression 'none' (secure aggregation encodes in its own ring)"
        )


def privatize_update(
    delta: PyTree,
    error: PyTree | None,
    clip_norm: float | jax.Array,
    key: jax.Array | None = None,
    noise_std: float | jax.Array = 0.0,
    method: str = "none",
    block_size: int = compression.DEFAULT_BLOCK_SIZE,
) -> tuple[PyTree, PyTree, jax.Array]:
    """A silo's DP upload: (payload, new error-feedback residual, norm of Δ + error before clipping).

    Order (see the module docstring): add the residual, clip to C, add this silo's noise share
    (distributed mode; `noise_std=0` in central mode), compress; the new residual is the
    compression error of the released value only. Jit with `static_argnames=("method",
    "block_size")`; a traced `noise_std` skips the refusal of noise with lossy compression, so
    validate the config with `check_combination` first.
    """
    if isinstance(noise_std, (int, float)) and noise_std > 0 and method != "none":
        raise ValueError(
            f"distributed noise with compression {method!r} is refused (see privacy.check_combination)"
        )
    y = delta if error is None else jax.tree.map(lambda d, e: d.astype(jnp.float32) + e, delta, error)
    x, norm = clip_update(y, clip_norm)
    if not (isinstance(noise_std, (int, float)) and noise_std == 0):
        if key is None:
            raise ValueError("privatize_update needs a key to add noise (see privacy.noise_key)")
        x = add_noise(x, key, noise_std)
    payload, new_error = compression.compress(x, None, method, block_size)
    return payload, new_error, norm


# ------------------------------------------------------------------------------ aggregator side


def capped_weights(raw: Mapping[str, float], cap: float) -> dict[str, float]:
    """Per-silo DP weights min(raw / cap, 1) in [0, 1] (McMahan et al. 2018's capped weights).

    `raw` must be fixed before training (e.g. configured corpus sizes), not this round's data.
    """
    if not cap > 0:
        raise ValueError(f"the weight cap must be positive, got {cap}")
    out = {}
    for name, w in raw.items():
        if not (w >= 0 and math.isfinite(w)):
            raise ValueError(f"weight of silo {name!r} must be finite and >= 0, got {w}")
        out[name] = min(float(w) / cap, 1.0)
    return out


def fixed_denominator(weights: Mapping[str, float] | Sequence[float], sampling_probability: float) -> float:
    """D = q · Σ_i w_i over ALL silos of the federation: the expected total weight of a round.

    Weights must lie in [0, 1] (the noise is calibrated to max w = 1); equal weights with K of N
    sampled give D = K.
    """
    ws = list(weights.values()) if isinstance(weights, Mapping) else list(weights)
    if not ws or any(not 0 <= w <= 1 for w in ws):
        raise ValueError(f"DP weights must be a non-empty list of values in [0, 1], got {ws[:8]}")
    if not 0 < sampling_probability <= 1:
        raise ValueError(f"sampling probability must be in (0, 1], got {sampling_probability}")
    d = float(sampling_probability) * float(sum(ws))
    if not d > 0:
        raise ValueError("the DP denominator is zero: every silo has weight 0")
    return d


def dp_mean(sum_tree: PyTree, denominator: float) -> PyTree:
    """The DP estimate of the mean pseudo-gradient: (noised) sum / D, f32. Jit-able.

    With S = Σ w_k clip(Δ_k, C), w_k ∈ [0, 1] and noise N(0, σ²C²) on S, the mean's sensitivity
    is C / D and its noise std σC / D per coordinate; D is public, so this is post-processing.
    """
    if not denominator > 0:
        raise ValueError(f"the DP denominator must be positive, got {denominator}")
    inv = np.float32(1.0 / denominator)
    return jax.tree.map(lambda s: jnp.asarray(s).astype(jnp.float32) * inv, sum_tree)


# ------------------------------------------------------------------------------ adaptive clipping


class AdaptiveClipState(NamedTuple):
    """The clipping norm and its update's settings (a pytree of scalars; checkpoint it)."""

    clip_norm: Any  # C, the current clip
    target_quantile: Any  # γ: the fraction of updates that should be unclipped
    learning_rate: Any  # η: C changes by at most a factor exp(η) per round
    indicator_noise_std: Any  # σ_b: std of the noise on the sum of centred indicators
    expected_contributors: Any  # m: the denominator of b̄


def adaptive_clip_init(
    initial_clip: float,
    expected_contributors: float,
    target_quantile: float = 0.5,
    learning_rate: float = 0.2,
    indicator_noise_std: float | None = None,
) -> AdaptiveClipState:
    """The state; σ_b defaults to m/20 (Andrew et al.'s suggestion)."""
    if not initial_clip > 0:
        raise ValueError(f"initial clip must be positive, got {initial_clip}")
    if not 0 <= target_quantile <= 1:
        raise ValueError(f"target quantile must be in [0, 1], got {target_quantile}")
    if not expected_contributors > 0:
        raise ValueError(f"expected contributors must be positive, got {expected_contributors}")
    sb = expected_contributors / 20 if indicator_noise_std is None else indicator_noise_std
    return AdaptiveClipState(
        float(initial_clip),
        float(target_quantile),
        float(learning_rate),
        float(sb),
        float(expected_contributors),
    )


def update_noise_multiplier(noise_multiplier: float, indicator_noise_std: float) -> float:
    """z_Δ = (σ⁻² − (2σ_b)⁻²)^(-1/2): the update's noise multiplier so that the round, update and
    indicator together, is the Gaussian mechanism with multiplier σ (Andrew et al. 2021, Thm. 1)."""
    s, sb = float(noise_multiplier), float(indicator_noise_std)
    if s == 0:
        return 0.0
    if not sb > s / 2:
        raise ValueError(
            f"adaptive clipping with noise multiplier {s} needs indicator noise std > {s / 2:g} "
            f"(got {sb:g}): the indicator alone would spend the whole budget"
        )
    return (s**-2 - (2 * sb) ** -2) ** -0.5


def centered_indicator(norm: jax.Array, clip_norm: jax.Array | float) -> jax.Array:
    """A silo's report b_k − 1/2 with b_k = [‖y_k‖ ≤ C]: ±1/2 (f32), sensitivity 1/2. Jit-able."""
    return jnp.where(jnp.asarray(norm) <= jnp.asarray(clip_norm, jnp.float32), 0.5, -0.5).astype(jnp.float32)


def adaptive_clip_update(
    state: AdaptiveClipState, noised_indicator_sum: jax.Array | float
) -> AdaptiveClipState:
    """C ← C · exp(−η (b̄ − γ)), b̄ = clip((Σ (b_k − ½) + N(0, σ_b²)) / m + ½, 0, 1). Jit-able.

    `noised_indicator_sum` already carries the noise (added by the aggregator with
    `add_noise(Σ, key, σ_b)`, or by the silos in shares σ_b/√t under secure aggregation).
    """
    frac = jnp.clip(
        jnp.asarray(noised_indicator_sum, jnp.float32) / state.expected_contributors + 0.5, 0.0, 1.0
    )
    clip = jnp.asarray(state.clip_norm, jnp.float32) * jnp.exp(
        -state.learning_rate * (frac - state.target_quantile)
    )
    return state._replace(clip_norm=clip)
