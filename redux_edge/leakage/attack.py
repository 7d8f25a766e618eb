"""Correlation power/EM analysis (CPA/DEMA) of first-layer weights from traces and known inputs.

Brier, Clavier and Olivier's CPA (CHES 2004) applied to neural-network weights as in Batina et al.
("CSI NN", USENIX Security 2019): for every attacked weight and every int8 hypothesis g, the Pearson
correlation between HW(g * x) (x: the known input the weight is multiplied with, the product an int32) and
every sample of the traces; the best hypothesis has the largest |correlation| in the weight's window.
Correlation cannot tell apart hypotheses whose predictions are affine images of each other over the inputs
that occur: with non-negative inputs, g and 2g predict the same Hamming weight (a shift keeps the bits), so
such exact ties are reported together. With inputs of both signs a left shift drops a leading 1 of a
negative product and the predictions differ by one bit on half the inputs, so g and 2g are near-ties that
take many more traces to separate. Weights are therefore scored per shift class (sign and odd part: g, 2g,
4g, ... ; 0 alone): a weight counts as recovered when its class ranks first, and as recovered exactly when
the single best hypothesis is the weight itself. The sums behind the correlations are accumulated
chunk by chunk, so a million traces never need to be in memory at once, and the ranks are read off at
checkpoints.

``realign`` is the Double Strike step (the attack on MACPruning's control flow): where the keep/skip branch
leaks, each trace is parsed slot by slot, and every executed MAC is put back at its weight's position;
CPA then runs per weight on the traces where that MAC ran.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import numpy as np

from redux_edge.leakage.simulate import hamming_weight

__all__ = [
    "GUESSES",
    "Correlation",
    "kernel_windows",
    "realign",
    "recovery_report",
    "shift_class",
    "tie_groups",
]

GUESSES = np.arange(-128, 128, dtype=np.int32)
# Hamming weight of g * x for every int8 hypothesis g and input x: [guesses, 256], indexed by x + 128.
_TABLE = hamming_weight(GUESSES[:, None] * GUESSES[None]).astype(np.float64)


def shift_class(values: np.ndarray) -> np.ndarray:
    """sign(g) * odd part of |g|: the class of g, 2g, 4g, ..."""
    magnitude = np.abs(values.astype(np.int32))
    while np.any((magnitude > 0) & (magnitude % 2 == 0)):
        magnitude = np.where((magnitude > 0) & (magnitude % 2 == 0), magnitude // 2, magnitude)
    return np.sign(values.astype(np.int32)) * magnitude


def tie_groups(seen: np.ndarray) -> np.ndarray:
    """A group id per hypothesis: hypotheses whose predictions over the inputs ``seen`` (bool [256]) are
    affine images of each other, which no correlation can tell apart. Constant predictions (g = 0) form
    one group that never correlates."""
    rows = _TABLE[:, seen]
    centred = rows - rows.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(centred, axis=1, keepdims=True)
    unit = np.where(norms > 1e-9, centred / np.where(norms > 1e-9, norms, 1.0), 0.0)
    # |correlation| is blind to the sign too: orient every row by its first non-zero entry.
    first = unit[np.arange(len(unit)), np.argmax(np.abs(unit) > 1e-9, axis=1)]
    unit *= np.where(first < 0, -1.0, 1.0)[:, None]
    _, groups = np.unique(np.round(unit, 9), axis=0, return_inverse=True)
    return groups.reshape(-1)


@dataclasses.dataclass
class Correlation:
    """Streaming Pearson correlation of every hypothesis with every sample, per attacked weight.

    A hypothesis depends on a trace only through the weight's input value, so the stream keeps, per weight
    and input value, the count of traces and the sum of their samples (one sparse product per chunk); the
    hypothesis sums follow from the table of Hamming weights when correlations are read. That is
    O(traces x weights x samples) per chunk instead of O(... x 256 hypotheses)."""

    weights: int
    length: int
    count: int = 0

    def __post_init__(self) -> None:
        self.sum_s = np.zeros(self.length)
        self.sum_ss = np.zeros(self.length)
        self.counts = np.zeros((self.weights, 256))
        self.sums = np.zeros((self.weights * 256, self.length))

    @property
    def seen(self) -> np.ndarray:
        return self.counts.sum(axis=0) > 0

    def update(self, samples: np.ndarray, operands: np.ndarray) -> None:
        from scipy.sparse import csr_matrix

        samples = samples.astype(np.float64)
        count = len(samples)
        self.count += count
        self.sum_s += samples.sum(axis=0)
        self.sum_ss += (samples * samples).sum(axis=0)
        rows = (np.arange(self.weights)[None] * 256 + operands.astype(np.int64) + 128).reshape(-1)
        columns = np.repeat(np.arange(count), self.weights)
        selector = csr_matrix((np.ones(len(rows)), (rows, columns)), shape=(self.weights * 256, count))
        self.sums += selector @ samples
        np.add.at(self.counts, (np.tile(np.arange(self.weights), count), rows % 256), 1.0)

    def peaks(self, windows: np.ndarray | None = None) -> np.ndarray:
        """max |correlation| over the samples of each weight's window ([weights, 2]: first, last sample;
        default all): [weights, guesses]."""
        n = self.count
        mean_s = self.sum_s / n
        std_s = np.sqrt(np.maximum(self.sum_ss / n - mean_s**2, 1e-12))
        peaks = np.zeros((self.weights, len(GUESSES)))
        sums = self.sums.reshape(self.weights, 256, self.length)
        for weight in range(self.weights):
            mean_h = _TABLE @ self.counts[weight] / n
            std_h = np.sqrt(np.maximum((_TABLE**2) @ self.counts[weight] / n - mean_h**2, 1e-12))
            first, last = (0, self.length - 1) if windows is None else windows[weight]
            span = slice(first, last + 1)
            covariance = _TABLE @ sums[weight][:, span] / n - mean_h[:, None] * mean_s[None, span]
            correlation = np.abs(covariance) / (std_h[:, None] * std_s[None, span])
            peaks[weight] = correlation.max(axis=1)
        return peaks


_CLASSES, _CLASS_INDEX = np.unique(shift_class(GUESSES), return_inverse=True)


def ranks(peaks: np.ndarray, true_weights: np.ndarray) -> np.ndarray:
    """Rank (1 = best) of each weight's shift class among the classes, a class scored by its best member."""
    class_peaks = np.full((len(peaks), len(_CLASSES)), -np.inf)
    for index in range(len(_CLASSES)):
        class_peaks[:, index] = peaks[:, np.equal(_CLASS_INDEX, index)].max(axis=1)
    true_index = np.searchsorted(_CLASSES, shift_class(true_weights))
    true_peak = class_peaks[np.arange(len(peaks)), true_index]
    return 1 + (class_peaks > true_peak[:, None]).sum(axis=1)


