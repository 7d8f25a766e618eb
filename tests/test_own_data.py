"""Your own model evaluated on your own data: a sentiment classifier fine-tuned here from MiniLM on Rotten
Tomatoes and a ViT trained here on Fashion-MNIST (``own_models``), pruned with ``--eval-data`` naming held-out
rows and a labelled image folder: accuracy from the model's own logits, dense vs compressed, in the report
and the manifest; ``--calibration-data`` feeds the choice by calibration; bad data files are refused."""

from __future__ import annotations

import json

import numpy as np
import own_models
import pytest
from conftest import assert_clean_user_error


@pytest.fixture(scope="session")
def text_classifier(tmp_path_factory):
    return own_models.text_classifier(tmp_path_factory.mktemp("own") / "minilm-sentiment")


@pytest.fixture(scope="session")
def image_classifier(tmp_path_factory):
    return own_models.image_classifier(tmp_path_factory.mktemp("own") / "vit-fashion")


def _quality(cli, folder, data, out, *flags):
    result = cli("compile", "-m", folder, "--prune-heads", "0.5", "--eval-data", data, *flags, "-o", out)
    assert result.exit_code == 0, result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    return manifest, result.stdout


@pytest.mark.slow
def test_a_fine_tuned_text_classifier_reports_accuracy_from_its_logits(cli, tmp_path, text_classifier):
    folder, held_out = text_classifier
    manifest, report = _quality(cli, folder, held_out, tmp_path / "pruned")
    quality = manifest["compression"]["quality"]
    assert quality["samples"] == 200 and "--eval-data" in quality["task"]
    accuracy = quality["accuracy"]
    assert accuracy["dense"] > 0.7, "the fine-tuned classifier learned the task"
    assert 0.5 <= accuracy["compressed"] <= 1.0
    assert quality["points_lost"] == pytest.approx(100 * (accuracy["dense"] - accuracy["compressed"]))
    assert "accuracy from the model's logits" in report
    assert manifest["verify"]["reference"].startswith("pytorch (transformers), with the removed heads")


@pytest.mark.slow
def test_an_image_classifier_reports_accuracy_on_a_labelled_image_folder(cli, tmp_path, image_classifier):
    folder, held_out = image_classifier
    manifest, report = _quality(cli, folder, held_out, tmp_path / "pruned")
    quality = manifest["compression"]["quality"]
    assert quality["samples"] == 300 and "10 classes" in quality["task"]
    assert quality["accuracy"]["dense"] > 0.6
    assert manifest["metrics"]["structure"]["heads_per_layer"] == {"0": 2, "1": 2}
    assert "accuracy from the model's logits" in report


@pytest.mark.slow
def test_calibration_data_chooses_the_heads(cli, tmp_path, text_classifier):
    folder, held_out = text_classifier
    unlabelled = tmp_path / "calibration.jsonl"
    texts = [line.split(",")[0] for line in held_out.read_text().splitlines()[1:40]]
    unlabelled.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    manifest, _ = _quality(
        cli,
        folder,
        held_out,
        tmp_path / "calibrated",
        "--importance",
        "calibration",
        "--calibration-data",
        unlabelled,
    )
    assert "calibration.jsonl" in manifest["compression"]["calibration"]


@pytest.mark.slow
def test_bad_evaluation_data_is_refused_before_anything_is_written(cli, tmp_path, image_classifier):
    folder, _ = image_classifier
    parent = tmp_path / "runs"
    parent.mkdir()

    def refused(data, message):
        result = cli(
            "compile", "-m", folder, "--prune-heads", "0.5", "--eval-data", data, "-o", parent / "out"
        )
        assert_clean_user_error(result, parent, message=message)

    refused(tmp_path / "missing.csv", "does not exist")
    unknown_class = tmp_path / "folders"
    (unknown_class / "spaceship").mkdir(parents=True)
    from PIL import Image

    Image.fromarray(np.zeros((28, 28), np.uint8)).save(unknown_class / "spaceship" / "a.png")
    refused(unknown_class, "label 'spaceship' is not one of the model's classes")
    np.savez(tmp_path / "no_labels.npz", images=np.zeros((4, 28, 28), np.uint8))
    refused(tmp_path / "no_labels.npz", "has no 'labels' array")
    np.savez(tmp_path / "bad_labels.npz", images=np.zeros((2, 28, 28), np.uint8), labels=np.array([3, 12]))
    refused(tmp_path / "bad_labels.npz", "labels [12] are not classes of the model")


@pytest.mark.slow
def test_a_text_table_without_its_label_column_is_refused(cli, tmp_path):
    parent = tmp_path / "runs"
    parent.mkdir()
    table = tmp_path / "eval.csv"
    table.write_text("sentence,label\na fine film,1\n")
    result = cli("compile", "-m", "minilm-l6", "--eval-data", table, "-o", parent / "out")
    assert_clean_user_error(result, parent, message="row 1 has no text column")
    table.write_text("text\na fine film\n")
    result = cli("compile", "-m", "minilm-l6", "--eval-data", table, "-o", parent / "out")
    assert_clean_user_error(result, parent, message="row 1 has no label column")
