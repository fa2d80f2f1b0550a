"""Compliance cards and the EU AI Act analysis: a compliant project and each way one fails."""

import json
import os
import subprocess
import sys

import pytest
import yaml

from fedjax_lm import compliance
from fedjax_lm.compliance import cards as cards_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROJECT = {
    "name": "federated pre-training",
    "provider": "the consortium",
    "placed_on_eu_market": True,
    "scientific_research_only": False,
    "kind": "gpai_model",
    "intended_purposes": ["general text generation"],
    "prohibited_practices": {name: False for name in cards_lib.PROHIBITED_PRACTICES},
    "interacts_with_people": False,
    "generates_synthetic_content": True,
    "marks_synthetic_content": True,
    "copyright_policy": True,
    "training_content_summary": True,
    "technical_documentation": True,
    "downstream_information": True,
}
LICENSED = {
    "name": "news archive",
    "silo": "news",
    "source_category": "licensed",
    "modality": "text",
    "size_range": "1M-1B tokens",
    "latest_collection_date": "2026-05-01",
    "licence": "LicenseRef-news-archive",
    "personal_data": False,
}
CRAWLED = {
    "name": "forum crawl",
    "silo": "forum",
    "source_category": "crawled",
    "modality": "text",
    "licence": "CC-BY-4.0",
    "tdm_opt_out_checked": True,
    "tdm_opt_out_method": "tdmrep",
    "personal_data": True,
    "special_categories": False,
    "legal_basis": "legitimate_interests",
    "anonymisation": "pseudonymised",
}
TRAINED = {"name": "fedjax-tiny", "kind": "trained", "licence": "Apache-2.0", "weights_public": True}


def write_cards(folder, project=None, datasets=None, models=None):
    """A cards folder (YAML) from dicts; None keeps the compliant example's card."""
    os.makedirs(folder / "datasets", exist_ok=True)
    os.makedirs(folder / "models", exist_ok=True)
    (folder / "project.yaml").write_text(yaml.safe_dump(project or PROJECT))
    for silo, card in (datasets or {"news": LICENSED, "forum": CRAWLED}).items():
        (folder / "datasets" / f"{silo}.yaml").write_text(yaml.safe_dump(card))
    for name, card in (models or {"trained": TRAINED}).items():
        (folder / "models" / f"{name}.json").write_text(json.dumps(card))
    return str(folder)


def verdict_of(tmp_path, **kw):
    flops = {k: kw.pop(k) for k in ("measured_flop", "projected_flop") if k in kw}
    return compliance.analyse(compliance.load_dir(write_cards(tmp_path / "cards", **kw)), **flops)


def by_field(items, field):
    return [f for f in items if f.field == field]


def test_a_compliant_open_source_gpai_project(tmp_path):
    v = verdict_of(tmp_path, measured_flop=3.2e15)
    assert v.status == "compliant", compliance.report(v)
    c = v.classification
    assert c["gpai_model"] is True and c["systemic_risk"] is False and c["high_risk"] is False
    assert c["open_source_exemption"] is True  # Apache-2.0, weights public, no systemic risk
    exempt = [f for f in v.findings if "Art. 53(2)" in f.article]
    assert {f.article for f in exempt} == {"Art. 53(1)(a), Art. 53(2)", "Art. 53(1)(b), Art. 53(2)"}
    assert any(f.article == "Art. 53(1)(c)" and f.field == "tdm_opt_out_checked" for f in v.findings)
    report = compliance.report(v)
    assert report.startswith("# EU AI Act analysis: COMPLIANT") and "3.2e+15 FLOP" in report


def test_a_prohibited_practice_stops_the_analysis(tmp_path):
    project = {**PROJECT, "prohibited_practices": {**PROJECT["prohibited_practices"], "social_scoring": True}}
    bad_data = {**CRAWLED, "legal_basis": "none"}  # would be unmet, but nothing else is evaluated
    v = verdict_of(tmp_path, project=project, datasets={"forum": bad_data})
    assert v.status == "prohibited"
    assert [(f.article, f.field) for f in v.findings] == [
        ("Art. 5(1)(c)", "prohibited_practices.social_scoring")
    ]


