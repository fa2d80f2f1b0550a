"""Compliance: cards for the project, each silo's dataset and each model, and the EU AI Act analysis.

    python -m fedjax_lm comply --cards DIR [--flop N] [--out DIR]

`cards` reads and validates the cards; `analysis` renders the three-valued verdict.
"""

from fedjax_lm.compliance.analysis import Finding, Verdict, analyse, classify, report
from fedjax_lm.compliance.cards import Card, CardError, CardSet, load, load_dir, parse

__all__ = [
    "Card",
    "CardError",
    "CardSet",
    "Finding",
    "Verdict",
    "analyse",
    "classify",
    "load",
    "load_dir",
    "parse",
    "report",
]
