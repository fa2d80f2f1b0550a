"""Secure aggregation over the store: the message flow of `fedjax_lm.secagg`, one round at a time.

Store layout of round r (every object written atomically, signed by its writer when the federation is
signed, size-capped and schema-checked by its readers)::

    secagg/<r>/keys/<silo>.json       a sampled silo's two X25519 public keys         (AdvertiseKeys)
    secagg/<r>/U1.json                aggregator: the members and the keys it accepted
    secagg/<r>/shares/<silo>.json     a member's Shamir shares, one AES-GCM ciphertext per member (ShareKeys)
    secagg/<r>/U2.json                aggregator: the senders whose shares count, with each file's sha256
    updates/<r>/<silo>/               the masked ring update, committed as any update  (MaskedInput)
    secagg/<r>/U3.json                aggregator: survivors and dropped, or why the round aborted
    secagg/<r>/unmask/<silo>.json     a survivor's response, sealed to the aggregator  (Unmasking)

The lists carry what they decide (U1 the public keys themselves, U2 the hashes of the share files),
so a member that rewrites its keys or shares after a list was published changes nothing. A silo
keeps its protocol state (private keys, self-mask seed, the shares it holds, what it answered) in
its own workdir, written before anything derived from it goes to the store: a silo killed at any
point restarts with the same keys and re-sends the same bytes it may already have sent. The
aggregator derives its round key from its private secret (`secure.aggregator_key`).

Timing: keys and shares close when every expected member has written, or `secagg.phase_s` after the
phase started once t have; the masked inputs close like a plain round (all of U2, or the round's
deadline), and then fewer than t survivors abort the round; the unmasking phase waits for every
survivor or `phase_s` once t answered. An aborted round publishes the next global with the params
unchanged and the reason in its meta: no sum of the round is ever computed.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import x25519

from fedjax_lm import ring
from fedjax_lm import secagg
from fedjax_lm.deploy.channel import Channel, MessageError
from fedjax_lm.deploy.common import Trust, log

PREFIX = "secagg"
MESSAGE_DOMAIN = b"fedjax_lm/secagg-message/v1"
MAX_MESSAGE_BYTES = 8 << 20  # a shares file holds one ~400-byte ciphertext per member


class ProtocolError(MessageError):
    """A protocol message that cannot be used (missing signature, wrong sender, malformed)."""


def path(r: int, kind: str, silo: str | None = None) -> str:
    if kind in ("U1", "U2", "U3"):
        return f"{PREFIX}/{int(r)}/{kind}.json"
    return f"{PREFIX}/{int(r)}/{kind}/{silo}.json"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: Any, what: str) -> bytes:
    if not isinstance(text, str):
        raise ProtocolError(f"{what} is not base64 text")
    try:
        return base64.b64decode(text, validate=True)
    except ValueError:
        raise ProtocolError(f"{what} is not valid base64") from None


def channel(store: Any, trust: Trust, me: str) -> Channel:
    """`me`'s signed-message channel in the secure-aggregation domain."""
    return Channel(store, trust, me, domain=MESSAGE_DOMAIN, max_bytes=MAX_MESSAGE_BYTES)


def wait_phase(
    collect: Callable[[], dict[str, Any]],
    expected: Sequence[str],
    need: int,
    deadline: float,
    poll_s: float,
    what: str,
) -> dict[str, Any]:
    """Polls `collect()` until every expected member is in it, or the deadline once `need` are."""
    shown = None
    while True:
        got = collect()
        if set(expected) <= set(got):
            return got
        now = time.time()
        if now >= deadline and len(got) >= need:
            log(
                "aggregator",
                f"{what}: closing with {len(got)}/{len(expected)} (missing {sorted(set(expected) - set(got))})",
            )
            return got
        if sorted(got) != shown:
            log("aggregator", f"{what}: {len(got)}/{len(expected)} in {sorted(got)}, {need} needed")
            shown = sorted(got)
        time.sleep(poll_s)


# ------------------------------------------------------------------------------ the silo's state


def _private_b64(key: x25519.X25519PrivateKey) -> str:
    raw = key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    return _b64(raw)


