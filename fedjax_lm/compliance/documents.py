"""Documents a general-purpose model's provider owes, filled from a run's config, cards and measured figures.

    python -m fedjax_lm report --workdir runs/photon        # -> runs/photon/reports/

- `technical_documentation.json` / `.md`: Annex XI, Section 1 (Art. 53(1)(a)): general description
  (tasks, acceptable use, release, architecture and parameters, modalities, licence) and the development
  process (design choices, training data per silo, compute in FLOP, training time, energy).
- `training_content_summary.json` / `.md`: the public summary of training content (Art. 53(1)(d)) in the
  three sections of the AI Office's template (July 2025): general information; list of data sources;
  relevant data-processing aspects. Aggregated from the silos' Data cards: only metadata.
- `README.md` next to exported weights (`export`): a Hugging Face model card with YAML metadata (license,
  datasets, co2_eq_emissions) and the same figures.

A figure the run did not measure, or a field no card states, is written as "unknown", never guessed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import yaml

from fedjax_lm import monitor
from fedjax_lm import runs
from fedjax_lm.compliance import cards as cards_lib
from fedjax_lm.compliance import gate as gate_lib

UNKNOWN = "unknown"


def _read_json(path: str) -> dict[str, Any] | None:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def gather(workdir: str, data_cards: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What the documents are made of: the run's config and summary, its rows, its cards and verdict.
    `data_cards` (a deployment's aggregator: the silos' published cards) replaces the local ones."""
    run = runs.read_run(workdir)
    if run is None:
        raise FileNotFoundError(f"{workdir} holds no run (no run.json)")
    summary = _read_json(os.path.join(workdir, "summary.json"))
    if summary is None:
        raise FileNotFoundError(f"{workdir} has no summary.json: the run has not finished; finish it first")
    config = run["config"]
    fed = config.get("federation") or {}
    folder = str((fed.get("compliance") or {}).get("cards") or "")
    project, models = None, {}
    if folder and os.path.isdir(folder):
        loaded = cards_lib.load_dir(folder)
        project, models = loaded.project, dict(loaded.models)
    if data_cards is None:
        silos = sorted((summary.get("val") or {}).get("per_silo") or {})
        data_cards = gate_lib.local_data_cards(folder, silos, (config.get("data") or {}).get("corpus_dir"))
    rows = monitor.rows_by_round(workdir, "rounds")
    contributed = {s for row in rows.values() for s in row.get("accepted", [])}
    # the training content is what was trained on: silos whose updates counted (a federated run's rows
    # say which; a centralized run trained on every silo it evaluates)
    datasets = {
        s: c
        for s, c in data_cards.items()
        if isinstance(c, cards_lib.Card) and (not rows or s in contributed)
    }
    return {
        "workdir": workdir,
        "run": run,
        "config": config,
        "summary": summary,
        "rows": rows,
        "project": project,
        "models": models,
        "datasets": datasets,
        "verdict": _read_json(os.path.join(workdir, "compliance", "verdict.json")),
    }


def _field(card: cards_lib.Card | None, name: str) -> Any:
    value = card.get(name) if card is not None else None
    return UNKNOWN if value is None else value


def _trained(facts: Mapping[str, Any]) -> cards_lib.Card | None:
    return next((m for m in facts["models"].values() if m.get("kind") == "trained"), None)


def _compute(facts: Mapping[str, Any]) -> dict[str, Any]:
    s = facts["summary"]
    flops = s.get("flops")
    if flops is None:  # a run written before FLOPs were summed: its rows hold them
        flops = sum(float(r.get("flops", 0) or 0) for r in facts["rows"].values()) or None
    e = s.get("energy") or {}
    comm = s.get("communication") or {}
    return {
        "training_flop": flops if flops is not None else UNKNOWN,
        "flop_formula": "per token 6 x matmul params + 6 x layers x seq_len x heads x head_dim "
        "(fedjax_lm.model.flops_per_token), times the tokens trained",
        # the rounds' own wall time: a resumed run's summary holds only the last invocation's
        "training_time_s": sum(float(r.get("time_round", 0) or 0) for r in facts["rows"].values())
        or s.get("wall_time_s", UNKNOWN),
        "tokens": s.get("tokens", UNKNOWN),
        "energy_kwh": e.get("energy_kwh", UNKNOWN),
        "energy_source": e.get("energy_source", UNKNOWN),
        "co2_eq_kg": e.get("co2_kg") if e.get("co2_kg") is not None else UNKNOWN,
        "bytes_communicated": comm.get("bytes_moved", UNKNOWN),
        "traffic_vs_data_parallel": comm.get("traffic_ratio_vs_dp", UNKNOWN),
    }


