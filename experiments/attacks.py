"""Attacks on a short, real, signed deployment, and what mean / median / trimmed mean make of them.

    python experiments/attacks.py --workdir runs/attacks      # ~25 min on 2 CPU cores

Every scenario is a real deployment on this machine (tiny model, default corpus, 5 silos, 5 rounds
of H=8), its processes sharing only an on-disk store: the aggregator, four honest silos and
*mallory*, a member of the federation (its key is in the allow-list) that misbehaves in its
`upload`. An *outsider* — write access to the store, no listed key — acts from this process.

Scenarios, each run once per aggregation rule (`federation.aggregation`):
- clean: nobody misbehaves (the reference perplexity);
- rejections: in one run, mallory sends a NaN update (round 0), a 5 MiB manifest (1), an update
  trained from the previous global (2), zarr metadata with a codec the store does not write (3),
  and a x100 update (4); the outsider forges a commit under quotes-en's name (1), replays
  quotes-de's round-1 update into round 2 (2), and swaps quotes-ru's chunks for quotes-en's
  after the aggregator validated them (3, in a pause the aggregator is told to take); a second
  aggregator is started during round 1;
- tokens / signflip / noise: mallory claims 1e30 tokens, or sends -1 x its update, or Gaussian
  noise of 5x its update's norm, every round.
And once: the outsider publishes the next global itself (forged global).

Writes WORKDIR/attacks.md (the table) and WORKDIR/attacks.json.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

RULES = ("mean", "median", "trimmed_mean")
MALLORY = "bible-en"  # the 5th natural silo of the default corpus
FORGED, REPLAYED, SWAPPED = "quotes-en", "quotes-de", "quotes-ru"
REJECTION_PLAN = {0: "nan", 1: "manifest", 2: "stale", 3: "zarr", 4: "x100"}
ROUNDS = 5


# ----------------------------------------------------------------------------- mallory


def run_member(spec: str, store: str, silo: str, key: str, plan: dict[int, str]) -> None:
    """A real silo process whose `upload` misbehaves as `plan` says (round -> attack)."""
    import jax
    import numpy as np

    from fedjax_lm import compression
    from fedjax_lm import config as config_lib
    from fedjax_lm import deploy
    from fedjax_lm.deploy.common import global_meta

    config = config_lib.load_config(spec)
    config.federation.deploy.key = key

    class Mallory(deploy.SiloWorker):
        previous = None  # (payload, manifest) of the last round, honest

        def upload(self, r, payload, manifest):
            act = plan.get(r, plan.get(-1))  # -1: every round
            honest = (payload, dict(manifest))
            like = self.fed.abstract_params
            if act == "nan":
                delta = jax.tree.map(np.array, compression.decompress(payload, like))
                jax.tree.leaves(delta)[0].reshape(-1)[0] = np.nan
                payload = compression.compress(delta, None, self.fed.method)[0]
            elif act in ("x100", "signflip", "noise"):
                delta = jax.device_get(compression.decompress(payload, like))
                if act == "noise":
                    rng = np.random.default_rng(r)
                    norm = np.sqrt(sum(float(np.sum(np.square(x))) for x in jax.tree.leaves(delta)))
                    noise = jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32), delta)
                    n_norm = np.sqrt(sum(float(np.sum(np.square(x))) for x in jax.tree.leaves(noise)))
                    delta = jax.tree.map(lambda x: x * np.float32(5 * norm / n_norm), noise)
                else:
                    delta = jax.tree.map(lambda x: x * np.float32(100.0 if act == "x100" else -1.0), delta)
                payload = compression.compress(delta, None, self.fed.method)[0]
            elif act == "manifest":
                manifest["notes"] = "x" * (5 << 20)
            elif act == "tokens":
                manifest["tokens"] = 1e30
            elif act == "stale" and self.previous is not None:
                payload, old = self.previous  # last round's update, trained from last round's global
                manifest = {**old, "round": r, "finished_at": time.time()}
                assert (
                    manifest["base_global_sha256"]
                    == global_meta(self.store, r - 1, self.trust)["params_sha256"]
                )
            super().upload(r, jax.device_get(payload), manifest)
            if act == "zarr":  # re-describe one committed array with a codec the store never writes
                meta_path = sorted(
                    glob.glob(os.path.join(store, f"updates/{r}/{silo}/**/zarr.json"), recursive=True)
                )[0]
                meta = json.load(open(meta_path))
                meta["codecs"] = [meta["codecs"][0], {"name": "gzip", "configuration": {"level": 9}}]
                json.dump(meta, open(meta_path, "w"))
            self.previous = honest

    Mallory(config, store, silo).run()


# ----------------------------------------------------------------------------- the outsider


class Outsider:
    """Write access to the store, no key in the allow-list."""

    def __init__(self, store: str, keys_dir: str):
        from fedjax_lm import identity

        path = os.path.join(keys_dir, "outsider.key")
        if not os.path.exists(path):
            identity.generate("outsider", keys_dir)
        self.store, self.key = store, identity.Signer.load(path, "outsider")

    def _dir(self, r: int) -> str:
        return os.path.join(self.store, "updates", str(r))

    def forge(self, r: int, victim: str, source_round: int) -> None:
        """A commit under `victim`'s name: its last update re-labelled for round r, signed with our key."""
        import hashlib

        from fedjax_lm import identity

        src, dst = os.path.join(self._dir(source_round), victim), os.path.join(self._dir(r), victim)
        shutil.copytree(src, dst)
        manifest = json.load(open(os.path.join(dst, "manifest.json")))
        manifest["round"] = r
        data = json.dumps(manifest).encode()
        open(os.path.join(dst, "manifest.json"), "wb").write(data)
        digest = hashlib.sha256(data).hexdigest()
        marker = {
            "manifest_sha256": digest,
            "signer": victim,
            "signature": self.key.sign(identity.UPDATE_DOMAIN, digest.encode()),
        }
        open(os.path.join(self._dir(r), f"{victim}.COMMITTED"), "w").write(json.dumps(marker))

    def replay(self, r: int, victim: str) -> None:
        """The victim's own signed update of round r-1, copied unchanged into round r."""
        shutil.copytree(os.path.join(self._dir(r - 1), victim), os.path.join(self._dir(r), victim))
        shutil.copyfile(
            os.path.join(self._dir(r - 1), f"{victim}.COMMITTED"),
            os.path.join(self._dir(r), f"{victim}.COMMITTED"),
        )

    def swap_chunks(self, r: int, victim: str, donor: str) -> int:
        """Overwrites the victim's chunk files with the donor's (valid zarr, other data)."""
        n = 0
        base = self._dir(r)
        for src in glob.glob(os.path.join(base, donor, "**", "c", "**"), recursive=True):
            if os.path.isfile(src):
                dst = src.replace(os.sep + donor + os.sep, os.sep + victim + os.sep)
                if os.path.exists(dst):
                    shutil.copyfile(src, dst)
                    n += 1
        return n

    def forge_global(self, r: int, config) -> None:
        """Publishes global/<r> itself: the previous params + 0.01, with the last signed meta re-labelled."""
        import jax

        from fedjax_lm import federation
        from fedjax_lm import store as store_lib
        from fedjax_lm.deploy import silo_names

        fed = federation.Federation(config, silo_names(config))
        st = store_lib.Store(self.store)
        params, opt, meta = st.read_global(r - 1, fed.abstract_params, fed.abstract_outer_opt)
        st.publish_global(r, jax.tree.map(lambda x: x + 0.01, params), opt, {**meta, "round": r})
        st.close()