def test_a_silo_missing_a_high_risk_purpose_is_unmet(tmp_path):
    governance = {item: True for item in cards_lib.DATA_GOVERNANCE_ITEMS}
    project = {
        **PROJECT,
        "kind": "ai_system",
        "intended_purposes": ["employment", "chat"],
        "art_6_3_exception": "",
    }
    news = {**LICENSED, "intended_purposes": ["employment"], "data_governance": governance}
    forum = {**CRAWLED, "intended_purposes": ["chat"], "data_governance": governance}
    model = {**TRAINED, "intended_purposes": ["employment", "chat"]}
    v = verdict_of(
        tmp_path, project=project, datasets={"news": news, "forum": forum}, models={"trained": model}
    )
    assert v.classification["high_risk"] is True and v.classification["high_risk_purposes"] == ["employment"]
    assert v.status == "non_compliant"
    (unmet,) = v.unmet
    assert unmet.card.endswith("datasets/forum.yaml") and unmet.field == "intended_purposes"
    assert "Annex III(4)" in unmet.article and "'employment'" in unmet.reason
    # an Art. 6(3) exception takes the system out of high-risk: no purpose check, no Art. 10
    v = verdict_of(
        tmp_path,
        project={**project, "art_6_3_exception": "narrow procedural task (Art. 6(3)(a))"},
        datasets={"news": news, "forum": forum},
        measured_flop=1e18,  # an AI system of known compute: not a GPAI model, nothing unknown
    )
    assert v.classification["high_risk"] is False and v.status == "compliant", compliance.report(v)


def test_personal_data_without_a_legal_basis_is_unmet_and_an_unstated_one_unknown(tmp_path):
    v = verdict_of(tmp_path, datasets={"forum": {**CRAWLED, "legal_basis": "none"}})
    assert v.status == "non_compliant"
    (unmet,) = v.unmet
    assert unmet.article == "GDPR Art. 6(1)" and unmet.field == "legal_basis"
    unstated = {k: x for k, x in CRAWLED.items() if k != "legal_basis"}
    v = verdict_of(tmp_path, datasets={"forum": unstated})
    assert v.status == "incomplete" and not v.unmet
    assert [f.field for f in v.unknown] == ["legal_basis"]


def test_an_unknown_tdm_status_is_unknown_not_unmet(tmp_path):
    unchecked = {k: x for k, x in CRAWLED.items() if k not in ("tdm_opt_out_checked", "tdm_opt_out_method")}
    v = verdict_of(tmp_path, datasets={"forum": unchecked})
    assert v.status == "incomplete" and not v.unmet
    (unknown,) = v.unknown
    assert unknown.article == "Art. 53(1)(c)" and unknown.field == "tdm_opt_out_checked"
    v = verdict_of(tmp_path, datasets={"forum": {**CRAWLED, "tdm_opt_out_checked": False}})
    assert v.status == "non_compliant" and v.unmet[0].field == "tdm_opt_out_checked"
    # a null is a missing answer, not "no"
    v = verdict_of(tmp_path, datasets={"forum": {**CRAWLED, "tdm_opt_out_checked": None}})
    assert v.status == "incomplete"


def test_an_open_source_model_over_1e25_flop_loses_the_exemption(tmp_path):
    project = {**PROJECT, "technical_documentation": False, "downstream_information": False}
    v = verdict_of(tmp_path, project=project, measured_flop=1e24)
    assert v.status == "compliant" and v.classification["open_source_exemption"] is True
    for flops in ({"measured_flop": 2e25}, {"measured_flop": 1e21, "projected_flop": 3e25}):
        v = verdict_of(tmp_path, project=project, **flops)
        c = v.classification
        assert c["systemic_risk"] is True and c["open_source_exemption"] is False
        assert {f.article for f in v.unmet} == {"Art. 53(1)(a)", "Art. 53(1)(b)"}
        assert all("systemic-risk model keeps the obligation" in f.reason for f in v.unmet)
        assert {f.article for f in v.unknown} == set(cards_lib.SYSTEMIC_RISK_ITEMS.values())  # Art. 55


