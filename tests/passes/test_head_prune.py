"""prune-heads on a two-layer random-init BERT: heads are removed for real, and the graph equals the
module with those heads' columns zeroed before the output projection."""

from __future__ import annotations

import json

import numpy as np
import pytest

from redux_edge.analysis.reference import masked
from redux_edge.errors import UserError
from redux_edge.frontend.module_run import run_module
from redux_edge.ir.blocks import find_structure
from redux_edge.passes import build_pass

HEAD_DIM = 8


def test_half_the_heads_by_magnitude_are_removed_and_the_rest_is_exact(tiny_bert, run):
    module, inputs, model = tiny_bert()
    outcome = build_pass("prune-heads", {"fraction": 0.5})(model)
    assert find_structure(model).summary()["heads_per_layer"] == {"0": 2, "1": 2}
    assert {layer: len(heads) for layer, heads in outcome.removed["heads"].items()} == {"0": 2, "1": 2}
    with masked(module, outcome.removed, HEAD_DIM):
        expected = run_module(module, inputs)[0]
    assert np.abs(run(model, inputs)[0] - expected).max() <= 1e-4


def test_a_plan_names_the_heads_removed(tiny_bert, tmp_path):
    _, _, model = tiny_bert()
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"heads": {"1": [0, 3]}}))
    outcome = build_pass("prune-heads", {"importance": "plan", "plan": str(plan)})(model)
    assert outcome.removed["heads"] == {"1": [0, 3]}
    assert find_structure(model).summary()["heads_per_layer"] == {"0": 4, "1": 2}


def test_removing_every_head_of_a_layer_is_refused(tiny_bert, tmp_path):
    _, _, model = tiny_bert()
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"heads": {"0": [0, 1, 2, 3]}}))
    with pytest.raises(UserError):
        build_pass("prune-heads", {"importance": "plan", "plan": str(plan)})(model)
