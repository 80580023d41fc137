"""What the Triton kernels share: how they were compiled (GPU or the CPU interpreter) and dot precision."""
from __future__ import annotations

import os

import torch

FP8_BLOCK = 128  # the checkpoints' weight block and the activation group size

# Decided once, when the kernels are defined: triton.jit reads TRITON_INTERPRET at decoration time, so a kernel
# module imported under the interpreter stays interpreted even if the variable changes later.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# The interpreter stores bfloat16 as raw uint16 bits and tl.dot multiplies those bits (bf16 math is documented as
# unsupported there), so interpreted kernels upcast dot operands to float32; compiled kernels keep bf16/fp8 operands
# for the tensor cores.


def dot_precision(dtype: torch.dtype) -> str:
    # float32 inputs would otherwise run as TF32 on the GPU (10-bit mantissa), far outside the 1e-4 float32 budget.
    return "ieee" if dtype == torch.float32 else "tf32"
