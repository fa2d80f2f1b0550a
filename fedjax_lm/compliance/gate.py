"""The compliance gate of the round: the AI Act analysis before the first round and whenever the
ingredients change, and what it decides for each silo.

`federation.compliance.cards` names the project's cards folder (project.yaml, models/, and optionally
datasets/<silo>.yaml); empty turns the gate off. A silo's Data card is its own (in the simulation the
folder's datasets/<silo>.yaml, else the one generated from the prepared corpus; in a deployment the
card the silo published to the store, signed) . `Gate.check` runs the analysis when the cards differ
from the last check (the first round; a silo joins, changes or withdraws its card) and decides:

- a prohibited practice (Art. 5), or a Project card that cannot be read, stops the run (`ComplianceStop`);
- a silo with an unmet obligation on its own Data card, an unreadable card, or (`require_data_card`) no
  card at all is excluded from the rounds until its card changes (`policy="exclude"`, logged with the
  reasons), or stops the run (`policy="stop"`);
- everything else (unknowns, and the project's own obligations such as Art. 53(1)(d), met at release by
  `report`) is recorded, not enforced.

Every analysis is written to WORKDIR/compliance/: verdict.json and report.md (the latest) and one line of
history.jsonl per analysis (round, trigger, status, excluded silos and why).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

from fedjax_lm import energy
from fedjax_lm.compliance import analysis
from fedjax_lm.compliance import cards as cards_lib
from fedjax_lm.compliance import corpus_cards

POLICIES = ("exclude", "stop")


def default_config() -> dict[str, Any]:
    return dict(
        cards="",  # the project's cards folder; "" = no gate
        policy="exclude",  # a silo whose own Data card fails: "exclude" it, or "stop" the run
        require_data_card=True,  # a silo with no Data card at all counts as failing
        energy=energy.default_config(),  # lifecycle monitoring: how training energy is metered (energy.py)
    )


def check_config(cfg: Mapping[str, Any]) -> None:
    energy.check_config(cfg["energy"])
    if cfg["policy"] not in POLICIES:
        raise ValueError(f"federation.compliance.policy must be one of {POLICIES}, got {cfg['policy']!r}")
    folder = str(cfg["cards"])
    if folder and not os.path.isdir(os.path.expanduser(folder)):
        raise ValueError(
            f"federation.compliance.cards={folder}: no such folder (project.yaml, models/, datasets/)"
        )


class ComplianceStop(ValueError):
    """The analysis forbids going on: a prohibited practice, an unreadable Project card, or a failing
    silo under policy "stop". The message holds every reason."""


def local_data_cards(folder: str, silos: Sequence[str], corpus_dir: str | None) -> dict[str, Any]:
    """{silo: Card, or why it has none usable} from folder/datasets/<silo>.* (no folder: none) or the
    corpus's corpus.json."""
    out: dict[str, Any] = {}
    generated = None
    for silo in silos:
        own = folder and [
            os.path.join(folder, "datasets", f"{silo}{ext}")
            for ext in (".yaml", ".yml", ".json")
            if os.path.exists(os.path.join(folder, "datasets", f"{silo}{ext}"))
        ]
        if own:
            try:
                out[silo] = cards_lib.load_data_card(own[0], silo)
            except (cards_lib.CardError, OSError) as e:
                out[silo] = f"its Data card cannot be used: {e}"
            continue
        if corpus_dir is not None:
            if generated is None:
                try:
                    generated = corpus_cards.data_cards(corpus_dir)
                except (FileNotFoundError, ValueError):
                    generated = {}
            if silo in generated:
                out[silo] = cards_lib.parse("data", generated[silo], f"{corpus_dir}/corpus.json#{silo}")
    return out


