"""Energy and CO2-eq of training, per silo and per round (the AI Act's Annex XI asks for both).

The meter is codecarbon's offline tracker (`federation.compliance.energy.meter="codecarbon"`, the
default): a maintained library that reads Intel/AMD RAPL counters on Linux and NVML on NVIDIA GPUs, and
otherwise estimates CPU power from its table of CPU TDPs and the measured load (RAM from its size). It
needs no network. Chosen over hand-written counters because it already knows those sources and their
pitfalls; it knows no TPU counter, so a TPU host's figure is its CPU's. Where no counter is readable
(containers, most CI machines, this project's 2-core test machine) the figure is an estimate and every
record says so: `energy_source` is "measured (RAPL)", "measured (NVML)", or "estimated (...)".

`meter="estimate"` skips codecarbon: energy = wall time x `device_power_w` (the accelerator's board
power, which the user knows better than any table). `meter="off"` records nothing.

CO2-eq = energy x `grid_gco2_per_kwh` when it is set; otherwise codecarbon's emission factor of
`country_iso_code`'s grid (its bundled data); with neither, no CO2 figure is given.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator, Mapping
from typing import Any

METERS = ("codecarbon", "estimate", "off")


def default_config() -> dict[str, Any]:
    return dict(
        meter="codecarbon",  # codecarbon | estimate (time x device_power_w) | off
        device_power_w=0.0,  # estimate: the device's power draw in W
        country_iso_code="",  # e.g. DEU: codecarbon's grid emission factor for the CO2-eq figure
        grid_gco2_per_kwh=0.0,  # or the grid's intensity in gCO2-eq/kWh (takes precedence)
    )


def check_config(cfg: Mapping[str, Any]) -> None:
    if cfg["meter"] not in METERS:
        raise ValueError(f"federation.compliance.energy.meter must be one of {METERS}, got {cfg['meter']!r}")
    for key in ("device_power_w", "grid_gco2_per_kwh"):
        if not float(cfg[key]) >= 0:
            raise ValueError(f"federation.compliance.energy.{key} must be >= 0, got {cfg[key]}")
    code = str(cfg["country_iso_code"])
    if code and not (len(code) == 3 and code.isalpha() and code.isupper()):
        raise ValueError(
            f"federation.compliance.energy.country_iso_code must be an ISO 3166 alpha-3 code, got {code!r}"
        )
    if cfg["meter"] == "estimate" and not float(cfg["device_power_w"]) > 0:
        raise ValueError(
            "federation.compliance.energy.meter=estimate needs device_power_w > 0 (the device's watts)"
        )


def _counter() -> str | None:
    """The hardware energy counter this machine exposes to codecarbon, if any."""
    for path in (
        "/sys/class/powercap/intel-rapl:0/energy_uj",
        "/sys/class/powercap/intel-rapl/intel-rapl:0/energy_uj",
    ):
        if os.access(path, os.R_OK):
            return "RAPL"
    try:
        import pynvml

        pynvml.nvmlInit()
        if pynvml.nvmlDeviceGetCount() > 0:
            return "NVML"
    except Exception:  # no NVIDIA driver or library: the common case, not an error
        pass
    return None


class Meter:
    """`with meter.measure() as m:` ... then m holds energy_kwh, energy_source and co2_kg (or None)."""

    def __init__(self, cfg: Mapping[str, Any]):
        self.mode = str(cfg["meter"])
        self.power_w = float(cfg["device_power_w"])
        self.grid = float(cfg["grid_gco2_per_kwh"])
        self.country = str(cfg["country_iso_code"])
        self._tracker = None
        self.source = "off"
        if self.mode == "estimate":
            self.source = f"estimated (wall time x device_power_w={self.power_w:g} W)"
        elif self.mode == "codecarbon":
            counter = _counter()
            self.source = (
                f"measured ({counter})" if counter else "estimated (codecarbon: CPU TDP x load, RAM size)"
            )

    @property
    def on(self) -> bool:
        return self.mode != "off"

    def _codecarbon(self):
        if self._tracker is None:
            try:
                from codecarbon import OfflineEmissionsTracker
            except ImportError:
                raise ImportError(
                    "federation.compliance.energy.meter=codecarbon needs the codecarbon package (pip install "
                    "codecarbon, pinned in requirements.txt), or set meter=estimate (with device_power_w) or off"
                ) from None
            # its routine warnings (unknown CPU, no RAPL) say what energy_source says already
            logging.getLogger("codecarbon").setLevel(logging.ERROR)
            self._tracker = OfflineEmissionsTracker(
                country_iso_code=self.country or "USA",  # its CO2 figure is used only with a country given
                output_methods=[],  # nothing written: the run records the figures itself
                log_level="error",
                measure_power_secs=5,
                tracking_mode="process",
                allow_multiple_runs=True,
            )
            self._tracker.start()
        return self._tracker

    @contextlib.contextmanager
    def measure(self) -> Iterator[dict[str, Any]]:
        out: dict[str, Any] = {}
        if not self.on:
            yield out
            return
        t0 = time.perf_counter()
        if self.mode == "codecarbon":
            tracker = self._codecarbon()
            tracker.start_task()
            try:
                yield out
            finally:
                data = tracker.stop_task()
            if data is None:  # codecarbon refused the task (e.g. it failed to start): nothing measured
                return
            kwh = float(data.energy_consumed)
            country_kg = float(data.emissions) if self.country else None
        else:
            yield out
            kwh = (time.perf_counter() - t0) * self.power_w / 3.6e6
            country_kg = None
        out.update(
            energy_kwh=kwh,
            energy_source=self.source,
            co2_kg=kwh * self.grid / 1000.0 if self.grid else country_kg,
        )

    def close(self) -> None:
        if self._tracker is not None:
            with contextlib.suppress(Exception):
                self._tracker.stop()
            self._tracker = None


def round_fields(
    seconds: Mapping[str, float], used: Mapping[str, Mapping[str, Any]], source: str
) -> dict[str, Any]:
    """A round's lifecycle row fields: seconds/<silo>, and for the silos in `used` ({silo: energy_kwh,
    co2_kg}) energy_kwh/<silo> with the round's energy_kwh, co2_kg (None unless every silo has one) and
    `source`. Both drivers write them with this."""
    row: dict[str, Any] = {f"seconds/{s}": float(t) for s, t in sorted(seconds.items())}
    if not used:
        return row
    co2 = [u.get("co2_kg") for u in used.values()]
    return {
        **row,
        **{f"energy_kwh/{s}": float(u["energy_kwh"]) for s, u in sorted(used.items())},
        "energy_kwh": float(sum(u["energy_kwh"] for u in used.values())),
        "co2_kg": None if any(c is None for c in co2) else float(sum(co2)),
        "energy_source": source,
    }


def totals(rows: Mapping[int, Mapping[str, Any]] | list[Mapping[str, Any]]) -> dict[str, Any] | None:
    """The run's energy from its metrics rows (None if none was recorded)."""
    rows = list(rows.values()) if isinstance(rows, Mapping) else list(rows)
    kwh = [r["energy_kwh"] for r in rows if isinstance(r.get("energy_kwh"), (int, float))]
    if not kwh:
        return None
    co2 = [r["co2_kg"] for r in rows if isinstance(r.get("co2_kg"), (int, float))]
    sources = sorted({str(r["energy_source"]) for r in rows if r.get("energy_source")})
    return {
        "energy_kwh": float(sum(kwh)),
        "co2_kg": float(sum(co2)) if len(co2) == len(kwh) else None,
        "energy_source": "; ".join(sources),
        "rounds": len(kwh),
    }