def test_gpai_status_follows_measured_compute_and_is_unknown_without_it(tmp_path):
    system = {**PROJECT, "kind": "ai_system"}
    assert verdict_of(tmp_path, project=system).classification["gpai_model"] is None
    assert verdict_of(tmp_path, project=system, measured_flop=5e22).classification["gpai_model"] is False
    v = verdict_of(tmp_path, project=system, measured_flop=2e23)
    assert v.classification["gpai_model"] is True
    assert any(f.article == "Art. 53(1)(d)" for f in v.findings)


def test_research_only_and_off_market_projects_are_out_of_scope(tmp_path):
    assert (
        verdict_of(tmp_path, project={**PROJECT, "scientific_research_only": True}).status == "out_of_scope"
    )
    v = verdict_of(tmp_path, project={**PROJECT, "placed_on_eu_market": False})
    articles = {f.article for f in v.findings if not f.article.startswith("Art. 5")}
    assert v.status == "out_of_scope" and articles == {"Art. 2(1)", "GDPR Art. 6(1)"}  # the GDPR remains


@pytest.mark.parametrize(
    "card, message",
    [
        (
            {**LICENSED, "licence": "Apache 2.0"},
            r"news.yaml: field 'licence' is 'Apache 2.0'; expected an SPDX",
        ),
        ({**LICENSED, "personal_data": "no"}, r"field 'personal_data' is 'no'; expected true or false"),
        (
            {**LICENSED, "source_category": "scraped"},
            r"field 'source_category' is 'scraped'; expected one of",
        ),
        ({**LICENSED, "latest_collection_date": "May 2026"}, r"expected a date YYYY-MM-DD"),
        ({**LICENSED, "licnce": "MIT"}, r"unknown field 'licnce' in a data card"),
        ({**LICENSED, "silo": "other"}, r"field 'silo' is 'other'; expected 'news' \(the file name\)"),
        (
            {**LICENSED, "data_governance": {"bias_checks": True}},
            r"field 'data_governance' .* expected a mapping of",
        ),
    ],
)
def test_a_bad_card_names_the_file_the_field_and_the_expected_value(tmp_path, card, message):
    folder = write_cards(tmp_path / "cards", datasets={"news": card})
    with pytest.raises(compliance.CardError, match=message):
        compliance.load_dir(folder)


def test_unreadable_or_missing_cards_are_refused_clearly(tmp_path):
    folder = tmp_path / "cards"
    os.makedirs(folder)
    with pytest.raises(compliance.CardError, match="no project.yaml"):
        compliance.load_dir(str(folder))
    (folder / "project.yaml").write_text("name: [unclosed\n")
    with pytest.raises(compliance.CardError, match=r"project.yaml: not valid YAML"):
        compliance.load_dir(str(folder))
    (folder / "project.yaml").write_text("- a list\n")
    with pytest.raises(compliance.CardError, match="must be a mapping of fields"):
        compliance.load_dir(str(folder))


