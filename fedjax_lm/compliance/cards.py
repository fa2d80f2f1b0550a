"""Compliance cards: the project, each silo's dataset, each model (base and trained), as YAML or JSON.

Only metadata leaves a silo: its Data card says what its data is, never the data. Every field is
optional in the schema sense that a missing (or null) field is *unknown*, not "no": the analysis
(`analysis.py`) reports an obligation that depends on it as unknown, naming the card and the field,
where the Compliance Cards rules engine (Marino et al.) would have read a missing flag as False. A
field that is present must have the documented type and value; anything else is refused with the
file, the field and what was expected.

A cards folder holds:

    project.yaml               the Project card (one)
    datasets/<silo>.yaml       one Data card per silo (the file name is the silo's name)
    models/<id>.yaml           Model cards: the base model (kind: base), the trained one (kind: trained)

`.json` is read the same way as `.yaml`. The fields, their types and the article each one serves are
the `FIELDS` tables below (`python -m fedjax_lm comply --schema` prints them).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import re
from collections.abc import Mapping
from typing import Any

import yaml

MAX_CARD_BYTES = 1 << 20  # a card is metadata: a megabyte is far more than any needs

# Art. 5(1)(a)-(h): the practices that stop everything.
PROHIBITED_PRACTICES = {
    "subliminal_manipulation": "Art. 5(1)(a)",
    "exploiting_vulnerabilities": "Art. 5(1)(b)",
    "social_scoring": "Art. 5(1)(c)",
    "crime_prediction_by_profiling": "Art. 5(1)(d)",
    "untargeted_facial_image_scraping": "Art. 5(1)(e)",
    "emotion_recognition_at_work_or_school": "Art. 5(1)(f)",
    "biometric_categorisation_of_sensitive_traits": "Art. 5(1)(g)",
    "realtime_remote_biometric_identification_for_law_enforcement": "Art. 5(1)(h)",
}

# Annex III areas: an intended purpose in one of them makes an AI system high-risk (Art. 6(2)) unless
# Art. 6(3) applies. Other purposes are free text (e.g. "general text generation").
HIGH_RISK_PURPOSES = {
    "biometrics": "Annex III(1)",
    "critical_infrastructure": "Annex III(2)",
    "education": "Annex III(3)",
    "employment": "Annex III(4)",
    "essential_services": "Annex III(5)",
    "law_enforcement": "Annex III(6)",
    "migration_border_control": "Annex III(7)",
    "justice_democracy": "Annex III(8)",
}

SOURCE_CATEGORIES = ("public", "licensed", "crawled", "user", "synthetic")
MODALITIES = ("text", "code", "image", "audio", "video", "tabular", "other")
SIZE_RANGES = ("<1M tokens", "1M-1B tokens", "1B-1T tokens", ">1T tokens")
TDM_METHODS = ("robots.txt", "tdmrep", "licence_terms", "not_applicable")
LEGAL_BASES = (  # GDPR Art. 6(1)(a)-(f), or "none" (personal data with no legal basis)
    "consent",
    "contract",
    "legal_obligation",
    "vital_interests",
    "public_task",
    "legitimate_interests",
    "none",
)
ANONYMISATION = ("none", "pseudonymised", "anonymised")
# Art. 10(2)(a)-(h) and 10(3): the data-governance items a high-risk system's training data must cover.
DATA_GOVERNANCE_ITEMS = {
    "design_choices": "Art. 10(2)(a)",
    "collection_and_origin": "Art. 10(2)(b)",
    "preparation_operations": "Art. 10(2)(c)",
    "assumptions": "Art. 10(2)(d)",
    "availability_and_suitability": "Art. 10(2)(e)",
    "bias_examination": "Art. 10(2)(f)",
    "bias_mitigation": "Art. 10(2)(g)",
    "gaps_and_shortcomings": "Art. 10(2)(h)",
    "representative_and_error_free": "Art. 10(3)",
}
SYSTEMIC_RISK_ITEMS = {  # Art. 55(1)(a)-(d)
    "model_evaluation": "Art. 55(1)(a)",
    "systemic_risk_assessment": "Art. 55(1)(b)",
    "incident_reporting": "Art. 55(1)(c)",
    "cybersecurity": "Art. 55(1)(d)",
}

_SPDX = re.compile(r"^(LicenseRef-[A-Za-z0-9.\-]+|[A-Za-z0-9][A-Za-z0-9.\-+]*)$")
# SPDX ids of licences the Open Source Initiative approves, as far as Art. 53(2)'s "free and
# open-source licence" is concerned here (weights, not only code); extend as needed.
OPEN_SOURCE_LICENCES = frozenset(
    {"Apache-2.0", "MIT", "BSD-2-Clause", "BSD-3-Clause", "GPL-2.0-only", "GPL-3.0-only", "GPL-3.0-or-later",
     "LGPL-3.0-only", "MPL-2.0", "CC-BY-4.0", "CC-BY-SA-4.0", "CC0-1.0", "Unlicense", "ISC"}
)  # fmt: skip


class CardError(ValueError):
    """A card that cannot be used: names the file, the field and what was expected."""


@dataclasses.dataclass(frozen=True)
class Field:
    kind: str  # str | bool | number | date | list | choice | choices | spdx | sha256 | flags
    doc: str
    article: str = ""
    choices: tuple[str, ...] = ()


def _choice(values, doc, article=""):
    return Field("choice", doc, article, tuple(values))


def _flags(names: Mapping[str, str], doc: str) -> Field:
    return Field("flags", doc, "", tuple(names))


PROJECT_FIELDS: dict[str, Field] = {
    "name": Field("str", "the project's name"),
    "provider": Field("str", "who places the model or system on the market (Art. 3(3))", "Art. 3(3)"),
    "placed_on_eu_market": Field(
        "bool", "whether it is placed on the EU market or put into service there", "Art. 2(1)"
    ),
    "scientific_research_only": Field(
        "bool", "developed and put into service solely for scientific research", "Art. 2(6)"
    ),
    "kind": _choice(
        ("gpai_model", "ai_system"),
        "what is placed on the market: the model, or a system built on it",
        "Art. 3(1), 3(63)",
    ),
    "intended_purposes": Field(
        "choices",
        "the project's intended purposes; Annex III areas make a system high-risk",
        "Art. 6(2)",
        tuple(HIGH_RISK_PURPOSES),
    ),
    "annex_i_safety_component": Field(
        "bool", "a safety component of a product under Annex I harmonisation law", "Art. 6(1)"
    ),
    "art_6_3_exception": Field(
        "str", "why an Annex III system is not high-risk (Art. 6(3)(a)-(d)); empty: none", "Art. 6(3)"
    ),
    "prohibited_practices": _flags(
        PROHIBITED_PRACTICES, "each Art. 5(1) practice: true if the system performs it"
    ),
    "interacts_with_people": Field(
        "bool", "the system interacts directly with natural persons", "Art. 50(1)"
    ),
    "generates_synthetic_content": Field(
        "bool", "it generates synthetic text, audio, image or video", "Art. 50(2)"
    ),
    "discloses_ai_interaction": Field(
        "bool", "people are told they interact with an AI system", "Art. 50(1)"
    ),
    "marks_synthetic_content": Field(
        "bool", "outputs are marked machine-readably as AI-generated", "Art. 50(2)"
    ),
    "copyright_policy": Field(
        "bool", "a policy to comply with EU copyright law, honouring TDM reservations", "Art. 53(1)(c)"
    ),
    "training_content_summary": Field(
        "bool", "the public summary of training content is published (AI Office template)", "Art. 53(1)(d)"
    ),
    "technical_documentation": Field(
        "bool", "Annex XI technical documentation is drawn up and kept up to date", "Art. 53(1)(a)"
    ),
    "downstream_information": Field(
        "bool", "Annex XII information for downstream providers is available", "Art. 53(1)(b)"
    ),
    "systemic_risk_measures": _flags(
        SYSTEMIC_RISK_ITEMS, "Art. 55(1) measures in place (systemic-risk models)"
    ),
    "compute_budget_flop": Field(
        "number", "the training compute planned for the model, if known (projects Art. 51)", "Art. 51(2)"
    ),
}

DATA_FIELDS: dict[str, Field] = {
    "name": Field("str", "the dataset's name"),
    "silo": Field("str", "the silo that holds it"),
    "version": Field("str", "the dataset's version"),
    "sha256": Field("sha256", "hash of the prepared dataset (what `prepare` recorded)"),
    "source_category": _choice(SOURCE_CATEGORIES, "where the data comes from", "Annex XI(2)(c)"),
    "sources": Field("list", "the sources (packages, sites, collections)", "Annex XI(2)(c)"),
    "modality": _choice(MODALITIES, "the data's modality", "Annex XI(2)(c)"),
    "size_range": _choice(SIZE_RANGES, "the dataset's size", "Annex XI(2)(c)"),
    "size_tokens": Field("number", "measured size in tokens"),
    "latest_collection_date": Field(
        "date", "the latest date data was collected (YYYY-MM-DD)", "Annex XI(2)(c)"
    ),
    "licence": Field("spdx", "the data's licence (SPDX id; LicenseRef-... for others)", "Art. 53(1)(c)"),
    "tdm_opt_out_checked": Field(
        "bool", "text-and-data-mining reservations were checked (DSM Directive Art. 4(3))", "Art. 53(1)(c)"
    ),
    "tdm_opt_out_method": _choice(TDM_METHODS, "how TDM reservations were checked", "Art. 53(1)(c)"),
    "personal_data": Field("bool", "the data contains personal data", "GDPR Art. 6"),
    "special_categories": Field(
        "bool", "it contains special categories of personal data (GDPR Art. 9)", "Art. 10(5)"
    ),
    "legal_basis": _choice(
        LEGAL_BASES, "the GDPR Art. 6(1) legal basis for processing personal data", "GDPR Art. 6(1)"
    ),
    "anonymisation": _choice(ANONYMISATION, "how personal data was anonymised", "GDPR Art. 89(1)"),
    "data_governance": _flags(
        DATA_GOVERNANCE_ITEMS, "Art. 10 data-governance items covered (high-risk purposes)"
    ),
    "intended_purposes": Field(
        "choices", "the purposes the data may be used for", "Art. 10(2)", tuple(HIGH_RISK_PURPOSES)
    ),
}

MODEL_FIELDS: dict[str, Field] = {
    "name": Field("str", "the model's name"),
    "kind": _choice(("base", "trained"), "a base model the project starts from, or the model it trains"),
    "licence": Field("spdx", "the weights' licence (SPDX id)", "Art. 53(2)"),
    "weights_public": Field(
        "bool", "parameters, architecture and usage information are made public", "Art. 53(2)"
    ),
    "parameters": Field("number", "parameter count", "Annex XI(1)(d)"),
    "training_flop": Field("number", "training compute in FLOP (measured)", "Art. 51(2), Annex XI(2)(d)"),
    "energy_kwh": Field("number", "training energy in kWh (measured or estimated)", "Annex XI(2)(e)"),
    "intended_purposes": Field(
        "choices", "the model's intended purposes", "Art. 6(2)", tuple(HIGH_RISK_PURPOSES)
    ),
    "systemic_risk": Field("bool", "a base model that is itself classified with systemic risk", "Art. 51"),
}

SCHEMAS = {"project": PROJECT_FIELDS, "data": DATA_FIELDS, "model": MODEL_FIELDS}


@dataclasses.dataclass(frozen=True)
class Card:
    """One validated card: `kind` (project | data | model), where it came from, and its fields (a
    missing or null field is absent here: unknown)."""

    kind: str
    path: str
    fields: Mapping[str, Any]

    @property
    def label(self) -> str:
        return f"{self.kind} card {self.path}"

    def get(self, name: str, default: Any = None) -> Any:
        return self.fields.get(name, default)


def _expected(f: Field) -> str:
    return {
        "str": "a string",
        "bool": "true or false",
        "number": "a non-negative number",
        "date": "a date YYYY-MM-DD",
        "list": "a list of strings",
        "choice": f"one of {list(f.choices)}",
        "choices": f"a list of purposes (free text, or Annex III areas {list(f.choices)})",
        "spdx": "an SPDX licence id (e.g. Apache-2.0, CC-BY-4.0, LicenseRef-...)",
        "sha256": "64 hex digits",
        "flags": f"a mapping of {list(f.choices)} to true / false",
    }[f.kind]


def _check_value(f: Field, value: Any) -> Any:
    """The value in canonical form, or None when it does not have the field's type."""
    k = f.kind
    if k == "str":
        return value if isinstance(value, str) else None
    if k == "bool":
        return value if isinstance(value, bool) else None
    if k == "number":
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return None
        try:
            number = float(value)  # an integer of 400 digits overflows: not a number a card can hold
        except OverflowError:
            return None
        return number if math.isfinite(number) and number >= 0 else None
    if k == "date":
        if isinstance(value, datetime.date):
            return value.isoformat()
        try:
            return datetime.date.fromisoformat(value).isoformat() if isinstance(value, str) else None
        except ValueError:
            return None
    if k in ("list", "choices"):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            return None
        return list(value)
    if k == "choice":
        return value if value in f.choices else None
    if k == "spdx":
        return value if isinstance(value, str) and _SPDX.match(value) else None
    if k == "sha256":
        return value.lower() if isinstance(value, str) and re.fullmatch(r"[0-9a-fA-F]{64}", value) else None
    if k == "flags":
        if not isinstance(value, Mapping):
            return None
        out = {}
        for name, flag in value.items():
            if name not in f.choices or not (flag is None or isinstance(flag, bool)):
                return None
            if flag is not None:
                out[name] = flag
        return out
    raise AssertionError(k)


