"""Command line: `python -m fedjax_lm <verb> --config path.py:variant [--config.x.y=v] [flags]`.

`python -m fedjax_lm VERB --help` lists a verb's flags with an example. Errors a user can
cause (a bad config value, a missing or corrupt corpus, a workdir started with another
config) print one line naming the field or file and exit 1; `-v 1` shows the traceback.
"""

from __future__ import annotations

import dataclasses
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. experiments/centralized.py:size=tiny", accept_new_attributes=False
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder (run.json, checkpoints, metrics, summary.json)")
_ALLOW = flags.DEFINE_boolean(
    "allow_config_change", False, "Resume a workdir (or store) although its config differs from --config"
)
_MESH = flags.DEFINE_string("mesh", None, "Mesh as data,fsdp,tensor (e.g. 1,8,1)")
_BATCH = flags.DEFINE_integer("batch_size", None, "Global batch size (default: config.train.batch_size)")
_OUT = flags.DEFINE_string(
    "out", None, "Output folder (export: the Hugging Face model; keygen: the key files)"
)
_STORE = flags.DEFINE_string("store", None, "The store root (local path, gs://, s3://)")
_SILO = flags.DEFINE_string("silo", None, "This silo's name")
_PROMPT = flags.DEFINE_string("prompt", None, "Text to continue")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.8, "Sampling temperature (0: greedy)")
_TOP_K = flags.DEFINE_integer("top_k", 40, "Sample among the k most likely tokens (0: all)")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed")
_NAME = flags.DEFINE_string("name", None, "Member name: a silo's name, or 'aggregator'")
_ALLOW_LIST = flags.DEFINE_string(
    "allow_list", None, "Allow-list JSON file to add the new public key to (created if missing)"
)
_SOURCE = flags.DEFINE_multi_string(
    "source",
    None,
    "A text source NAME=SPEC, repeatable; replaces config.data.sources. SPEC: folder:/path (every .txt/.md "
    "file a document), jsonl:/path/file.jsonl[:field], hf:dataset[:split[:field]], python-code, or a built-in",
)
_SWEEP = flags.DEFINE_string(
    "sweep", None, "Sweep name: the function sweep_NAME(add, base) in the --config file"
)
_CARDS = flags.DEFINE_string(
    "cards", None, "Cards folder: project.yaml, datasets/<silo>.yaml, models/<id>.yaml"
)
_CORPUS = flags.DEFINE_string(
    "corpus", None, "A prepared corpus: Data cards generated from its corpus.json for silos without one"
)
_FLOP = flags.DEFINE_float("flop", None, "Measured training compute in FLOP (Art. 51)")
_PROJECTED_FLOP = flags.DEFINE_float("projected_flop", None, "Planned training compute in FLOP (Art. 51)")
_SCHEMA = flags.DEFINE_boolean("schema", False, "Print every card's fields (type, article, meaning) and exit")
_PRINT_ONLY = flags.DEFINE_boolean(
    "print-only", False, "Print one `train` command per point (for a scheduler) and run nothing"
)


@dataclasses.dataclass(frozen=True)
class Verb:
    summary: str
    flags: tuple[str, ...]
    example: str
    needs_config: bool = True  # False: taken from WORKDIR/run.json when --config is not given