class Gate:
    """One federation's gate (see the module docstring); `excluded` maps silo -> reasons."""

    def __init__(self, cfg: Mapping[str, Any], workdir: str | None, silos: Sequence[str], log=print):
        self.folder = os.path.expanduser(str(cfg["cards"]))
        self.policy, self.require = str(cfg["policy"]), bool(cfg["require_data_card"])
        self.silos = list(silos)
        self.out = os.path.join(workdir, "compliance") if workdir else None
        self.log = log
        self.excluded: dict[str, list[str]] = {}
        self._seen: dict[str, str] | None = None  # silo -> its card's digest at the last analysis

    @property
    def on(self) -> bool:
        return bool(self.folder)

    def check(
        self,
        r: int,
        data_cards: Mapping[str, Any],
        *,
        measured_flop: float | None = None,
        projected_flop: float | None = None,
        absent_ok: Sequence[str] = (),
    ) -> dict[str, list[str]]:
        """The silos excluded from round r on, re-analysed if the cards changed. `data_cards`: {silo:
        Card, or a string saying why its card is unusable}; a silo in `absent_ok` with no card yet (a
        deployment silo that has not joined) is not held against it."""
        if not self.on:
            return {}
        try:
            project = cards_lib.load_project(self.folder)  # the silos' cards are each silo's own
        except (cards_lib.CardError, OSError) as e:
            raise ComplianceStop(f"the project's cards cannot be analysed: {e}") from None
        digests = {
            "(project)": _digest([project.project.fields, {k: m.fields for k, m in project.models.items()}])
        }
        for silo in self.silos:
            card = data_cards.get(silo)
            digests[silo] = _digest(card.fields if isinstance(card, cards_lib.Card) else card)
        if digests == self._seen:
            return self.excluded
        trigger = self._trigger(digests, r)
        usable = {s: c for s, c in data_cards.items() if isinstance(c, cards_lib.Card)}
        verdict = analysis.analyse(
            cards_lib.CardSet(project.project, usable, project.models),
            measured_flop=measured_flop,
            projected_flop=projected_flop,
        )
        excluded: dict[str, list[str]] = {}
        for silo in self.silos:
            card = data_cards.get(silo)
            if isinstance(card, str):
                excluded[silo] = [card]
            elif card is None:
                if self.require and silo not in absent_ok:
                    excluded[silo] = ["no Data card (federation.compliance.require_data_card)"]
            else:
                unmet = [
                    f"{f.article}: {f.reason} (field {f.field})" for f in verdict.unmet if f.card == card.path
                ]
                if unmet:
                    excluded[silo] = unmet
        self._record(r, trigger, verdict, excluded)
        self._seen = digests
        if verdict.status == "prohibited":
            raise ComplianceStop(
                "a prohibited practice (Art. 5) stops the run: "
                + "; ".join(f"{f.article} {f.reason}" for f in verdict.unmet)
            )
        if excluded and self.policy == "stop":
            raise ComplianceStop(
                "federation.compliance.policy=stop: "
                + "; ".join(f"silo {s}: {', '.join(why)}" for s, why in sorted(excluded.items()))
            )
        for silo, why in sorted(excluded.items()):
            if self.excluded.get(silo) != why:
                self.log(f"[compliance] round {r}: silo {silo} EXCLUDED: {'; '.join(why)}")
        for silo in sorted(set(self.excluded) - set(excluded)):
            self.log(f"[compliance] round {r}: silo {silo} is admitted again (its card changed)")
        self.excluded = excluded
        return excluded

    def _trigger(self, digests: Mapping[str, str], r: int) -> str:
        if self._seen is None:
            return "start" if r == 0 else "resume"
        changes = []
        for key in digests:
            before, now = self._seen.get(key), digests[key]
            if before == now:
                continue
            if key == "(project)":
                changes.append("the project's cards changed")
            elif before == _digest(None):
                changes.append(f"silo {key} joined")
            elif now == _digest(None):
                changes.append(f"silo {key} withdrew its card")
            else:
                changes.append(f"silo {key}'s card changed")
        return "; ".join(changes)

    def _record(self, r: int, trigger: str, verdict: analysis.Verdict, excluded: Mapping[str, list[str]]):
        where = f" ({os.path.join(self.out, 'report.md')})" if self.out else ""
        self.log(
            f"[compliance] round {r}: analysis ({trigger}): {verdict.status}, {len(verdict.unmet)} unmet, "
            f"{len(verdict.unknown)} unknown; silos excluded: {', '.join(sorted(excluded)) or 'none'}{where}"
        )
        if self.out is None:
            return
        os.makedirs(self.out, exist_ok=True)
        for name, text in (
            ("verdict.json", json.dumps({**verdict.to_json(), "excluded": dict(excluded)}, indent=1)),
            ("report.md", analysis.report(verdict)),
        ):
            tmp = os.path.join(self.out, f".{name}.tmp")
            with open(tmp, "w") as f:
                f.write(text)
            os.replace(tmp, os.path.join(self.out, name))
        line = {
            "round": r,
            "trigger": trigger,
            "status": verdict.status,
            "excluded": dict(excluded),
            "unmet": len(verdict.unmet),
            "unknown": len(verdict.unknown),
            "time": time.time(),
        }
        with open(os.path.join(self.out, "history.jsonl"), "a") as f:
            f.write(json.dumps(line) + "\n")


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()
