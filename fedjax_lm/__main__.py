"""`python -m fedjax_lm <verb> [flags]`; `python -m fedjax_lm <verb> --help` lists a verb's flags."""

import os
import sys


def _simulated_devices_from_argv(argv: list[str]) -> int | None:
    """`compile --mesh 1,8,1` on a CPU host needs 8 simulated devices before JAX starts."""
    for i, a in enumerate(argv):
        value = None
        if a.startswith("--mesh="):
            value = a.split("=", 1)[1]
        elif a == "--mesh" and i + 1 < len(argv):
            value = argv[i + 1]
        if value:
            try:
                n = 1
                for part in value.split(","):
                    n *= int(part)
                return n
            except ValueError:
                return None
    return None


if __name__ == "__main__":
    n = _simulated_devices_from_argv(sys.argv)
    if n and n > 1 and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        # Only affects the CPU backend; on TPU/GPU the real devices are used.
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n}"
        ).strip()
    from fedjax_lm import cli

    cli.main()
