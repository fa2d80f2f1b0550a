"""The privacy accountant of silo-level DP: ε at δ of the rounds run and to run, and the noise multiplier
for a target ε (dp-accounting's PLD or RDP accountants; `privacy` says what is protected and why each
round is the event accounted here).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import dp_accounting
from dp_accounting import pld, rdp

ACCOUNTANTS = ("pld", "rdp")
SAMPLINGS = ("poisson", "without_replacement")
DEFAULT_PLD_DISCRETIZATION = 1e-3


def _check_accounting_args(noise_multiplier, sampling_probability, delta, accountant, sampling, population):
    if not (noise_multiplier >= 0 and math.isfinite(noise_multiplier)):
        raise ValueError(f"noise multiplier must be finite and >= 0, got {noise_multiplier}")
    if not 0 < sampling_probability <= 1:
        raise ValueError(f"sampling probability must be in (0, 1], got {sampling_probability}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
    if sampling not in SAMPLINGS:
        raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")
    if sampling == "without_replacement" and sampling_probability < 1:
        if accountant != "rdp":
            raise ValueError(
                "sampling 'without_replacement' is accounted with RDP only (dp-accounting 0.6.0)"
            )
        if not population or population < 1:
            raise ValueError("sampling 'without_replacement' needs the population N (number of silos)")
        k = sampling_probability * population
        if abs(k - round(k)) > 1e-9:
            raise ValueError(f"q·N = {k} is not a whole number of sampled silos")


def round_event(
    noise_multiplier: float,
    sampling_probability: float = 1.0,
    sampling: str = "poisson",
    population: int | None = None,
) -> dp_accounting.DpEvent:
    """One round's DpEvent (see the module docstring for why each)."""
    gauss = dp_accounting.GaussianDpEvent(float(noise_multiplier))
    if sampling_probability >= 1:
        return gauss
    if sampling == "poisson":
        return dp_accounting.PoissonSampledDpEvent(float(sampling_probability), gauss)
    k = int(round(sampling_probability * population))
    # Replace-one: the sum's sensitivity is 2C, so the event's multiplier is σ/2.
    half = dp_accounting.GaussianDpEvent(float(noise_multiplier) / 2)
    return dp_accounting.SampledWithoutReplacementDpEvent(int(population), k, half)


def _fresh_accountant(accountant: str, sampling: str, q: float, discretization: float):
    if sampling == "without_replacement" and q < 1:
        return rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    if accountant == "pld":
        return pld.PLDAccountant(value_discretization_interval=discretization)
    return rdp.RdpAccountant()


