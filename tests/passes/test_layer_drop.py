"""drop-layers on a two-layer random-init BERT: a dropped layer's input flows on as its output, and the
graph equals the module with that layer skipped."""

from __future__ import annotations

import numpy as np
import pytest

from redux_edge.analysis.reference import masked
from redux_edge.errors import UserError
from redux_edge.frontend.module_run import run_module
from redux_edge.ir.blocks import find_structure
from redux_edge.passes import build_pass


def test_a_named_layer_is_dropped_and_the_rest_is_exact(tiny_bert, run):
    module, inputs, model = tiny_bert()
    outcome = build_pass("drop-layers", {"layers": [0]})(model)
    assert outcome.removed["layers"] == [0]
    assert find_structure(model).summary()["layers"] == 1
    with masked(module, outcome.removed, 8):
        expected = run_module(module, inputs)[0]
    assert np.abs(run(model, inputs)[0] - expected).max() <= 1e-4


def test_dropping_every_layer_is_refused(tiny_bert):
    _, _, model = tiny_bert()
    with pytest.raises(UserError):
        build_pass("drop-layers", {"layers": [0, 1]})(model)
