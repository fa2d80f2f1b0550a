"""fedjax_lm's train step against the PyTorch peer a user already knows, on the same machine, in one process.

    pip install -e .[bench]                       # torch (CPU build) and transformers: never needed otherwise
    python benchmarks/vs_pytorch.py               # tiny and small, batch 8x256 and 4x1024, then the round
    python benchmarks/vs_pytorch.py --shapes tiny:8x256 --reps 3 --no-round

Same shapes on both sides (d_model, layers, heads, kv heads, d_ff, vocab, untied head), float32,
AdamW (b1 0.9, b2 0.95, eps 1e-8, decoupled weight decay 0.1 on matrices only), global-norm clipping
at 1.0, linear warm-up then cosine. Ours is the real train step: `Silo.train_step` (what the
centralized trainer runs) and, for the round, `Silo.local_train_chunk` as `Federation.train_silo`
calls it. Theirs is Hugging Face `LlamaForCausalLM` (SDPA attention) + `torch.optim.AdamW` +
`clip_grad_norm_`, eager and under `torch.compile` (the model's forward/backward; the optimizer
runs eagerly, as in most user code).

The runners are timed alternately (ours, eager, compiled, ours, ...): machine load that comes and
goes hits all three alike, and the ratio ours / eager is the median over the alternations.
Each timed block is `--steps` steps, synchronised at its end.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from experiments import presets  # noqa: E402
from fedjax_lm import model as model_lib  # noqa: E402
from fedjax_lm import optim  # noqa: E402
from fedjax_lm import sharding  # noqa: E402
from fedjax_lm import silo as silo_lib  # noqa: E402
from fedjax_lm.silo import Silo  # noqa: E402

torch = transformers = None  # set by main(): the [bench] extra is optional
TOTAL_STEPS = 1000  # schedule length on both sides (warm-up 20, cosine to 10%)


def model_config(preset: str, seq: int) -> model_lib.ModelConfig:
    cfg = presets.model_preset(preset)
    cfg.max_seq_len = max(cfg.max_seq_len, seq)
    return model_lib.ModelConfig.from_dict(cfg)


def token_batches(vocab: int, n: int, batch: int, seq: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    toks = np.random.default_rng(seed).integers(0, vocab, size=(n, batch, seq + 1), dtype=np.int32)
    return toks[..., :-1], toks[..., 1:]


# ---- ours ------------------------------------------------------------------------------------
class Ours:
    name = "fedjax_lm"

    def __init__(self, mcfg: model_lib.ModelConfig):
        self.ocfg = optim.default_optim_config()
        tx, schedule = optim.make_optimizer(self.ocfg, TOTAL_STEPS)
        mesh = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
        self.silo = Silo(mcfg, tx, mesh, schedule=schedule)
        self.state = self.silo.init_state(jax.random.key(0))

    def steps(self, inputs: np.ndarray, targets: np.ndarray) -> float:
        """One train step per [B, L] batch (the centralized trainer's loop); returns the last loss."""
        metrics = None
        for x, y in zip(inputs, targets):
            self.state, metrics = self.silo.train_step(
                self.state, self.silo.put_batch({"inputs": x, "targets": y})
            )
        return float(metrics["loss"])

    def round(self, inputs: np.ndarray, targets: np.ndarray) -> float:
        """H steps over [H, B, L] as `Federation.train_silo` runs them: placed once, one chunk of H."""
        H = inputs.shape[0]
        on_mesh = self.silo.put_batch({"inputs": inputs, "targets": targets}, ndim=3)
        self.state, metrics = self.silo.local_train_chunk(self.state, on_mesh, np.int32(0), H)
        return float(metrics["loss"][-1])


# ---- theirs ----------------------------------------------------------------------------------
def torch_schedule(cfg, total_steps: int):
    """optax.warmup_cosine_decay_schedule as a LambdaLR factor (same shape, same numbers)."""
    warmup, peak, end = int(cfg.warmup_steps), float(cfg.lr), float(cfg.lr) * float(cfg.end_lr_ratio)
    decay = max(int(cfg.decay_steps) or total_steps, warmup + 1)

    def factor(step: int) -> float:
        if step < warmup:
            return step / warmup
        t = min(step - warmup, decay - warmup) / (decay - warmup)
        return (end + (peak - end) * 0.5 * (1 + math.cos(math.pi * t))) / peak

    return factor


class Torch:
    def __init__(self, mcfg: model_lib.ModelConfig, compiled: bool):
        self.name = "torch.compile" if compiled else "PyTorch eager"
        torch.manual_seed(0)
        hf = transformers.LlamaConfig(
            vocab_size=mcfg.vocab_size,
            hidden_size=mcfg.d_model,
            intermediate_size=mcfg.d_ff,
            num_hidden_layers=mcfg.n_layers,
            num_attention_heads=mcfg.n_heads,
            num_key_value_heads=mcfg.n_kv_heads,
            head_dim=mcfg.head_dim,
            max_position_embeddings=mcfg.max_seq_len,
            rms_norm_eps=mcfg.norm_eps,
            rope_theta=mcfg.rope_theta,
            tie_word_embeddings=False,
            attention_bias=False,
            mlp_bias=False,
            attn_implementation="sdpa",
            use_cache=False,
        )
        self.model = transformers.LlamaForCausalLM(hf).float().train()
        cfg = optim.default_optim_config()
        decay = [p for p in self.model.parameters() if p.ndim >= 2]
        no_decay = [p for p in self.model.parameters() if p.ndim < 2]
        self.opt = torch.optim.AdamW(
            [dict(params=decay, weight_decay=cfg.weight_decay), dict(params=no_decay, weight_decay=0.0)],
            lr=cfg.lr,
            betas=(cfg.b1, cfg.b2),
            eps=cfg.eps,
        )
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, torch_schedule(cfg, TOTAL_STEPS))
        self.clip = float(cfg.clip_norm)
        self.forward = torch.compile(self.model) if compiled else self.model

    def _step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = self.forward(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]).float(), y.reshape(-1))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.opt.step()
        self.sched.step()
        return loss.detach()

    def steps(self, inputs: np.ndarray, targets: np.ndarray) -> float:
        loss = None
        for x, y in zip(inputs, targets):
            loss = self._step(torch.from_numpy(x).long(), torch.from_numpy(y).long())
        return float(loss)

    def round(self, inputs: np.ndarray, targets: np.ndarray) -> float:
        return self.steps(inputs, targets)


