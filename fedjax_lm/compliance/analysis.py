"""The automated EU AI Act analysis of a project's cards (Regulation (EU) 2024/1689).

`analyse(cards, measured_flop=, projected_flop=)` returns a `Verdict`: a classification and one
`Finding` per obligation and ingredient, each three-valued:

    met       the cards show the obligation is satisfied
    unmet     the cards show it is not (a field says so)
    unknown   a field it depends on is missing: the answer is not "no", it is not known

The order follows the Act:
1. Art. 5: any prohibited practice stops the analysis (status "prohibited", nothing else evaluated).
2. Scope: Art. 2(6) (solely scientific research) and Art. 2(1) (not placed on the EU market) end it
   with status "out_of_scope".
3. Classification: GPAI model (Art. 3(63); the Commission's indicative criterion, > 1e23 training FLOP
   for a model that generates text) and systemic risk (Art. 51(2): presumed above 1e25 FLOP), from the
   measured training compute and the projected one (the configured budget), whichever is larger; or a
   base model already classified with systemic risk. High-risk (Art. 6): an AI system with an Annex III
   purpose, unless Art. 6(3) applies, or an Annex I safety component.
4. Ingredients (every Data card, and Model cards where they apply): licence and TDM reservations
   (Art. 53(1)(c)), personal data and its legal basis (GDPR Art. 6(1); the Act leaves the GDPR whole,
   Art. 2(7)); for high-risk purposes, that every ingredient lists each of the project's high-risk
   purposes and covers Art. 10's data-governance items, special categories only for bias detection
   (Art. 10(5)).
5. Transparency (Art. 50) and, for a GPAI model, Art. 53(1)(a)-(d), with the Art. 53(2) open-source
   exemption (it waives (a) and (b) only, and never for a systemic-risk model), and Art. 55.

Status: "prohibited", "out_of_scope", "non_compliant" (any unmet), "incomplete" (unknowns only),
"compliant". This is an aid to a legal assessment, not one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

from fedjax_lm.compliance import cards as cards_lib
from fedjax_lm.compliance.cards import Card, CardSet

GPAI_FLOP = 1e23  # Commission guidelines (July 2025): indicative criterion for a text-generating GPAI model
SYSTEMIC_RISK_FLOP = 1e25  # Art. 51(2): presumption of high-impact capabilities
MET, UNMET, UNKNOWN = "met", "unmet", "unknown"


@dataclasses.dataclass(frozen=True)
class Finding:
    article: str
    obligation: str
    status: str  # met | unmet | unknown
    card: str  # the card's file
    field: str
    reason: str

    def to_json(self) -> dict[str, str]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Verdict:
    status: str
    classification: dict[str, Any]
    findings: tuple[Finding, ...]

    @property
    def unmet(self) -> list[Finding]:
        return [f for f in self.findings if f.status == UNMET]

    @property
    def unknown(self) -> list[Finding]:
        return [f for f in self.findings if f.status == UNKNOWN]

    def to_json(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "classification": self.classification,
            "unmet": [f.to_json() for f in self.unmet],
            "unknown": [f.to_json() for f in self.unknown],
            "met": [f.to_json() for f in self.findings if f.status == MET],
        }


class _Findings:
    def __init__(self):
        self.items: list[Finding] = []

    def add(self, article, obligation, status, card: Card, field, reason) -> str:
        self.items.append(Finding(article, obligation, status, card.path, field, reason))
        return status

    def flags(self, obligation, card: Card, field, items: Mapping[str, str]) -> None:
        """A mapping of booleans (`items`: name -> article): true is met, false unmet, missing unknown."""
        given = card.get(field) or {}
        for item, article in items.items():
            value, name = given.get(item), f"{field}.{item}"
            if value is None:
                self.add(article, obligation, UNKNOWN, card, name, f"{item} is not stated")
            else:
                self.add(article, obligation, MET if value else UNMET, card, name, f"{item}: {value}")

    def flag(self, article, obligation, card: Card, field, *, want: bool = True, why_unmet: str) -> str:
        """A boolean field: `want` is met, the other value unmet, missing unknown."""
        value = card.get(field)
        if value is None:
            return self.add(article, obligation, UNKNOWN, card, field, f"{field} is not stated")
        if value == want:
            return self.add(article, obligation, MET, card, field, f"{field}: {value}")
        return self.add(article, obligation, UNMET, card, field, why_unmet)


def _status(findings: Iterable[Finding]) -> str:
    findings = list(findings)
    if any(f.status == UNMET for f in findings):
        return "non_compliant"
    if any(f.status == UNKNOWN for f in findings):
        return "incomplete"
    return "compliant"


def _prohibited(f: _Findings, project: Card) -> bool:
    practices = project.get("prohibited_practices") or {}
    stop = False
    for name, article in cards_lib.PROHIBITED_PRACTICES.items():
        value = practices.get(name)
        field = f"prohibited_practices.{name}"
        if value is None:
            f.add(article, "prohibited practice", UNKNOWN, project, field, f"{name} is not stated")
        elif value:
            f.add(article, "prohibited practice", UNMET, project, field, f"the project performs {name}")
            stop = True
        else:
            f.add(article, "prohibited practice", MET, project, field, f"{name}: false")
    return stop


def _largest(*values: float | None) -> float | None:
    known = [float(v) for v in values if v is not None]
    return max(known) if known else None


def classify(cards: CardSet, measured_flop: float | None, projected_flop: float | None) -> dict[str, Any]:
    """GPAI / systemic risk / high-risk, each True, False or None (unknown), with what decided it."""
    p = cards.project
    trained = [m for m in cards.models.values() if m.get("kind") == "trained"]
    flop = _largest(
        measured_flop,
        projected_flop,
        p.get("compute_budget_flop"),
        *(m.get("training_flop") for m in trained),
    )
    bases = [m.get("systemic_risk") for m in cards.models.values() if m.get("kind") == "base"]
    base_systemic = True if any(v is True for v in bases) else (None if None in bases else False)
    kind = p.get("kind")
    if kind == "gpai_model" or (flop is not None and flop > GPAI_FLOP):
        gpai = True
    elif flop is None:
        gpai = None
    else:
        gpai = False
    if base_systemic or (flop is not None and flop > SYSTEMIC_RISK_FLOP):
        systemic = True
    elif flop is None or base_systemic is None:
        systemic = None
    else:
        systemic = False
    purposes = set(p.get("intended_purposes") or [])
    high_risk_purposes = sorted(purposes & set(cards_lib.HIGH_RISK_PURPOSES))
    annex_i = p.get("annex_i_safety_component")
    if kind == "gpai_model":  # Art. 6 classifies AI systems; a model alone is not high-risk
        high = False
    elif annex_i:
        high = True
    elif kind is None or p.get("intended_purposes") is None:
        high = None
    elif high_risk_purposes:
        exception = p.get("art_6_3_exception")  # unstated: unknown; "" states that none applies
        high = None if exception is None else not exception
    else:
        high = None if annex_i is None else False
    return {
        "kind": kind,
        "gpai_model": gpai,
        "systemic_risk": systemic,
        "high_risk": high,
        "high_risk_purposes": high_risk_purposes,
        "training_flop_measured": measured_flop,
        "training_flop_projected": _largest(projected_flop, p.get("compute_budget_flop")),
        "training_flop_used": flop,
        "thresholds_flop": {"gpai": GPAI_FLOP, "systemic_risk": SYSTEMIC_RISK_FLOP},
    }


def _data_card(f: _Findings, card: Card) -> None:
    if card.get("licence") is None:
        f.add(
            "Art. 53(1)(c)", "licence of the training data", UNKNOWN, card, "licence", "licence is not stated"
        )
    else:
        f.add("Art. 53(1)(c)", "licence of the training data", MET, card, "licence", card.get("licence"))
    source = card.get("source_category")
    if source in ("licensed", "user", "synthetic"):
        f.add("Art. 53(1)(c)", "TDM reservations honoured", MET, card, "source_category",
              f"{source} data: used under its licence or terms, no TDM exception relied on")  # fmt: skip
    else:  # crawled or public data (or unknown): the TDM exception needs the reservations checked
        f.flag("Art. 53(1)(c)", "TDM reservations honoured", card, "tdm_opt_out_checked",
               why_unmet="text-and-data-mining reservations were not checked (DSM Directive Art. 4(3))")  # fmt: skip
    _gdpr(f, card)


def _gdpr(f: _Findings, card: Card) -> None:
    personal = card.get("personal_data")
    if personal is None:
        f.add("GDPR Art. 6(1)", "lawful processing of personal data", UNKNOWN, card, "personal_data",
              "whether the data holds personal data is not stated")  # fmt: skip
    elif not personal:
        f.add(
            "GDPR Art. 6(1)",
            "lawful processing of personal data",
            MET,
            card,
            "personal_data",
            "no personal data",
        )
    else:
        basis = card.get("legal_basis")
        if basis is None:
            f.add("GDPR Art. 6(1)", "lawful processing of personal data", UNKNOWN, card, "legal_basis",
                  "personal data with no legal basis stated")  # fmt: skip
        elif basis == "none":
            f.add("GDPR Art. 6(1)", "lawful processing of personal data", UNMET, card, "legal_basis",
                  "personal data processed without a legal basis")  # fmt: skip
        else:
            f.add("GDPR Art. 6(1)", "lawful processing of personal data", MET, card, "legal_basis", basis)


def _high_risk_ingredient(f: _Findings, card: Card, purposes: list[str]) -> None:
    listed = card.get("intended_purposes")
    for purpose in purposes:
        article = cards_lib.HIGH_RISK_PURPOSES[purpose]
        if listed is None:
            f.add(f"Art. 6(2), {article}", "ingredient covers the high-risk purpose", UNKNOWN, card,
                  "intended_purposes", f"the card states no intended purposes (the project's: {purpose})")  # fmt: skip
        elif purpose in listed:
            f.add(
                f"Art. 6(2), {article}",
                "ingredient covers the high-risk purpose",
                MET,
                card,
                "intended_purposes",
                purpose,
            )
        else:
            f.add(f"Art. 6(2), {article}", "ingredient covers the high-risk purpose", UNMET, card,
                  "intended_purposes", f"the project's high-risk purpose {purpose!r} is not among {listed}")  # fmt: skip
    if card.kind != "data":
        return
    governance = card.get("data_governance") or {}
    f.flags("data governance", card, "data_governance", cards_lib.DATA_GOVERNANCE_ITEMS)
    if card.get("special_categories"):
        examined = governance.get("bias_examination")
        status = UNKNOWN if examined is None else (MET if examined else UNMET)
        f.add("Art. 10(5)", "special categories only for bias detection", status, card,
              "data_governance.bias_examination", f"special categories of personal data; bias examination: {examined}")  # fmt: skip


def analyse(
    cards: CardSet, *, measured_flop: float | None = None, projected_flop: float | None = None
) -> Verdict:
    """The verdict on `cards` (see the module docstring)."""
    f = _Findings()
    p = cards.project
    classification = classify(cards, measured_flop, projected_flop)
    if _prohibited(f, p):
        return Verdict("prohibited", classification, tuple(x for x in f.items if x.status == UNMET))
    out_of_scope = None
    if p.get("scientific_research_only") is True:
        out_of_scope = ("Art. 2(6)", "scientific_research_only", "solely for scientific research")
    elif p.get("placed_on_eu_market") is False:
        out_of_scope = ("Art. 2(1)", "placed_on_eu_market", "not placed on the EU market")
    if out_of_scope is not None:  # the AI Act does not apply; the GDPR still does (Art. 2(7))
        f.add(out_of_scope[0], "scope", MET, p, out_of_scope[1], out_of_scope[2])
        for card in cards.datasets.values():
            _gdpr(f, card)
        return Verdict("out_of_scope", classification, tuple(f.items))
    for field, article in (("scientific_research_only", "Art. 2(6)"), ("placed_on_eu_market", "Art. 2(1)")):
        if p.get(field) is None:
            f.add(article, "scope", UNKNOWN, p, field, f"{field} is not stated: the Act is assumed to apply")
    if classification["kind"] is None:
        f.add("Art. 3(1), 3(63)", "classification", UNKNOWN, p, "kind", "model or system is not stated")
    if classification["gpai_model"] is None:
        f.add("Art. 51", "classification", UNKNOWN, p, "compute_budget_flop",
              "training compute is neither measured nor budgeted: GPAI status unknown")  # fmt: skip
    if classification["high_risk"] is None:
        f.add("Art. 6", "classification", UNKNOWN, p, "intended_purposes",
              "intended purposes (or the kind) are not stated: high-risk status unknown")  # fmt: skip
    for card in cards.datasets.values():
        _data_card(f, card)
    if classification["high_risk"]:
        for card in [*cards.datasets.values(), *cards.models.values()]:
            _high_risk_ingredient(f, card, classification["high_risk_purposes"])
    if p.get("interacts_with_people") is None:
        f.add("Art. 50(1)", "disclose AI interaction", UNKNOWN, p, "interacts_with_people",
              "whether the system interacts with people is not stated")  # fmt: skip
    elif p.get("interacts_with_people"):
        f.flag("Art. 50(1)", "disclose AI interaction", p, "discloses_ai_interaction",
               why_unmet="people are not told they interact with an AI system")  # fmt: skip
    if p.get("generates_synthetic_content") is not False:
        f.flag("Art. 50(2)", "mark synthetic content", p, "marks_synthetic_content",
               why_unmet="generated content is not marked as AI-generated")  # fmt: skip
    if classification["gpai_model"]:
        _gpai(f, cards, classification)
    return Verdict(_status(f.items), classification, tuple(f.items))


def _gpai(f: _Findings, cards: CardSet, classification: dict[str, Any]) -> None:
    p = cards.project
    trained = [m for m in cards.models.values() if m.get("kind") == "trained"]
    open_source = None
    if trained:
        m = trained[0]
        licence, public = m.get("licence"), m.get("weights_public")
        if licence is not None and public is not None:
            open_source = licence in cards_lib.OPEN_SOURCE_LICENCES and public
    systemic = classification["systemic_risk"]
    exempt = bool(open_source) and systemic is False
    # undecidable: the licence or weights are unstated, or open source with systemic risk unknown
    undecided = open_source is None or (open_source and systemic is None)
    classification["open_source_exemption"] = None if undecided and not exempt else exempt
    for field, article in (
        ("technical_documentation", "Art. 53(1)(a)"),
        ("downstream_information", "Art. 53(1)(b)"),
    ):
        if exempt:
            f.add(f"{article}, Art. 53(2)", "GPAI documentation", MET, trained[0], "licence",
                  f"open-source model ({trained[0].get('licence')}, weights public) without systemic risk: exempt")  # fmt: skip
            continue
        if p.get(field) is False and undecided:
            why = (
                "no trained Model card stating licence and weights_public"
                if open_source is None
                else "open source, but whether the model has systemic risk is unknown"
            )
            f.add(article, "GPAI documentation", UNKNOWN, p, field,
                  f"{field} is not in place; the Art. 53(2) exemption may apply ({why})")  # fmt: skip
            continue
        why = (
            "open-source, but a systemic-risk model keeps the obligation (Art. 53(2))"
            if open_source and systemic
            else f"{field} is not in place"
        )
        f.flag(article, "GPAI documentation", p, field, why_unmet=why)
    f.flag("Art. 53(1)(c)", "copyright policy", p, "copyright_policy",
           why_unmet="no policy to comply with EU copyright law and TDM reservations")  # fmt: skip
    f.flag("Art. 53(1)(d)", "public summary of training content", p, "training_content_summary",
           why_unmet="the public summary of training content is not published")  # fmt: skip
    if systemic:
        f.flags("systemic-risk obligations", p, "systemic_risk_measures", cards_lib.SYSTEMIC_RISK_ITEMS)


def report(verdict: Verdict) -> str:
    """The verdict as readable Markdown."""
    c = verdict.classification
    flop = c.get("training_flop_used")
    lines = [
        f"# EU AI Act analysis: {verdict.status.upper()}",
        "",
        f"- kind: {c.get('kind') or 'unknown'}; GPAI model: {_tri(c.get('gpai_model'))}; systemic risk: "
        f"{_tri(c.get('systemic_risk'))}; high-risk: {_tri(c.get('high_risk'))}"
        + (f" ({', '.join(c['high_risk_purposes'])})" if c.get("high_risk_purposes") else ""),
        f"- training compute: {'unknown' if flop is None else f'{flop:.3g} FLOP'} (measured "
        f"{_num(c.get('training_flop_measured'))}, projected {_num(c.get('training_flop_projected'))}; "
        f"GPAI above {GPAI_FLOP:.0e}, systemic risk above {SYSTEMIC_RISK_FLOP:.0e})",
    ]
    if "open_source_exemption" in c:
        lines.append(f"- Art. 53(2) open-source exemption: {_tri(c['open_source_exemption'])}")
    for title, items in (("Unmet", verdict.unmet), ("Unknown (a field is missing)", verdict.unknown)):
        lines += ["", f"## {title}: {len(items)}", ""]
        lines += [f"- {x.article} — {x.obligation}: {x.reason} ({x.card}, field `{x.field}`)" for x in items]
    met = sum(1 for x in verdict.findings if x.status == MET)
    lines += ["", f"{met} obligations met. This analysis supports, and does not replace, a legal assessment."]
    return "\n".join(lines) + "\n"


def _tri(v: Any) -> str:
    return "unknown" if v is None else ("yes" if v else "no")


def _num(v: Any) -> str:
    return "unknown" if v is None else f"{float(v):.3g}"
