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

Against hiding, where a MAC can be at any of the positions of its window (``shuffled_windows``), the
statistics (``STATISTICS``) are the standard ones against shuffling (Clavier, Coron and Dabbous, CHES
2000; Veyrat-Charvillon et al., ASIACRYPT 2012): ``windowed``, the best single sample in the window (the
plain CPA when the window is one sample); ``integrated``, CPA on the sum of the window's samples, which
keeps the leak of the MAC wherever it ran and pays with the other MACs' as noise; ``second-order``, CPA on
the sum of the squared centred samples against the squared centred prediction, the combination that
defeats a first-order mask. ``accumulator_recovery`` attacks the running sum (the accumulator after each
MAC) instead of the product, weight after weight in loop order, each prediction built on the weights
already recovered (aligned traces only: unprotected, or realigned).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import numpy as np

from redux_edge.leakage.simulate import hamming_weight

__all__ = [
    "GUESSES",
    "STATISTICS",
    "Correlation",
    "accumulator_recovery",
    "kernel_windows",
    "realign",
    "recovery_report",
    "selected_keep",
    "shift_class",
    "shuffled_windows",
    "tie_groups",
]

STATISTICS = ("windowed", "integrated", "second-order")

GUESSES = np.arange(-128, 128, dtype=np.int32)
# Hamming weight of g * x for every int8 hypothesis g and input x: [guesses, 256], indexed by x + 128.
_TABLE = hamming_weight(GUESSES[:, None] * GUESSES[None]).astype(np.float64)
# The second-order prediction: the squared deviation of the Hamming weight from its mean over the inputs.
_SQUARED = (_TABLE - _TABLE.mean(axis=1, keepdims=True)) ** 2


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
    hypothesis sums follow from the table of predictions when correlations are read. That is
    O(traces x weights x samples) per chunk instead of O(... x 256 hypotheses). ``per_weight``: the
    samples are one column per weight (a statistic of its window), and weight w is correlated with
    column w only."""

    weights: int
    length: int
    count: int = 0
    per_weight: bool = False
    table: np.ndarray = dataclasses.field(default_factory=lambda: _TABLE)

    def __post_init__(self) -> None:
        self.sum_s = np.zeros(self.length)
        self.sum_ss = np.zeros(self.length)
        self.counts = np.zeros((self.weights, 256))
        self.sums = np.zeros((self.weights * 256, 1 if self.per_weight else self.length))

    @property
    def seen(self) -> np.ndarray:
        return self.counts.sum(axis=0) > 0

    def update(self, samples: np.ndarray, operands: np.ndarray, known: np.ndarray | None = None) -> None:
        """Add a chunk; ``known`` [n, weights] (``per_weight`` only): False leaves that trace out of that
        weight's statistics (a MAC the attacker knows did not run on the known input)."""
        from scipy.sparse import csr_matrix

        samples = samples.astype(np.float64)
        count = len(samples)
        self.count += count
        rows = (np.arange(self.weights)[None] * 256 + operands.astype(np.int64) + 128).reshape(-1)
        if self.per_weight:
            used = np.ones(samples.shape, bool) if known is None else known.astype(bool)
            self.sum_s += (samples * used).sum(axis=0)
            self.sum_ss += (samples * samples * used).sum(axis=0)
            size = self.weights * 256
            flat = used.reshape(-1)
            self.sums[:, 0] += np.bincount(rows[flat], weights=samples.reshape(-1)[flat], minlength=size)
            self.counts += np.bincount(rows[flat], minlength=size).reshape(self.weights, 256)
            return
        self.sum_s += samples.sum(axis=0)
        self.sum_ss += (samples * samples).sum(axis=0)
        columns = np.repeat(np.arange(count), self.weights)
        selector = csr_matrix((np.ones(len(rows)), (rows, columns)), shape=(self.weights * 256, count))
        self.sums += selector @ samples
        np.add.at(self.counts, (np.tile(np.arange(self.weights), count), rows % 256), 1.0)

    def peaks(self, windows: np.ndarray | None = None) -> np.ndarray:
        """max |correlation| over the samples of each weight's window ([weights, 2]: first, last sample;
        default all): [weights, guesses]."""
        # Per weight, the traces in its statistics (all of them unless some were left out).
        totals = self.counts.sum(axis=1) if self.per_weight else np.full(self.weights, self.count)
        scale = np.maximum(totals, 1) if self.per_weight else self.count
        mean_s = self.sum_s / scale
        std_s = np.sqrt(np.maximum(self.sum_ss / scale - mean_s**2, 1e-12))
        peaks = np.zeros((self.weights, len(GUESSES)))
        sums = self.sums.reshape(self.weights, 256, -1)
        table = self.table
        for weight in range(self.weights):
            n = max(totals[weight], 1)
            mean_h = table @ self.counts[weight] / n
            std_h = np.sqrt(np.maximum((table**2) @ self.counts[weight] / n - mean_h**2, 1e-12))
            if self.per_weight:
                span, own = slice(weight, weight + 1), sums[weight]
            else:
                first, last = (0, self.length - 1) if windows is None else windows[weight]
                span = slice(first, last + 1)
                own = sums[weight][:, span]
            covariance = table @ own / n - mean_h[:, None] * mean_s[None, span]
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


def shuffled_windows(weights: int, span: int, prefix: int, jitter: int = 0) -> np.ndarray:
    """Where each of the first ``weights`` slots' MAC can be in a trace of the kernel with hiding: anywhere
    in its span of ``span`` slots, after the ``prefix`` select samples: [weights, 2]."""
    block = np.arange(weights) // span
    first = prefix + block * span
    last = prefix + ((block + 1) * span - 1) * (1 + jitter) + jitter
    return np.stack([first, last], axis=1)