# ----------------------------------------------------------------------------- one deployment


class Deployment:
    def __init__(self, workdir: str, spec: str, keys: str, env_extra: dict | None = None):
        self.workdir, self.spec, self.keys = workdir, spec, keys
        self.store = os.path.join(workdir, "store")
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = dict(
            os.environ,
            XLA_FLAGS="--xla_force_host_platform_device_count=1",
            JAX_PLATFORMS="cpu",
            PYTHONPATH=ROOT,
            **(env_extra or {}),
        )
        os.makedirs(os.path.join(workdir, "logs"), exist_ok=True)

    def _start(self, name: str, cmd: list[str], env: dict | None = None) -> None:
        log = open(os.path.join(self.workdir, "logs", f"{name}.log"), "a")
        self.procs[name] = subprocess.Popen(
            cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env or self.env
        )

    def key_flag(self, member: str) -> str:
        return f"--config.federation.deploy.key={os.path.join(self.keys, member + '.key')}"

    def aggregator(self, name: str = "aggregator", env: dict | None = None) -> None:
        cmd = [
            sys.executable,
            "-m",
            "fedjax_lm",
            "aggregate",
            "--config",
            self.spec,
            "--store",
            self.store,
            "--workdir",
            os.path.join(self.workdir, "agg"),
            self.key_flag("aggregator"),
        ]
        self._start(name, cmd, {**self.env, **(env or {})})

    def silo(self, silo: str) -> None:
        cmd = [
            sys.executable,
            "-m",
            "fedjax_lm",
            "silo",
            "--config",
            self.spec,
            "--store",
            self.store,
            "--silo",
            silo,
            self.key_flag(silo),
        ]
        self._start(silo, cmd)

    def mallory(self, plan: dict[int, str]) -> None:
        cmd = [
            sys.executable,
            os.path.abspath(__file__),
            "member",
            "--spec",
            self.spec,
            "--store",
            self.store,
            "--silo",
            MALLORY,
            "--key",
            os.path.join(self.keys, MALLORY + ".key"),
            "--plan",
            json.dumps(plan),
        ]
        self._start(MALLORY, cmd)

    def log(self, name: str) -> str:
        try:
            return open(os.path.join(self.workdir, "logs", f"{name}.log")).read()
        except FileNotFoundError:
            return ""

    def latest_global(self) -> int:
        rounds = (
            [int(d) for d in os.listdir(os.path.join(self.store, "global")) if d.isdigit()]
            if os.path.isdir(os.path.join(self.store, "global"))
            else []
        )
        return max(rounds, default=-1)

    def wait_for(self, pred, what: str, timeout: float = 900) -> None:
        t = time.time()
        while not pred():
            if time.time() - t > timeout:
                raise TimeoutError(f"{self.workdir}: timed out waiting for {what}")
            if self.procs.get("aggregator") and self.procs["aggregator"].poll() not in (None, 0):
                raise RuntimeError(f"the aggregator died:\n{self.log('aggregator')[-2000:]}")
            time.sleep(0.05)

    def wait_all(self, timeout: float = 1800) -> dict[str, int]:
        t = time.time()
        out = {}
        for name, p in self.procs.items():
            try:
                out[name] = p.wait(timeout=max(1, timeout - (time.time() - t)))
            except subprocess.TimeoutExpired:
                p.send_signal(signal.SIGKILL)
                out[name] = p.wait()
        return out

    def kill_all(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()


def global_meta(store: str, r: int) -> dict:
    return json.load(open(os.path.join(store, "global", str(r), "meta", "metadata")))


def pooled_ppl(workdir: str) -> float | None:
    path = os.path.join(workdir, "agg", "summary.json")
    return json.load(open(path))["val"]["pooled"]["ppl"] if os.path.exists(path) else None


def line_with(log: str, *needles: str) -> str:
    for line in log.splitlines():
        if all(n in line for n in needles):
            return line.split("] ", 1)[-1]
    return ""


# ----------------------------------------------------------------------------- scenarios


def scenario(name: str, rule: str, base: str, keys: str, spec: str, silos: list[str]) -> dict:
    workdir = os.path.join(base, f"{rule}-{name}")
    done = os.path.join(workdir, "outcome.json")
    if os.path.exists(done):
        return json.load(open(done))
    shutil.rmtree(workdir, ignore_errors=True)
    t0 = time.time()
    honest = [s for s in silos if s != MALLORY]
    env = {"FEDJAX_PAUSE_AFTER_VALIDATION_S": "6"} if name == "rejections" else {}
    d = Deployment(workdir, spec, keys)
    outsider = Outsider(d.store, os.path.join(base, "outsider-key"))
    outcome: dict = {"scenario": name, "rule": rule}
    try:
        d.aggregator(env=env)
        d.wait_for(lambda: d.latest_global() >= 0, "global/0")
        plan = {
            "rejections": REJECTION_PLAN,
            "tokens": {-1: "tokens"},
            "signflip": {-1: "signflip"},
            "noise": {-1: "noise"},
        }.get(name)
        if name == "forged_global":
            from fedjax_lm import config as config_lib

            for s in silos:
                d.silo(s)
            d.wait_for(lambda: d.latest_global() >= 1, "global/1")
            outsider.forge_global(2, config_lib.load_config(spec))
            codes = d.wait_all(timeout=600)
            outcome["exit_codes"] = codes
            outcome["aggregator"] = line_with(d.log("aggregator"), "not the aggregator's")
            outcome["silo"] = line_with(d.log(honest[0]), "not the aggregator's")
        else:
            for s in honest:
                d.silo(s)
            if plan:
                d.mallory(plan)
            else:
                d.silo(MALLORY)
            if name == "rejections":
                d.wait_for(lambda: d.latest_global() >= 1, "global/1")
                outsider.forge(1, FORGED, source_round=0)
                d.aggregator(name="second-aggregator")
                d.wait_for(lambda: d.latest_global() >= 2, "global/2")
                outsider.replay(2, REPLAYED)
                d.wait_for(lambda: d.latest_global() >= 3, "global/3")
                d.wait_for(lambda: "round 3: validated" in d.log("aggregator"), "round 3 validated")
                outcome["swapped_chunks"] = outsider.swap_chunks(3, SWAPPED, FORGED)
            codes = d.wait_all()
            outcome["exit_codes"] = codes
            outcome["rejected"] = {r: global_meta(d.store, r + 1).get("rejected", {}) for r in range(ROUNDS)}
            outcome["accepted"] = {r: global_meta(d.store, r + 1).get("accepted", []) for r in range(ROUNDS)}
            outcome["not_counted"] = [
                line for line in d.log("aggregator").splitlines() if "does not count" in line
            ]
            outcome["second_aggregator"] = (
                d.log("second-aggregator").strip().splitlines()[-1:] if name == "rejections" else []
            )
            outcome["ppl"] = pooled_ppl(workdir)
    finally:
        d.kill_all()
    outcome["wall_s"] = time.time() - t0
    json.dump(outcome, open(done, "w"), indent=1)
    return json.load(open(done))  # str keys, as when a finished scenario is read back


def short(reason: str, limit: int = 110) -> str:
    reason = reason.split("rejected: ", 1)[-1]
    return reason if len(reason) <= limit else reason[: limit - 3] + "..."


def table(results: dict) -> str:
    rows = []

    def cell(rule: str, fn) -> str:
        try:
            return fn(results[rule])
        except (KeyError, IndexError, TypeError):
            return "(not run)"

    def rej(r: int, silo: str):
        return lambda res: "rejected: " + short(res["rejections"]["rejected"][str(r)][silo])

    def not_counted(silo: str, r: int):
        def f(res):
            line = next(x for x in res["rejections"]["not_counted"] if f"round {r}:" in x and silo in x)
            accepted = silo in res["rejections"]["accepted"][str(r)]
            return (
                "not counted: "
                + short(line.split("does not count: ")[-1], 70)
                + (f"; {silo}'s own update replaced it and was accepted" if accepted else "")
            )

        return f

    def accepted(name: str, what: str):
        """An attack the checks let through: what it cost, against the same rule's clean run."""

        def f(res):
            ppl, clean = res[name]["ppl"], res["clean"]["ppl"]
            hit = sum(MALLORY in v for v in res[name]["rejected"].values())
            rejected = f"; mallory rejected in {hit}/{ROUNDS} rounds" if hit else ""
            return f"{what}: pooled ppl {ppl:.1f} vs clean {clean:.1f} ({100 * (ppl / clean - 1):+.0f}%){rejected}"

        return f

    spec = [
        ("forged silo name (outsider, round 1)", not_counted(FORGED, 1)),
        ("replay of an old update (outsider, round 2)", not_counted(REPLAYED, 2)),
        ("update from a stale global (member, round 2)", rej(2, MALLORY)),
        ("huge token claim, 1e30 (member, every round)", accepted("tokens", "weight capped")),
        ("x100 update (member, round 4)", rej(4, MALLORY)),
        ("sign-flipped update (member, every round)", accepted("signflip", "accepted")),
        ("random noise, 5x its norm (member, every round)", accepted("noise", "accepted")),
        ("NaN in the update (member, round 0)", rej(0, MALLORY)),
        ("oversized manifest, 5 MiB (member, round 1)", rej(1, MALLORY)),
        ("chunks swapped after validation (outsider, round 3)", rej(3, SWAPPED)),
        ("malformed zarr metadata (member, round 3)", rej(3, MALLORY)),
        (
            "a second aggregator (round 1)",
            lambda res: (
                "refused, exit 1: lock "
                + short(
                    res["rejections"]["second_aggregator"][0]
                    .split("aggregator.lock ", 1)[-1]
                    .split(" (owner")[0],
                    90,
                )
            ),
        ),
        (
            "forged global (outsider publishes global/2)",
            lambda res: (
                "every silo and the aggregator stop (exit 1): "
                + short(res["forged_global"]["silo"].split(" is ", 1)[-1].split(": someone")[0], 90)
            ),
        ),
        ("(clean run: nobody misbehaves)", lambda res: f"pooled ppl {res['clean']['ppl']:.1f}"),
    ]
    head = ["attack", *RULES]
    rows = ["| " + " | ".join(head) + " |", "|---|---|---|---|"]
    for label, fn in spec:
        rows.append("| " + " | ".join([label, *(cell(rule, fn) for rule in RULES)]) + " |")
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd")
    m = sub.add_parser("member")
    m.add_argument("--spec")
    m.add_argument("--store")
    m.add_argument("--silo")
    m.add_argument("--key")
    m.add_argument("--plan")
    p.add_argument("--workdir", default="runs/attacks")
    p.add_argument("--rules", default=",".join(RULES))
    p.add_argument("--scenarios", default="clean,rejections,tokens,signflip,noise")
    args = p.parse_args()
    if args.cmd == "member":
        run_member(
            args.spec, args.store, args.silo, args.key, {int(k): v for k, v in json.loads(args.plan).items()}
        )
        return

    from fedjax_lm import config as config_lib
    from fedjax_lm import data as data_lib
    from fedjax_lm import identity

    t_all = time.time()
    base = os.path.abspath(args.workdir)
    os.makedirs(base, exist_ok=True)
    keys = os.path.join(base, "keys")
    config = config_lib.load_config(f"{ROOT}/experiments/photon.py:size=tiny,silos=5,rounds={ROUNDS},H=8")
    data_lib.prepare(config.data)
    silos = list(config.train.silos) or list(data_lib.Corpus.load(config.data.corpus_dir).silos)[:5]
    assert MALLORY in silos, silos
    if not os.path.exists(os.path.join(keys, "federation.json")):
        for member in ("aggregator", *silos):
            _, pub = identity.generate(member, keys)
            identity.add_to_allow_list(os.path.join(keys, "federation.json"), member, pub)
    results: dict = {}
    for rule in args.rules.split(","):
        c = config.copy_and_resolve_references()
        c.train.silos = tuple(silos)
        c.federation.aggregation = rule
        c.federation.deploy.update(
            dict(
                allow_list=os.path.join(keys, "federation.json"),
                deadline_s=240.0,
                adaptive_deadline=False,
                poll_s=0.2,
            )
        )
        path = os.path.join(base, f"config-{rule}.json")
        open(path, "w").write(c.to_json_best_effort())
        spec = f"{ROOT}/experiments/from_json.py:{path}"
        results[rule] = {}
        names = args.scenarios.split(",") + (["forged_global"] if rule == "mean" else [])
        for name in names:
            print(f"=== {rule} / {name}", flush=True)
            results[rule][name] = scenario(name, rule, base, keys, spec, silos)
            print(f"    {results[rule][name].get('ppl')}  ({results[rule][name]['wall_s']:.0f}s)", flush=True)
    for rule in results:  # the forged global is the same for every rule: run once
        results[rule].setdefault("forged_global", results.get("mean", {}).get("forged_global"))
    md = table(results)
    wall = time.time() - t_all
    with open(os.path.join(base, "attacks.md"), "w") as f:
        f.write(
            f"Command: python experiments/attacks.py --workdir {args.workdir} (wall time {wall / 60:.0f} min)\n\n{md}\n"
        )
    json.dump(results, open(os.path.join(base, "attacks.json"), "w"), indent=1)
    print(md)


if __name__ == "__main__":
    main()
