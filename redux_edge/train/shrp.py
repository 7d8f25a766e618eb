"""``shrp``: Expert Attention with usage-driven routing, after SHRP ("Specialized Head Routing and Pruning";
docs/PAPERS.md), turned into a head plan for the ``prune-heads`` pass.

Every attention head is an expert. Per layer a router (a linear map of the layer's input tokens to one
logit per head) scores the heads for each token; the ``keep`` best heads of each token pass, weighted by
their share of the router's softmax (times the number of heads, so an untrained router is the dense
model), the others are switched off; the straight-through estimator carries gradients to the router
through the hard choice. An optional shared expander (a small bottleneck feed-forward network after the
attention block of each layer) refines what the chosen heads wrote. The encoder is frozen; the routers
(and expander) learn by distillation from the dense model on real sentences (1 - cosine of every token's
final state). Usage is counted on real tokens: how often a head is each token's first choice (Top-1) and
its mean router share. At the end, the heads of each layer with the least usage become the plan: the
deterministic pruning decision that replaces routing at deployment.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch
from safetensors.torch import save_file
from torch import nn

from redux_edge.errors import UserError
from redux_edge.train.data import DistillTask, sentence_distance
from redux_edge.train.recover import compile_recipe
from redux_edge.zoo.bert import BertSentenceEncoder, Layer, TokenStates

__all__ = ["Options", "Routed", "ShrpTask"]


@dataclass
class Options:
    fraction: float = 0.5  # of each layer's heads that the plan removes
    expander: int = 0  # width of the shared expander; 0 = none (the prune-heads pass cannot deploy one)


class _Router(nn.Module):
    """One layer's router: token -> head scores; keeps the ``keep`` best heads of every token."""

    def __init__(self, hidden: int, heads: int, keep: int, generator: torch.Generator) -> None:
        super().__init__()
        self.scores = nn.Linear(hidden, heads)
        with torch.no_grad():
            self.scores.weight.normal_(0.0, 0.01, generator=generator)
            self.scores.bias.zero_()
        self.heads, self.keep = heads, keep
        self.tokens: torch.Tensor | None = None  # the layer's input, set by a pre-hook on the layer
        self.mask: torch.Tensor | None = None  # real tokens of the current batch

    def gates(self) -> tuple[torch.Tensor, torch.Tensor]:
        share = torch.softmax(self.scores(self.tokens), dim=-1)  # [batch, seq, heads]
        chosen = torch.zeros_like(share).scatter_(-1, share.topk(self.keep, dim=-1).indices, 1.0)
        hard = chosen * share
        # Forward: the chosen heads weighted by heads x share; backward: the soft share's gradient.
        return self.heads * (hard + (share - share.detach()) * (1.0 - chosen)), share


class _Expander(nn.Module):
    def __init__(self, hidden: int, width: int) -> None:
        super().__init__()
        self.down = nn.Linear(hidden, width)
        self.up = nn.Linear(width, hidden)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        return states + self.up(nn.functional.gelu(self.down(states)))


