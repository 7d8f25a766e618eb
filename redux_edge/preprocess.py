"""Turning a user's input file into the named arrays a model takes.

A bundle records how its model's inputs are made (``manifest["preprocess"]``): ``text`` runs the
model's own WordPiece tokenizer (shipped in the bundle as ``preprocess/tokenizer.json``), ``image``
converts a picture to the model's grey-scale size and normalisation. Whatever the model, ``.npz``
(one array per input name) and ``.npy`` (a model with one input) are taken as they are.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from redux_edge.errors import UserError

__all__ = ["ImagePreprocessor", "Preprocessor", "TextPreprocessor", "from_manifest", "read_inputs"]


@dataclass(frozen=True)
class TextPreprocessor:
    tokenizer_file: Path
    max_length: int

    kind = "text"

    def __call__(self, texts: list[str]) -> dict[str, np.ndarray]:
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(self.tokenizer_file))
        tokenizer.enable_truncation(self.max_length)
        tokenizer.enable_padding()
        encoded = tokenizer.encode_batch(texts)
        return {
            "input_ids": np.array([e.ids for e in encoded], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in encoded], dtype=np.int64),
        }

    def read(self, path: Path) -> dict[str, np.ndarray]:
        texts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not texts:
            raise UserError(f"{path} holds no text", "write one sentence per line")
        return self(texts)

    def assets(self) -> dict[str, Path]:
        return {"preprocess/tokenizer.json": self.tokenizer_file}

    def to_manifest(self) -> dict:
        return {"kind": "text", "tokenizer": "preprocess/tokenizer.json", "max_length": self.max_length}


@dataclass(frozen=True)
class ImagePreprocessor:
    size: int
    mean: float
    std: float
    input_name: str = "image"

    kind = "image"

    def __call__(self, paths: list[Path]) -> dict[str, np.ndarray]:
        from PIL import Image, UnidentifiedImageError

        pixels = []
        for path in paths:
            try:
                with Image.open(path) as image:
                    grey = image.convert("L").resize((self.size, self.size), Image.Resampling.BILINEAR)
            except (UnidentifiedImageError, OSError) as exc:
                raise UserError(f"cannot read image {path}: {exc}", "give a PNG or JPEG file") from exc
            pixels.append(np.asarray(grey))
        return self.pixels(np.stack(pixels))

    def pixels(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Feeds for uint8 grey images [n, size, size]."""
        batch = (images.astype(np.float32)[:, None] / 255.0 - self.mean) / self.std
        return {self.input_name: batch.astype(np.float32)}

    def read(self, path: Path) -> dict[str, np.ndarray]:
        return self([path])

    def assets(self) -> dict[str, Path]:
        return {}

    def to_manifest(self) -> dict:
        return {
            "kind": "image",
            "size": self.size,
            "mean": self.mean,
            "std": self.std,
            "input": self.input_name,
        }


Preprocessor = TextPreprocessor | ImagePreprocessor


def from_manifest(spec: dict | None, bundle_dir: Path) -> Preprocessor | None:
    if not spec:
        return None
    if spec["kind"] == "text":
        return TextPreprocessor(bundle_dir / spec["tokenizer"], spec["max_length"])
    return ImagePreprocessor(spec["size"], spec["mean"], spec["std"], spec["input"])


def _read_numpy(path: Path) -> dict[str, np.ndarray]:
    """Arrays of a .npy ({"": array}) or .npz file, never unpickling: an input file is untrusted."""
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            return {"": loaded}
        with loaded as archive:
            return {name: archive[name] for name in archive.files}
    except (ValueError, OSError, zipfile.BadZipFile) as exc:
        raise UserError(
            f"cannot read {path}: {exc}", "save plain numeric arrays with numpy.save/savez"
        ) from exc


def read_inputs(
    path: Path, input_names: list[str], preprocessor: Preprocessor | None
) -> dict[str, np.ndarray]:
    """Read ``path`` into {input name: array}; raises UserError when the file does not fit the model."""
    if not path.is_file():
        raise UserError(f"input file {path} does not exist", "give a .npz, .npy, text or image file")
    suffix = path.suffix.lower()
    if suffix in (".npz", ".npy"):
        arrays = _read_numpy(path)
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