def state_to_json(state: secagg.SiloState, outbox: Mapping[str, bytes] | None) -> dict[str, Any]:
    fp = state.spec.fixed_point
    return {
        "name": state.name,
        "spec": {
            "run_id": state.spec.run_id,
            "round": state.spec.round,
            "threshold": state.spec.threshold,
            "bound": fp.bound,
            "max_summands": fp.max_summands,
            "ring_bits": fp.ring_bits,
        },
        "enc_key": _private_b64(state.enc_key),
        "mask_key": _private_b64(state.mask_key),
        "members": list(state.members),
        "public_keys": {n: k.to_json() for n, k in state.public_keys.items()},
        "self_seed": None if state.self_seed is None else _b64(state.self_seed),
        "share_senders": list(state.share_senders),
        "held": {n: [b.to_json(), s.to_json()] for n, (b, s) in state.held.items()},
        "answered": None if state.answered is None else [list(state.answered[0]), list(state.answered[1])],
        "outbox": None if outbox is None else {n: _b64(c) for n, c in outbox.items()},
    }


def state_from_json(obj: Mapping[str, Any]) -> tuple[secagg.SiloState, dict[str, bytes] | None]:
    sp = obj["spec"]
    spec = secagg.RoundSpec(
        run_id=sp["run_id"],
        round=int(sp["round"]),
        threshold=int(sp["threshold"]),
        fixed_point=ring.FixedPoint(float(sp["bound"]), int(sp["max_summands"]), int(sp["ring_bits"])),
    )
    key = lambda name: x25519.X25519PrivateKey.from_private_bytes(_unb64(obj[name], name))  # noqa: E731
    state = secagg.SiloState(
        name=obj["name"],
        spec=spec,
        enc_key=key("enc_key"),
        mask_key=key("mask_key"),
        members=tuple(obj["members"]),
        public_keys={n: secagg.PublicKeys.from_json(k) for n, k in obj["public_keys"].items()},
        self_seed=None if obj["self_seed"] is None else _unb64(obj["self_seed"], "self_seed"),
        share_senders=tuple(obj["share_senders"]),
        held={n: (secagg.Share.from_json(b), secagg.Share.from_json(s)) for n, (b, s) in obj["held"].items()},
        answered=None if obj["answered"] is None else (tuple(obj["answered"][0]), tuple(obj["answered"][1])),
    )
    outbox = None if obj["outbox"] is None else {n: _unb64(c, "outbox") for n, c in obj["outbox"].items()}
    return state, outbox


