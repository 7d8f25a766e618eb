"""prune-ffn on a two-layer random-init BERT: neurons leave the first projection's columns and the second
projection's rows, and the graph equals the module with those neurons zeroed."""

from __future__ import annotations

import numpy as np

from redux_edge.analysis.reference import masked
from redux_edge.frontend.module_run import run_module
from redux_edge.ir.blocks import find_structure
from redux_edge.passes import build_pass


def test_a_quarter_of_the_neurons_by_magnitude_are_removed_and_the_rest_is_exact(tiny_bert, run):
    module, inputs, model = tiny_bert()
    outcome = build_pass("prune-ffn", {"fraction": 0.25})(model)
    assert find_structure(model).summary()["ffn_width_per_layer"] == {"0": 48, "1": 48}
    with masked(module, outcome.removed, 8):
        expected = run_module(module, inputs)[0]
    assert np.abs(run(model, inputs)[0] - expected).max() <= 1e-4


def test_per_layer_counts_remove_that_many_in_each_layer(tiny_bert):
    _, _, model = tiny_bert()
    build_pass("prune-ffn", {"per_layer": [8, 0]})(model)
    assert find_structure(model).summary()["ffn_width_per_layer"] == {"0": 56, "1": 64}
