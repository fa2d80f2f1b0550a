"""Command line: `python -m fedjax_lm <verb> --config path.py:variant [--config.x.y=v] [flags]`.

Verbs:
  prepare   build the default corpus (or the config's sources): tokenizer + per-silo token files
  train     centralized training (experiments/centralized.py) or, for configs with a
            `federation` section, a one-process federated simulation
  compile   lower and compile the train step for a mesh without running it; prints memory
  eval      validation perplexity of the latest checkpoint in --workdir
  export    write the latest checkpoint as a Hugging Face Llama model (--out DIR)
  aggregate the aggregator process of a cross-silo deployment (--store ROOT --workdir DIR)
  silo      one silo process of a cross-silo deployment (--store ROOT --silo NAME)
"""

from __future__ import annotations

import os

from absl import app, flags, logging
from ml_collections import config_flags

VERBS = ("prepare", "train", "compile", "eval", "export", "aggregate", "silo")

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. experiments/centralized.py:size=tiny", accept_new_attributes=False
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder (checkpoints, metrics, summary.json)")
_MESH = flags.DEFINE_string("mesh", None, "compile: mesh as data,fsdp,tensor (e.g. 1,8,1)")
_BATCH = flags.DEFINE_integer(
    "batch_size", None, "compile: global batch size (default: config.train.batch_size)"
)
_OUT = flags.DEFINE_string("out", None, "export: output folder")
_STORE = flags.DEFINE_string("store", None, "aggregate/silo: the store root (path, gs://, s3://)")
_SILO = flags.DEFINE_string("silo", None, "silo: this silo's name")


def _require(flag, name: str, verb: str):
    if flag.value is None:
        raise app.UsageError(f"`{verb}` needs --{name}")
    return flag.value


def _cmd_prepare(config) -> None:
    from fedjax_lm import data as data_lib
    from fedjax_lm import train

    info = data_lib.prepare(config.data)
    corpus = data_lib.Corpus.load(config.data.corpus_dir)
    del info
    print(f"corpus ready at {config.data.corpus_dir}: {len(corpus.silos)} silos, vocab {corpus.vocab_size}")
    print(
        "silos: " + " ".join(train.active_silos(config, corpus))
    )  # last line: read by launch/local_federation.sh


def _cmd_train(config) -> None:
    workdir = _require(_WORKDIR, "workdir", "train")
    if "federation" in config and config.federation is not None:
        from fedjax_lm import federation

        federation.train(config, workdir)
    else:
        from fedjax_lm import train

        train.train(config, workdir)


def _cmd_compile(config) -> None:
    import jax

    from fedjax_lm import model as model_lib
    from fedjax_lm import monitor
    from fedjax_lm import train

    if _MESH.value:
        try:
            d, f, t = (int(x) for x in _MESH.value.split(","))
        except ValueError:
            raise app.UsageError(
                f"--mesh must be data,fsdp,tensor (three integers), got {_MESH.value!r}"
            ) from None
        config.mesh.update(dict(data=d, fsdp=f, tensor=t))
    silo = train.build_silo(config, total_steps=int(config.train.steps))
    batch = _BATCH.value or int(config.train.batch_size)
    seq = int(config.train.seq_len)
    lowered, compiled = silo.compile_train_step(batch, seq)
    mem = compiled.memory_analysis()
    n = model_lib.param_count(silo.model_config)
    print(f"model: {n:,} params, {model_lib.flops_per_token(silo.model_config, seq):.3e} train FLOPs/token")
    print(
        f"mesh: {dict(silo.mesh.shape)} on {jax.device_count()} {jax.devices()[0].platform} devices; batch {batch}x{seq}"
    )
    if mem is not None:
        fields = (
            "argument_size_in_bytes",
            "output_size_in_bytes",
            "temp_size_in_bytes",
            "alias_size_in_bytes",
            "generated_code_size_in_bytes",
        )
        for f in fields:
            v = getattr(mem, f, None)
            if v is not None:
                print(f"per-device {f.replace('_in_bytes', '')}: {monitor.human_bytes(v)}")
        total = (
            mem.argument_size_in_bytes
            + mem.output_size_in_bytes
            + mem.temp_size_in_bytes
            - mem.alias_size_in_bytes
        )
        print(f"per-device peak estimate: {monitor.human_bytes(total)}")
    cost = compiled.cost_analysis()
    if cost:
        c = cost[0] if isinstance(cost, list) else cost
        if "flops" in c:
            print(f"XLA cost analysis: {c['flops']:.3e} FLOPs per step per device")