class Routed(nn.Module):
    """A frozen model with routers (and expanders) hooked into its layers; forward returns the loss.

    ``states`` computes what is distilled from (ids, mask); ``layers`` are its transformer layers and
    ``projections`` each layer's attention output projection, whose input (the heads' contexts) the gates
    scale; ``distance`` compares ``states``'s output with the dense model's."""

    def __init__(
        self,
        states: nn.Module,
        layers: Sequence[nn.Module],
        projections: Sequence[nn.Module],
        size: tuple[int, int],
        options: Options,
        seed: int,
        distance: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] = sentence_distance,
    ) -> None:
        super().__init__()
        hidden, self.heads = size
        self.head_dim = hidden // self.heads
        keep = self.heads - round(options.fraction * self.heads)
        generator = torch.Generator().manual_seed(seed)
        self.states, self.distance = states, distance
        self.states.requires_grad_(False)
        self.routers = nn.ModuleList(_Router(hidden, self.heads, keep, generator) for _ in layers)
        self.expanders = nn.ModuleList(
            _Expander(hidden, options.expander) for _ in layers if options.expander
        )
        # Usage on this rank's real tokens: Top-1 counts and summed shares, per layer and head.
        self.top1 = torch.zeros(len(self.routers), self.heads)
        self.share = torch.zeros(len(self.routers), self.heads)
        self.tokens = torch.zeros(())
        routers = cast(list[_Router], list(self.routers))
        expanders = cast(list[_Expander], list(self.expanders))
        for index, (layer, projection, router) in enumerate(zip(layers, projections, routers, strict=True)):
            layer.register_forward_pre_hook(self._remember(router), with_kwargs=True)
            projection.register_forward_pre_hook(self._route(index, router))
            if options.expander:
                attention = cast(Layer, layer).attention
                attention.register_forward_hook(self._expand(expanders[index]))

    @staticmethod
    def _remember(router: _Router):
        def hook(_: nn.Module, args: tuple, kwargs: dict) -> None:
            router.tokens = args[0] if args else kwargs.get("hidden_states", next(iter(kwargs.values())))

        return hook

    def _route(self, index: int, router: _Router):
        def hook(_: nn.Module, args: tuple) -> tuple:
            gates, share = router.gates()
            assert router.mask is not None, "forward sets the batch's mask first"
            real = router.mask.to(share.dtype)[..., None]
            with torch.no_grad():
                self.top1[index] += (
                    torch.nn.functional.one_hot(share.argmax(-1), self.heads).mul(real).sum((0, 1))
                )
                self.share[index] += (share * real).sum((0, 1))
            batch, seq, _ = args[0].shape
            context = args[0].view(batch, seq, self.heads, self.head_dim) * gates[..., None]
            return (context.view(batch, seq, -1),)

        return hook

    @staticmethod
    def _expand(expander: _Expander):
        def hook(_: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            return expander(output)

        return hook

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, teacher: torch.Tensor
    ) -> torch.Tensor:
        for router in self.routers:
            router.mask = attention_mask
        self.tokens += attention_mask.sum()
        return self.distance(self.states(input_ids, attention_mask), teacher, attention_mask)


class ShrpTask(DistillTask):
    def __init__(self, entry, recipe) -> None:
        super().__init__(entry, recipe)
        self.options = Options(**recipe.options)
        if not 0.0 < self.options.fraction < 1.0:
            raise UserError(f"shrp fraction {self.options.fraction} is not in (0, 1)", "e.g. fraction = 0.5")
        self.module = self.routed(entry, recipe.optim.seed)

    def routed(self, entry, seed: int) -> Routed:
        """The zoo encoder, frozen, with its routers; ``blocks``: its layers."""
        encoder = BertSentenceEncoder(entry.module.config)
        encoder.load_state_dict(entry.module.state_dict())
        layers = list(encoder.encoder.layer)
        self.blocks = layers
        projections = [cast(Layer, layer).attention.output.dense for layer in layers]
        size = (encoder.config.hidden_size, encoder.config.num_heads)
        return Routed(TokenStates(encoder), layers, projections, size, self.options, seed)

    def usage(self) -> dict[str, torch.Tensor]:
        """This rank's usage counters (the worker sums them over ranks before ``finish``)."""
        routed = self.module
        assert isinstance(routed, Routed)
        return {"top1": routed.top1, "share": routed.share, "tokens": routed.tokens}

    def finish(self, state: dict[str, torch.Tensor], out: Path, usage: dict[str, torch.Tensor]) -> dict:
        tokens = float(usage["tokens"])
        share = (usage["share"] / tokens).numpy()
        top1 = (usage["top1"] / tokens).numpy()
        remove = round(self.options.fraction * share.shape[1])
        # Least used first: by mean router share, Top-1 frequency breaking ties.
        plan = {
            "heads": {
                str(layer): sorted(
                    sorted(range(share.shape[1]), key=lambda h: (share[layer, h], top1[layer, h]))[:remove]
                )
                for layer in range(share.shape[0])
            }
        }
        (out / "plan.json").write_text(json.dumps(plan, indent=1))
        (out / "recipe.toml").write_text(compile_recipe(out / "plan.json", plan))
        (out / "usage.json").write_text(
            json.dumps(
                {"tokens": tokens, "share": share.round(5).tolist(), "top1": top1.round(5).tolist()}, indent=1
            )
        )
        routing = {
            name: value.detach().cpu().contiguous()
            for name, value in state.items()
            if name.startswith(("routers.", "expanders."))
        }
        save_file(routing, str(out / "routing.safetensors"))
        return {
            "plan": "plan.json",
            "recipe": "recipe.toml",
            "usage": "usage.json",
            "routing": "routing.safetensors",
        }