def _data(card: cards_lib.Card) -> dict[str, Any]:
    keys = ("name", "source_category", "sources", "modality", "size_tokens", "size_range", "licence",
            "latest_collection_date", "tdm_opt_out_checked", "tdm_opt_out_method", "personal_data",
            "anonymisation", "sha256", "version")  # fmt: skip
    return {k: _field(card, k) for k in keys}


def technical_documentation(facts: Mapping[str, Any]) -> dict[str, Any]:
    """Annex XI, Section 1, as a JSON-able dict."""
    c, p, m = facts["config"], facts["project"], _trained(facts)
    model = c.get("model") or {}
    fed = c.get("federation") or {}
    summary = facts["summary"]
    return {
        "annex": "Regulation (EU) 2024/1689, Annex XI, Section 1",
        "1_general_description": {
            "a_tasks_and_systems": _field(p, "intended_purposes"),
            "b_acceptable_use_policy": UNKNOWN,  # not a card field yet: the provider's own document
            "c_release": {
                "placed_on_eu_market": _field(p, "placed_on_eu_market"),
                "provider": _field(p, "provider"),
            },
            "d_architecture": {
                "type": "decoder-only transformer (pre-norm, RoPE, SwiGLU, no biases)",
                "parameters": summary.get("params", UNKNOWN),
                **{
                    k: model.get(k, UNKNOWN)
                    for k in ("d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "vocab_size")
                },
            },
            "e_modalities": {"input": "text", "output": "text"},
            "f_licence": _field(m, "licence"),
        },
        "2_development_process": {
            "a_integration": "Hugging Face Llama format (python -m fedjax_lm export); SentencePiece tokenizer",
            "b_design": {
                "training": summary.get("kind", UNKNOWN),
                "method": (
                    f"federated: {fed.get('rounds')} rounds x {fed.get('local_steps')} local AdamW steps per "
                    f"silo, outer optimizer {(fed.get('outer') or {}).get('name')}, uploads {fed.get('compression')}"
                    if fed
                    else "centralized"
                ),
                "objective": "next-token cross-entropy",
                "config": c.get("name", UNKNOWN),
            },
            "c_data": {silo: _data(card) for silo, card in sorted(facts["datasets"].items())},
            "d_compute": _compute(facts),
            "e_energy": {k: _compute(facts)[k] for k in ("energy_kwh", "energy_source", "co2_eq_kg")},
        },
        "evaluation": {
            "validation_perplexity": ((summary.get("val") or {}).get("pooled") or {}).get("ppl", UNKNOWN)
        },
        "compliance_verdict": (facts.get("verdict") or {}).get("status", UNKNOWN),
    }


_TEMPLATE_CATEGORIES = {  # AI Office template, section 2: data source categories
    "public": "2.1 publicly available datasets",
    "licensed": "2.2 private non-publicly available datasets obtained from third parties (licensed)",
    "crawled": "2.3 data crawled and scraped from online sources",
    "user": "2.4 user data",
    "synthetic": "2.5 synthetic data",
}


def training_content_summary(facts: Mapping[str, Any]) -> dict[str, Any]:
    """The public summary of training content (AI Office template, three sections)."""
    p, m, comp = facts["project"], _trained(facts), _compute(facts)
    by_category: dict[str, list[dict[str, Any]]] = {}
    for silo, card in sorted(facts["datasets"].items()):
        key = _TEMPLATE_CATEGORIES.get(card.get("source_category"), "2.6 other sources (category unknown)")
        by_category.setdefault(key, []).append(
            {
                "silo": silo,
                "name": _field(card, "name"),
                "sources": _field(card, "sources"),
                "licence": _field(card, "licence"),
                "size_tokens": _field(card, "size_tokens"),
                "latest_collection_date": _field(card, "latest_collection_date"),
            }  # fmt: skip
        )
    cards = list(facts["datasets"].values())
    return {
        "template": "AI Office, public summary of training content (July 2025)",
        "1_general_information": {
            "provider": _field(p, "provider"),
            "model": _field(m, "name"),
            "modalities": sorted({str(_field(c, "modality")) for c in cards}) or [UNKNOWN],
            "training_tokens": comp["tokens"],
            "silos": len(cards),
            "latest_collection_date": max(
                (str(c.get("latest_collection_date")) for c in cards if c.get("latest_collection_date")),
                default=UNKNOWN,
            ),
        },
        "2_list_of_data_sources": by_category,
        "3_data_processing": {
            "tdm_reservations": {s: _tdm(c) for s, c in sorted(facts["datasets"].items())},
            "personal_data": {s: _field(c, "personal_data") for s, c in sorted(facts["datasets"].items())},
            "copyright_policy": _field(p, "copyright_policy"),
            "federated": "the data never left its silo; only model updates were exchanged",
        },
    }


def _tdm(card: cards_lib.Card) -> str:
    if card.get("source_category") in ("licensed", "user", "synthetic"):
        return f"{card.get('source_category')}: used under its licence or terms ({_field(card, 'licence')})"
    checked = card.get("tdm_opt_out_checked")
    if checked is None:
        return UNKNOWN
    return (
        f"reservations checked ({_field(card, 'tdm_opt_out_method')})"
        if checked
        else "reservations NOT checked"
    )


def markdown(title: str, doc: Mapping[str, Any]) -> str:
    """A nested document as Markdown headings and bullet lists."""
    lines = [f"# {title}", ""]

    def walk(obj: Any, depth: int) -> None:
        for key, value in obj.items():
            label = str(key).replace("_", " ")
            if isinstance(value, Mapping):
                lines.append(
                    f"{'#' * min(depth, 6)} {label}" if depth <= 3 else f"{'  ' * (depth - 4)}- **{label}**"
                )
                if depth <= 3:
                    lines.append("")
                walk(value, depth + 1)
                if depth <= 3:
                    lines.append("")
            elif isinstance(value, list) and value and isinstance(value[0], Mapping):
                lines.append(f"{'#' * min(depth, 6)} {label}")
                lines.append("")
                for item in value:
                    lines.append("- " + "; ".join(f"{k}: {_fmt(v)}" for k, v in item.items()))
                lines.append("")
            else:
                lines.append(f"{'  ' * max(0, depth - 4)}- {label}: {_fmt(value)}")

    walk(doc, 2)
    return "\n".join(lines).rstrip() + "\n"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return ", ".join(_fmt(x) for x in v)
    return str(v)


def hf_model_card(facts: Mapping[str, Any]) -> str:
    """README.md for exported weights: Hugging Face YAML metadata, then the figures."""
    m, comp = _trained(facts), _compute(facts)
    meta: dict[str, Any] = {
        "license": str(_field(m, "licence")).lower() if m is not None and m.get("licence") else "other",
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["fedjax_lm", "federated-learning"],
        "datasets": sorted(
            {str(s) for c in facts["datasets"].values() for s in (c.get("sources") or [c.get("name")])}
        ),
    }
    if isinstance(comp["co2_eq_kg"], float):  # Hugging Face's field, in grams
        meta["co2_eq_emissions"] = {
            "emissions": comp["co2_eq_kg"] * 1000,
            "source": comp["energy_source"],
            "training_type": "pre-training",
            "hardware_used": "see technical documentation",
        }
    ppl = ((facts["summary"].get("val") or {}).get("pooled") or {}).get("ppl", UNKNOWN)
    body = [
        f"# {_field(m, 'name')}",
        "",
        f"Trained with fedjax_lm ({facts['summary'].get('kind', UNKNOWN)}, config {facts['config'].get('name')}).",
        "",
        f"- parameters: {facts['summary'].get('params', UNKNOWN)}; training tokens: {comp['tokens']}",
        f"- validation perplexity (pooled): {_fmt(ppl)}",
        f"- training compute: {_fmt(comp['training_flop'])} FLOP; wall time {_fmt(comp['training_time_s'])} s",
        f"- energy: {_fmt(comp['energy_kwh'])} kWh ({comp['energy_source']}); CO2-eq: {_fmt(comp['co2_eq_kg'])} kg",
        f"- traffic: {_fmt(comp['bytes_communicated'])} bytes, {_fmt(comp['traffic_vs_data_parallel'])}x less than data-parallel",
        f"- EU AI Act verdict at training time: {(facts.get('verdict') or {}).get('status', UNKNOWN)}",
    ]
    return (
        "---\n"
        + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True)
        + "---\n\n"
        + "\n".join(body)
        + "\n"
    )


def write_reports(
    workdir: str, out: str | None = None, data_cards: Mapping[str, Any] | None = None
) -> list[str]:
    """Writes the documents to `out` (default WORKDIR/reports); returns their paths."""
    facts = gather(workdir, data_cards)
    out = out or os.path.join(workdir, "reports")
    os.makedirs(out, exist_ok=True)
    written = []
    for stem, title, doc in (
        (
            "technical_documentation",
            "Technical documentation (AI Act Annex XI, Section 1)",
            technical_documentation(facts),
        ),
        ("training_content_summary", "Public summary of training content", training_content_summary(facts)),
    ):
        for ext, text in (("json", json.dumps(doc, indent=1, default=str)), ("md", markdown(title, doc))):
            path = os.path.join(out, f"{stem}.{ext}")
            _write(path, text)
            written.append(path)
    return written


def _write(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