def _window_sums(samples: np.ndarray, windows: np.ndarray) -> np.ndarray:
    """[n, weights]: each trace's sum over each weight's window."""
    running = np.concatenate([np.zeros((len(samples), 1)), np.cumsum(samples, axis=1, dtype=np.float64)], 1)
    return running[:, windows[:, 1] + 1] - running[:, windows[:, 0]]


def recovery_report(
    chunks: Iterable[tuple[np.ndarray, ...]],
    true_weights: np.ndarray | None,
    checkpoints: list[int],
    windows: np.ndarray | None = None,
    statistic: str = "windowed",
) -> dict:
    """Run CPA over (samples, operands[, known]) chunks; at each checkpoint (number of traces) the best
    class per weight (searched in its window of samples, default the whole trace; ``statistic`` says how
    the window is read, see the module) and, if ``true_weights`` are known (an evaluation), their ranks and
    the success rate. ``known`` (integrated and second-order only) leaves out MACs known not to have run
    on the known input."""
    correlation = None
    history = []
    pending = sorted(checkpoints)
    centre = None
    for chunk in chunks:
        samples, operands = chunk[0], chunk[1]
        known = chunk[2] if len(chunk) > 2 else None
        if statistic != "windowed":
            spans = (
                windows if windows is not None else np.array([[0, samples.shape[1] - 1]] * operands.shape[1])
            )
            if statistic == "second-order":
                # Centred on the first chunk's means: a fixed centre keeps the statistic one function.
                centre = samples.mean(axis=0) if centre is None else centre
                samples = (samples - centre) ** 2
            samples = _window_sums(samples, spans)
        start = 0
        while start < len(samples):
            if correlation is None:
                table = _SQUARED if statistic == "second-order" else _TABLE
                per_weight = statistic != "windowed"
                correlation = Correlation(operands.shape[1], samples.shape[1], 0, per_weight, table)
            limit = pending[0] - correlation.count if pending else len(samples) - start
            stop = min(len(samples), start + max(limit, 1))
            part = None if known is None else known[start:stop]
            correlation.update(samples[start:stop], operands[start:stop], part)
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
    return _scored(correlation.peaks(windows), correlation.seen, correlation.count, true_weights)


def _scored(peaks: np.ndarray, seen: np.ndarray, traces: int, true_weights: np.ndarray | None) -> dict:
    groups = tie_groups(seen)
    best = peaks.argmax(axis=1)
    entry = {
        "traces": traces,
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


def selected_keep(samples: np.ndarray, prefix: int, weights: int, threshold: float) -> np.ndarray:
    """Double Strike against the constant-time kernel: no branch moves the MACs, but the select of each
    window pixel's operand leaks its keep bit in the ``prefix`` samples before them. [n, weights]: whether
    each attacked weight's MAC read as having run on the input (weight j reads pixel j mod prefix)."""
    kept = samples[:, :prefix] > threshold
    return kept[:, np.arange(weights) % prefix]


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
        branch = samples[rows, np.minimum(position, samples.shape[1] - 1)]
        kept[:, slot] = branch > threshold
        values[:, slot] = np.where(
            kept[:, slot], samples[rows, np.minimum(position + 1, samples.shape[1] - 1)], 0.0
        )
        position += 1 + kept[:, slot]
    executed = kept.sum(axis=0)
    means = np.where(executed > 0, (values * kept).sum(axis=0) / np.maximum(executed, 1), 0.0)
    return np.where(kept, values, means[None].astype(np.float32)), kept


def accumulator_recovery(
    samples: np.ndarray,
    operands: np.ndarray,
    executed: np.ndarray,
    per_channel: int,
    true_weights: np.ndarray | None,
    checkpoints: list[int],
) -> dict:
    """CPA on the accumulator: ``samples`` [n, weights] is each MAC's sample (aligned), ``executed`` whether
    it ran. Weight j's prediction is HW(acc + g * x), acc the running sum of the channel's earlier MACs
    with the weights recovered before it; the running sum restarts every ``per_channel`` weights."""
    history = []
    for traces in sorted({min(c, len(samples)) for c in checkpoints} | {len(samples)}):
        peaks = np.zeros((operands.shape[1], len(GUESSES)))
        running = np.zeros(traces, np.int64)
        for weight in range(operands.shape[1]):
            if weight % per_channel == 0:
                running[:] = 0
            inputs = operands[:traces, weight].astype(np.int64)
            ran = executed[:traces, weight]
            predicted = hamming_weight((running[:, None] + GUESSES[None] * inputs[:, None]).astype(np.int32))
            predicted = np.where(ran[:, None], predicted, predicted[ran].mean(axis=0) if ran.any() else 0.0)
            peaks[weight] = np.abs(_pearson(predicted, samples[:traces, weight]))
            running += GUESSES[peaks[weight].argmax()] * inputs * ran
        seen = np.zeros(256, bool)
        seen[np.unique(operands[:traces].astype(np.int64) + 128)] = True
        history.append(_scored(peaks, seen, traces, true_weights))
    return {"traces": len(samples), "weights": operands.shape[1], "checkpoints": history}


def _pearson(predictions: np.ndarray, sample: np.ndarray) -> np.ndarray:
    """Correlation of each column of ``predictions`` [n, guesses] with ``sample`` [n]."""
    centred = predictions - predictions.mean(axis=0)
    deviation = sample.astype(np.float64) - sample.mean()
    denominator = np.sqrt((centred**2).sum(axis=0) * (deviation**2).sum())
    return (centred.T @ deviation) / np.maximum(denominator, 1e-12)