def kernel_windows(slots: int, protected: bool, jitter: int = 0) -> np.ndarray:
    """Where each slot's MAC can be in a trace of the emitted kernel, from its public loop: [slots, 2].
    A weight is only looked for there, since the weights that share an input pixel leak correlated
    values at their own MACs."""
    slot = np.arange(slots)
    if not protected:
        return np.stack([slot, slot * (1 + jitter) + jitter], axis=1)
    # Slot j's branch follows j earlier slots of 1 or 2 samples (plus jitter); its MAC comes right after.
    return np.stack([slot + 1, slot * (2 + jitter) + jitter + 1], axis=1)


def recovery_report(
    chunks: Iterable[tuple[np.ndarray, np.ndarray]],
    true_weights: np.ndarray | None,
    checkpoints: list[int],
    windows: np.ndarray | None = None,
) -> dict:
    """Run CPA over (samples, operands) chunks; at each checkpoint (number of traces) the best class per
    weight (searched in its window of samples, default the whole trace) and, if ``true_weights`` are known
    (an evaluation), their ranks and the success rate."""
    correlation = None
    history = []
    pending = sorted(checkpoints)
    for samples, operands in chunks:
        start = 0
        while start < len(samples):
            if correlation is None:
                correlation = Correlation(operands.shape[1], samples.shape[1])
            limit = pending[0] - correlation.count if pending else len(samples) - start
            stop = min(len(samples), start + max(limit, 1))
            correlation.update(samples[start:stop], operands[start:stop])
            start = stop
            if pending and correlation.count >= pending[0]:
                history.append(_snapshot(correlation, true_weights, windows))
                pending.pop(0)
    if correlation is None:
        return {"traces": 0, "checkpoints": []}
    if not history or history[-1]["traces"] != correlation.count:
        history.append(_snapshot(correlation, true_weights, windows))
    return {"traces": correlation.count, "weights": correlation.weights, "checkpoints": history}


def _snapshot(correlation: Correlation, true_weights: np.ndarray | None, windows: np.ndarray | None) -> dict:
    peaks = correlation.peaks(windows)
    groups = tie_groups(correlation.seen)
    best = peaks.argmax(axis=1)
    entry = {
        "traces": correlation.count,
        "best_guess": GUESSES[best].tolist(),
        "best_ties": [GUESSES[groups == groups[b]].tolist() for b in best],
        "best_peak": peaks.max(axis=1).tolist(),
    }
    if true_weights is not None:
        rank = ranks(peaks, true_weights)
        entry |= {
            "rank": rank.tolist(),
            "recovered": int((rank == 1).sum()),
            "recovered_exactly": int((GUESSES[best] == true_weights).sum()),
            "success_rate": float((rank == 1).mean()),
        }
    return entry


def realign(samples: np.ndarray, slots: int, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Parse protected-kernel traces (no jitter) by their branch samples: a branch sample above
    ``threshold`` means the MAC ran and is the next sample. Returns the MAC samples [n, slots], a skipped
    MAC filled with the mean of the executed ones (so that it adds nothing to the covariance), and the keep
    flags the attacker read [n, slots]."""
    count = len(samples)
    position = np.zeros(count, dtype=np.int64)
    values = np.zeros((count, slots), np.float32)
    kept = np.zeros((count, slots), bool)
    rows = np.arange(count)
    for slot in range(slots):
        branch = samples[rows, position]
        kept[:, slot] = branch > threshold
        values[:, slot] = np.where(
            kept[:, slot], samples[rows, np.minimum(position + 1, samples.shape[1] - 1)], 0.0
        )
        position += 1 + kept[:, slot]
    executed = kept.sum(axis=0)
    means = np.where(executed > 0, (values * kept).sum(axis=0) / np.maximum(executed, 1), 0.0)
    return np.where(kept, values, means[None].astype(np.float32)), kept