def parse(kind: str, obj: Any, path: str) -> Card:
    """A card of `kind` from a parsed YAML/JSON object; CardError names the file, field and expectation."""
    schema = SCHEMAS[kind]
    if not isinstance(obj, Mapping):
        raise CardError(f"{path}: a {kind} card must be a mapping of fields, got {type(obj).__name__}")
    fields: dict[str, Any] = {}
    for name, value in obj.items():
        if name not in schema:
            raise CardError(
                f"{path}: unknown field {name!r} in a {kind} card; known fields: {', '.join(schema)}"
            )
        if value is None:
            continue  # null: unknown, like a missing field
        checked = _check_value(schema[name], value)
        if checked is None:
            raise CardError(f"{path}: field {name!r} is {value!r}; expected {_expected(schema[name])}")
        fields[name] = checked
    return Card(kind, path, fields)


def load(kind: str, path: str) -> Card:
    """One card file (.yaml, .yml or .json)."""
    if os.path.getsize(path) > MAX_CARD_BYTES:
        raise CardError(f"{path}: larger than {MAX_CARD_BYTES} bytes; a card is metadata")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        obj = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise CardError(f"{path}: not valid {'JSON' if path.endswith('.json') else 'YAML'}: {e}") from None
    return parse(kind, obj, path)


