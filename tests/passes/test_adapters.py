"""adapters on a two-layer random-init BERT: a merged pack adds its dequantized low-rank product to the
weight it names, and a pack for weights the model lacks is refused."""

from __future__ import annotations

import numpy as np
import pytest

from redux_edge.errors import UserError
from redux_edge.ir.weights import find_weights
from redux_edge.passes import build_pass
from redux_edge.train.adapters import AdapterPack


def _pack(path, weight: str, shape: tuple[int, int]):
    rng = np.random.default_rng(0)
    rank = 2
    factors = {
        weight: {
            "down": (rng.choice([-1, 1], (rank, shape[1])), np.full(rank, 0.5, np.float16)),
            "up": (rng.choice([-1, 1], (shape[0], rank)), np.full(shape[0], 0.25, np.float16)),
        }
    }
    head = rng.standard_normal((2, shape[0])).astype(np.float16)
    pack = AdapterPack("demo", ["no", "yes"], 1, rank, factors, head, np.zeros(2, np.float16))
    path.write_bytes(pack.to_bytes())
    return path, factors[weight]


def test_a_merged_pack_adds_its_low_rank_product_to_the_weight(tiny_bert, tmp_path):
    _, _, model = tiny_bert()
    weight = next(w for w in find_weights(model) if w.name.endswith("layer.0.attention.self.query.weight"))
    before = weight.torch_layout.copy()
    pack_file, parts = _pack(tmp_path / "demo.bin", weight.name, before.shape)
    outcome = build_pass("adapters", {"packs": [str(pack_file)], "merge": True})(model)
    assert outcome.merge and list(outcome.read) == ["demo"]
    after = next(w for w in find_weights(model) if w.name == weight.name).torch_layout
    down = parts["down"][0] * parts["down"][1].astype(np.float32)[:, None]
    up = parts["up"][0] * parts["up"][1].astype(np.float32)[:, None]
    np.testing.assert_allclose(after - before, up @ down, atol=1e-5)


def test_a_pack_for_weights_the_model_lacks_is_refused(tiny_bert, tmp_path):
    _, _, model = tiny_bert()
    pack_file, _ = _pack(tmp_path / "other.bin", "encoder.elsewhere.weight", (32, 32))
    with pytest.raises(UserError, match="targets weights this model lacks"):
        build_pass("adapters", {"packs": [str(pack_file)], "merge": True})(model)
