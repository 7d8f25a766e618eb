"""A plain PyTorch BERT sentence encoder whose attention heads are addressable.

Follows the BERT architecture (Devlin et al., 2019) as Hugging Face's ``BertModel`` lays out its
weights, followed by the mean pooling and L2 normalisation of Sentence-BERT (Reimers & Gurevych, 2019).
Written out instead of imported so that every module is plain torch the exporter traces without surprises,
under Hugging Face's module names, so that the structural passes' exact reference
(``redux_edge.analysis.reference.masked``) addresses its heads, neurons and layers the same way as in
``transformers``' BERT models.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["BertConfig", "BertSentenceEncoder", "TokenStates"]


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_positions: int
    type_vocab_size: int
    layer_norm_eps: float

    @classmethod
    def from_hf_json(cls, config: dict) -> BertConfig:
        return cls(
            vocab_size=config["vocab_size"],
            hidden_size=config["hidden_size"],
            num_layers=config["num_hidden_layers"],
            num_heads=config["num_attention_heads"],
            intermediate_size=config["intermediate_size"],
            max_positions=config["max_position_embeddings"],
            type_vocab_size=config["type_vocab_size"],
            layer_norm_eps=config["layer_norm_eps"],
        )


class Embeddings(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_positions, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        # Sentence encoders feed a single segment, so every token has type 0.
        embedded = (
            self.word_embeddings(input_ids)
            + self.position_embeddings(positions)[None]
            + self.token_type_embeddings.weight[0]
        )
        return self.LayerNorm(embedded)


class SelfAttention(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        width = num_heads * self.head_dim
        self.query = nn.Linear(hidden_size, width)
        self.key = nn.Linear(hidden_size, width)
        self.value = nn.Linear(hidden_size, width)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape
        return x.view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, hidden: torch.Tensor, additive_mask: torch.Tensor) -> torch.Tensor:
        q = self._split_heads(self.query(hidden))
        k = self._split_heads(self.key(hidden))
        v = self._split_heads(self.value(hidden))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim)
        probs = torch.softmax(scores + additive_mask, dim=-1)
        context = torch.matmul(probs, v)
        batch, _, seq, _ = context.shape
        return context.transpose(1, 2).reshape(batch, seq, self.num_heads * self.head_dim)


class AttentionOutput(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


class Attention(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.self = SelfAttention(config.hidden_size, config.num_heads)
        self.output = AttentionOutput(config)

    def forward(self, hidden: torch.Tensor, additive_mask: torch.Tensor) -> torch.Tensor:
        context = self.self(hidden, additive_mask)
        return self.output.LayerNorm(hidden + self.output.dense(context))


class Intermediate(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)


class FeedForwardOutput(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


class Layer(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.attention = Attention(config)
        self.intermediate = Intermediate(config)
        self.output = FeedForwardOutput(config)

    def forward(self, hidden: torch.Tensor, additive_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.attention(hidden, additive_mask)
        # BERT's GELU is the exact erf form, not the tanh approximation.
        inner = nn.functional.gelu(self.intermediate.dense(hidden))
        return self.output.LayerNorm(hidden + self.output.dense(inner))


class Encoder(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(Layer(config) for _ in range(config.num_layers))


class BertSentenceEncoder(nn.Module):
    """input_ids, attention_mask [batch, seq] -> L2-normalised mean-pooled embedding [batch, hidden]."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.encoder = Encoder(config)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.to(torch.float32)
        summed = _token_states(self, input_ids, attention_mask).sum(dim=1)
        pooled = summed / mask.sum(dim=1, keepdim=True).clamp(min=1e-9)
        return nn.functional.normalize(pooled, p=2.0, dim=1)


class TokenStates(nn.Module):
    """A sentence encoder seen through its last layer's token states [batch, seq, hidden] (zero at padding),
    under the same parameter names: what MaskLLM distils, since matching every token constrains a mask far
    more than matching their mean."""

    def __init__(self, sentence_encoder: nn.Module) -> None:
        super().__init__()
        assert isinstance(sentence_encoder, BertSentenceEncoder), "a BERT sentence encoder"
        self.embeddings = sentence_encoder.embeddings
        self.encoder = sentence_encoder.encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return _token_states(self, input_ids, attention_mask)


def _token_states(
    model: BertSentenceEncoder | TokenStates, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    mask = attention_mask.to(torch.float32)
    additive_mask = ((1.0 - mask) * torch.finfo(torch.float32).min)[:, None, None, :]
    hidden = model.embeddings(input_ids)
    for layer in model.encoder.layer:
        hidden = layer(hidden, additive_mask)
    return hidden * mask[:, :, None]
