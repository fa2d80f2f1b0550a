"""Secure aggregation by pairwise additive masking (Bonawitz et al., CCS 2017), as pure functions.

The aggregator learns the sum of the surviving silos' updates and nothing else about any one of
them; a silo that drops out after sharing its keys is removed from the sum with the help of the
others (Shamir shares, threshold t of n); fewer than t survivors abort the round (`SecAggAbort`).
Security model: an honest-but-curious aggregator and store reader, colluding with fewer than t
silos; the store is readable by every member, so everything secret written there is encrypted to
its one reader. Message integrity and origin come from the store's Ed25519 signatures (identity).

Fixed-point ring
----------------
Updates are f32 pytrees; masks must cancel exactly, so each silo encodes its update into the ring
Z/2^b (b = 32 by default, numpy uint32 arithmetic that wraps) with `FixedPoint(bound, max_summands)`:
every entry is clipped to [−B, B] (the count of saturated entries is returned) and scaled by 2^f,
f the largest integer with `max_summands · round(B·2^f) ≤ 2^(b−1) − 1`; so any sum of up to
`max_summands` encodings, read as a signed b-bit integer, is the exact integer sum — it cannot
wrap. A power-of-two scale makes x·2^f exact in f64. With b = 32, B = C (a clip norm bounds every
entry) and 16 silos, f = 26: each entry is rounded to within C·2^-27 ≈ 7.5e-9·C, far below the DP
noise σC on the sum, and finer than bf16 (relative 2^-8) for every entry above C·2^-19. The upload
is 4 bytes per parameter, the same as an uncompressed f32 update (b = 64 doubles it, for rounding
within C·2^-59). Under
distributed DP, B must also cover the noise share: `elementwise_bound(C, noise_std, d)` picks
B = C + z·std with P(any of d entries saturates) ≤ `tail` (add that to δ).

Masks
-----
Silo u holds two X25519 key pairs per round (fresh each round: a dropped silo's mask key is
reconstructed and so must never be reused): `enc` for the channel that carries its shares, `mask`
for pairwise seeds. For a pair (u, v): s_uv = HKDF-SHA256(X25519(mask_u, mask_v^pub), info = domain,
purpose, run id, round, the two names in sorted order) — 32 bytes, the same on both sides, fresh
per round, pair and run. u's mask is

    mask_u = PRG(b_u) + Σ_{v > u} PRG(s_uv) − Σ_{v < u} PRG(s_uv)        (mod 2^b, names sorted)

over the silos v that completed the key-sharing step; b_u is a fresh 32-byte self-mask seed. The
PRG is the ChaCha20 keystream (RFC 8439, via `cryptography`): a stream cipher is a PRG by design,
it is specified bit for bit (the same masks on every machine and library version, unlike numpy's
`Generator` methods, which may change, or Philox, which is not a cryptographic PRG), constant-time
in software, and on the 2-core CI machine it expands ~1.8 GB/s against ~0.3 GB/s for AES-CTR. Leaf i of the tree uses the keystream of nonce i
(little-endian uint32/uint64 words), so masking streams leaf by leaf.

Dropouts: each silo splits b_u and its mask private key into Shamir shares over GF(p), p = 2^521 − 1
(a Mersenne prime: any 32-byte secret is a field element; Python integers keep the code short and
exact; n ≤ a few hundred makes the cost negligible), one share per member, each encrypted to its
recipient with AES-256-GCM under a key from their `enc` X25519 agreement (associated data: domain,
run, round, sender, recipient). After the masked inputs, for every survivor the others reveal its
b share, for every dropped silo its mask-key share — never both for one silo (`unmask_response`
checks that the lists partition the round's silos and refuses to answer a second, different
request). The aggregator reconstructs, subtracts the survivors' self-masks and the dropped silos'
pairwise masks, and decodes the exact sum of the survivors' encodings. Responses are sealed to the
aggregator's round key: otherwise every member reading the store could also unmask the sum, which
breaks central DP (the aggregator's noise would be added after others saw the sum).

Messages through the store, per round r (each written by one member, signed, committed atomically)
-------------------------------------------------------------------------------------------------
1. AdvertiseKeys — aggregator publishes the round's sample and its own X25519 key
   (`new_aggregator_key`) in the signed global meta; each sampled silo: `advertise_keys` →
   ``secagg/<r>/keys/<silo>.json`` (`PublicKeys.to_json`).
2. ShareKeys — aggregator: U1 = silos whose keys arrived by the deadline (abort if < t), signed
   ``secagg/<r>/U1.json``; each silo in U1: `share_keys(state, keys of U1)` →
   ``secagg/<r>/shares/<silo>/<recipient>.bin`` (ciphertexts, one per member including itself).
3. MaskedInput — aggregator: U2 = silos whose shares all arrived, ``secagg/<r>/U2.json``; each
   silo in U2: `receive_shares(state, {sender: ciphertext to me})`, `mask_update(state, w·z)` →
   the usual ``updates/<r>/<silo>/`` with uint32 arrays, committed. The aggregator folds committed
   masked updates into a running ring sum (`ring_add`: memory O(model)).
4. Unmasking — aggregator: U3 = committed silos (`check_survivors`: abort if < t), signed
   ``secagg/<r>/U3.json`` with survivors and dropped = U2 \\ U3; each survivor:
   `unmask_response(state, survivors, dropped, aggregator_key)` → ``secagg/<r>/unmask/<silo>.bin``;
   aggregator: `open_response` each, `unmask` once t have arrived, `decode`, publish.
`simulate_round` runs the same steps in memory (tests; the one-process driver). Each silo's
`SiloState` stays in its own memory or private folder, never in the store. Against a store that
shows different U3 lists to different silos (split view), Bonawitz's active-security version adds a
consistency round (silos sign U3 and check t signatures); that is not implemented — with t > n/2
(`check_threshold`) two disjoint quorums cannot exist, which bounds what one split view can yield.

What combines with what (`check_combination`)
---------------------------------------------
The aggregator sees masked updates and their sum only, so median / trimmed mean, per-update norm
bounds and finiteness checks cannot run (checking norms of masked updates needs zero-knowledge
proofs: out of scope); only the (weighted) mean is allowed — each silo multiplies its update by its
aggregator-assigned weight before encoding, and the ring's saturation bound B is the only limit on
one silo's influence (L∞ ≤ B). Compression must be "none": per-silo int8/bf16 encodings do not sum
in a ring (the ring encoding replaces them). DP: distributed noise composes naturally (the
aggregator never sees an un-noised value); central noise is possible (the aggregator adds noise to
the unmasked sum; silos must clip themselves, since the aggregator cannot re-clip).
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedjax_lm import shamir
from fedjax_lm.ring import FixedPoint, decode, encode, ring_sum
from fedjax_lm.shamir import SEED_BYTES, Share

PyTree = Any

DOMAIN = "fedjax_lm/secagg/v1"
AGGREGATOR = "aggregator"
KEY_PREFIX = "x25519:"


class SecAggAbort(RuntimeError):
    """The round cannot complete securely; the aggregator must publish nothing for it."""


# ------------------------------------------------------------------------------ PRG and keys


def prg(seed: bytes, stream: int, size: int, dtype: np.dtype) -> np.ndarray:
    """`size` uniform words of `dtype` (uint32/uint64): the ChaCha20 keystream of key `seed`, nonce
    `stream` (little-endian words; identical on every machine)."""
    if len(seed) != SEED_BYTES:
        raise ValueError(f"a PRG seed has {SEED_BYTES} bytes, got {len(seed)}")
    dtype = np.dtype(dtype)
    # cryptography's ChaCha20 nonce: 4-byte block counter (0) then the 12-byte nonce.
    nonce = bytes(4) + int(stream).to_bytes(8, "little") + bytes(4)
    enc = Cipher(algorithms.ChaCha20(seed, nonce), mode=None).encryptor()
    raw = enc.update(bytes(size * dtype.itemsize))
    return np.frombuffer(raw, dtype=dtype.newbyteorder("<")).astype(dtype, copy=False)


def _raw_public(key: x25519.X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _raw_private(key: x25519.X25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )


@dataclasses.dataclass(frozen=True)
class PublicKeys:
    """A silo's advertised X25519 public keys for one round."""

    enc: bytes
    mask: bytes

    def to_json(self) -> dict[str, str]:
        return {k: KEY_PREFIX + base64.b64encode(getattr(self, k)).decode() for k in ("enc", "mask")}

    @classmethod
    def from_json(cls, obj: Any, where: str = "keys") -> "PublicKeys":
        out = {}
        for k in ("enc", "mask"):
            text = obj.get(k) if isinstance(obj, dict) else None
            if not isinstance(text, str) or not text.startswith(KEY_PREFIX):
                raise ValueError(f"{where}: {k!r} must be 'x25519:<base64 of 32 bytes>'")
            raw = base64.b64decode(text[len(KEY_PREFIX) :], validate=True)
            x25519.X25519PublicKey.from_public_bytes(raw)  # validates the length
            out[k] = raw
        return cls(**out)