VERBS = {
    "prepare": Verb(
        "build the corpus (tokenizer + per-silo token files); `train` does it when needed",
        ("config", "source"),
        "python -m fedjax_lm prepare --config experiments/photon.py --source mine=folder:/data/mine",
    ),
    "train": Verb(
        "centralized training, or a one-process federation for configs with a `federation` section",
        ("config", "workdir", "source", "allow_config_change"),
        "python -m fedjax_lm train --config experiments/photon.py:size=tiny,silos=8 --workdir runs/photon",
    ),
    "eval": Verb(
        "validation perplexity per silo of the latest model in a workdir (any run kind)",
        ("workdir", "config"),
        "python -m fedjax_lm eval --workdir runs/photon",
        needs_config=False,
    ),
    "generate": Verb(
        "sample text from the latest model in a workdir with the run's tokenizer",
        ("workdir", "prompt", "max_new_tokens", "temperature", "top_k", "seed", "config"),
        'python -m fedjax_lm generate --workdir runs/photon --prompt "The Lord said"',
        needs_config=False,
    ),
    "export": Verb(
        "write the latest model of a workdir as a Hugging Face Llama model, tokenizer included",
        ("workdir", "out", "config"),
        "python -m fedjax_lm export --workdir runs/photon --out runs/photon-hf",
        needs_config=False,
    ),
    "compile": Verb(
        "lower and compile the train step for a mesh without running it; prints memory per device",
        ("config", "mesh", "batch_size"),
        "python -m fedjax_lm compile --config experiments/centralized.py:size=1.3b --mesh 1,8,1",
    ),
    "keygen": Verb(
        "an Ed25519 key pair for one member of a signed deployment (NAME.key stays on its machine)",
        ("name", "out", "allow_list"),
        "python -m fedjax_lm keygen --name quotes-en --out keys --allow_list keys/federation.json",
        needs_config=False,
    ),
    "aggregate": Verb(
        "the aggregator process of a cross-silo deployment",
        ("config", "store", "workdir", "allow_config_change"),
        "python -m fedjax_lm aggregate --config experiments/photon.py:size=tiny --store runs/store --workdir runs/agg",
    ),
    "silo": Verb(
        "one silo process of a cross-silo deployment: trains on its own sources with the store's tokenizer",
        ("config", "store", "silo", "source", "workdir"),
        "python -m fedjax_lm silo --config experiments/photon.py:size=tiny --store runs/store --source clinic=folder:/data/clinic",
    ),
    "federation": Verb(
        "a sub-federation of a tree (federation.tree.spec): the aggregator of its own store, one member of its parent's",
        ("config", "store", "name", "workdir"),
        "python -m fedjax_lm federation --config experiments/worldlm.py:method=hierfavg --name slavic --store runs/store --workdir runs/slavic",
    ),
    "sweep": Verb(
        "run every point of a sweep defined next to its config (resumable), then one table and plots",
        ("config", "sweep", "workdir", "print-only"),
        "python -m fedjax_lm sweep --config experiments/photon.py:size=tiny --sweep rounds_vs_H --workdir runs/sweep",
    ),
    "report": Verb(
        "the AI Act documents of a finished run: Annex XI technical documentation, training-content summary",
        ("workdir", "out"),
        "python -m fedjax_lm report --workdir runs/photon",
        needs_config=False,
    ),
    "comply": Verb(
        "the EU AI Act analysis of a cards folder: verdict.json + report.md (exit 2 if prohibited or unmet)",
        ("cards", "corpus", "flop", "projected_flop", "out", "schema"),
        "python -m fedjax_lm comply --cards experiments/cards --corpus cache/corpus --out runs/compliance",
        needs_config=False,
    ),
}


def usage() -> str:
    lines = [
        "usage: python -m fedjax_lm <verb> [flags]   (python -m fedjax_lm <verb> --help for its flags)",
        "",
    ]
    lines += [f"  {name:<10} {v.summary}" for name, v in VERBS.items()]
    return "\n".join(lines)


def verb_help(name: str) -> str:
    v = VERBS[name]
    lines = [f"python -m fedjax_lm {name}: {v.summary}", "", "flags:"]
    for f in v.flags:
        flag = flags.FLAGS[f]
        default = "" if flag.default in (None, False, "") else f" (default {flag.default})"
        optional = " (default: the workdir's run.json)" if f == "config" and not v.needs_config else ""
        lines.append(f"  --{f:<22} {flag.help}{default}{optional}")
    lines += [
        "  --config.FIELD=VALUE     override one config field",
        "  -v 1                     tracebacks and library logs",
    ]
    lines += ["", "example:", f"  {v.example}"]
    return "\n".join(lines)


def _require(flag, name: str, verb: str):
    if flag.value is None:
        raise app.UsageError(f"`{verb}` needs --{name} (python -m fedjax_lm {verb} --help)")
    return flag.value


