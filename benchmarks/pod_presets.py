"""Do the large presets fit a real pod? AOT-compile each one's train step on simulated TPU-slice meshes.

    python benchmarks/pod_presets.py                       # every large preset x v5e-16/64/256, v5p-64
    python benchmarks/pod_presets.py --presets 7b --slices v5e-256

Each preset runs with its pod defaults (`experiments/presets.py`: bf16 compute over f32 params, its
remat policy, fsdp over every chip, `POD_SEQS_PER_CHIP` sequences of max_seq_len per chip) on a CPU
mesh of as many simulated devices as the slice has chips (one process with
XLA_FLAGS=--xla_force_host_platform_device_count=256, the mesh taking the first N). Printed per row:
parameters, mesh, global batch, XLA's per-device peak (arguments + outputs + temporaries - aliased,
for the CPU backend's buffer assignment: a proxy for the TPU's, see docs/performance.md) against the
chip's HBM, lower + compile time, and the step's model FLOPs (6N + attention, all chips).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

_DEVICES = 256
if "jax" not in sys.modules:
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={_DEVICES}".strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from experiments import common, presets  # noqa: E402
from fedjax_lm import compile_report  # noqa: E402

GiB = 1024**3
_SHORT = {"bfloat16": "bf16", "float32": "f32", "float16": "f16"}


def pod_config(preset: str, chips: int):
    layout = presets.pod_layout(preset, chips)
    c = common.base_config(
        size=preset, seq_len=layout["seq_len"], batch_size=layout["batch_size"], steps=1000
    )
    c.mesh.update(layout["mesh"])
    return c


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default=",".join(presets.POD_SEQS_PER_CHIP))
    p.add_argument("--slices", default=",".join(presets.TPU_SLICES))
    args = p.parse_args()
    t0 = time.perf_counter()
    print(f"jax {jax.__version__}, {jax.device_count()} simulated {jax.devices()[0].platform} devices")
    head = (
        f"{'preset':<6} {'params':>7} {'slice':<8} {'mesh d,f,t':>11} {'batch':>9} {'dtype/remat':>17} "
        f"{'peak/device':>11} {'HBM':>6} {'fits':>5} {'compile s':>9} {'FLOPs/step':>10}"
    )
    print(head, flush=True)
    misfits = 0
    for preset in args.presets.split(","):
        for slice_name in args.slices.split(","):
            chips, hbm_gib = presets.TPU_SLICES[slice_name]
            c = pod_config(preset, chips)
            s = compile_report.compile_stats(c)
            peak = s.peak_bytes / GiB
            fits = peak <= hbm_gib
            misfits += not fits
            mesh = ",".join(str(s.mesh[a]) for a in ("data", "fsdp", "tensor"))
            print(
                f"{preset:<6} {s.params / 1e9:>6.2f}B {slice_name:<8} {mesh:>11} {s.batch:>4}x{s.seq_len:<4} "
                f"{_SHORT[c.model.dtype] + '/' + c.model.remat:>17} {peak:>7.1f} GiB {hbm_gib:>4} G "
                f"{'yes' if fits else 'NO':>5} {s.compile_s:>9.1f} {s.model_flops_per_step:>10.2e}",
                flush=True,
            )
    print(f"wall time {time.perf_counter() - t0:.0f} s; {misfits} row(s) over the chip's HBM")
    sys.exit(1 if misfits else 0)


if __name__ == "__main__":
    main()
