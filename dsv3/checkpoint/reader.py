"""Reading windows of checkpoint tensors into model tensors: plain positioned reads straight into the destination,
or, when the dtype changes or FP8 is dequantised, through one small reused staging buffer, chunk by chunk, so a load's
extra memory is a few MB and only the bytes of what is loaded are read.

Why not safetensors' `safe_open(...).get_slice`: it memory-maps the shard, so every page a load touches counts in the
process's resident set until the mapping goes, and each slice comes back as a new tensor in the stored dtype before it
is converted; benchmarks/load_memory.py measures both (docs/loading.md).
"""
from __future__ import annotations

import math
import os
from typing import Callable

import torch

from ..kernels import fp8
from .fp8 import SCALE_SUFFIX
from .layout import CheckpointError, CheckpointLayout, TensorInfo

_CHUNK_BYTES = 8 * 2**20  # staging buffer for reads that change dtype: bounds the load's extra memory


def _read_at(f, offset: int, view: memoryview) -> int:
    """Fill `view` from byte `offset` of the open file; every byte a load reads goes through here."""
    f.seek(offset)
    got = 0
    while got < len(view):
        n = f.readinto(view[got:])
        if not n:
            break
        got += n
    return got


class TensorReader:
    """Reads windows of a checkpoint's tensors into CPU or device tensors, converting dtypes and dequantising FP8
    on the way, through one reused staging buffer. `on_bytes(n)` is told of every n bytes read."""

    def __init__(self, layout: CheckpointLayout, on_bytes: Callable[[int], None] | None = None):
        self.layout, self.on_bytes = layout, on_bytes or (lambda n: None)
        self._files: dict[str, object] = {}
        self._stage = torch.empty(0, dtype=torch.uint8)

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def _staging(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        n = math.prod(shape) * dtype.itemsize
        if self._stage.numel() < n:
            self._stage = torch.empty(n, dtype=torch.uint8)
        return self._stage[:n].view(dtype).view(shape)

    def _read_rows(self, info: TensorInfo, r0: int, cols: tuple[int, int], out: torch.Tensor) -> None:
        """out [n, c1 - c0] (CPU, contiguous, info.dtype) <- info[r0:r0 + n, c0:c1] (1-D tensors: one row)."""
        if out.numel() == 0:
            return
        ncols = info.shape[-1] if info.shape else 1
        item = info.dtype.itemsize
        c0, c1 = cols
        fpath = os.path.join(self.layout.path, info.file)
        f = self._files.get(info.file)
        if f is None:
            f = self._files[info.file] = open(fpath, "rb", buffering=0)
        flat = memoryview(out.view(-1).view(torch.uint8).numpy())
        if c0 == 0 and c1 == ncols:  # whole rows: one contiguous range
            spans = [(info.offset + r0 * ncols * item, flat)]
        else:
            row = (c1 - c0) * item
            spans = [(info.offset + ((r0 + k) * ncols + c0) * item, flat[k * row:(k + 1) * row])
                     for k in range(out.shape[0])]
        for offset, view in spans:
            if _read_at(f, offset, view) != len(view):
                raise CheckpointError(f"{fpath}: the file ended while reading tensor {info.name!r}; it was "
                                      f"truncated or replaced during the read (download it again)")
            self.on_bytes(len(view))

    def fill(self, dest: torch.Tensor, name: str, rows: tuple[int, int], cols: tuple[int, int],
             scale: torch.Tensor | None = None) -> None:
        """dest [R, C] <- tensor[rows, cols] converted to dest's dtype (1-D tensors: rows (0, 1)). An FP8 source
        with `scale` (the float32 scales of the blocks the window touches, from read_scale) is dequantised exactly.
        Bytes go straight into dest when nothing changes, otherwise through the staging buffer in chunks of whole
        128-row blocks."""
        info = self.layout.tensors[name]
        r0, r1 = rows
        width = cols[1] - cols[0]
        direct = scale is None and dest.dtype == info.dtype and dest.device.type == "cpu"
        b = fp8.BLOCK
        per = max(1, _CHUNK_BYTES // max(1, width * info.dtype.itemsize))
        aligned = scale is not None and per >= b
        if aligned:
            per -= per % b
        r = r0
        while r < r1:
            n = min(r1 - r, per - (r % b if aligned else 0))
            out = dest[r - r0:r - r0 + n]
            buf = out if direct else self._staging((n, width), info.dtype)
            self._read_rows(info, r, cols, buf)
            if not direct:
                buf = buf.to(dest.device)
                if scale is None:
                    out.copy_(buf)
                else:
                    s = scale[r // b - r0 // b: -(-(r + n) // b) - r0 // b]
                    fp8.dequantize(buf, s, offset=(r % b, cols[0] % b), out=out)
            r += n

    def read_scale(self, name: str, rows: tuple[int, int], cols: tuple[int, int],
                   device: str | torch.device = "cpu") -> torch.Tensor:
        """The float32 scales of the blocks that the window [rows, cols] of FP8 weight `name` touches."""
        info = self.layout.tensors[name + SCALE_SUFFIX]
        b = fp8.BLOCK
        srows, scols = (rows[0] // b, -(-rows[1] // b)), (cols[0] // b, -(-cols[1] // b))
        s = torch.empty(srows[1] - srows[0], scols[1] - scols[0], dtype=torch.float32, device=device)
        self.fill(s, info.name, srows, scols)
        if not torch.isfinite(s).all():
            raise CheckpointError(f"{os.path.join(self.layout.path, info.file)}: tensor {info.name!r} holds "
                                  f"non-finite scales (NaN or inf): the file is corrupted; download it again")
        return s
