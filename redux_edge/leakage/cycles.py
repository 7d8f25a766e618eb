"""What a kernel variant costs on a Cortex-M4, counted by running it.

Each variant is built for the Cortex-M4 (``arm-none-eabi-gcc -mcpu=cortex-m4 -mthumb -O2``, freestanding,
with a small driver that makes Linux system calls for its output) and run once, one inference, under
``qemu-arm`` with one instruction per translation block and the execution log on, so that every executed
instruction is one log line; the lines inside the kernel's own functions are counted. qemu's user mode
does not run M-profile cores, so the Thumb-2 code runs on its Cortex-A15 model, which decodes the same
instructions; the count is of instructions, not cycles (on a Cortex-M4 most take one cycle, loads one or
two). The driver writes the layer's int32 outputs, which are checked against ``kernel.accumulate``: the
count is of a build that computes the right thing.
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from redux_edge.errors import UserError
from redux_edge.leakage.c_source import c_initializer, emit_c
from redux_edge.leakage.kernel import QuantizedLayer, accumulate, draw_reference

__all__ = ["KernelCost", "count_instructions"]

_NAME = "macprune_layer"
_SEED = 12345


@dataclasses.dataclass
class KernelCost:
    variant: str
    instructions: int  # per inference: drawing the mask (and fill) and running the layer
    integer_exact: bool


def _tools() -> tuple[str, str]:
    compiler = shutil.which("arm-none-eabi-gcc")
    emulator = shutil.which("qemu-arm-static") or shutil.which("qemu-arm")
    if compiler is None or emulator is None:
        raise UserError(
            "counting Cortex-M4 instructions needs arm-none-eabi-gcc and qemu-arm",
            "apt-get install gcc-arm-none-eabi qemu-user-static (make test does)",
        )
    return compiler, emulator


def _driver(layer: QuantizedLayer, image: np.ndarray, variant: str) -> str:
    p = _NAME.upper()
    calls = {
        "plain": f"{_NAME}_run(input, output);",
        "none": f"{_NAME}_seed({_SEED}u); {_NAME}_draw_mask(keep); {_NAME}_run(input, keep, output);",
        "shuffle": f"{_NAME}_seed({_SEED}u); {_NAME}_draw_mask(keep, fill); "
        f"{_NAME}_run(input, keep, fill, output);",
    }
    return f"""#include <stdint.h>
#include "{_NAME}.h"
/* gcc may call these for loops and initialisers; a freestanding build has no libc. */
void *memset(void *d, int c, unsigned n) {{ uint8_t *p = d; while (n--) *p++ = (uint8_t)c; return d; }}
void *memcpy(void *d, const void *s, unsigned n) {{
    uint8_t *p = d; const uint8_t *q = s; while (n--) *p++ = *q++; return d; }}
static const int8_t input[{p}_IN_CHANNELS][{p}_HEIGHT][{p}_WIDTH] = {c_initializer(image)};
static uint8_t keep[{p}_HEIGHT][{p}_WIDTH];
static int8_t fill[{p}_IN_CHANNELS][{p}_HEIGHT][{p}_WIDTH];
static int32_t output[{p}_OUT_CHANNELS][{p}_OUT_HEIGHT][{p}_OUT_WIDTH];
static void linux_call(int number, int a, const void *b, unsigned c) {{
    register int r0 __asm__("r0") = a;
    register const void *r1 __asm__("r1") = b;
    register unsigned r2 __asm__("r2") = c;
    register int r7 __asm__("r7") = number;
    __asm__ volatile("svc 0" : "+r"(r0) : "r"(r1), "r"(r2), "r"(r7) : "memory");
}}
void _start(void) {{
    (void)keep; (void)fill;
    {calls[variant]}
    linux_call(4, 1, output, sizeof output);
    linux_call(1, 0, 0, 0);
    for (;;) {{}}
}}
"""


def count_instructions(layer: QuantizedLayer, variant: str, image: np.ndarray) -> KernelCost:
    """Build ``variant`` of ``layer``'s kernel for the Cortex-M4, run one inference on int8 ``image``
    [channels, h, w] under qemu-arm and count the instructions executed in the kernel's functions."""
    compiler, emulator = _tools()
    # The layer's hiding decides what the reference draws; the plain kernel draws nothing.
    layer = dataclasses.replace(layer, hiding="none" if variant == "plain" else variant)
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        emit_c(layer, folder, _NAME, variant)
        (folder / "driver.c").write_text(_driver(layer, image.astype(np.int8), variant))
        program = folder / "kernel.elf"
        flags = ["-mcpu=cortex-m4", "-mthumb", "-O2", "-std=c99", "-ffreestanding", "-nostdlib", "-static"]
        flags += ["-fno-tree-loop-distribute-patterns", "-I", str(folder)]
        sources = [str(folder / "driver.c"), str(folder / f"{_NAME}.c")]
        subprocess.run(
            [compiler, *flags, *sources, "-lgcc", "-o", str(program)], check=True, capture_output=True
        )
        written = folder / "output.bin"
        with written.open("wb") as output:
            run = subprocess.Popen(
                [emulator, "-cpu", "cortex-a15", "-singlestep", "-d", "exec,nochain", str(program)],
                stdout=output,
                stderr=subprocess.PIPE,
            )
            assert run.stderr is not None
            # The log (millions of lines) is counted as it streams; each line ends with its symbol.
            symbol = _NAME.encode()
            counted = sum(1 for line in run.stderr if line.rstrip().rsplit(b" ", 1)[-1].startswith(symbol))
            if run.wait() != 0:
                raise RuntimeError(f"the Cortex-M4 build of the {variant} kernel failed under qemu-arm")
        got = np.frombuffer(written.read_bytes(), dtype="<i4")
    out_c, _, k_h, k_w = layer.weights.shape
    shape = (1, out_c, layer.height + 2 * layer.padding - k_h + 1, layer.width + 2 * layer.padding - k_w + 1)
    keep, fill = draw_reference(layer, _SEED)
    if variant == "plain":
        keep = np.ones_like(keep)
    expected = accumulate(layer, image[None], keep[None], None if fill is None else fill[None])
    exact = got.size == expected.size and np.array_equal(got.reshape(shape), expected)
    return KernelCost(variant, counted, bool(exact))
