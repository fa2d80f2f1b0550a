"""A silo's Data card through the store, for the aggregator's compliance gate (compliance/gate.py).

    cards/datasets/<silo>.json    {"card": {...Data card fields...}, "from": silo, "signature": ...}

A silo publishes its card when it joins and again whenever it changes (its own
`federation.compliance.cards`/datasets/<silo>.yaml, else the card generated from its prepared
corpus); only metadata leaves the silo. The message is signed in a domain of its own and carries the
run's id, so neither a forger nor another member can publish a card in a silo's name, and a card signed
for another run is refused. (Within one run, a stale card of the same silo could be written back by
anyone with write access to the store until the silo republishes: no sequence number yet.) The aggregator reads every member's card
before it closes a round: a card that is missing, unsigned or invalid is reported as such, and the gate
decides what that means for the silo.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fedjax_lm.compliance import cards as cards_lib
from fedjax_lm.compliance import gate as gate_lib
from fedjax_lm.deploy.channel import Channel, MessageError
from fedjax_lm.deploy.common import Trust, log

CARD_DOMAIN = b"fedjax_lm/data-card/v1"
PREFIX = "cards/datasets"


def key(silo: str) -> str:
    return f"{PREFIX}/{silo}.json"


def channel(store: Any, trust: Trust, me: str) -> Channel:
    return Channel(store, trust, me, domain=CARD_DOMAIN, max_bytes=cards_lib.MAX_CARD_BYTES)


def own_card(config: Any, silo: str, corpus_dir: str) -> dict[str, Any]:
    """This silo's Data card fields: its own card file, else the one generated from its corpus."""
    folder = str(config.federation.compliance.cards or "")
    card = gate_lib.local_data_cards(folder, [silo], corpus_dir).get(silo)
    if isinstance(card, str):  # the silo's own file is bad: its own input, refused here with the reason
        raise cards_lib.CardError(f"silo {silo}: {card}")
    if card is None:
        raise cards_lib.CardError(f"silo {silo}: no Data card and no prepared corpus to generate one from")
    return dict(card.fields)


def publish(store: Any, trust: Trust, silo: str, fields: dict[str, Any], run_id: str) -> bool:
    """Writes the card (bound to the run) unless the store already holds this silo's same card for this
    run; True if written."""
    ch = channel(store, trust, silo)
    try:
        current = ch.get(key(silo), silo)
    except MessageError:
        current = None  # someone else's or a damaged file: replaced
    if current is not None and current.get("card") == fields and current.get("run_id") == run_id:
        return False
    ch.put(key(silo), {"card": fields, "run_id": run_id})
    log(silo, f"published its Data card ({key(silo)})")
    return True


def read_all(store: Any, trust: Trust, silos: Sequence[str], run_id: str) -> dict[str, Any]:
    """{silo: Card, or why its published card cannot be used}; silos with no card are left out. A card
    signed for another run (a replay from another federation) or naming another silo is not usable."""
    out: dict[str, Any] = {}
    for silo in silos:
        ch = channel(store, trust, "aggregator")
        try:
            msg = ch.get(key(silo), silo)
        except MessageError as e:
            out[silo] = f"its published Data card cannot be used: {e}"
            continue
        if msg is None:
            continue
        if msg.get("run_id") != run_id:
            out[silo] = (
                f"its published Data card was signed for another run ({str(msg.get('run_id'))[:16]!r})"
            )
            continue
        try:
            card = cards_lib.parse("data", msg.get("card"), f"store:{key(silo)}")
        except cards_lib.CardError as e:
            out[silo] = f"its published Data card is invalid: {e}"
            continue
        if card.get("silo", silo) != silo:
            out[silo] = f"its published Data card names silo {card.get('silo')!r}"
            continue
        out[silo] = card
    return out
