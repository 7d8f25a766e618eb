"""The simulator's noise level measured on captures: the estimator on traces of known noise, then NewAE's
published ChipWhisperer-Lite captures of a real STM32F303 (Cortex-M4), read by the project's own readers."""

from __future__ import annotations

import json
import zipfile

import numpy as np
from conftest import assert_one_error_line

from redux_edge.datasets import captures, wheel_path
from redux_edge.leakage import calibrate

KEY = "2b7e151628aed2a6abf7158809cf4f3c"  # the key ChipWhisperer's tutorials capture under


def test_sbox_is_fips_197():
    outputs = calibrate.aes_sbox_outputs(np.array([[0x00, 0x01, 0x53] + [0] * 13]), np.zeros(16))
    assert outputs[0, :3].tolist() == [0x63, 0x7C, 0xED]


def test_estimator_recovers_a_known_noise_level():
    rng = np.random.default_rng(0)
    values = rng.integers(0, 256, size=(20_000, 2), dtype=np.uint8)
    weights = np.bitwise_count(values).astype(np.float64)
    samples = rng.normal(0.0, 0.004, size=(20_000, 40))
    samples[:, 11] += 0.5 - 0.003 * weights[:, 0]  # 1.3 HW bits of noise: 0.004 / 0.003
    samples[:, 29] += 0.003 * weights[:, 1]
    samples[:, 29] += rng.normal(0.0, 0.003 * 0.6, size=20_000)  # sqrt(1.333^2 + 0.6^2) = 1.46 bits
    fits = calibrate.fit_noise((samples[s : s + 3000], values[s : s + 3000]) for s in range(0, 20_000, 3000))
    assert [fit.sample for fit in fits] == [11, 29]
    assert abs(fits[0].noise - 4 / 3) < 0.05 and abs(fits[1].noise - 1.462) < 0.05
    # Mangard's SNR of a byte's Hamming weight (variance 2) against that noise: 2 / sigma^2.
    assert abs(fits[0].snr - 2 / (4 / 3) ** 2) < 0.1


def test_the_packaged_cortex_m4_capture_sets_the_noise(cli):
    result = cli("leakage", "noise", "--json")
    assert result.exit_code == 0, result.stderr
    measured = json.loads(result.stdout)
    assert "STM32F303" in measured["source"] and measured["traces"] == 1000 and measured["values"] == 16
    # Every key byte's S-box output leaks clearly (a CPA would rank the right key byte first) ...
    assert min(abs(fit["correlation"]) for fit in measured["fits"]) > 0.7
    # ... and the noise is about one bit: the simulator's default sigma 1 is this board, not a guess.
    assert 0.8 < measured["noise"] < 1.1


def test_a_chipwhisperer_project_as_saved(tmp_path, cli):
    """NewAE's Lab 4_3 project unpacked as a user has it: Windows separators in the .cwp, <prefix>traces.npy,
    and a trace buffer one row longer than the 50 traces captured."""
    with zipfile.ZipFile(wheel_path(captures.CWTRACES_WHEEL, "capture")) as wheel:
        members = [name for name in wheel.namelist() if name.startswith("cwtraces/sca101/Lab_4_3")]
        wheel.extractall(tmp_path, members)
    project = tmp_path / "cwtraces" / "sca101" / "Lab_4_3.cwp"
    result = cli("leakage", "noise", project, "--aes-key", KEY, "--json")
    assert result.exit_code == 0, result.stderr
    measured = json.loads(result.stdout)
    assert measured["traces"] == 50 and 0.6 < measured["noise"] < 1.2


def test_noise_misuse_is_one_error_line(tmp_path, cli):
    np.save(tmp_path / "traces.npy", np.zeros((20, 8), np.float32))
    np.save(tmp_path / "inputs.npy", np.zeros((20, 16), np.uint8))
    np.save(tmp_path / "values.npy", np.zeros((19, 2), np.uint8))
    (tmp_path / "escape.cwp").write_text("[Trace Management]\ntracefile0 = ..\\..\\etc\\config_x.cfg\n")
    traces = [tmp_path / "traces.npy", "--inputs", tmp_path / "inputs.npy"]
    cases = [
        (["--aes-key", KEY], "describe a TRACES_FILE"),
        ([*traces], "--aes-key HEX or --values"),
        ([*traces, "--aes-key", "zz"], "is not hex"),
        ([*traces, "--aes-key", "00ff"], "has 2 bytes"),
        ([*traces, "--values", tmp_path / "values.npy"], "the capture has 20 traces"),
        ([tmp_path / "escape.cwp", "--aes-key", KEY], "outside the project"),
    ]
    for arguments, message in cases:
        assert_one_error_line(cli("leakage", "noise", *arguments), message)