class SiloProtocol:
    """One silo's side of secure aggregation, round by round, with its state in its own workdir."""

    def __init__(self, store: Any, trust: Trust, name: str, workdir: str, poll_s: float):
        self.ch = channel(store, trust, name)
        self.store, self.name, self.poll = store, name, poll_s
        self.dir = os.path.join(workdir, "secagg")
        self.state: secagg.SiloState | None = None
        self.outbox: dict[str, bytes] | None = None

    # -- persistence: written (0600, atomically) before anything derived from it leaves the silo
    def _file(self, r: int) -> str:
        return os.path.join(self.dir, f"{int(r)}.json")

    def _save(self) -> None:
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        target = self._file(self.state.spec.round)
        tmp = f"{target}.tmp.{os.getpid()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(state_to_json(self.state, self.outbox), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
        for name in os.listdir(self.dir):  # keys of finished rounds are not needed again
            if name.endswith(".json") and name[:-5].isdigit() and int(name[:-5]) < self.state.spec.round - 1:
                os.unlink(os.path.join(self.dir, name))

    def _load(self, spec: secagg.RoundSpec) -> bool:
        try:
            with open(self._file(spec.round)) as f:
                self.state, self.outbox = state_from_json(json.load(f))
        except FileNotFoundError:
            return False
        if self.state.spec != spec:
            raise ProtocolError(
                f"round {spec.round}: the saved secure-aggregation state of {self.name!r} is for another round "
                f"setting ({self.state.spec} vs {spec}); delete {self._file(spec.round)} to drop out of this round"
            )
        return True

    # -- waiting for the aggregator's lists (None: the round closed without this silo)
    def _wait_list(self, r: int, kind: str) -> dict[str, Any] | None:
        while True:
            try:
                msg = self.ch.get(path(r, kind), secagg.AGGREGATOR)
            except MessageError as e:
                raise ProtocolError(f"round {r}: {kind}: {e}") from None
            if msg is not None:
                return msg
            if (self.store.latest_global() or 0) > r:
                return None
            time.sleep(self.poll)

    def load(self, spec: secagg.RoundSpec) -> bool:
        """After a restart with the masked input already committed: the state to answer U3 with."""
        return self._load(spec) and bool(self.state.share_senders)

    def begin(self, spec: secagg.RoundSpec) -> bool:
        """AdvertiseKeys then ShareKeys. False: this silo is not in the round's key set (it trains but
        does not upload, like a late silo)."""
        r = spec.round
        if not self._load(spec):
            self.state, public = secagg.advertise_keys(self.name, spec)
            self.outbox = None
            self._save()
        own = secagg.PublicKeys(
            enc=secagg.public_bytes(self.state.enc_key), mask=secagg.public_bytes(self.state.mask_key)
        )
        if self.ch.raw(path(r, "U1")) is None:
            self.ch.put(path(r, "keys", self.name), {"round": r, "keys": own.to_json()})
        u1 = self._wait_list(r, "U1")
        if u1 is None:
            return False
        members = {n: secagg.PublicKeys.from_json(k, f"U1 keys of {n}") for n, k in u1["members"].items()}
        if members.get(self.name) != own:
            log(self.name, f"round {r}: not in the secure-aggregation key set (U1); sitting the round out")
            return False
        if self.outbox is None:
            self.outbox = secagg.share_keys(self.state, members)
            self._save()
        if self.ch.raw(path(r, "U2")) is None:
            self.ch.put(
                path(r, "shares", self.name), {"round": r, "to": {n: _b64(c) for n, c in self.outbox.items()}}
            )
        return True

    def mask(self, r: int, contribution: Any) -> tuple[Any, int] | None:
        """MaskedInput: (masked ring tree, saturated entries), or None if this silo is not in U2."""
        u2 = self._wait_list(r, "U2")
        if u2 is None or self.name not in u2["senders"]:
            log(self.name, f"round {r}: not among the senders of shares (U2); not uploading")
            return None
        if not self.state.share_senders:
            ciphertexts = {}
            for sender, digest in sorted(u2["senders"].items()):
                data = self.ch.raw(path(r, "shares", sender))
                if data is None or hashlib.sha256(data).hexdigest() != digest:
                    raise ProtocolError(f"round {r}: the shares of {sender!r} are not the ones U2 lists")
                msg = self.ch.get(path(r, "shares", sender), sender, data)
                ciphertexts[sender] = _unb64(msg["to"].get(self.name), f"share from {sender}")
            secagg.receive_shares(self.state, ciphertexts)
            self._save()
        return secagg.mask_update(self.state, contribution)

    def respond(self, r: int) -> None:
        """Unmasking: answers U3 when this silo is a survivor (after its masked input was committed)."""
        if self.state is None or not self.state.share_senders:
            return
        u3 = self._wait_list(r, "U3")
        if u3 is None or u3.get("aborted") or self.name not in u3.get("survivors", []):
            return
        if self.ch.raw(path(r, "unmask", self.name)) is not None and self.state.answered is not None:
            return
        aggregator_public = _unb64(u3["aggregator_key"], "aggregator_key")
        blob = secagg.unmask_response(self.state, u3["survivors"], u3["dropped"], aggregator_public)
        self._save()  # records what it answered: it never answers other lists for this round
        self.ch.put(path(r, "unmask", self.name), {"round": r, "response": _b64(blob)})
        log(self.name, f"round {r}: answered the unmasking request ({len(u3['dropped'])} dropped)")


# ------------------------------------------------------------------------------ the aggregator's side