def _load_latest(config, workdir: str):
    from fedjax_lm import checkpoint as ckpt_lib
    from fedjax_lm import train

    silo = train.build_silo(config, total_steps=int(config.train.steps))
    ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
    step = ckpt.latest_step()
    if step is None:
        raise app.UsageError(f"no checkpoint under {workdir}/checkpoints")
    state, _ = ckpt.restore(step, silo.abstract_state_with_shardings())
    ckpt.close()
    return silo, state, step


def _cmd_eval(config) -> None:
    from fedjax_lm import evaluate as eval_lib
    from fedjax_lm import train

    workdir = _require(_WORKDIR, "workdir", "eval")
    corpus = train.ensure_corpus(config.data)
    silo, state, step = _load_latest(config, workdir)
    sets = eval_lib.eval_sets(
        corpus,
        train.active_silos(config, corpus),
        seq_len=int(config.train.seq_len),
        batch_size=int(config.train.batch_size),
        max_batches=int(config.train.eval_batches),
    )
    result = eval_lib.evaluate(silo, state.params, sets)
    print(f"step {step}")
    print(eval_lib.format_table(result))


def _cmd_export(config) -> None:
    import jax

    from fedjax_lm import export

    workdir = _require(_WORKDIR, "workdir", "export")
    out = _require(_OUT, "out", "export")
    silo, state, step = _load_latest(config, workdir)
    tok = os.path.join(config.data.corpus_dir, "tokenizer.model")
    export.export_hf_llama(
        jax.device_get(state.params),
        silo.model_config,
        out,
        tokenizer_path=tok if os.path.exists(tok) else None,
    )
    print(f"exported step {step} to {out} (Hugging Face Llama format)")


class _QuietLibraries:
    """Drops Orbax's routine warnings (e.g. skipped OCDBT merges on one host); errors still show."""

    def filter(self, record) -> bool:
        return record.levelno >= 40 or "orbax" not in record.pathname


def _store_root(config) -> str:
    root = _STORE.value or config.federation.deploy.store
    if not root:
        raise app.UsageError("give the store with --store ROOT (or config.federation.deploy.store)")
    return root


def _cmd_aggregate(config) -> None:
    from fedjax_lm import deploy

    deploy.Aggregator(config, _store_root(config), _require(_WORKDIR, "workdir", "aggregate")).run()


def _cmd_silo(config) -> None:
    from fedjax_lm import deploy

    deploy.SiloWorker(config, _store_root(config), _require(_SILO, "silo", "silo")).run()


def _main(argv: list[str]) -> None:
    if len(argv) < 2 or argv[1] not in VERBS:
        raise app.UsageError(
            f"usage: python -m fedjax_lm <{'|'.join(VERBS)}> --config FILE[:VARIANT] [flags]"
        )
    if len(argv) > 2:
        raise app.UsageError(f"unexpected arguments: {argv[2:]}")
    from fedjax_lm import sharding

    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO; -v 0 brings it back
        logging.get_absl_handler().addFilter(_QuietLibraries())
    sharding.maybe_initialize_distributed()
    config = _CONFIG.value
    if config is None:
        raise app.UsageError("--config is required, e.g. --config experiments/centralized.py:size=tiny")
    verb = argv[1]
    {
        "prepare": _cmd_prepare,
        "train": _cmd_train,
        "compile": _cmd_compile,
        "eval": _cmd_eval,
        "export": _cmd_export,
        "aggregate": _cmd_aggregate,
        "silo": _cmd_silo,
    }[verb](config)


def main() -> None:
    app.run(_main)


if __name__ == "__main__":
    main()
