"""Sweeps: a plain function next to its config that calls `add(**overrides)` once per point.

    python -m fedjax_lm sweep --config experiments/photon.py:size=tiny --sweep rounds_vs_H --workdir runs/sweep
    python -m fedjax_lm sweep --config experiments/photon.py:size=tiny --sweep rounds_vs_H --workdir runs/sweep --print-only

A config file defines `sweep_<name>(add, base)`; `base` is the config that `--config` gives (read
it, e.g. for a token budget; changing it changes nothing). Every `add(...)` is one point, and its
keywords are:

- a variant key of the config file (no dot: `add(H=8, rounds=32)`): the point's config is
  `get_config` of the --config variant with these keys replaced, so what the file derives from
  them follows (the run's name, the warm-up);
- a dotted config field (`add(**{"federation.outer.momentum": 0.95})`), set on that config;
- `recipe="centralized"`: the point is the centralized twin of its federated config
  (`centralized_twin`: the same model, data, silos and inner optimizer, and the same tokens);
- `name="..."` (optional): the point's folder; by default its overrides name it (`H=8,rounds=32`).

`--config.FIELD=VALUE` flags apply to every point that does not set FIELD itself. A point whose
config evaluates only at the end gets 4 evaluations (its curve), and one of more than 16 rounds
at most ~16 checkpoints (not one per round); both show in its printed command.

Every point's config is built and validated before the first point runs (a field that does not
exist is refused, naming it). Then each runs in WORKDIR/<name> through the code path of `train`
(centralized, or the one-process federation), one after another:

- a finished point (summary.json, and a run.json with the point's config) is skipped, a half-done
  one resumes like `train` does; a point started with another config fails (the runs' usual check);
- a point that raises (or ends with a non-finite loss) is recorded with its error, its traceback goes
  to WORKDIR/<name>/sweep_error.txt, and the sweep goes on; the command fails at the end;
- a progress line says the point, its round (or step), tokens/s and the ETAs of the point and sweep.

At the end (and after every point): WORKDIR/sweep.csv and sweep.md (one row per point: status,
swept values, tokens, wall time, pooled and per-silo validation loss / perplexity, bytes moved and
the traffic ratio vs data-parallel, the mean pairwise cosine and norm ratio of the silos' updates),
sweep_final.png (final perplexity vs the swept value, one line per combination of the other
values; points without that value as horizontal references) and sweep_curves.png (validation
perplexity vs tokens per point). `--print-only` prints one `train` command per point instead.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import shlex
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_collections

from fedjax_lm import config as config_lib
from fedjax_lm import monitor
from fedjax_lm import runs
from fedjax_lm.sweep_report import write_outputs

RESERVED = ("recipe", "name")
RECIPES = ("federated", "centralized")
EVALS_PER_POINT = 4
MAX_CHECKPOINTS = 16
PROGRESS_EVERY_S = 30.0
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class SweepFailed(ValueError):
    """Some points of a sweep failed (the others ran); the table says which and why."""


@dataclasses.dataclass
class Point:
    index: int  # 1-based
    name: str
    overrides: dict[str, Any]  # as given to add(), reserved keys included
    config: ml_collections.ConfigDict
    spec: str  # the config file (and variant) its train command starts from
    fields: dict[str, Any]  # the dotted fields the command sets on top of `spec`

    @property
    def kind(self) -> str:
        return "federated" if self.config.get("federation") is not None else "centralized"

    def command(self, workdir: str) -> str:
        args = ["python", "-m", "fedjax_lm", "train", "--config", self.spec]
        args += [f"--config.{k}={format_value(v)}" for k, v in self.fields.items()]
        args += ["--workdir", os.path.join(workdir, self.name)]
        return " ".join(shlex.quote(a) for a in args)


@dataclasses.dataclass
class Result:
    point: Point
    status: str  # "ok" (ran now), "skipped" (finished earlier), "failed"
    summary: dict[str, Any] | None = None
    error: str = ""


# ------------------------------------------------------------------------------ defining points


def load_module(path: str):
    if not os.path.exists(path):
        raise FileNotFoundError(f"config file {path!r} does not exist")
    spec = importlib.util.spec_from_file_location(f"_fedjax_sweep_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def sweep_function(config_path: str, name: str) -> Callable:
    module = load_module(config_path)
    fn = getattr(module, f"sweep_{name}", None)
    if not callable(fn):
        found = sorted(k.removeprefix("sweep_") for k in vars(module) if k.startswith("sweep_"))
        raise ValueError(
            f"{config_path} defines no sweep {name!r} (a function sweep_{name}(add, base)); "
            f"its sweeps: {', '.join(found) or 'none'}"
        )
    return fn


def collect(fn: Callable, base: ml_collections.ConfigDict) -> list[dict[str, Any]]:
    """The overrides of every `add(...)` the sweep function makes, in order."""
    added: list[dict[str, Any]] = []

    def add(**overrides):
        added.append(dict(overrides))

    fn(add, base.copy_and_resolve_references())
    if not added:
        raise ValueError(f"sweep {fn.__name__} adds no point")
    return added


def format_value(v: Any) -> str:
    """A value as `--config.F=...` and a config variant read it back."""
    return v if isinstance(v, str) else repr(v)


def merge_variant(variant: str, keys: Mapping[str, Any]) -> str:
    """'size=tiny,H=32' + {H: 8, rounds: 32} -> 'size=tiny,H=8,rounds=32'."""
    items: dict[str, str] = {}
    for item in filter(None, (s.strip() for s in variant.split(","))):
        if "=" not in item:
            raise ValueError(
                f"variant keys {sorted(keys)} need a config variant of key=value pairs, got {variant!r}; "
                "give dotted config fields instead"
            )
        k, v = (s.strip() for s in item.split("=", 1))
        items[k] = v
    for k, v in keys.items():
        text = format_value(v)
        if "," in text or "=" in text:
            raise ValueError(f"variant key {k}={text!r}: a variant value cannot hold ',' or '='")
        items[k] = text
    return ",".join(f"{k}={v}" for k, v in items.items())


def flat_fields(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in config.items():
        key = f"{prefix}{k}"
        if isinstance(v, (ml_collections.ConfigDict, dict)):
            out.update(flat_fields(v, key + "."))
        else:
            out[key] = v
    return out


def set_field(config: ml_collections.ConfigDict, dotted: str, value: Any) -> None:
    """config.<dotted> = value, refusing a field that does not exist (naming it and its section)."""
    if isinstance(value, Mapping):
        raise ValueError(f"{dotted}: give the fields of a section one by one ({dotted}.FIELD), not a dict")
    node, parts = config, dotted.split(".")
    for i, p in enumerate(parts):
        where = ".".join(parts[:i]) or "the config"
        if not isinstance(node, ml_collections.ConfigDict) or p not in node:
            valid = sorted(node) if isinstance(node, ml_collections.ConfigDict) else []
            raise ValueError(f"config has no field {dotted!r} ({where} has {valid})")
        if i < len(parts) - 1:
            node = node[p]
    try:
        node[parts[-1]] = value
    except (TypeError, ValueError) as e:
        raise ValueError(f"{dotted}={value!r}: {e}") from None


def num_silos(config: ml_collections.ConfigDict) -> int:
    """The silos a config trains on, without the corpus: train.silos, or one per source (natural),
    or data.num_silos (iid, dirichlet)."""
    if config.train.get("silos"):
        return len(config.train.silos)
    if config.data.partition == "natural":
        return len(config.data.sources)
    return int(config.data.num_silos)


def centralized_twin(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The centralized run at the tokens of a federated config: the same model, data, silos, inner
    optimizer and seed; rounds x H steps of one batch the size of a round's K silo batches (the
    data-parallel equivalent), evaluated at the same token counts. A centralized config is its own twin."""
    fed = config.get("federation")
    twin = config.copy_and_resolve_references()
    if fed is None:
        return twin
    h, k = int(fed.local_steps), int(fed.silos_per_round) or num_silos(config)
    twin.name = f"{config.name}-centralized"
    twin.train.steps = int(fed.rounds) * h
    twin.train.batch_size = int(config.train.batch_size) * k
    twin.train.eval_every = int(fed.eval_every) * h
    del twin["federation"]
    return twin


