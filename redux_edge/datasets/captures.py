"""A published power capture of a real Cortex-M4, read from NewAE's ``cwtraces`` wheel (never installed).

NewAE's SCA101 Lab 4_1 recording: 1,000 traces of 5,000 samples from a ChipWhisperer-Lite with its
STM32F303 target (``PLATFORM = 'CWLITEARM'``), running TinyAES-128 (``CRYPTO_TARGET = 'TINYAES128C'``)
under one fixed key on random plaintexts (the generator notebook is ``courses/sca101/generators/Lab4_1 -
GENERATOR.ipynb`` in newaetech/chipwhisperer-jupyter). The first-round S-box outputs are known values, so
the capture measures how strongly a Cortex-M4 leaks a Hamming weight against its noise
(``redux_edge.leakage.calibrate``).
"""

from __future__ import annotations

import dataclasses
import io
import zipfile

import numpy as np

from redux_edge.datasets import wheel_path

__all__ = ["CWTRACES_WHEEL", "AesCapture", "chipwhisperer_stm32f3"]

CWTRACES_WHEEL = "cwtraces-0.2.0-py3-none-any.whl"
_LAB = "cwtraces/sca101/lab4_1"


@dataclasses.dataclass(frozen=True)
class AesCapture:
    source: str
    samples: np.ndarray  # float32 [traces, samples]
    plaintext: np.ndarray  # uint8 [traces, 16]
    key: np.ndarray  # uint8 [16]


def chipwhisperer_stm32f3() -> AesCapture:
    with zipfile.ZipFile(wheel_path(CWTRACES_WHEEL, "ChipWhisperer STM32F303 capture")) as wheel:

        def member(name: str) -> np.ndarray:
            return np.load(io.BytesIO(wheel.read(f"{_LAB}_{name}.npy")), allow_pickle=False)

        samples = member("traces").astype(np.float32)
        plaintext, key = member("textin"), member("key")
    return AesCapture(
        "ChipWhisperer-Lite STM32F303 (Cortex-M4), TinyAES-128, NewAE SCA101 Lab 4_1 (cwtraces 0.2.0)",
        samples,
        plaintext.astype(np.uint8),
        key.astype(np.uint8),
    )
