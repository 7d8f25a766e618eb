"""Turning a user's input file into the named arrays a model takes.

A bundle records how its model's inputs are made (``manifest["preprocess"]``): ``text`` runs the
model's own WordPiece tokenizer (shipped in the bundle as ``preprocess/tokenizer.json``), ``image``
converts a picture to the model's size, channels and normalisation. Whatever the model, ``.npz``
(one array per input name) and ``.npy`` (a model with one input) are taken as they are.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from redux_edge.errors import UserError, first_line
from redux_edge.untrusted import npy_members, read_json

__all__ = [
    "ImagePreprocessor",
    "Preprocessor",
    "TextPreprocessor",
    "from_manifest",
    "read_arrays",
    "read_inputs",
]


@dataclass(frozen=True)
class TextPreprocessor:
    tokenizer_file: Path
    max_length: int

    kind = "text"

    def tokenizer(self) -> Tokenizer:
        """The tokenizer file read as untrusted text; one the library cannot parse is a user error."""
        hint = "save the tokenizer again with tokenizers or transformers (a fast tokenizer's tokenizer.json)"
        read_json(self.tokenizer_file, hint)  # UTF-8, nesting and JSON checked before the library parses it
        try:
            return Tokenizer.from_file(str(self.tokenizer_file))
        except Exception as exc:  # tokenizers raises a bare Exception for what it cannot parse
            raise UserError(f"{self.tokenizer_file} is not a tokenizer: {first_line(exc)}", hint) from exc

    def __call__(self, texts: list[str]) -> dict[str, np.ndarray]:
        tokenizer = self.tokenizer()
        tokenizer.enable_truncation(self.max_length)
        tokenizer.enable_padding()
        encoded = tokenizer.encode_batch(texts)
        return {
            "input_ids": np.array([e.ids for e in encoded], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in encoded], dtype=np.int64),
        }

    def read(self, path: Path) -> dict[str, np.ndarray]:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise UserError(
                f"{path} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start})",
                "save it as UTF-8 text, one sentence per line",
            ) from exc
        texts = [line.strip() for line in text.splitlines() if line.strip()]
        if not texts:
            raise UserError(f"{path} holds no text", "write one sentence per line")
        return self(texts)

    def assets(self) -> dict[str, Path]:
        return {"preprocess/tokenizer.json": self.tokenizer_file}

    def to_manifest(self) -> dict:
        return {"kind": "text", "tokenizer": "preprocess/tokenizer.json", "max_length": self.max_length}


@dataclass(frozen=True)
class ImagePreprocessor:
    """A picture (or uint8 images) to the model's size, channels (1: grey, 3: RGB) and normalisation, per
    channel where ``mean``/``std`` are lists (Hugging Face image processors), after scaling to [0, 1]."""

    size: int
    mean: float | tuple[float, ...]
    std: float | tuple[float, ...]
    input_name: str = "image"
    channels: int = 1

    kind = "image"

    def __call__(self, paths: list[Path]) -> dict[str, np.ndarray]:
        return self.pixels(self.pixels_of(paths))

    def pixels_of(self, paths: list[Path]) -> np.ndarray:
        """uint8 images [n, size, size, channels] read from picture files."""
        from PIL import Image, UnidentifiedImageError

        pixels = []
        for path in paths:
            try:
                with Image.open(path) as image:
                    converted = image.convert("L" if self.channels == 1 else "RGB")
                    pixels.append(np.asarray(self._resized(converted)))
            except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
                # Pillow refuses images of more than twice MAX_IMAGE_PIXELS (a decompression bomb).
                raise UserError(f"cannot read image {path}: {exc}", "give a PNG or JPEG file") from exc
        return self.resized(np.stack(pixels))

    def _resized(self, image: Any) -> Any:
        from PIL import Image

        return image.resize((self.size, self.size), Image.Resampling.BILINEAR)

    def resized(self, images: np.ndarray) -> np.ndarray:
        """uint8 images [n, height, width] (grey) or [n, height, width, channels] at the model's size and
        channels: [n, size, size, channels]."""
        from PIL import Image

        if images.shape[1:3] != (self.size, self.size):
            images = np.stack([np.asarray(self._resized(Image.fromarray(image))) for image in images])
        if images.ndim == 3:
            images = images[..., None]
        if images.shape[-1] != self.channels:
            grey = images.mean(axis=-1, keepdims=True).round().astype(np.uint8)
            images = np.repeat(grey, self.channels, axis=-1)
        return images

    def pixels(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Feeds for uint8 images [n, height, width] (grey) or [n, height, width, channels]."""
        scaled = self.resized(images).astype(np.float32).transpose(0, 3, 1, 2) / 255.0
        mean = np.asarray(self.mean, np.float32).reshape(-1, 1, 1)
        std = np.asarray(self.std, np.float32).reshape(-1, 1, 1)
        return {self.input_name: ((scaled - mean) / std).astype(np.float32)}

    def read(self, path: Path) -> dict[str, np.ndarray]:
        return self([path])

    def assets(self) -> dict[str, Path]:
        return {}

    def to_manifest(self) -> dict:
        return {
            "kind": "image",
            "size": self.size,
            "mean": list(self.mean) if isinstance(self.mean, tuple) else self.mean,
            "std": list(self.std) if isinstance(self.std, tuple) else self.std,
            "input": self.input_name,
            "channels": self.channels,
        }


Preprocessor = TextPreprocessor | ImagePreprocessor


def from_manifest(spec: dict | None, bundle_dir: Path) -> Preprocessor | None:
    if not spec:
        return None
    if spec["kind"] == "text":
        return TextPreprocessor(bundle_dir / spec["tokenizer"], spec["max_length"])
    mean, std = (tuple(v) if isinstance(v, list) else v for v in (spec["mean"], spec["std"]))
    return ImagePreprocessor(spec["size"], mean, std, spec["input"], spec.get("channels", 1))


def read_arrays(path: Path) -> dict[str, np.ndarray]:
    """Arrays of a .npy ({"": array}) or .npz file, never unpickling: an input file is untrusted."""
    npy_members(path, "save plain numeric arrays with numpy.save/savez")
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            return {"": loaded}
        with loaded as archive:
            return {name: archive[name] for name in archive.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise UserError(
            f"cannot read {path}: {exc or type(exc).__name__}",
            "save plain numeric arrays with numpy.save/savez",
        ) from exc


def read_inputs(
    path: Path, input_names: list[str], preprocessor: Preprocessor | None
) -> dict[str, np.ndarray]:
    """Read ``path`` into {input name: array}; raises UserError when the file does not fit the model."""
    if not path.is_file():
        raise UserError(f"input file {path} does not exist", "give a .npz, .npy, text or image file")
    suffix = path.suffix.lower()
    if suffix in (".npz", ".npy"):
        arrays = read_arrays(path)
        if suffix == ".npy":
            if len(input_names) != 1:
                raise UserError(
                    f"the model takes {len(input_names)} inputs {input_names}", "give a .npz file"
                )
            return {input_names[0]: arrays[""]}
        if missing := set(input_names) - set(arrays):
            raise UserError(f"{path} lacks inputs {sorted(missing)}", f"the model takes {input_names}")
        return {name: arrays[name] for name in input_names}
    if preprocessor is None:
        raise UserError(f"this model has no reader for '{suffix}' files", "give a .npz or .npy file")
    return preprocessor.read(path)
