"""``mask-aware``: fine-tune an image zoo model with MACPruning's masks as training-time augmentation, so
that it keeps its accuracy at the masking rates that protect (the defender owns the model).

Every training image gets a fresh mask per step, drawn as the ``mac-prune`` pass draws it: the pixels the
pass would always keep (its occlusion map on the same calibration images) stay, every other pixel is
dropped with probability ``drop``: zeroed (``hiding = "none"``) or replaced by a uniform random value in
the calibration images' range (``hiding = "shuffle"``, what the constant-time kernel computes). The loss is
the cross-entropy on the card's training labels. The masks of step ``s`` are a fixed function of ``s`` and
the seed, so 1 process and ``w`` processes see the same examples with the same masks. The result is the
zoo model's weights (``weights.safetensors``) and a compile recipe that protects it with the same
settings::

    redux-edge compile --model mnist-cnn --weights <out>/weights.safetensors --recipe <out>/recipe.toml

(the recipe also writes the C kernel, ``emit_c``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import cast

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from redux_edge.errors import UserError
from redux_edge.files import write_atomically
from redux_edge.preprocess import ImagePreprocessor
from redux_edge.train.data import global_batch_indices, rank_share

__all__ = ["MaskAwareTask", "Options"]

_CALIBRATION = 64  # as many images as the pass chooses its pixel map by


@dataclass
class Options:
    drop: float = 0.5
    keep_top: float = 0.4
    hiding: str = "shuffle"


class _Masked(nn.Module):
    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        self.classifier = classifier

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(self.classifier(images), labels)


class MaskAwareTask:
    """A classifier, its normalised training ``images`` [n, c, h, w] and ``labels``, and the map and fill
    range of the mac-prune pass that will protect it; ``from_recipe`` builds it for a zoo model."""

    def __init__(
        self,
        classifier: nn.Module,
        images: np.ndarray,
        labels: np.ndarray,
        critical: np.ndarray,
        fill_range: list[float] | None,
        options: Options,
        global_batch: int,
        seed: int = 0,
    ) -> None:
        self.options = options
        self.critical = torch.from_numpy(critical)
        self.fill_range = fill_range
        self.images = torch.from_numpy(images)
        self.labels = torch.from_numpy(labels.astype(np.int64))
        self.global_batch, self.seed = global_batch, seed
        self.module = _Masked(classifier.train())
        self.blocks: list[nn.Module] = []
        self.device = torch.device("cpu")

    @classmethod
    def from_recipe(cls, entry, recipe) -> MaskAwareTask:
        """The task of ``redux-edge train`` for an image zoo model and its card's task data."""
        from redux_edge.frontend import load_source
        from redux_edge.passes import build_pass
        from redux_edge.passes.mac_prune import PixelsMasked

        options = Options(**recipe.options)
        source = load_source(recipe.model)
        data = source.image_task
        if data is None or not isinstance(source.preprocessor, ImagePreprocessor):
            raise UserError(
                f"mask-aware trains on the model card's image task data; {recipe.model} names none",
                "use an image zoo model such as mnist-cnn",
            )
        configured = build_pass("mac-prune", asdict(options))
        protect = configured.prepared({"calibration": source.calibration(_CALIBRATION).feeds})
        # The pass itself gives the map and range a compile would use (it changes source.model, unused after).
        outcome = cast(PixelsMasked, protect(source.model))
        images = source.preprocessor.pixels(data.train_images)["image"]
        return cls(
            entry.module,
            images,
            data.train_labels,
            outcome.critical,
            outcome.fill_range,
            options,
            recipe.optim.global_batch,
            recipe.optim.seed,
        )

    def to(self, device: torch.device) -> None:
        self.device = device
        self.module.to(device)

    def batch(self, step: int, rank: int, world: int) -> tuple[torch.Tensor, ...]:
        chosen = global_batch_indices(len(self.images), step, self.global_batch, self.seed)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        images = self.images[chosen]
        draws = torch.rand((len(chosen), 1, *images.shape[2:]), generator=generator)
        keep = self.critical | (draws >= self.options.drop)
        if self.fill_range is None:
            fill = torch.zeros_like(images)
        else:
            low, high = self.fill_range
            fill = low + (high - low) * torch.rand(images.shape, generator=generator)
        masked = torch.where(keep, images, fill)
        mine = torch.from_numpy(rank_share(np.arange(len(chosen)), rank, world))
        return masked[mine].to(self.device), self.labels[chosen][mine].to(self.device)

    def finish(self, state: dict[str, torch.Tensor], out: Path) -> dict:
        prefix = "classifier."
        weights = {
            name[len(prefix) :]: value.detach().cpu().contiguous()
            for name, value in state.items()
            if name.startswith(prefix)
        }
        write_atomically(out / "weights.safetensors", lambda path: save_file(weights, str(path)))
        options = self.options
        recipe = "\n".join(
            [
                "# Written by `redux-edge train`: protects the fine-tuned model as it was trained.",
                "",
                "[[passes]]",
                'pass = "mac-prune"',
                f"drop = {options.drop}",
                f"keep_top = {options.keep_top}",
                f'hiding = "{options.hiding}"',
                "emit_c = true",
                "",
            ]
        )
        write_atomically(out / "recipe.toml", lambda path: path.write_text(recipe))
        return {"weights": "weights.safetensors", "recipe": "recipe.toml", **asdict(options)}