def _bookkeeping(config: ml_collections.ConfigDict, fixed: set[str]) -> None:
    """Evaluations for the curves and a bounded number of checkpoints, unless set explicitly."""
    fed = config.get("federation")
    if fed is not None:
        rounds = int(fed.rounds)
        if int(fed.eval_every) == 0 and "federation.eval_every" not in fixed:
            fed.eval_every = max(1, rounds // EVALS_PER_POINT)
        if (
            int(fed.checkpoint_every) == 1
            and rounds > MAX_CHECKPOINTS
            and "federation.checkpoint_every" not in fixed
        ):
            fed.checkpoint_every = math.ceil(rounds / MAX_CHECKPOINTS)
    elif int(config.train.eval_every) == 0 and "train.eval_every" not in fixed:
        config.train.eval_every = max(1, int(config.train.steps) // EVALS_PER_POINT)


def twin_spec(config_path: str) -> str:
    """The config file a centralized twin's command starts from: centralized.py beside the sweep's
    config file, else the repository's experiments/centralized.py."""
    beside = os.path.join(os.path.dirname(config_path), "centralized.py")
    return beside if os.path.exists(beside) else os.path.join(REPO, "experiments", "centralized.py")


def build_point(
    spec: str,
    overrides: Mapping[str, Any],
    cli_overrides: Mapping[str, Any],
    loaded: dict[str, ml_collections.ConfigDict],
) -> tuple[ml_collections.ConfigDict, str, dict[str, Any]]:
    """(config, command spec, command fields) of one point; ValueError names what is wrong."""

    def load(s: str) -> ml_collections.ConfigDict:
        if s not in loaded:
            loaded[s] = config_lib.load_config(s)
        return loaded[s].copy_and_resolve_references()

    path, _, variant = spec.partition(":")
    recipe = overrides.get("recipe", "federated")
    if recipe not in RECIPES:
        raise ValueError(f"recipe={recipe!r}: valid recipes are {RECIPES}")
    keys = {k: v for k, v in overrides.items() if "." not in k and k not in RESERVED}
    fields = {k: v for k, v in overrides.items() if "." in k}
    point_spec = f"{path}:{merge_variant(variant, keys)}" if keys else spec
    config, plain = load(point_spec), load(spec)
    plain_flat, point_flat = flat_fields(plain), flat_fields(config)
    for dotted, value in cli_overrides.items():  # the flag applies unless the point's variant changed it
        if dotted not in fields and point_flat.get(dotted) == plain_flat.get(dotted):
            set_field(config, dotted, value)
    for dotted, value in fields.items():
        set_field(config, dotted, value)
    _bookkeeping(config, set(fields) | set(cli_overrides))
    if recipe == "centralized":
        config = centralized_twin(config)
        point_spec = twin_spec(path)
    config_lib.validate(config)
    # The command: the spec, then every field where the point differs from what the spec gives.
    start, want = flat_fields(load(point_spec)), flat_fields(config)
    missing = sorted(set(want) ^ set(start))
    if missing:
        raise ValueError(
            f"the point's fields {missing} are not those of {point_spec}: its train command cannot be written"
        )
    command_fields = {k: v for k, v in want.items() if v != start[k]}
    return config, point_spec, command_fields


def point_names(all_overrides: Sequence[Mapping[str, Any]]) -> list[str]:
    """Readable, unique folder names: 'H=8,rounds=32', 'outer.momentum=0.95', 'centralized'."""
    dotted = sorted({k for o in all_overrides for k in o if "." in k})

    def short(key: str) -> str:
        if "." not in key:
            return key
        parts = key.split(".")
        for n in range(1, len(parts) + 1):
            tail = ".".join(parts[-n:])
            if sum(1 for d in dotted if d == tail or d.endswith("." + tail)) == 1 and tail not in {
                k for o in all_overrides for k in o if "." not in k
            }:
                return tail
        return key

    names = []
    for o in all_overrides:
        if "name" in o:
            names.append(_safe(str(o["name"])))
            continue
        items = [
            "centralized" if k == "recipe" and v == "centralized" else f"{short(k)}={format_value(v)}"
            for k, v in o.items()
            if not (k == "recipe" and v == "federated")
        ]
        names.append(_safe(",".join(items)) or "base")
    return names


def _safe(name: str) -> str:
    keep = "".join(c if c.isalnum() or c in "._=,+-" else "" for c in name)
    return keep[:120] or "point"


def build(
    spec: str,
    sweep: str,
    base: ml_collections.ConfigDict,
    cli_overrides: Mapping[str, Any] | None = None,
) -> list[Point]:
    """Every point of `sweep_<sweep>` in the config file of `spec`, built and validated."""
    cli_overrides = dict(cli_overrides or {})
    path = spec.partition(":")[0]
    all_overrides = collect(sweep_function(path, sweep), base)
    names = point_names(all_overrides)
    seen: dict[str, int] = {}
    loaded: dict[str, ml_collections.ConfigDict] = {}
    points = []
    for i, (name, overrides) in enumerate(zip(names, all_overrides), start=1):
        if name in seen:
            raise ValueError(
                f"sweep {sweep}: points {seen[name]} and {i} are both named {name!r} (the same overrides?); "
                "give one a name= "
            )
        seen[name] = i
        try:
            config, point_spec, fields = build_point(spec, overrides, cli_overrides, loaded)
        except (ValueError, KeyError, TypeError, FileNotFoundError) as e:
            message = e.args[0] if isinstance(e, KeyError) and e.args else e
            raise ValueError(f"sweep {sweep}, point {i} {name} {dict(overrides)}: {message}") from None
        points.append(Point(i, name, dict(overrides), config, point_spec, fields))
    return points


# ------------------------------------------------------------------------------ running points


def planned_tokens(config: ml_collections.ConfigDict) -> int:
    t = config.train
    per_step = int(t.batch_size) * int(t.seq_len)
    fed = config.get("federation")
    if fed is None:
        return int(t.steps) * per_step
    k = int(fed.silos_per_round) or num_silos(config)
    return int(fed.rounds) * k * int(fed.local_steps) * per_step


def finished(point: Point, workdir: str) -> bool:
    """summary.json is there and run.json holds this point's config (fields added since at their defaults)."""
    if not os.path.exists(os.path.join(workdir, "summary.json")):
        return False
    try:
        run = runs.read_run(workdir)
    except ValueError:
        return False
    return run is not None and not runs.stored_config_diff(run["config"], point.config)


def train_point(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """The code path of `python -m fedjax_lm train`: a one-process federation or centralized training."""
    if config.get("federation") is not None:
        from fedjax_lm import simulation

        summary = simulation.train(config, workdir)
        summary.pop("server", None)
        return summary
    from fedjax_lm import train

    return train.train(config, workdir)


class PointWatch:
    """Prints a point's progress from the metrics its run writes (rounds.jsonl or train.jsonl):
    round (or step), loss, tokens/s, the point's ETA and the sweep's."""

    def __init__(self, label: str, point: Point, workdir: str, later_tokens: int, every_s: float):
        cfg, fed = point.config, point.config.get("federation")
        per_step = int(cfg.train.batch_size) * int(cfg.train.seq_len)
        if fed is not None:
            self.stream, self.unit, total = "rounds", "round", int(fed.rounds)
            tokens_per_unit = (int(fed.silos_per_round) or num_silos(cfg)) * int(fed.local_steps) * per_step
        else:
            self.stream, self.unit, total, tokens_per_unit = "train", "step", int(cfg.train.steps), per_step
        self.path = os.path.join(workdir, "metrics", f"{self.stream}.jsonl")
        self.offset = 0
        done, _ = self._read(0)  # a resumed point: what its earlier runs did
        self.later_tokens = later_tokens
        self.progress = monitor.StepProgress(
            label,
            total=total,
            tokens_per_step=tokens_per_unit,
            enabled=True,
            log_every_s=every_s,
            unit=self.unit,
            eta_label="point ETA",
            initial=done,
            bar=False,
        )
        self.done = done
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _read(self, done: int) -> tuple[int, float | None]:
        loss = None
        if not os.path.exists(self.path):
            return done, loss
        if os.path.getsize(self.path) < self.offset:  # a resumed run dropped a half-done round's rows
            self.offset = 0
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            for line in f:
                if not line.endswith(b"\n"):
                    break  # half-written: read it next time
                self.offset += len(line)
                row = json.loads(line)
                done = row["round"] + 1 if self.unit == "round" else int(row["step"])
                loss = row.get("train_loss" if self.unit == "round" else "loss")
        return done, loss

    def _loop(self) -> None:
        while not self._stop.wait(1.0):
            done, loss = self._read(self.done)
            if done == self.done:
                continue
            self.done = done
            rate, eta = self.progress.rate(done), self.progress.eta(done)
            note = ""
            if eta is not None and rate > 0:
                note = f"sweep ETA {monitor.format_duration(eta + self.later_tokens / rate)}"
            self.progress.update(done, loss=loss if loss is None or math.isfinite(loss) else None, note=note)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.progress.close()


def run(
    points: Sequence[Point],
    workdir: str,
    *,
    command: str = "",
    progress_every_s: float = PROGRESS_EVERY_S,
) -> list[Result]:
    """Runs every point not finished yet, one after another; writes the table and plots after each.
    Raises SweepFailed at the end when a point failed."""
    os.makedirs(workdir, exist_ok=True)
    t0 = time.time()
    runs.write_json_atomic(
        os.path.join(workdir, "sweep.json"),
        {
            "command": command,
            "points": [
                {
                    "name": p.name,
                    "overrides": p.overrides,
                    "fingerprint": runs.fingerprint(p.config),
                    "command": p.command(workdir),
                }
                for p in points
            ],
        },
    )
    done_before = {p.name for p in points if finished(p, os.path.join(workdir, p.name))}
    todo_tokens = {p.name: planned_tokens(p.config) for p in points if p.name not in done_before}
    print(
        f"[sweep] {len(points)} points, {len(points) - len(done_before)} to run "
        f"({sum(todo_tokens.values()):,} tokens) in {workdir}",
        flush=True,
    )
    results: list[Result] = []
    n = len(points)
    for p in points:
        wd = os.path.join(workdir, p.name)
        label = f"[sweep] point {p.index}/{n} {p.name}"
        if p.name in done_before:
            summary = _read_json(os.path.join(wd, "summary.json"))
            results.append(Result(p, "skipped", summary))
            print(f"{label}: finished earlier, skipped ({_ppl_text(summary)})", flush=True)
            continue
        todo_tokens.pop(p.name)
        print(f"{label}: {p.kind} run in {wd}", flush=True)
        started = time.time()
        try:
            with PointWatch(label, p, wd, sum(todo_tokens.values()), progress_every_s):
                summary = train_point(p.config, wd)
            loss = summary["val"]["pooled"]["loss"]
            if not math.isfinite(loss):
                raise runs.NonFiniteLossError(f"the final pooled validation loss is {loss}")
            results.append(Result(p, "ok", summary))
            _remove(os.path.join(wd, "sweep_error.txt"))
            took = time.time() - started
            rate = planned_tokens(p.config) / max(took, 1e-9)
            left = sum(todo_tokens.values()) / rate
            print(
                f"{label}: done in {monitor.format_duration(took)}, {_ppl_text(summary)}, "
                f"{rate:,.0f} tokens/s; sweep ETA {monitor.format_duration(left)}",
                flush=True,
            )
        except Exception as e:  # noqa: BLE001 - any failure of one point is recorded, the sweep goes on
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            error = f"{type(e).__name__}: {first}" if first else type(e).__name__
            results.append(Result(p, "failed", None, error[:300]))
            os.makedirs(wd, exist_ok=True)
            with open(os.path.join(wd, "sweep_error.txt"), "w") as f:
                f.write(traceback.format_exc())
            print(f"{label}: FAILED: {error} (traceback in {wd}/sweep_error.txt)", flush=True)
        if p.index < n:  # the table so far, for a sweep of hours
            write_outputs(results, workdir, command=command, wall_s=time.time() - t0)
    write_outputs(results, workdir, command=command, wall_s=time.time() - t0)
    failed = [r for r in results if r.status == "failed"]
    print(
        f"[sweep] {len(results) - len(failed)}/{n} points finished, {len(failed)} failed "
        f"({monitor.format_duration(time.time() - t0)}); wrote {workdir}/sweep.md, sweep.csv, "
        "sweep_final.png, sweep_curves.png",
        flush=True,
    )
    if failed:
        raise SweepFailed(
            f"{len(failed)} of {n} points failed ({', '.join(r.point.name for r in failed)}); "
            f"see {os.path.join(workdir, 'sweep.md')}"
        )
    return results


def _read_json(path: str) -> dict[str, Any]:
    with open(path) as f:
        return json.load(f)


def _remove(path: str) -> None:
    if os.path.exists(path):
        os.remove(path)


def _ppl_text(summary: Mapping[str, Any]) -> str:
    return f"pooled val ppl {summary['val']['pooled']['ppl']:.2f}"


# ------------------------------------------------------------------------------ the verb


def main(
    spec: str,
    sweep: str,
    workdir: str,
    base: ml_collections.ConfigDict,
    *,
    cli_overrides: Mapping[str, Any] | None = None,
    print_only: bool = False,
) -> list[Result] | None:
    """`python -m fedjax_lm sweep`: builds and validates every point, then prints or runs them."""
    points = build(spec, sweep, base, cli_overrides)
    if print_only:
        print(f"# sweep {sweep}: {len(points)} points", file=sys.stderr)
        for p in points:
            print(p.command(workdir))
        return None
    args = ["python", "-m", "fedjax_lm", "sweep", "--config", spec]
    args += [f"--config.{k}={format_value(v)}" for k, v in (cli_overrides or {}).items()]
    args += ["--sweep", sweep, "--workdir", workdir]
    command = " ".join(shlex.quote(a) for a in args)
    return run(points, workdir, command=command)