def _card_files(folder: str) -> list[str]:
    if not os.path.isdir(folder):
        return []
    return sorted(
        os.path.join(folder, n) for n in os.listdir(folder) if n.endswith((".yaml", ".yml", ".json"))
    )


@dataclasses.dataclass(frozen=True)
class CardSet:
    """A project's cards: the Project card, Data cards by silo, Model cards by id."""

    project: Card
    datasets: Mapping[str, Card]
    models: Mapping[str, Card]

    def with_dataset(self, silo: str, card: Card) -> "CardSet":
        return dataclasses.replace(self, datasets={**self.datasets, silo: card})


def _stem(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


def load_project(folder: str) -> CardSet:
    """project.yaml and models/*.yaml of `folder`, without its Data cards (each silo's own business: a bad
    one excludes that silo, it does not stop the analysis)."""
    projects = [p for p in _card_files(folder) if _stem(p) == "project"]
    if not projects:
        raise CardError(f"{folder}: no project.yaml (or project.json): the Project card is required")
    if len(projects) > 1:
        raise CardError(f"{folder}: more than one Project card: {projects}")
    models = {_stem(p): load("model", p) for p in _card_files(os.path.join(folder, "models"))}
    return CardSet(load("project", projects[0]), {}, models)


def load_data_card(path: str, silo: str) -> Card:
    """A silo's Data card file, refused if its `silo` field names another silo."""
    card = load("data", path)
    if card.get("silo", silo) != silo:
        raise CardError(f"{path}: field 'silo' is {card.get('silo')!r}; expected {silo!r} (the file name)")
    return card


def load_dir(folder: str, corpus_dir: str | None = None) -> CardSet:
    """project.yaml, datasets/*.yaml and models/*.yaml of `folder` (see the module docstring); with
    `corpus_dir`, a silo of that prepared corpus without a card of its own gets the one generated from
    what prepare recorded (`corpus_cards`)."""
    project = load_project(folder)
    datasets = {
        _stem(path): load_data_card(path, _stem(path))
        for path in _card_files(os.path.join(folder, "datasets"))
    }
    if corpus_dir is not None:
        from fedjax_lm.compliance import corpus_cards

        for silo, fields in corpus_cards.data_cards(corpus_dir).items():
            if silo not in datasets:
                datasets[silo] = parse("data", fields, f"{corpus_dir}/corpus.json#{silo}")
    return dataclasses.replace(project, datasets=datasets)


def schema_table() -> str:
    """Every card's fields as Markdown (`comply --schema`)."""
    lines = []
    for kind, schema in SCHEMAS.items():
        lines += [f"## {kind} card", "", "| field | expected | article | meaning |", "|---|---|---|---|"]
        lines += [f"| {n} | {_expected(f)} | {f.article} | {f.doc} |" for n, f in schema.items()]
        lines.append("")
    return "\n".join(lines)
