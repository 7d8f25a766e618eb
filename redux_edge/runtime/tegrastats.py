"""Jetson's ``tegrastats``: sampled while a benchmark runs, summarised as power, GPU load and RAM."""

from __future__ import annotations

import re
import shutil
import subprocess
import threading

import numpy as np

__all__ = ["Tegrastats", "parse_tegrastats"]

_TEGRA_RAM = re.compile(r"\bRAM (\d+)/(\d+)MB")
_TEGRA_GPU = re.compile(r"\bGR3D_FREQ (\d+)%(?:@\[?([\d,]+)\]?)?")
# The board's input rail: VDD_IN (Orin Nano/NX, Xavier), VIN_SYS_5V0 (AGX Orin), POM_5V_IN (Nano).
_TEGRA_POWER = re.compile(r"\b(VDD_IN|VIN_SYS_5V0|POM_5V_IN) (\d+)(?:mW)?/\d+")


def parse_tegrastats(lines: list[str]) -> dict:
    """Summary of tegrastats lines: input-rail power (mW), GPU load (%) and frequency (MHz), RAM (MB)."""
    power, load, freq, ram = [], [], [], []
    rail = None
    for line in lines:
        if match := _TEGRA_POWER.search(line):
            rail = match.group(1)
            power.append(float(match.group(2)))
        if match := _TEGRA_GPU.search(line):
            load.append(float(match.group(1)))
            clocks = [float(mhz) for mhz in (match.group(2) or "").split(",") if mhz]
            freq.extend(clocks[:1])
        if match := _TEGRA_RAM.search(line):
            ram.append(float(match.group(1)))

    def summary(values: list[float]) -> dict | None:
        return {"mean": float(np.mean(values)), "max": float(np.max(values))} if values else None

    return {
        "samples": len(lines),
        "power_rail": rail,
        "power_mw": summary(power),
        "gpu_load_pct": summary(load),
        "gpu_freq_mhz": summary(freq),
        "ram_used_mb": summary(ram),
    }


class Tegrastats:
    """Samples ``tegrastats`` (Jetson) while the block runs; ``summary`` is None where it is absent."""

    def __init__(self, interval_ms: int = 100) -> None:
        self.interval_ms = interval_ms
        self.summary: dict | None = None

    def __enter__(self) -> Tegrastats:
        program = shutil.which("tegrastats")
        self._process = None
        if program:
            self._lines: list[str] = []
            self._process = subprocess.Popen(
                [program, "--interval", str(self.interval_ms)], stdout=subprocess.PIPE, text=True
            )
            output = self._process.stdout
            assert output is not None
            self._reader = threading.Thread(target=lambda: self._lines.extend(output), daemon=True)
            self._reader.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait(timeout=5)
            self._reader.join(timeout=5)
            self.summary = parse_tegrastats(self._lines)