def _cmd_prepare(config) -> None:
    from fedjax_lm import data as data_lib
    from fedjax_lm.data import select

    data_lib.prepare(config.data)
    corpus = data_lib.Corpus.load(config.data.corpus_dir)
    print(f"corpus ready at {config.data.corpus_dir}: {len(corpus.silos)} silos, vocab {corpus.vocab_size}")
    if config.get("federation") is not None and str(config.federation.tree.spec).strip():
        from fedjax_lm import tree as tree_lib

        tree = tree_lib.from_config(config.federation, select.active_silos(config, corpus))
        print("federations: " + " ".join(tree.inner()))  # read by launch/local_federation.sh
    print(
        "silos: " + " ".join(select.active_silos(config, corpus))
    )  # last line: read by launch/local_federation.sh


def _cmd_train(config) -> None:
    workdir = _require(_WORKDIR, "workdir", "train")
    if config.get("federation") is not None:
        from fedjax_lm import simulation

        simulation.train(config, workdir, allow_config_change=_ALLOW.value)
    else:
        from fedjax_lm import train

        train.train(config, workdir, allow_config_change=_ALLOW.value)


def _cmd_compile(config) -> None:
    from fedjax_lm import compile_report

    print(compile_report.report(config, batch_size=_BATCH.value))


def _cmd_eval(config) -> None:
    from fedjax_lm import evaluate as eval_lib
    from fedjax_lm import runs
    from fedjax_lm.data import select

    workdir = _require(_WORKDIR, "workdir", "eval")
    silo, params, what = runs.load_params(config, workdir)
    corpus = select.ensure_corpus(config.data)
    sets = eval_lib.eval_sets(
        corpus,
        select.active_silos(config, corpus),
        seq_len=int(config.train.seq_len),
        batch_size=int(config.train.batch_size),
        max_batches=int(config.train.eval_batches),
    )
    print(f"model: {what}")
    print(eval_lib.format_table(eval_lib.evaluate(silo, params, sets)))


def _tokenizer_path(config) -> str:
    return os.path.join(config.data.corpus_dir, "tokenizer.model")


def _cmd_generate(config) -> None:
    from fedjax_lm import generate
    from fedjax_lm import runs
    from fedjax_lm.data import Tokenizer

    workdir = _require(_WORKDIR, "workdir", "generate")
    prompt = _require(_PROMPT, "prompt", "generate")
    tok_path = _tokenizer_path(config)
    if not os.path.exists(tok_path):
        raise FileNotFoundError(f"no tokenizer at {tok_path}: the run's corpus is gone; run `prepare` again")
    silo, params, what = runs.load_params(config, workdir)
    text = generate.generate_text(
        silo.model_config,
        params,
        Tokenizer(tok_path),
        prompt,
        max_new_tokens=_MAX_NEW.value,
        temperature=_TEMPERATURE.value,
        top_k=_TOP_K.value,
        seed=_SEED.value,
        rules=silo.rules,
        mesh=silo.mesh,
    )
    print(f"model: {what}", file=sys.stderr)
    print(prompt + text)


def _cmd_export(config) -> None:
    import jax

    from fedjax_lm import export
    from fedjax_lm import runs

    workdir = _require(_WORKDIR, "workdir", "export")
    out = _require(_OUT, "out", "export")
    silo, params, what = runs.load_params(config, workdir)
    tok = _tokenizer_path(config)
    if not os.path.exists(tok):
        raise FileNotFoundError(f"no tokenizer at {tok}: the run's corpus is gone; run `prepare` again")
    export.export_hf_llama(jax.device_get(params), silo.model_config, out, tokenizer_path=tok)
    print(f"exported {what} to {out} (Hugging Face Llama format, tokenizer.model beside the weights)")
    from fedjax_lm.compliance import documents

    try:
        card = documents.hf_model_card(documents.gather(workdir))
    except FileNotFoundError as e:  # an unfinished run: weights without a card
        print(f"no model card: {e}")
    else:
        with open(os.path.join(out, "README.md"), "w") as f:
            f.write(card)
        print(f"model card: {out}/README.md")