# ---- the timing loop -------------------------------------------------------------------------
def alternate(runners, method: str, inputs, targets, reps: int, tokens: int) -> dict[str, list[float]]:
    """tokens/s of each runner per repetition, the runners interleaved within each repetition."""
    for r in runners:  # compile / warm up, not timed
        getattr(r, method)(inputs, targets)
    out: dict[str, list[float]] = {r.name: [] for r in runners}
    for _ in range(reps):
        for r in runners:
            t = time.perf_counter()
            loss = getattr(r, method)(inputs, targets)
            dt = time.perf_counter() - t
            if not math.isfinite(loss):
                raise FloatingPointError(f"{r.name}: loss {loss}")
            out[r.name].append(tokens / dt)
    return out


def report(label: str, params: int, rates: dict[str, list[float]]) -> str:
    names = list(rates)
    ours, eager = rates[names[0]], rates[names[1]]
    ratios = [a / b for a, b in zip(ours, eager)]
    cells = " ".join(f"{statistics.median(rates[n]):>14,.0f}" for n in names)
    ratio_c = ""
    if len(names) > 2:
        ratio_c = f" {statistics.median(a / b for a, b in zip(ours, rates[names[2]])):>14.2f}"
    return (
        f"{label:<20} {params / 1e6:>7.2f}M {cells} {statistics.median(ratios):>12.2f}{ratio_c}"
        f"   (ours/eager per rep: {' '.join(f'{r:.2f}' for r in ratios)})"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="tiny:8x256,tiny:4x1024,small:8x256,small:4x1024")
    p.add_argument("--steps", type=int, default=5, help="steps per timed block")
    p.add_argument("--reps", type=int, default=5, help="alternations (timed blocks per runner)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile column")
    p.add_argument("--round", default="tiny:8x256:16,small:8x256:8", help="preset:BxL:H for the round")
    p.add_argument("--no-round", action="store_true")
    args = p.parse_args()
    global torch, transformers  # optional: imported only to run (so --help works without them)
    # On a shared machine torch's OpenMP threads spin-wait (OMP_WAIT_POLICY=ACTIVE behaviour) and
    # collapse when another process holds a core: tiny 8x256 eager measured 577 tok/s with the
    # default and 6,228 with PASSIVE under the same load. PASSIVE is the fair setting there; set
    # OMP_WAIT_POLICY yourself (read when torch loads) to compare on an idle machine.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        import torch
        import transformers
    except ImportError as e:
        sys.exit(
            f"benchmarks/vs_pytorch.py needs torch and transformers ({e}).\n"
            "Install the optional extra: pip install -e .[bench]   (torch==2.13.0 CPU build, transformers)"
        )

    torch.set_num_threads(os.cpu_count() or 1)
    print(
        f"jax {jax.__version__} ({jax.device_count()} x {jax.devices()[0].platform}), torch {torch.__version__} "
        f"({torch.get_num_threads()} threads, OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}), transformers {transformers.__version__}; "
        f"{os.cpu_count()} cores, load avg {os.getloadavg()[0]:.2f} at start; "
        f"{args.reps} alternations of {args.steps} steps; fedjax_lm.silo.MALLOC_TUNED={silo_lib.MALLOC_TUNED} "
        "(process-wide: torch runs with it too; FEDJAX_LM_MALLOPT=0 for neither)"
    )
    t_start = time.perf_counter()
    cols = ["fedjax_lm", "PyTorch eager"] + ([] if args.no_compile else ["torch.compile"])
    head = f"{'shape':<20} {'params':>8} " + " ".join(f"{c + ' tok/s':>14}" for c in cols)
    head += f" {'ours/eager':>12}" + ("" if args.no_compile else f" {'ours/compile':>14}")

    def runners_for(mcfg):
        rs = [Ours(mcfg), Torch(mcfg, compiled=False)]
        if not args.no_compile:
            rs.append(Torch(mcfg, compiled=True))
        return rs

    print("\n== train step ==\n" + head, flush=True)
    for shape in args.shapes.split(","):
        preset, bl = shape.split(":")
        batch, seq = (int(v) for v in bl.split("x"))
        mcfg = model_config(preset, seq)
        inputs, targets = token_batches(mcfg.vocab_size, args.steps, batch, seq)
        rates = alternate(runners_for(mcfg), "steps", inputs, targets, args.reps, args.steps * batch * seq)
        print(report(f"{preset} {batch}x{seq}", model_lib.param_count(mcfg), rates), flush=True)

    if not args.no_round:
        print(
            "\n== federated round: H local steps (Silo.local_train_chunk vs a PyTorch loop) ==\n" + head,
            flush=True,
        )
        for shape in args.round.split(","):
            preset, bl, h = shape.split(":")
            batch, seq = (int(v) for v in bl.split("x"))
            H = int(h)
            mcfg = model_config(preset, seq)
            inputs, targets = token_batches(mcfg.vocab_size, H, batch, seq, seed=1)
            reps = max(2, args.reps // 2)
            rates = alternate(runners_for(mcfg), "round", inputs, targets, reps, H * batch * seq)
            print(report(f"{preset} {batch}x{seq} H={H}", model_lib.param_count(mcfg), rates), flush=True)
    print(f"\nwall time {time.perf_counter() - t_start:.0f} s; load avg {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
