"""Data cards filled in from what `prepare` recorded in a corpus's corpus.json.

What prepare knows goes in: the sources each silo mixes (package and version, or folder / file), their
licences (mapped to SPDX ids), the tokens, the sha256 of the text, the date the corpus was built.
What it cannot know stays out, so the analysis reports it as unknown for the silo's owner to answer:
whether the text holds personal data, its legal basis, the intended purposes. The default corpus's
Debian packages are publicly available (source_category "public") under the open licence their
copyright file states, which grants the use: no text-and-data-mining exception is relied on
(tdm_opt_out_method "licence_terms"). Other sources (a user's folder or JSONL) are the owner's to
describe: their category and TDM status stay unknown.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

# Debian copyright-file names (as `data.debian.licences_of` reads them) to SPDX ids.
_SPDX = {
    "BSD": "LicenseRef-BSD-unspecified",
    "GPL-2": "GPL-2.0-only",
    "GPL-2+": "GPL-2.0-or-later",
    "GPL-3": "GPL-3.0-only",
    "GPL-3+": "GPL-3.0-or-later",
    "GPL-3.0+": "GPL-3.0-or-later",
    "LGPL-2.1": "LGPL-2.1-only",
    "public-domain": "LicenseRef-public-domain",
    "PSF-2.0 (Python licence)": "PSF-2.0",
}


def spdx_id(licence: str) -> str:
    """An SPDX id for a licence name as prepare recorded it (LicenseRef-... when there is none)."""
    if licence in _SPDX:
        return _SPDX[licence]
    return "LicenseRef-" + (re.sub(r"[^A-Za-z0-9.\-]+", "-", licence).strip("-") or "unknown")


def _size_range(tokens: float) -> str:
    for limit, name in ((1e6, "<1M tokens"), (1e9, "1M-1B tokens"), (1e12, "1B-1T tokens")):
        if tokens < limit:
            return name
    return ">1T tokens"


def data_cards(corpus_dir: str) -> dict[str, dict[str, Any]]:
    """{silo: Data card fields} for every silo of the prepared corpus at `corpus_dir`."""
    path = os.path.join(corpus_dir, "corpus.json")
    try:
        with open(path) as f:
            info = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{path}: no prepared corpus (python -m fedjax_lm prepare --config ...)"
        ) from None
    sources, cards = info.get("sources", {}), {}
    for silo, meta in sorted(info.get("silos", {}).items()):
        mix = sorted(meta.get("mix", {}) or {silo: 1.0})
        used = [sources.get(name, {}) for name in mix]
        # a licence prepare could not read is no licence: left out (unknown to the analysis)
        known = [
            str(s["licence"]) for s in used if s.get("licence") and str(s["licence"]).lower() != "unknown"
        ]
        licences = sorted({spdx_id(x) for x in known})
        tokens = float(meta.get("train_tokens", 0)) + float(meta.get("val_tokens", 0))
        card: dict[str, Any] = {
            "name": f"{silo} ({', '.join(mix)})",
            "silo": silo,
            "version": ", ".join(
                f"{s.get('package', n)} {s.get('version', '')}".strip() for n, s in zip(mix, used)
            ),
            **(
                {
                    "source_category": "public",
                    "tdm_opt_out_checked": True,
                    "tdm_opt_out_method": "licence_terms",
                }
                if used and len(known) == len(used) and all(s.get("package") for s in used)
                else {}
            ),
            "sources": [
                f"debian:{s['package']}={s.get('version', '')}" if s.get("package") else name
                for name, s in zip(mix, used)
            ],
            "modality": "code" if any(n == "python-code" for n in mix) else "text",
            "size_range": _size_range(tokens),
            "size_tokens": tokens,
        }
        if len(licences) == 1:  # a mixture of licences is for the silo's owner to state
            card["licence"] = licences[0]
        if len(used) == 1 and isinstance(used[0].get("sha256"), str) and len(used[0]["sha256"]) == 64:
            card["sha256"] = used[0]["sha256"]
        created = str(info.get("created", ""))[:10]
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", created):
            card["latest_collection_date"] = created
        cards[silo] = card
    return cards
