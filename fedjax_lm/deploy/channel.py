"""Signed JSON messages through the store: what one member writes for another to read.

A message is a JSON object with `from` (its writer) and, in a signed federation, `signature`: the
writer's Ed25519 signature over the canonical JSON of the rest, in a domain of its own (secure
aggregation's messages, a silo's compliance card), so a signature made for one kind of message is
never valid for another. A reader refuses, with the key and the reason, a message over the size cap,
one that is not JSON, one from another writer, or one whose signature does not verify.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from fedjax_lm import identity
from fedjax_lm.deploy.common import Trust


class MessageError(ValueError):
    """A message that cannot be used (too large, malformed, wrong writer, bad signature)."""


class Channel:
    """Signed JSON messages through the store, as one member of the federation."""

    def __init__(self, store: Any, trust: Trust, me: str, *, domain: bytes, max_bytes: int):
        self.store, self.trust, self.me = store, trust, me
        self.domain, self.max_bytes = domain, int(max_bytes)
        self.bytes_written = 0

    def put(self, key: str, body: Mapping[str, Any]) -> bytes:
        msg = {**body, "from": self.me}
        if self.trust.signer is not None:
            msg["signature"] = self.trust.signer.sign(self.domain, identity.canonical_json(msg))
        data = json.dumps(msg, sort_keys=True).encode()
        self.store.objects.put(key, data)
        self.bytes_written += len(data)
        return data

    def raw(self, key: str) -> bytes | None:
        return self.store.objects.get(key)

    def get(self, key: str, sender: str, data: bytes | None = None) -> dict[str, Any] | None:
        """The message at `key` from `sender` (None if absent); MessageError if it is not usable."""
        if data is None:
            data = self.raw(key)
        if data is None:
            return None
        if len(data) > self.max_bytes:
            raise MessageError(f"{key} is {len(data):,} bytes, more than the cap of {self.max_bytes:,}")
        try:
            msg = json.loads(data)
        except ValueError:
            raise MessageError(f"{key} does not parse as JSON") from None
        if not isinstance(msg, dict) or msg.get("from") != sender:
            raise MessageError(f"{key} is not a message from {sender!r}")
        if self.trust.allow is not None:
            body = {k: v for k, v in msg.items() if k != "signature"}
            try:
                problem = self.trust.allow.verify(
                    sender, self.domain, identity.canonical_json(body), msg.get("signature")
                )
            except ValueError:
                problem = "holds non-finite numbers"
            if problem:
                raise MessageError(f"{key}: {problem}")
        return msg