def _cmd_keygen(config) -> None:
    from fedjax_lm import identity

    name = _require(_NAME, "name", "keygen")
    out = _require(_OUT, "out", "keygen")
    path, public = identity.generate(name, out)
    print(f"private key: {path} (mode 0600; it never leaves this machine)")
    print(f"public key:  {public}")
    if _ALLOW_LIST.value:
        identity.add_to_allow_list(_ALLOW_LIST.value, name, public)
        print(f"added {name!r} to {_ALLOW_LIST.value}")
    else:
        print("send the public key to whoever assembles the federation's allow-list")


def _store_root(config) -> str:
    root = _STORE.value or config.federation.deploy.store
    if not root:
        raise app.UsageError("give the store with --store ROOT (or config.federation.deploy.store)")
    return root


def _cmd_aggregate(config) -> None:
    from fedjax_lm import deploy

    workdir = _require(_WORKDIR, "workdir", "aggregate")
    deploy.Aggregator(config, _store_root(config), workdir, allow_config_change=_ALLOW.value).run()


def _cmd_silo(config) -> None:
    from fedjax_lm import deploy

    name = _SILO.value
    if name is None and _SOURCE.value and len(_SOURCE.value) == 1 and "=" in _SOURCE.value[0].split(":")[0]:
        name = _SOURCE.value[0].split("=", 1)[0]  # `--source clinic=folder:/data/clinic` is silo clinic
    if name is None:
        raise app.UsageError(
            "`silo` needs --silo NAME (or one --source NAME=SPEC) (python -m fedjax_lm silo --help)"
        )
    deploy.SiloWorker(config, _store_root(config), name, workdir=_WORKDIR.value).run()


def _cmd_federation(config) -> None:
    from fedjax_lm.deploy.subfederation import SubFederation

    name = _require(_NAME, "name", "federation")
    SubFederation(config, _store_root(config), name, _require(_WORKDIR, "workdir", "federation")).run()


def _cmd_report(config) -> None:
    from fedjax_lm.compliance import documents

    workdir = _require(_WORKDIR, "workdir", "report")
    for path in documents.write_reports(workdir, _OUT.value):
        print(f"wrote {path}")


def _cmd_comply(config) -> None:
    import json

    from fedjax_lm import compliance
    from fedjax_lm.compliance import cards as cards_lib

    if _SCHEMA.value:
        print(cards_lib.schema_table())
        return
    folder = _require(_CARDS, "cards", "comply")
    cards = compliance.load_dir(folder, _CORPUS.value)
    verdict = compliance.analyse(cards, measured_flop=_FLOP.value, projected_flop=_PROJECTED_FLOP.value)
    text = compliance.report(verdict)
    print(text, end="")
    if _OUT.value:
        os.makedirs(_OUT.value, exist_ok=True)
        with open(os.path.join(_OUT.value, "verdict.json"), "w") as f:
            json.dump(verdict.to_json(), f, indent=1)
        with open(os.path.join(_OUT.value, "report.md"), "w") as f:
            f.write(text)
        generated = {s: c for s, c in cards.datasets.items() if "corpus.json#" in c.path}
        if generated:  # for the silos' owners to review and complete
            import yaml

            os.makedirs(os.path.join(_OUT.value, "datasets"), exist_ok=True)
            for silo, card in generated.items():
                with open(os.path.join(_OUT.value, "datasets", f"{silo}.yaml"), "w") as f:
                    yaml.safe_dump(dict(card.fields), f, sort_keys=False, allow_unicode=True)
        print(
            f"wrote {_OUT.value}/verdict.json and report.md"
            + (f" and {len(generated)} generated Data cards" if generated else "")
        )
    if verdict.status in ("prohibited", "non_compliant"):
        sys.exit(2)