class PrivacyAccountant:
    """ε at δ of the rounds run so far, and of the rounds one is about to run.

    The ledger is a list of (noise multiplier, rounds) segments; ε is recomputed from a fresh
    dp-accounting accountant composing each segment's event `rounds` times (cached), so the value
    after r rounds is the one a direct `compose(event, r).get_epsilon(δ)` gives. A round accounted
    at another multiplier (distributed noise with dropouts: `accounted_noise_multiplier`) starts a
    new segment. `state_dict()` / `from_state_dict()` round-trip through JSON for checkpoints.

    An aggregator per round::

        if budget is not None and acct.would_exceed(budget):  # before sampling / training
            stop: save the final checkpoint, report acct.epsilon()
        ... run the round ...
        acct.step(noise_multiplier=...)                         # default: the configured σ
        metrics["dp_epsilon"] = acct.epsilon()
    """

    def __init__(
        self,
        noise_multiplier: float,
        sampling_probability: float = 1.0,
        delta: float = 1e-5,
        accountant: str = "pld",
        *,
        sampling: str = "poisson",
        population: int | None = None,
        value_discretization_interval: float = DEFAULT_PLD_DISCRETIZATION,
    ):
        _check_accounting_args(
            noise_multiplier, sampling_probability, delta, accountant, sampling, population
        )
        self.noise_multiplier = float(noise_multiplier)
        self.sampling_probability = float(sampling_probability)
        self.delta = float(delta)
        self.accountant = accountant
        self.sampling = sampling
        self.population = population
        self.value_discretization_interval = float(value_discretization_interval)
        self._segments: list[tuple[float, int]] = []
        self._cache: dict[tuple[tuple[float, int], ...], float] = {}

    @property
    def rounds(self) -> int:
        return sum(n for _, n in self._segments)

    def _sigma(self, noise_multiplier: float | None) -> float:
        s = self.noise_multiplier if noise_multiplier is None else float(noise_multiplier)
        if not (s >= 0 and math.isfinite(s)):
            raise ValueError(f"noise multiplier must be finite and >= 0, got {s}")
        return s

    @staticmethod
    def _extended(segments, sigma: float, rounds: int) -> tuple[tuple[float, int], ...]:
        segs = list(segments)
        if rounds:
            if segs and segs[-1][0] == sigma:
                segs[-1] = (sigma, segs[-1][1] + rounds)
            else:
                segs.append((sigma, rounds))
        return tuple(segs)

    def event(self, segments: Sequence[tuple[float, int]] | None = None) -> dp_accounting.DpEvent:
        """The composed DpEvent of the ledger (or of `segments`)."""
        segs = self._segments if segments is None else segments
        events = [
            dp_accounting.SelfComposedDpEvent(
                round_event(s, self.sampling_probability, self.sampling, self.population), n
            )
            for s, n in segs
        ]
        return dp_accounting.ComposedDpEvent(events)

    def _epsilon_of(self, segments: tuple[tuple[float, int], ...]) -> float:
        if not segments:
            return 0.0
        if segments not in self._cache:
            acct = _fresh_accountant(
                self.accountant, self.sampling, self.sampling_probability, self.value_discretization_interval
            )
            for s, n in segments:
                acct.compose(round_event(s, self.sampling_probability, self.sampling, self.population), n)
            self._cache[segments] = float(acct.get_epsilon(self.delta))
        return self._cache[segments]

    def step(self, rounds: int = 1, noise_multiplier: float | None = None) -> "PrivacyAccountant":
        """Records `rounds` completed rounds at `noise_multiplier` (default: the configured σ)."""
        if rounds < 0:
            raise ValueError(f"rounds must be >= 0, got {rounds}")
        self._segments = list(self._extended(self._segments, self._sigma(noise_multiplier), int(rounds)))
        return self

    def epsilon(self) -> float:
        """ε at δ after the rounds recorded so far (0 before any; inf with σ = 0)."""
        return self._epsilon_of(tuple(self._segments))

    def epsilon_after(self, rounds: int = 1, noise_multiplier: float | None = None) -> float:
        """ε at δ if `rounds` more rounds ran at `noise_multiplier`; the ledger is unchanged."""
        return self._epsilon_of(self._extended(self._segments, self._sigma(noise_multiplier), int(rounds)))

    def would_exceed(self, budget: float, rounds: int = 1, noise_multiplier: float | None = None) -> bool:
        """True exactly when `epsilon_after(rounds)` > budget: do not run those rounds."""
        return self.epsilon_after(rounds, noise_multiplier) > float(budget)

    def state_dict(self) -> dict[str, Any]:
        return {
            "noise_multiplier": self.noise_multiplier,
            "sampling_probability": self.sampling_probability,
            "delta": self.delta,
            "accountant": self.accountant,
            "sampling": self.sampling,
            "population": self.population,
            "value_discretization_interval": self.value_discretization_interval,
            "segments": [[s, n] for s, n in self._segments],
        }

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> "PrivacyAccountant":
        acct = cls(
            state["noise_multiplier"],
            state["sampling_probability"],
            state["delta"],
            state["accountant"],
            sampling=state["sampling"],
            population=state["population"],
            value_discretization_interval=state["value_discretization_interval"],
        )
        for s, n in state["segments"]:
            acct.step(int(n), float(s))
        return acct


def noise_multiplier_for(
    epsilon: float,
    delta: float,
    rounds: int,
    sampling_probability: float = 1.0,
    accountant: str = "pld",
    *,
    sampling: str = "poisson",
    population: int | None = None,
    value_discretization_interval: float = DEFAULT_PLD_DISCRETIZATION,
    rtol: float = 1e-3,
) -> float:
    """The smallest σ (within relative `rtol`) with ε(σ) ≤ `epsilon` after `rounds` rounds.

    Bisection in log σ on a bracket found by doubling; returns the upper end, so the result is on
    the safe side (ε(σ) ≤ target) rather than within tolerance on either side as Brent's method
    would be. ε = inf gives 0 (no noise).
    """
    if math.isinf(epsilon):
        return 0.0
    if not epsilon > 0:
        raise ValueError(f"target epsilon must be positive, got {epsilon}")
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    _check_accounting_args(1.0, sampling_probability, delta, accountant, sampling, population)

    def eps(sigma: float) -> float:
        acct = PrivacyAccountant(
            sigma,
            sampling_probability,
            delta,
            accountant,
            sampling=sampling,
            population=population,
            value_discretization_interval=value_discretization_interval,
        )
        return acct.epsilon_after(rounds)

    hi = 1.0
    while eps(hi) > epsilon:
        hi *= 2.0
        if hi > 2.0**30:
            raise ValueError(f"no noise multiplier up to 2^30 reaches ε = {epsilon} at δ = {delta}")
    lo = hi / 2.0
    while eps(lo) <= epsilon:
        hi, lo = lo, lo / 2.0
        if lo < 2.0**-30:
            return hi
    while hi / lo > 1.0 + rtol:
        mid = math.sqrt(lo * hi)
        if eps(mid) > epsilon:
            lo = mid
        else:
            hi = mid
    return hi