def test_comply_command_writes_the_verdict_and_fails_on_unmet(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")

    def comply(folder, out):
        return subprocess.run(
            [sys.executable, "-m", "fedjax_lm", "comply", "--cards", folder, "--flop", "1e18", "--out", out],
            capture_output=True, text=True, cwd=ROOT, env=env,
        )  # fmt: skip

    ok = comply(write_cards(tmp_path / "ok"), str(tmp_path / "out-ok"))
    assert ok.returncode == 0, ok.stderr
    verdict = json.loads((tmp_path / "out-ok" / "verdict.json").read_text())
    assert verdict["status"] == "compliant" and verdict["classification"]["training_flop_measured"] == 1e18
    bad = comply(
        write_cards(tmp_path / "bad", datasets={"forum": {**CRAWLED, "legal_basis": "none"}}),
        str(tmp_path / "out-bad"),
    )
    assert bad.returncode == 2 and "NON_COMPLIANT" in bad.stdout
    assert "GDPR Art. 6(1)" in (tmp_path / "out-bad" / "report.md").read_text()
    broken = write_cards(tmp_path / "broken", datasets={"news": {**LICENSED, "modality": 3}})
    r = comply(broken, str(tmp_path / "out-broken"))
    assert r.returncode == 1 and "field 'modality' is 3" in r.stderr
    schema = subprocess.run(
        [sys.executable, "-m", "fedjax_lm", "comply", "--schema"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
    )
    assert (
        schema.returncode == 0 and "| tdm_opt_out_checked | true or false | Art. 53(1)(c) |" in schema.stdout
    )


def test_data_cards_generated_from_what_prepare_recorded(small_corpus, tmp_path):
    from fedjax_lm.compliance import corpus_cards

    info = json.loads(open(os.path.join(small_corpus.corpus_dir, "corpus.json")).read())
    generated = corpus_cards.data_cards(small_corpus.corpus_dir)
    assert sorted(generated) == sorted(info["silos"])
    for silo, fields in generated.items():
        card = cards_lib.parse("data", fields, f"corpus.json#{silo}")  # valid against the schema
        meta = info["silos"][silo]
        assert card.get("size_tokens") == meta["train_tokens"] + meta["val_tokens"]
        assert (
            card.get("personal_data") is None and card.get("intended_purposes") is None
        )  # the owner's to say
    assert corpus_cards.spdx_id("GPL-2+") == "GPL-2.0-or-later"
    assert corpus_cards.spdx_id("Some Licence v1") == "LicenseRef-Some-Licence-v1"
    # a silo's own card wins over the generated one; the others are generated and analysed
    own = {**LICENSED, "silo": "code"}
    folder = write_cards(tmp_path / "cards", datasets={"code": own})
    cards = compliance.load_dir(folder, small_corpus.corpus_dir)
    assert set(cards.datasets) == set(info["silos"]) and cards.datasets["code"].get("name") == "news archive"
    v = compliance.analyse(cards, measured_flop=1e15)
    unknown = {(f.card.rsplit("#", 1)[-1], f.field) for f in v.unknown}
    assert {(s, "personal_data") for s in info["silos"] if s != "code"} <= unknown


def gated_config(small_corpus, folder, **compliance_fields):
    from tests.test_simulation import fed_config

    c = fed_config(small_corpus, rounds=2)
    c.federation.compliance.update(dict(cards=str(folder), **compliance_fields))
    return c


def test_the_simulation_gate_excludes_a_silo_whose_card_fails_until_it_is_fixed(small_corpus, tmp_path):
    from fedjax_lm import simulation

    bad = {**CRAWLED, "silo": "lines", "legal_basis": "none"}
    folder = write_cards(tmp_path / "cards", datasets={"lines": bad})  # code and prose: generated cards
    workdir = tmp_path / "run"
    config = gated_config(small_corpus, folder)
    simulation.train(config, str(workdir), stop_after_round=1)
    rows = [json.loads(x) for x in open(workdir / "metrics" / "rounds.jsonl")]
    assert rows[0]["silos"] == 2 and rows[0]["excluded"] == ["lines"] and "lines" not in rows[0]["accepted"]
    history = [json.loads(x) for x in open(workdir / "compliance" / "history.jsonl")]
    assert [(h["round"], h["trigger"]) for h in history] == [(0, "start")]
    assert "GDPR Art. 6(1)" in history[0]["excluded"]["lines"][0]
    verdict = json.loads((workdir / "compliance" / "verdict.json").read_text())
    assert (
        verdict["excluded"] == history[0]["excluded"]
        and verdict["classification"]["training_flop_projected"] > 0
    )
    # the silo's owner fixes the card: the resumed run re-analyses and admits it
    (tmp_path / "cards" / "datasets" / "lines.yaml").write_text(
        yaml.safe_dump({**bad, "legal_basis": "consent"})
    )
    simulation.train(config, str(workdir))
    rows = [json.loads(x) for x in open(workdir / "metrics" / "rounds.jsonl")]
    assert [r["silos"] for r in rows] == [2, 3] and rows[1]["excluded"] == []
    history = [json.loads(x) for x in open(workdir / "compliance" / "history.jsonl")]
    assert [(h["round"], h["trigger"], h["excluded"]) for h in history][1] == (1, "resume", {})


def test_a_gate_stops_before_any_training_step(small_corpus, tmp_path):
    from fedjax_lm import simulation
    from fedjax_lm.compliance.gate import ComplianceStop

    bad = {**CRAWLED, "silo": "lines", "tdm_opt_out_checked": False}
    folder = write_cards(tmp_path / "cards", datasets={"lines": bad})
    with pytest.raises(ComplianceStop, match=r"policy=stop: silo lines: Art. 53\(1\)\(c\)"):
        simulation.train(gated_config(small_corpus, folder, policy="stop"), str(tmp_path / "stop"))
    assert (
        not (tmp_path / "stop" / "metrics" / "rounds.jsonl").exists()
        or not (tmp_path / "stop" / "metrics" / "rounds.jsonl").read_text()
    )
    project = {**PROJECT, "prohibited_practices": {"social_scoring": True}}
    folder = write_cards(tmp_path / "cards2", project=project)
    with pytest.raises(
        ComplianceStop, match=r"prohibited practice \(Art. 5\) stops the run: Art. 5\(1\)\(c\)"
    ):
        simulation.train(gated_config(small_corpus, folder), str(tmp_path / "prohibited"))
    with pytest.raises(ValueError, match="federation.compliance.policy must be one of"):
        simulation.train(gated_config(small_corpus, folder, policy="warn"), str(tmp_path / "bad"))


@pytest.mark.multiprocess
def test_a_silo_joining_mid_run_with_a_bad_card_is_excluded_before_its_update_counts(
    small_corpus, tmp_path, procs
):
    from fedjax_lm import store as store_lib
    from tests.test_deploy import Procs, assert_equals_simulation, final_params, make_config, wait_until

    bad = {**CRAWLED, "silo": "lines", "legal_basis": "none"}
    folder = write_cards(
        tmp_path / "cards", datasets={"lines": bad}
    )  # code, prose: generated from the corpus
    config, spec = make_config(small_corpus, tmp_path, rounds=3, deadline_s=8.0, signed=True)
    config.federation.compliance.cards = folder
    (tmp_path / "config.json").write_text(config.to_json_best_effort())
    p = procs["p"] = Procs(tmp_path, spec)
    store = store_lib.Store(p.store)
    p.aggregator()
    p.silo("code")
    p.silo("prose")
    wait_until(lambda: (store.latest_global() or 0) >= 1, what="round 0 to close without lines")
    p.silo("lines")  # joins in round 1, publishing its (signed) card first
    p.wait("aggregator")
    for s in ("code", "prose", "lines"):
        p.wait(s)
    meta2 = store.read_global_meta(2)  # the close of round 1
    assert (
        "lines" not in meta2["accepted"] and "excluded by the compliance gate" in meta2["rejected"]["lines"]
    )
    assert "GDPR Art. 6(1)" in meta2["rejected"]["lines"]
    assert "lines" not in store.read_global_meta(2)["sampled"]  # and no longer sampled
    history = [json.loads(x) for x in open(tmp_path / "agg" / "compliance" / "history.jsonl")]
    triggers = [(h["round"], h["trigger"]) for h in history]
    assert triggers[0] == (0, "start") and (1, "silo lines joined") in triggers, triggers
    assert "uploaded" in p.log("lines")  # it trained and uploaded; the gate kept the update out
    got, _ = final_params(config, p.store, 3)
    assert_equals_simulation(config, tmp_path, got)  # the simulation excludes it from the start
    # lifecycle: the silos metered their training and the aggregator's rows and summary carry it
    rows = [json.loads(x) for x in open(tmp_path / "agg" / "metrics" / "rounds.jsonl")]
    assert all(r["energy_kwh"] > 0 and r["energy_source"].startswith("reported by the silos: ") for r in rows)
    assert all(f"energy_kwh/{s}" in rows[1] for s in rows[1]["accepted"])
    summary = json.loads((tmp_path / "agg" / "summary.json").read_text())
    assert summary["energy"]["energy_kwh"] == pytest.approx(sum(r["energy_kwh"] for r in rows))
    # the aggregator's documents list the published cards of the silos whose updates counted: not lines
    content = json.loads((tmp_path / "agg" / "reports" / "training_content_summary.json").read_text())
    listed = {e["silo"] for entries in content["2_list_of_data_sources"].values() for e in entries}
    assert listed == {"code", "prose"}


def test_missing_answers_stay_unknown_where_a_no_would_change_the_verdict(tmp_path):
    # Art. 6(3) unstated for an Annex III purpose: high-risk status unknown, not assumed
    system = {**PROJECT, "kind": "ai_system", "intended_purposes": ["employment"]}
    v = verdict_of(tmp_path, project=system, measured_flop=1e18)
    assert v.classification["high_risk"] is None and not v.unmet
    assert any(f.article == "Art. 6" for f in v.unknown)
    # documentation not in place, but whether the open-source exemption applies is unknown (no FLOP known,
    # so systemic risk is unknown): unknown, not unmet
    v = verdict_of(tmp_path, project={**PROJECT, "technical_documentation": False})
    assert v.classification["systemic_risk"] is None and v.classification["open_source_exemption"] is None
    assert not v.unmet and any(f.field == "technical_documentation" for f in v.unknown)
    # a trained model card without licence: the exemption is unknown as well
    v = verdict_of(tmp_path, project={**PROJECT, "technical_documentation": False}, measured_flop=1e18,
                   models={"trained": {"name": "m", "kind": "trained"}})  # fmt: skip
    assert not v.unmet and v.classification["open_source_exemption"] is None
    # Art. 50(1) unstated: unknown
    unstated = {k: x for k, x in PROJECT.items() if k != "interacts_with_people"}
    v = verdict_of(tmp_path, project=unstated, measured_flop=1e18)
    assert [f.article for f in v.unknown] == ["Art. 50(1)"]


def test_out_of_scope_projects_still_answer_to_the_gdpr(tmp_path):
    research = {**PROJECT, "scientific_research_only": True}
    v = verdict_of(tmp_path, project=research, datasets={"forum": {**CRAWLED, "legal_basis": "none"}})
    assert v.status == "out_of_scope"
    assert [(f.article, f.field) for f in v.unmet] == [("GDPR Art. 6(1)", "legal_basis")]


def test_a_card_number_too_large_for_a_float_is_refused_not_a_crash():
    with pytest.raises(compliance.CardError, match="field 'size_tokens'"):
        cards_lib.parse("data", {**LICENSED, "size_tokens": 10**400}, "store:cards/datasets/news.json")


def test_an_unreadable_silo_card_excludes_that_silo_and_does_not_stop_the_gate(tmp_path):
    from fedjax_lm.compliance import gate as gate_lib

    folder = write_cards(tmp_path / "cards", datasets={"news": LICENSED})
    (tmp_path / "cards" / "datasets" / "forum.yaml").write_text("licence: [unclosed\n")
    silos = ["news", "forum"]
    gate = gate_lib.Gate(
        {**gate_lib.default_config(), "cards": folder}, str(tmp_path / "w"), silos, log=lambda m: None
    )
    cards = gate_lib.local_data_cards(folder, silos, None)
    excluded = gate.check(0, cards, measured_flop=1e15)
    assert list(excluded) == ["forum"] and "not valid YAML" in excluded["forum"][0]