class AggregatorProtocol:
    """The aggregator's side of one round: the lists, the survivors' check and the unmasking."""

    def __init__(
        self,
        store: Any,
        trust: Trust,
        spec: secagg.RoundSpec,
        key: x25519.X25519PrivateKey,
        phase_s: float,
        poll_s: float,
    ):
        self.ch = channel(store, trust, secagg.AGGREGATOR)
        self.store, self.spec, self.key = store, spec, key
        self.phase_s, self.poll = phase_s, poll_s
        self.r = spec.round

    def _list(self, kind: str) -> dict[str, Any] | None:
        return self.ch.get(path(self.r, kind), secagg.AGGREGATOR)

    def _publish(self, kind: str, body: Mapping[str, Any]) -> dict[str, Any]:
        self.ch.put(path(self.r, kind), {"round": self.r, **body})
        return self._list(kind)

    def _valid(self, kind: str, silo: str, check: Callable[[dict[str, Any]], Any]) -> Any:
        try:
            msg = self.ch.get(path(self.r, kind, silo), silo)
            if msg is None:
                return None
            if msg.get("round") != self.r:
                raise ProtocolError(f"names round {msg.get('round')!r}")
            return check(msg)
        except (ProtocolError, ValueError, KeyError, TypeError) as e:
            log("aggregator", f"round {self.r}: ignoring {kind} of {silo}: {e}")
            return None

    def members(self, sampled: Sequence[str]) -> dict[str, secagg.PublicKeys]:
        """U1 (published once; a restarted aggregator reuses it)."""
        u1 = self._list("U1")
        if u1 is None:
            start = time.time()

            def collect():
                got = {}
                for s in sampled:
                    k = self._valid(
                        "keys", s, lambda m, s=s: secagg.PublicKeys.from_json(m["keys"], f"keys of {s}")
                    )
                    if k is not None:
                        got[s] = k
                return got

            keys = wait_phase(
                collect, sampled, self.spec.threshold, start + self.phase_s, self.poll, f"round {self.r} keys"
            )
            u1 = self._publish("U1", {"members": {s: k.to_json() for s, k in sorted(keys.items())}})
        return {s: secagg.PublicKeys.from_json(k) for s, k in u1["members"].items()}

    def senders(self, members: Sequence[str]) -> list[str]:
        """U2: the members whose shares (for every member) arrived."""
        u2 = self._list("U2")
        if u2 is None:
            start = time.time()

            def check(msg):
                to = msg["to"]
                if not isinstance(to, dict) or set(to) != set(members):
                    raise ProtocolError("its shares are not addressed to exactly the members of U1")
                return True

            def collect():
                got = {}
                for s in members:
                    if self._valid("shares", s, check):
                        got[s] = hashlib.sha256(self.ch.raw(path(self.r, "shares", s))).hexdigest()
                return got

            digests = wait_phase(
                collect,
                members,
                self.spec.threshold,
                start + self.phase_s,
                self.poll,
                f"round {self.r} shares",
            )
            u2 = self._publish("U2", {"senders": dict(sorted(digests.items()))})
        return sorted(u2["senders"])

    def survivors(
        self, senders: Sequence[str], committed: Sequence[str]
    ) -> tuple[list[str], list[str], str | None]:
        """U3: (survivors, dropped, why the round aborts or None)."""
        u3 = self._list("U3")
        if u3 is None:
            survivors = sorted(set(committed) & set(senders))
            dropped = sorted(set(senders) - set(survivors))
            try:
                secagg.check_survivors(self.spec, senders, survivors)
                body = {
                    "survivors": survivors,
                    "dropped": dropped,
                    "aggregator_key": _b64(secagg.public_bytes(self.key)),
                }
            except secagg.SecAggAbort as e:
                body = {"survivors": survivors, "dropped": dropped, "aborted": str(e)}
            u3 = self._publish("U3", body)
        return list(u3["survivors"]), list(u3["dropped"]), u3.get("aborted")

    def unmask(
        self,
        masked_sum: Any,
        members: Mapping[str, secagg.PublicKeys],
        survivors: Sequence[str],
        dropped: Sequence[str],
    ) -> Any:
        """The survivors' ring sum without masks; SecAggAbort if fewer than t valid responses arrive."""
        start = time.time()

        def opened(msg, s):
            return secagg.open_response(self.key, self.spec, s, _unb64(msg["response"], "response"), members)

        def collect():
            got = {}
            for s in survivors:
                body = self._valid("unmask", s, lambda m, s=s: opened(m, s))
                if body is not None:
                    got[s] = body
            return got

        deadline = start + self.phase_s
        while True:
            responses = collect()
            if set(survivors) <= set(responses) or (
                time.time() >= deadline and len(responses) >= self.spec.threshold
            ):
                break
            if time.time() >= deadline + self.phase_s:  # a second phase without t answers: give up
                raise secagg.SecAggAbort(
                    f"round {self.r}: only {len(responses)} of the {self.spec.threshold} unmasking responses needed "
                    f"arrived within {2 * self.phase_s:.0f}s; the round is aborted and nothing is published"
                )
            time.sleep(self.poll)
        return secagg.unmask(masked_sum, self.spec, members, survivors, dropped, responses)

    def message_bytes(self, names: Sequence[str]) -> int:
        """Bytes of the round's protocol messages in the store (keys, lists, shares, responses): the
        traffic secure aggregation adds to the masked updates themselves."""
        keys = [path(self.r, k) for k in ("U1", "U2", "U3")]
        keys += [path(self.r, kind, n) for kind in ("keys", "shares", "unmask") for n in names]
        return sum(len(self.ch.raw(k) or b"") for k in keys)
