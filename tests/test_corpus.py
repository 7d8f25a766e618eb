"""Published models this project did not write (tests/corpus.py), each compiled plainly and with every lossy
pass it admits: a bundle verified on its real inputs whose shift passes the gate, or a one-line refusal;
never exit 1. Where the corpus has labels, a compile that passes the gate keeps the task metric within
what the gate promises (the top-1 agreement it asks for)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from corpus import CORPUS, Published

from redux_edge import api
from redux_edge.analysis.shift import GATES


@pytest.mark.slow
@pytest.mark.parametrize("published", CORPUS, ids=[model.name for model in CORPUS])
def test_a_published_model_compiles_plainly_and_each_lossy_pass_passes_its_gate_or_is_refused(
    cli, tmp_path, published: Published
):
    model = published.extract(tmp_path)
    feeds = published.inputs()
    np.savez(tmp_path / "inputs.npz", **feeds)
    plain = cli(
        "compile", "-m", model, "--inputs", tmp_path / "inputs.npz", "-o", tmp_path / "plain", "--json"
    )
    assert plain.exit_code == 0, plain.stderr
    verified = json.loads(plain.stdout)["verify"]
    assert verified["samples"] == next(iter(feeds.values())).shape[0] or not next(iter(feeds.values())).ndim
    float_score = _score(published, tmp_path / "plain", tmp_path)
    outcomes = {"plain": "verified" + (f", task {float_score:.3f}" if float_score is not None else "")}
    for flags in published.lossy:
        out = tmp_path / "-".join(flag.strip("-") for flag in flags)
        result = cli("compile", "-m", model, "--inputs", tmp_path / "inputs.npz", *flags, "-o", out, "--json")
        assert result.exit_code in (0, 2), result.stderr
        if result.exit_code == 2:
            errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
            assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
            assert not out.exists()
            outcomes[" ".join(flags)] = f"refused: {errors[0][7:160]}"
            continue
        shift = json.loads(result.stdout)["verify"]["shift"]
        assert not shift["beyond"] and not shift["waived"]
        score = _score(published, out, tmp_path)
        if score is not None and float_score is not None:
            promised = 1.0 - GATES[flags[-1]].min_top1
            assert score >= float_score - promised, (score, float_score)
        worst = {name: round(numbers.get("rel_l2", 0.0), 4) for name, numbers in shift["outputs"].items()}
        outcomes[" ".join(flags)] = f"gate passed, rel L2 {worst}" + (
            f", task {score:.3f}" if score is not None else ""
        )
    print(json.dumps({published.name: outcomes}))  # the corpus table of the closing note: pytest -s


def _score(published: Published, bundle, tmp_path) -> float | None:
    if published.labels is None or published.score is None:
        return None
    outputs, manifest = api.run(bundle, tmp_path / "inputs.npz")
    return published.score([outputs[spec["name"]] for spec in manifest["outputs"]], published.labels())