@dataclasses.dataclass(frozen=True)
class RoundSpec:
    """What every party of a round agrees on (from the config and the round's signed meta)."""

    run_id: str
    round: int
    threshold: int
    fixed_point: FixedPoint


def _info(purpose: str, spec: RoundSpec, a: str, b: str) -> bytes:
    return DOMAIN.encode() + b"\0" + json.dumps([purpose, spec.run_id, int(spec.round), a, b]).encode()


def _agree(private: x25519.X25519PrivateKey, peer_public: bytes, info: bytes) -> bytes:
    try:
        shared = private.exchange(x25519.X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as e:
        raise SecAggAbort(f"key agreement failed ({e}): a peer advertised an invalid public key") from None
    return HKDF(algorithm=hashes.SHA256(), length=SEED_BYTES, salt=None, info=info).derive(shared)


def pair_seed(
    mask_private: x25519.X25519PrivateKey, peer_mask_public: bytes, spec: RoundSpec, me: str, peer: str
) -> bytes:
    """s_uv: the 32-byte mask seed of the pair, the same from either side (names in sorted order)."""
    a, b = sorted((me, peer))
    return _agree(mask_private, peer_mask_public, _info("mask", spec, a, b))


def _channel_key(
    private: x25519.X25519PrivateKey, peer_public: bytes, spec: RoundSpec, purpose: str, a: str, b: str
):
    a, b = sorted((a, b))
    return _agree(private, peer_public, _info(purpose, spec, a, b))


def _seal(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    nonce = os.urandom(12)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def _open(key: bytes, blob: bytes, aad: bytes) -> bytes:
    if len(blob) < 12 + 16:
        raise InvalidTag
    return AESGCM(key).decrypt(blob[:12], blob[12:], aad)


def check_threshold(threshold: int, n: int) -> None:
    """t must satisfy n/2 < t ≤ n and t ≥ 2 (one update alone would be its own sum)."""
    if threshold < 2 or not n / 2 < threshold <= n:
        raise ValueError(
            f"secure aggregation threshold t={threshold} for {n} silos must satisfy t >= 2 and "
            f"{n}/2 < t <= {n} (a majority, so that no two disjoint quorums exist)"
        )


def new_aggregator_key() -> x25519.X25519PrivateKey:
    """The aggregator's round key; publish `public_bytes(key)` in the round's signed meta."""
    return x25519.X25519PrivateKey.generate()


def public_bytes(key: x25519.X25519PrivateKey) -> bytes:
    return _raw_public(key)


# ------------------------------------------------------------------------------ the silo's side


@dataclasses.dataclass
class SiloState:
    """A silo's private protocol state for one round (never written to the store)."""

    name: str
    spec: RoundSpec
    enc_key: x25519.X25519PrivateKey
    mask_key: x25519.X25519PrivateKey
    members: tuple[str, ...] = ()  # U1: the silos it shared keys with, sorted
    public_keys: dict[str, PublicKeys] = dataclasses.field(default_factory=dict)
    self_seed: bytes | None = None  # b_u
    share_senders: tuple[str, ...] = ()  # U2: the silos whose shares it holds
    held: dict[str, tuple[Share, Share]] = dataclasses.field(default_factory=dict)  # sender -> (b, mask key)
    answered: tuple[tuple[str, ...], tuple[str, ...]] | None = None


def advertise_keys(name: str, spec: RoundSpec) -> tuple[SiloState, PublicKeys]:
    """Step 1: fresh key pairs; the public half goes to the store."""
    enc, mask = x25519.X25519PrivateKey.generate(), x25519.X25519PrivateKey.generate()
    state = SiloState(name=name, spec=spec, enc_key=enc, mask_key=mask)
    return state, PublicKeys(enc=_raw_public(enc), mask=_raw_public(mask))


def share_keys(state: SiloState, public_keys: Mapping[str, PublicKeys]) -> dict[str, bytes]:
    """Step 2: Shamir shares of b_u and of the mask key, one ciphertext per member of U1 (itself too)."""
    spec = state.spec
    members = tuple(sorted(public_keys))
    if state.name not in members:
        raise SecAggAbort(
            f"round {spec.round}: {state.name!r} is not among the silos whose keys were accepted"
        )
    own = PublicKeys(enc=_raw_public(state.enc_key), mask=_raw_public(state.mask_key))
    if public_keys[state.name] != own:
        raise SecAggAbort(
            f"round {spec.round}: the keys listed for {state.name!r} are not the ones it advertised"
        )
    if len(members) < spec.threshold:
        raise SecAggAbort(
            f"round {spec.round}: only {len(members)} of the {spec.threshold} silos needed advertised keys"
        )
    check_threshold(spec.threshold, len(members))
    all_keys = [k.enc for k in public_keys.values()] + [k.mask for k in public_keys.values()]
    if len(set(all_keys)) != len(all_keys):
        raise SecAggAbort(f"round {spec.round}: two advertised public keys are equal")
    state.members, state.public_keys = members, dict(public_keys)
    state.self_seed = os.urandom(SEED_BYTES)
    n, t = len(members), spec.threshold
    b_shares = shamir.split(state.self_seed, n, t)
    s_shares = shamir.split(_raw_private(state.mask_key), n, t)
    out = {}
    for i, peer in enumerate(members):
        body = {
            "from": state.name,
            "to": peer,
            "round": spec.round,
            "b": b_shares[i].to_json(),
            "s": s_shares[i].to_json(),
        }
        key = _channel_key(state.enc_key, public_keys[peer].enc, spec, "shares", state.name, peer)
        aad = _info("shares-aad", spec, state.name, peer)
        out[peer] = _seal(key, json.dumps(body).encode(), aad)
    return out


def receive_shares(state: SiloState, ciphertexts: Mapping[str, bytes]) -> None:
    """Step 3a: decrypts the shares addressed to this silo by every silo of U2 (= the senders)."""
    spec = state.spec
    senders = tuple(sorted(ciphertexts))
    if not state.members:
        raise ValueError("receive_shares before share_keys")
    unknown = [s for s in senders if s not in state.members]
    if unknown:
        raise SecAggAbort(f"round {spec.round}: shares from silos that did not advertise keys: {unknown}")
    if state.name not in senders:
        raise SecAggAbort(
            f"round {spec.round}: {state.name!r} is not among the silos whose shares were accepted"
        )
    if len(senders) < spec.threshold:
        raise SecAggAbort(
            f"round {spec.round}: only {len(senders)} of the {spec.threshold} silos needed shared their keys"
        )
    my_x = state.members.index(state.name) + 1
    held = {}
    for sender in senders:
        key = _channel_key(state.enc_key, state.public_keys[sender].enc, spec, "shares", sender, state.name)
        try:
            body = json.loads(_open(key, ciphertexts[sender], _info("shares-aad", spec, sender, state.name)))
            b, s = Share.from_json(body["b"]), Share.from_json(body["s"])
        except (InvalidTag, ValueError, KeyError, TypeError):
            raise SecAggAbort(
                f"round {spec.round}: the key shares from {sender!r} to {state.name!r} fail authentication"
            ) from None
        if (body.get("from"), body.get("to"), body.get("round"), b.x, s.x) != (
            sender,
            state.name,
            spec.round,
            my_x,
            my_x,
        ):
            raise SecAggAbort(f"round {spec.round}: the key shares from {sender!r} are addressed wrongly")
        held[sender] = (b, s)
    state.share_senders, state.held = senders, held


def mask_update(state: SiloState, tree: PyTree) -> tuple[PyTree, int]:
    """Step 3b: (masked ring tree, saturated entries) = encode(tree) + mask_u, leaf by leaf.

    `tree` is what the silo contributes to the sum: its (weighted, clipped, noised) update.
    """
    if state.self_seed is None or not state.share_senders:
        raise ValueError("mask_update before share_keys and receive_shares")
    spec, fp = state.spec, state.spec.fixed_point
    encoded, saturated = encode(tree, fp)
    peers = [v for v in state.share_senders if v != state.name]
    seeds = {v: pair_seed(state.mask_key, state.public_keys[v].mask, spec, state.name, v) for v in peers}
    leaves, treedef = jax.tree_util.tree_flatten(encoded)
    out = []
    for i, x in enumerate(leaves):
        acc = np.add(x.reshape(-1), prg(state.self_seed, i, x.size, fp.dtype), dtype=fp.dtype)
        for v in peers:
            words = prg(seeds[v], i, x.size, fp.dtype)
            if state.name < v:
                np.add(acc, words, out=acc)
            else:
                np.subtract(acc, words, out=acc)
        out.append(acc.reshape(x.shape))
    return jax.tree_util.tree_unflatten(treedef, out), saturated


def _check_partition(
    spec: RoundSpec, senders: Sequence[str], survivors: Sequence[str], dropped: Sequence[str]
):
    s, d = set(survivors), set(dropped)
    if s & d or s | d != set(senders) or len(s) != len(survivors) or len(d) != len(dropped):
        raise SecAggAbort(
            f"round {spec.round}: survivors {sorted(s)} and dropped {sorted(d)} do not partition the "
            f"{len(senders)} silos that shared keys"
        )


def check_survivors(spec: RoundSpec, share_senders: Sequence[str], survivors: Sequence[str]) -> None:
    """The aggregator, after the masked-input deadline: abort below t masked inputs."""
    if len(survivors) < spec.threshold:
        missing = sorted(set(share_senders) - set(survivors))
        raise SecAggAbort(
            f"round {spec.round}: only {len(survivors)} of the {spec.threshold} masked inputs needed "
            f"arrived (missing: {', '.join(missing)}); the round is aborted and nothing is published"
        )


def unmask_response(
    state: SiloState, survivors: Sequence[str], dropped: Sequence[str], aggregator_public: bytes
) -> bytes:
    """Step 4: reveals b shares of the survivors and mask-key shares of the dropped, sealed to the
    aggregator. Refuses inconsistent lists and a second request with other lists."""
    spec = state.spec
    survivors, dropped = tuple(sorted(survivors)), tuple(sorted(dropped))
    _check_partition(spec, state.share_senders, survivors, dropped)
    if state.name not in survivors:
        raise SecAggAbort(f"round {spec.round}: {state.name!r} is not a survivor and must not answer")
    check_survivors(spec, state.share_senders, survivors)
    if state.answered is not None and state.answered != (survivors, dropped):
        raise SecAggAbort(
            f"round {spec.round}: {state.name!r} already answered for survivors {list(state.answered[0])}; "
            "answering other lists could reveal both masks of one silo"
        )
    state.answered = (survivors, dropped)
    body = {
        "from": state.name,
        "round": spec.round,
        "survivors": list(survivors),
        "dropped": list(dropped),
        "b": {u: state.held[u][0].to_json() for u in survivors},
        "s": {v: state.held[v][1].to_json() for v in dropped},
    }
    key = _channel_key(state.enc_key, aggregator_public, spec, "unmask", state.name, AGGREGATOR)
    return _seal(key, json.dumps(body).encode(), _info("unmask-aad", spec, state.name, AGGREGATOR))


# ------------------------------------------------------------------------------ the aggregator's side


def open_response(
    aggregator_key: x25519.X25519PrivateKey,
    spec: RoundSpec,
    responder: str,
    blob: bytes,
    public_keys: Mapping[str, PublicKeys],
) -> dict[str, Any]:
    """Decrypts and checks one unmasking response."""
    if responder not in public_keys:
        raise SecAggAbort(
            f"round {spec.round}: an unmasking response from {responder!r}, which advertised no keys"
        )
    key = _channel_key(aggregator_key, public_keys[responder].enc, spec, "unmask", responder, AGGREGATOR)
    try:
        body = json.loads(_open(key, blob, _info("unmask-aad", spec, responder, AGGREGATOR)))
    except (InvalidTag, ValueError):
        raise SecAggAbort(
            f"round {spec.round}: the unmasking response of {responder!r} fails authentication"
        ) from None
    if body.get("from") != responder or body.get("round") != spec.round:
        raise SecAggAbort(f"round {spec.round}: the unmasking response of {responder!r} is addressed wrongly")
    return body


def unmask(
    masked_sum: PyTree,
    spec: RoundSpec,
    public_keys: Mapping[str, PublicKeys],
    survivors: Sequence[str],
    dropped: Sequence[str],
    responses: Mapping[str, Mapping[str, Any]],
) -> PyTree:
    """Σ_{survivors} encode(x_u) (ring tree) from the ring sum of their masked inputs.

    `responses` are opened responses (`open_response`) of survivors; at least t are needed. Removes
    every survivor's self-mask and the pairwise masks each survivor shared with a dropped silo.
    Decode the result with `decode(result, spec.fixed_point, count=len(survivors))`.
    """
    fp, t = spec.fixed_point, spec.threshold
    survivors, dropped = tuple(sorted(survivors)), tuple(sorted(dropped))
    _check_partition(spec, list(survivors) + list(dropped), survivors, dropped)
    check_survivors(spec, list(survivors) + list(dropped), survivors)
    valid = {
        r: body
        for r, body in sorted(responses.items())
        if r in survivors and (tuple(body["survivors"]), tuple(body["dropped"])) == (survivors, dropped)
    }
    if len(valid) < t:
        raise SecAggAbort(
            f"round {spec.round}: only {len(valid)} of the {t} unmasking responses needed arrived; "
            "the round is aborted and nothing is published"
        )
    try:
        self_seeds = {
            u: _reconstruct(
                [Share.from_json(b["b"][u]) for b in valid.values()],
                t,
                f"round {spec.round}: self-mask of {u!r}",
            )
            for u in survivors
        }
        dropped_keys = {}
        for v in dropped:
            raw = _reconstruct(
                [Share.from_json(b["s"][v]) for b in valid.values()],
                t,
                f"round {spec.round}: mask key of {v!r}",
            )
            key = x25519.X25519PrivateKey.from_private_bytes(raw)
            if _raw_public(key) != public_keys[v].mask:
                raise SecAggAbort(
                    f"round {spec.round}: the reconstructed mask key of {v!r} is not the advertised one"
                )
            dropped_keys[v] = key
    except (KeyError, ValueError) as e:
        raise SecAggAbort(f"round {spec.round}: malformed unmasking response ({e})") from None
    pair_seeds = {
        (u, v): pair_seed(dropped_keys[v], public_keys[u].mask, spec, v, u)
        for v in dropped
        for u in survivors
    }
    leaves, treedef = jax.tree_util.tree_flatten(masked_sum)
    out = []
    for i, x in enumerate(leaves):
        x = np.asarray(x)
        if x.dtype != fp.dtype:
            raise ValueError(f"masked sum leaf {i} has dtype {x.dtype}, expected {fp.dtype}")
        acc = np.array(x.reshape(-1), copy=True)
        for u in survivors:
            np.subtract(acc, prg(self_seeds[u], i, x.size, fp.dtype), out=acc)
        for (u, v), seed in pair_seeds.items():
            words = prg(seed, i, x.size, fp.dtype)
            # u added +PRG(s_uv) if u < v, −PRG(s_uv) otherwise: undo it.
            if u < v:
                np.subtract(acc, words, out=acc)
            else:
                np.add(acc, words, out=acc)
        out.append(acc.reshape(x.shape))
    return jax.tree_util.tree_unflatten(treedef, out)


def _reconstruct(shares: Sequence[Share], t: int, what: str) -> bytes:
    try:
        return shamir.reconstruct_checked(shares, t, what)
    except shamir.ShamirError as e:
        raise SecAggAbort(str(e)) from None


# ------------------------------------------------------------------------------ combinations


def check_combination(aggregation: str, compression: str, dp_mode: str | None = None) -> None:
    """Refuses settings that need what secure aggregation hides; messages name the field."""
    if aggregation != "mean":
        raise ValueError(
            f"federation.aggregation={aggregation!r} needs every silo's update, which secure aggregation "
            "hides from the aggregator; use 'mean' with secure aggregation"
        )
    if compression != "none":
        raise ValueError(
            f"federation.compression={compression!r} cannot be summed under secure aggregation (per-silo "
            "scales); use 'none': the fixed-point ring is the encoding (4 bytes per parameter)"
        )
    if dp_mode not in (None, "central", "distributed"):
        raise ValueError(f"privacy.mode must be 'central', 'distributed' or off, got {dp_mode!r}")


# ------------------------------------------------------------------------------ in memory


@dataclasses.dataclass
class SimulatedRound:
    sum: PyTree  # f32 decoded sum of the survivors' updates
    ring_sum: PyTree  # the unmasked ring sum (exactly Σ encode(x_u))
    masked: dict[str, PyTree]  # each survivor's masked input, as the aggregator saw it
    masked_sum: PyTree
    survivors: tuple[str, ...]
    dropped: tuple[str, ...]
    saturated: dict[str, int]


def simulate_round(
    updates: Mapping[str, PyTree],
    *,
    threshold: int,
    fixed_point: FixedPoint,
    dropped: Sequence[str] = (),
    silent: Sequence[str] = (),
    run_id: str = "simulation",
    round_idx: int = 0,
) -> SimulatedRound:
    """The whole protocol in memory: every silo in `updates` advertises and shares keys; `dropped`
    silos then never send their masked input; `silent` ones send it but do not answer the unmasking
    request. Raises SecAggAbort as the real round would."""
    spec = RoundSpec(run_id=run_id, round=round_idx, threshold=threshold, fixed_point=fixed_point)
    names = sorted(updates)
    states, public = {}, {}
    for n in names:
        states[n], public[n] = advertise_keys(n, spec)
    agg_key = new_aggregator_key()
    outbox = {u: share_keys(states[u], public) for u in names}
    for v in names:
        receive_shares(states[v], {u: outbox[u][v] for u in names})
    survivors = tuple(n for n in names if n not in set(dropped))
    masked, saturated = {}, {}
    for u in survivors:
        masked[u], saturated[u] = mask_update(states[u], updates[u])
    check_survivors(spec, names, survivors)
    masked_sum = ring_sum(masked[u] for u in survivors)
    gone = tuple(n for n in names if n in set(dropped))
    responses = {
        v: open_response(
            agg_key, spec, v, unmask_response(states[v], survivors, gone, public_bytes(agg_key)), public
        )
        for v in survivors
        if v not in set(silent)
    }
    unmasked = unmask(masked_sum, spec, public, survivors, gone, responses)
    return SimulatedRound(
        sum=decode(unmasked, fixed_point, count=len(survivors)),
        ring_sum=unmasked,
        masked=masked,
        masked_sum=masked_sum,
        survivors=survivors,
        dropped=gone,
        saturated=saturated,
    )