def _cmd_sweep(config) -> None:
    from fedjax_lm import sweep

    name = _require(_SWEEP, "sweep", "sweep")
    workdir = _require(_WORKDIR, "workdir", "sweep")
    flag = flags.FLAGS["config"]
    sweep.main(
        config_flags.get_config_filename(flag),
        name,
        workdir,
        config,
        cli_overrides=config_flags.get_override_values(flag),
        print_only=_PRINT_ONLY.value,
    )


class _QuietLibraries:
    """Drops Orbax's routine warnings (e.g. skipped OCDBT merges on one host); errors still show."""

    def filter(self, record) -> bool:
        return record.levelno >= 40 or "orbax" not in record.pathname


def _user_errors() -> tuple[type[BaseException], ...]:
    from fedjax_lm import runs
    from fedjax_lm.data import DataError
    from fedjax_lm.store import LockHeld, LockLost

    return (
        ValueError,
        KeyError,
        OSError,
        TimeoutError,
        DataError,
        LockHeld,
        LockLost,
        runs.NonFiniteLossError,
    )


def _load_config(verb: str):
    config = _CONFIG.value
    if verb in ("keygen", "comply", "report"):
        return None  # no config: a key belongs to a member, cards to a project, not to a run
    if config is None and not VERBS[verb].needs_config and _WORKDIR.value:
        from fedjax_lm import runs

        config = runs.config_of(_WORKDIR.value)
    if config is None:
        raise app.UsageError(
            f"`{verb}` needs --config FILE[:VARIANT], e.g. --config experiments/photon.py:size=tiny "
            f"(python -m fedjax_lm {verb} --help)"
        )
    if _SOURCE.value:
        if "source" not in VERBS[verb].flags:
            raise app.UsageError(f"`{verb}` takes no --source (python -m fedjax_lm {verb} --help)")
        config.data.sources = tuple(_SOURCE.value)
    if verb == "compile" and _MESH.value:
        try:
            d, f, t = (int(x) for x in _MESH.value.split(","))
        except ValueError:
            raise app.UsageError(
                f"--mesh must be data,fsdp,tensor (three integers), got {_MESH.value!r}"
            ) from None
        config.mesh.update(dict(data=d, fsdp=f, tensor=t))
    if verb != "prepare":
        from fedjax_lm import config as config_lib

        config_lib.validate(config)
    return config


def _main(argv: list[str]) -> None:
    if len(argv) < 2 or argv[1] not in VERBS:
        raise app.UsageError(usage())
    if len(argv) > 2:
        raise app.UsageError(f"unexpected arguments: {argv[2:]}")
    verb = argv[1]
    verbose = flags.FLAGS["verbosity"].present
    if not verbose:
        logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO; -v 0 brings it back
        logging.get_absl_handler().addFilter(_QuietLibraries())
    try:
        from fedjax_lm import sharding

        sharding.maybe_initialize_distributed()
        config = _load_config(verb)
        globals()[f"_cmd_{verb}"](config)
    except _user_errors() as e:
        if verbose:
            raise
        message = str(e) if not isinstance(e, KeyError) else f"no such field {e}"
        print(f"fedjax_lm {verb}: error: {message}  (-v 1 shows the traceback)", file=sys.stderr, flush=True)
        sys.exit(1)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv if argv is None else argv)
    if len(argv) >= 2 and argv[1] in ("-h", "--help", "help"):
        print(usage())
        sys.exit(0)
    if len(argv) >= 2 and argv[1] in VERBS and any(a in ("-h", "--help", "--helpshort") for a in argv[2:]):
        print(verb_help(argv[1]))
        sys.exit(0)
    app.run(_main, argv=argv, flags_parser=_parse_flags)


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's parser, with a bad flag or config variant reported in one line like other errors."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        verb = argv[1] if len(argv) > 1 and argv[1] in VERBS else "usage"
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        if "-v" not in argv and any(line.startswith("Traceback") for line in lines):
            lines = [lines[0].removesuffix(":"), lines[-1]]  # the config file's own error, not its frames
        print(
            f"fedjax_lm {verb}: error: {': '.join(lines)}  (python -m fedjax_lm {verb} --help)",
            file=sys.stderr,
        )
        sys.exit(1)


if __name__ == "__main__":
    main()
