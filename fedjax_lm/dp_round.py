"""Client-level differential privacy in the round (`federation.dp`), for both drivers.

`RoundDP` is what a federation's DP setting means round by round: the noise multiplier σ (given, or
the one that reaches `dp.target_epsilon` after the run's rounds), the accountant over the rounds so far
(sampling K of N without replacement, or every silo every round), the budget that ends a run early,
the noise std on the mean, and adaptive clipping's clip norm. The primitives are in `privacy`; the
mechanisms and the reasons for the order of clip / noise / compress are in its docstring.

Adaptive clipping (`dp.adaptive_clip`, central mode): the aggregator sees each accepted update's norm,
so it forms the noised fraction of unclipped updates b̄ = (Σ_k ([‖Δ_k‖ ≤ C_t] − ½) + N(0, σ_b²)) / K + ½
and sets C_{t+1} = C_t · exp(−η (b̄ − γ)) (Andrew et al. 2021). The update's noise is drawn with
z_Δ = (σ⁻² − (2σ_b)⁻²)^(-1/2) ≥ σ so that the round — update and indicator together — is the Gaussian
mechanism with multiplier σ that the accountant counts. C_t is published with each round (the global
meta in a deployment, the checkpoint in the simulation), so a resumed run continues from it. Under
secure aggregation the aggregator sees no norm: adaptive clipping is refused there.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from fedjax_lm import accounting
from fedjax_lm import privacy

MODES = ("off", "central", "distributed")
UNITS = ("silo", "federation")


def default_config() -> dict[str, Any]:
    return dict(
        mode="off",  # "off" | "central" | "distributed" (distributed needs federation.secagg)
        clip_norm=0.0,  # C (with adaptive_clip: the first round's C)
        noise_multiplier=0.0,  # sigma; 0 with target_epsilon > 0: the sigma for the run's rounds
        target_epsilon=0.0,
        delta=1e-5,
        epsilon_budget=0.0,  # stop before a round would exceed it (0: no budget)
        accountant="rdp",  # "rdp" | "pld" (pld needs every silo in every round)
        adaptive_clip=False,  # central mode: move C toward the target quantile of the update norms
        target_quantile=0.5,  # gamma: the fraction of updates left unclipped
        clip_learning_rate=0.2,  # eta: C changes by at most exp(eta) per round
        indicator_noise_std=0.0,  # sigma_b on the count of unclipped updates; 0: expected silos / 20
        unit="silo",  # in a tree: "silo" (each silo's data) | "federation" (each root child's, as a whole)
    )


def check_config(fed: Mapping[str, Any]) -> None:
    """federation.dp and what it cannot be combined with; errors name the field."""
    dp = fed["dp"]
    unknown = set(dp) - set(default_config())
    if unknown:
        raise ValueError(f"federation.dp has unknown fields {sorted(unknown)}")
    if dp["mode"] == "off":
        return
    if dp["mode"] not in MODES:
        raise ValueError(f"federation.dp.mode must be one of {MODES}, got {dp['mode']!r}")
    if dp["unit"] not in UNITS:
        raise ValueError(f"federation.dp.unit must be one of {UNITS}, got {dp['unit']!r}")
    if not float(dp["clip_norm"]) > 0:
        raise ValueError(
            f"federation.dp.clip_norm must be > 0 with dp.mode={dp['mode']!r} (the sensitivity C)"
        )
    if not 0 < float(dp["delta"]) < 1:
        raise ValueError(f"federation.dp.delta must be in (0, 1), got {dp['delta']}")
    if float(dp["noise_multiplier"]) <= 0 and float(dp["target_epsilon"]) <= 0:
        raise ValueError("federation.dp: give noise_multiplier > 0 or target_epsilon > 0")
    if dp["accountant"] not in ("rdp", "pld"):
        raise ValueError(f"federation.dp.accountant must be 'rdp' or 'pld', got {dp['accountant']!r}")
    if fed["aggregation"] != "mean":
        raise ValueError(
            f"federation.dp needs federation.aggregation='mean' (the sensitivity of a {fed['aggregation']} is not C)"
        )
    if fed["aggregate_inner_moments"]:
        raise ValueError(
            "federation.dp cannot share inner optimizer moments (they are not clipped or noised)"
        )
    if dp["adaptive_clip"]:
        if dp["mode"] != "central" or fed["secagg"]["enabled"]:
            raise ValueError(
                "federation.dp.adaptive_clip needs each update's norm at the aggregator: dp.mode='central' "
                "without secure aggregation"
            )
        if not 0 <= float(dp["target_quantile"]) <= 1:
            raise ValueError(f"federation.dp.target_quantile must be in [0, 1], got {dp['target_quantile']}")
        if not float(dp["clip_learning_rate"]) > 0:
            raise ValueError(f"federation.dp.clip_learning_rate must be > 0, got {dp['clip_learning_rate']}")
        if not float(dp["indicator_noise_std"]) >= 0:
            raise ValueError(
                f"federation.dp.indicator_noise_std must be >= 0, got {dp['indicator_noise_std']}"
            )


class RoundDP:
    """A federation's DP setting, round by round (mode 'off': every method is a no-op)."""

    def __init__(
        self,
        dp: Mapping[str, Any],
        *,
        num_silos: int,
        expected_silos: int,
        rounds: int,
        queries: int = 1,
    ):
        """`rounds`: the rounds each silo's data is used in (a tree's silo rounds); `queries`: how many
        Gaussian queries of each silo's clipped update a round releases (2 with WorldLM's attention over
        key layers: the mean and the key aggregate). Each is drawn with multiplier σ·√queries, so that
        together they are one Gaussian mechanism of multiplier σ (Σ 1/(σ√q)² = 1/σ²): what is accounted."""
        self.cfg, self.mode = dp, str(dp["mode"])
        self.on, self.central = self.mode != "off", self.mode == "central"
        self.num_silos, self.expected_silos, self.rounds = num_silos, expected_silos, rounds
        self.delta, self.accountant = float(dp["delta"]), str(dp["accountant"])
        self.initial_clip = float(dp["clip_norm"])
        self.noise_multiplier = self._sigma() if self.on else 0.0  # what the accountant counts
        self.adaptive = None
        self.queries = int(queries)
        # what the update's noise (and the key aggregate's, with a second query) is drawn with
        self.update_noise_multiplier = self.noise_multiplier * math.sqrt(self.queries)
        self.key_noise_multiplier = self.update_noise_multiplier if self.queries > 1 else 0.0
        if self.on and dp["adaptive_clip"]:
            if self.queries > 1:
                raise ValueError(
                    "federation.dp.adaptive_clip cannot be combined with attention over key layers yet "
                    "(federation.tree.attention): the round would release three queries; turn one off"
                )
            self.adaptive = privacy.adaptive_clip_init(
                self.initial_clip,
                expected_silos,
                float(dp["target_quantile"]),
                float(dp["clip_learning_rate"]),
                float(dp["indicator_noise_std"]) or None,
            )
            try:
                self.update_noise_multiplier = privacy.update_noise_multiplier(
                    self.noise_multiplier, self.adaptive.indicator_noise_std
                )
            except ValueError as e:
                raise ValueError(f"federation.dp.indicator_noise_std: {e}") from None

    # -- accounting
    def _sampling(self) -> dict[str, Any]:
        n, k = self.num_silos, self.expected_silos
        if k == n:  # every silo in every round: no amplification by sampling
            return dict(sampling_probability=1.0)
        if self.accountant != "rdp":
            raise ValueError(
                "federation.dp.accountant='pld' cannot account a fixed-size sample of silos per round; use 'rdp'"
            )
        return dict(sampling_probability=k / n, sampling="without_replacement", population=n)

    def _sigma(self) -> float:
        sigma = float(self.cfg["noise_multiplier"])
        if sigma > 0:
            return sigma
        return accounting.noise_multiplier_for(
            float(self.cfg["target_epsilon"]),
            self.delta,
            self.rounds,
            accountant=self.accountant,
            **self._sampling(),
        )

    def epsilon_after(self, rounds: int) -> float:
        """The privacy spent after `rounds` rounds, at dp.delta."""
        acc = accounting.PrivacyAccountant(
            self.noise_multiplier, delta=self.delta, accountant=self.accountant, **self._sampling()
        )
        return acc.epsilon_after(rounds) if rounds else 0.0

    def rounds_allowed(self) -> int:
        """federation.rounds, or fewer if dp.epsilon_budget would be exceeded (the most rounds n with
        ε(n) <= budget; ε grows with n, so a bisection)."""
        budget = float(self.cfg["epsilon_budget"])
        if not self.on or not budget > 0 or self.epsilon_after(self.rounds) <= budget:
            return self.rounds
        lo, hi = 0, self.rounds  # ε(lo) <= budget < ε(hi)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if self.epsilon_after(mid) <= budget else (lo, mid)
        if lo == 0:
            raise ValueError(
                f"federation.dp.epsilon_budget={budget:g} is below the ε of one round "
                f"({self.epsilon_after(1):.3g} with noise_multiplier {self.noise_multiplier:.4g})"
            )
        return lo

    # -- the round's clip and noise
    def noise_std(self, clip_norm: float) -> float:
        """Central mode: the std of the noise on the mean, z_Δ · C / D (D: the expected silos)."""
        return self.update_noise_multiplier * clip_norm / self.expected_silos

    def next_clip(self, clip_norm: float, norms: Mapping[str, float], r: int, secret: bytes | None) -> float:
        """Adaptive clipping: C_{t+1} from this round's update norms (noised count of the unclipped)."""
        if self.adaptive is None:
            return clip_norm
        if secret is None:
            raise ValueError("adaptive clipping needs the aggregator's noise secret")
        count = sum(float(privacy.centered_indicator(n, clip_norm)) for n in norms.values())
        key = privacy.noise_key(secret, r, "aggregator", purpose="indicator")
        noise = float(self.adaptive.indicator_noise_std * jax.random.normal(key, (), jnp.float32))
        state = self.adaptive._replace(clip_norm=clip_norm)
        return float(privacy.adaptive_clip_update(state, count + noise).clip_norm)

    # -- reports
    def fields(self, rounds_done: int, clipped: int, clip_norm: float) -> dict[str, Any]:
        """The round row's DP fields (empty when off)."""
        if not self.on:
            return {}
        return dict(
            dp_epsilon=self.epsilon_after(rounds_done),
            dp_delta=self.delta,
            dp_noise_multiplier=self.noise_multiplier,
            dp_clip_norm=float(clip_norm),
            clipped=int(clipped),
        )

    def summary(self, rounds_done: int, clip_norm: float) -> dict[str, Any]:
        if not self.on:
            return {}
        out = {
            "mode": self.mode,
            "epsilon": self.epsilon_after(rounds_done),
            "delta": self.delta,
            "noise_multiplier": self.noise_multiplier,
            "clip_norm": self.initial_clip,
            "rounds": rounds_done,
            "sampling_probability": self.expected_silos / self.num_silos,
            "accountant": self.accountant,
            "stopped_by_budget": rounds_done < self.rounds,
        }
        if self.queries > 1:  # the mean and the key aggregate each drawn with sigma x sqrt(queries)
            out.update(queries=self.queries, update_noise_multiplier=self.update_noise_multiplier)
        if self.adaptive is not None:
            out.update(
                adaptive_clip=True,
                final_clip_norm=float(clip_norm),
                update_noise_multiplier=self.update_noise_multiplier,
                indicator_noise_std=float(self.adaptive.indicator_noise_std),
            )
        return out


def clip_of(meta: Mapping[str, Any], initial: float) -> float:
    """The clip norm a round uses: the one published with it (adaptive clipping), else dp.clip_norm."""
    c = meta.get("dp_clip_norm")
    return float(c) if isinstance(c, (int, float)) and math.isfinite(c) and c > 0 else initial
