"""Recipes are declarative and strict: every key is checked, and the manifest's recipe rebuilds the same."""

from __future__ import annotations

import json

import pytest

from redux_edge.errors import UserError
from redux_edge.passes.cleanup import CleanupPass
from redux_edge.recipe import load_recipe, parse_pass_flag
from redux_edge.zoo import MODELS_DIR


def test_default_recipe_is_cleanup():
    recipe = load_recipe(None)
    assert [p.name for p in recipe.passes] == ["cleanup"]


def test_toml_recipe_with_parameters(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text('name = "mine"\n[[passes]]\npass = "cleanup"\niterations = 3\n')
    recipe = load_recipe(path)
    assert recipe.name == "mine"
    assert isinstance(recipe.passes[0], CleanupPass)
    assert recipe.to_json() == {"name": "mine", "passes": [{"pass": "cleanup", "iterations": 3}]}


def test_manifest_recipe_round_trips(tmp_path):
    recipe = load_recipe(None).extended([parse_pass_flag("cleanup:iterations=4")])
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps({"recipe": recipe.to_json()}))
    assert load_recipe(path).to_json() == recipe.to_json()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[[passes]]\npass = "prune-everything"\n', "unknown pass 'prune-everything'"),
        ('colour = "blue"\n', "unknown recipe key colour"),
        ('[[passes]]\npass = "cleanup"\nspeed = 11\n', "has no parameter speed"),
        ('[[passes]]\npass = "cleanup"\niterations = "many"\n', "must be int"),
        ("[[passes]]\niterations = 2\n", "names no pass"),
        ("passes = 3\n", "must be a list"),
        ("[[passes]\n", "is not valid TOML"),
        (
            '[[passes]]\npass = "prune-heads"\n[[passes]]\npass = "prune-heads"\n',
            "prune-heads more than once",
        ),
        ('[[passes]]\npass = "prune-ffn"\nper_layer = 3\n', "must be list"),
    ],
)
def test_bad_recipes_say_what_is_wrong(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(UserError, match=message):
        load_recipe(path)


def test_pass_flags():
    assert parse_pass_flag("cleanup").parameters() == {"iterations": 2}
    assert parse_pass_flag("cleanup:iterations=5").parameters() == {"iterations": 5}
    with pytest.raises(UserError, match="key=value"):
        parse_pass_flag("cleanup:iterations")
    with pytest.raises(UserError, match="unknown pass"):
        parse_pass_flag("shrink")


def test_list_parameters_in_pass_flags():
    assert parse_pass_flag("prune-heads:per_layer=[2,0,1],importance=random").parameters() == {
        "fraction": 0.0,
        "per_layer": [2, 0, 1],
        "importance": "random",
        "plan": "",
        "seed": 0,
        "scope": "layer",
    }


def test_the_edge_recipe_and_the_passes_listing(cli):
    recipe = load_recipe(MODELS_DIR / "minilm-l6" / "edge.toml")
    assert [p.name for p in recipe.passes] == [
        "cleanup",
        "drop-layers",
        "prune-heads",
        "prune-ffn",
        "cleanup",
    ]
    listing = {row["pass"]: row["parameters"] for row in json.loads(cli("passes", "--json").stdout)}
    assert listing["drop-layers"] == {"count": 0, "layers": [], "importance": "calibration", "plan": ""}


def test_missing_recipe_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_recipe(tmp_path / "none.toml")
