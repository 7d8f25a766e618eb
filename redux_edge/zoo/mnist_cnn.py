"""The MNIST CNN of the ``ccexam`` package, rebuilt as a plain module and loaded ``weights_only``.

The layer layout mirrors ccexam's ``MNISTNet`` (conv 1->32, conv 32->64, each ReLU + 2x2 max-pool, then
linear 3136->128->10) so that its state dict loads key for key; ccexam's own code is not imported.
"""

from __future__ import annotations

import torch
from torch import nn

from redux_edge.preprocess import ImagePreprocessor
from redux_edge.zoo.model import ZooModel, package_dir

__all__ = ["MnistCnn", "load"]


class MnistCnn(nn.Module):
    def __init__(self, image_size: int = 28) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Linear(64 * (image_size // 4) ** 2, 128), nn.ReLU(), nn.Linear(128, 10)
        )

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(image).flatten(start_dim=1))


def load(card: dict) -> ZooModel:
    root = package_dir(card["package"])
    module = MnistCnn(card["image_size"]).eval()
    # weights_only: a .pth file is a pickle, and unpickling an untrusted file runs its code
    state = torch.load(root / "weights" / "mnist.pth", map_location="cpu", weights_only=True)
    module.load_state_dict(state)
    preprocessor = ImagePreprocessor(card["image_size"], card["mean"], card["std"])
    return ZooModel(
        name=card["name"],
        description=card["description"],
        module=module,
        inputs=preprocessor([root / sample for sample in card["samples"]]),
        dynamic_axes={"image": {0: "batch"}},
        output_names=["logits"],
        preprocessor=preprocessor,
        source=f"{card['package']}: weights/mnist.pth",
        architecture={"family": "cnn"},
    )
