"""Shamir secret sharing over GF(2^521 − 1) for 32-byte secrets (secure aggregation's dropout recovery).

p = 2^521 − 1 is a Mersenne prime: any secret of up to 65 bytes is a field element, Python integers
keep the arithmetic short and exact, and with n ≤ a few hundred members the cost is negligible next to
the masks. `split(secret, n, t)` gives shares at x = 1..n; any t reconstruct the secret and t − 1 reveal
nothing about it; `reconstruct_checked` also checks every further share lies on the same polynomial.
"""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Sequence
from typing import Any

PRIME = 2**521 - 1  # Mersenne prime M521
SEED_BYTES = 32


class ShamirError(ValueError):
    """Too few, inconsistent or corrupt shares."""


@dataclasses.dataclass(frozen=True)
class Share:
    """One Shamir share: the point (x, f(x)) of a degree t−1 polynomial with f(0) = secret."""

    x: int
    y: int

    def to_json(self) -> list[Any]:
        return [self.x, format(self.y, "x")]

    @classmethod
    def from_json(cls, obj: Any) -> "Share":
        if not (
            isinstance(obj, list) and len(obj) == 2 and isinstance(obj[0], int) and isinstance(obj[1], str)
        ):
            raise ValueError(f"a share is [x, hex y], got {str(obj)[:80]}")
        y = int(obj[1], 16)
        if not (0 < obj[0] < PRIME and 0 <= y < PRIME):
            raise ValueError("share out of the field")
        return cls(obj[0], y)


def split(secret: bytes, n: int, t: int) -> list[Share]:
    """n shares (x = 1..n) of `secret` (≤ 65 bytes); any t reconstruct it, t − 1 reveal nothing."""
    if not 1 <= t <= n:
        raise ValueError(f"Shamir needs 1 <= t <= n, got t={t}, n={n}")
    s = int.from_bytes(secret, "big")
    if s >= PRIME:
        raise ValueError(f"a secret of {len(secret)} bytes does not fit in GF(2^521 - 1)")
    coeffs = [s] + [secrets.randbelow(PRIME) for _ in range(t - 1)]
    shares = []
    for x in range(1, n + 1):
        y = 0
        for c in reversed(coeffs):  # Horner
            y = (y * x + c) % PRIME
        shares.append(Share(x, y))
    return shares


def _lagrange_at(shares: Sequence[Share], x0: int) -> int:
    """f(x0) of the polynomial through `shares` (distinct x), mod p."""
    xs = [s.x for s in shares]
    if len(set(xs)) != len(xs):
        raise ValueError(f"shares with repeated x: {sorted(xs)}")
    total = 0
    for i, si in enumerate(shares):
        num, den = 1, 1
        for j, sj in enumerate(shares):
            if i != j:
                num = num * (x0 - sj.x) % PRIME
                den = den * (si.x - sj.x) % PRIME
        total = (total + si.y * num * pow(den, -1, PRIME)) % PRIME
    return total


def reconstruct_int(shares: Sequence[Share]) -> int:
    """The polynomial's value at 0 from the given shares (the secret when there are ≥ t of them)."""
    if not shares:
        raise ValueError("no shares to reconstruct from")
    return _lagrange_at(shares, 0)


def reconstruct(shares: Sequence[Share], length: int = SEED_BYTES) -> bytes:
    """The `length`-byte secret; ValueError if the value does not fit (too few or corrupt shares)."""
    s = reconstruct_int(shares)
    if s >= 1 << (8 * length):
        raise ValueError("the shares do not reconstruct a secret of the expected size")
    return s.to_bytes(length, "big")


def reconstruct_checked(shares: Sequence[Share], t: int, what: str) -> bytes:
    """Reconstruct from the first t shares and check every further share lies on the same polynomial."""
    if len(shares) < t:
        raise ShamirError(f"{what}: only {len(shares)} of the {t} shares needed")
    base = list(shares[:t])
    for extra in shares[t:]:
        if _lagrange_at(base, extra.x) != extra.y:
            raise ShamirError(f"{what}: the shares are inconsistent (at least one is corrupt)")
    try:
        return reconstruct(base)
    except ValueError:
        raise ShamirError(f"{what}: the shares are corrupt") from None
