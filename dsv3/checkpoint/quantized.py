"""dsv3's int8/int4 checkpoints (written by `dsv3 quantize`): which tensors are stored as integer codes, their
float16 `weight_scale` companions, the config.json quantization_config that declares them, the checks of both, and
which weights a load quantises on the fly. The arithmetic is dsv3/kernels/quant.py's.

config.json: {"quant_method": "dsv3_int", "bits": 4, "group_size": 32, "sym": true, "scale_dtype": "float16",
"lm_head_bits": 8, "format": ...}: the projections the official FP8 checkpoints store in FP8 (attention, dense and
shared MLPs, routed experts) are quantised to `bits`; the output head to `lm_head_bits` (null: kept as it is);
embeddings, norms, the router, its bias and the MTP module's eh_proj stay as they are.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from ..config import INT_QUANT_METHOD, ModelConfig
from ..kernels import quant
from .fp8 import official_fp8
from .layout import ST_NAMES, CheckpointLayout, problem_lines

SCALE_NAME = "weight_scale"
SCALE_SUFFIX = "_scale"  # checkpoint name of a quantised weight's scales: <name>_scale (x.weight -> x.weight_scale)
LM_HEAD = "lm_head.weight"
# The head of a model quantised to int4 is stored as int8, as llama.cpp's Q4 files keep theirs at 6 bits or more:
# it is read once per token, a small share of the bytes of a large model, and costs the most quality per bit.
HEAD_BITS = {8: 8, 4: 8}


@dataclass(frozen=True)
class Quantization:
    """What a model's weights are quantised to: the projections' scheme and the head's (None: not quantised)."""

    scheme: quant.Scheme
    head: quant.Scheme | None

    @classmethod
    def named(cls, name: str) -> "Quantization":
        """`--quantize int8|int4` (a ValueError that lists the choices otherwise)."""
        s = quant.scheme(name)
        return cls(s, quant.scheme(f"int{HEAD_BITS[s.bits]}"))

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> "Quantization | None":
        q = cfg.int_quantization
        if q is None:
            return None
        head = q.get("lm_head_bits")
        return cls(quant.Scheme(q["bits"], q["group_size"]), None if head is None else quant.Scheme(head, q["group_size"]))

    @property
    def name(self) -> str:
        return self.scheme.name

    def config(self) -> dict:
        s = self.scheme
        return {"quant_method": INT_QUANT_METHOD, "bits": s.bits, "group_size": s.group_size, "sym": True,
                "scale_dtype": "float16", "lm_head_bits": None if self.head is None else self.head.bits,
                "format": "groups of group_size weights along the input dimension, one float16 scale each (<weight>"
                          "_scale [..., out, in / group_size]); int8: w = q * scale (int8 codes); int4: two codes "
                          "per byte, column 2j in the low nibble of byte j, w = (q - 8) * scale"}

    def scheme_for(self, checkpoint_name: str) -> quant.Scheme | None:
        """The scheme checkpoint tensor `checkpoint_name` is (or is to be) quantised to, or None."""
        if checkpoint_name == LM_HEAD:
            return self.head
        return self.scheme if official_fp8(checkpoint_name) else None


def scale_problems(layout: CheckpointLayout, q: Quantization, names: Iterable[tuple[str, tuple[int, ...]]]
                   ) -> list[str]:
    """What is wrong with the codes and scales of quantised weights `names` ((checkpoint name, the weight's
    [O, I] shape) pairs), one line per kind of problem (empty: all fine)."""
    bad_codes, no_scale, bad_scale = [], [], []
    for name, shape in names:
        s = q.scheme_for(name)
        info, sinfo = layout.tensors[name], layout.tensors.get(name + SCALE_SUFFIX)
        if info.dtype != s.code_dtype or info.shape != s.code_shape(shape):
            bad_codes.append(f"{layout.where(name)} {list(info.shape)} {ST_NAMES[info.dtype]} ({s.name} codes of a "
                             f"{list(shape)} weight are {ST_NAMES[s.code_dtype]} {list(s.code_shape(shape))})")
        if sinfo is None:
            no_scale.append(layout.where(name))
        elif sinfo.shape != s.scale_shape(shape) or sinfo.dtype != quant.SCALE_DTYPE:
            bad_scale.append(f"{layout.where(sinfo.name)} {list(sinfo.shape)} {ST_NAMES[sinfo.dtype]} (expected F16 "
                             f"{list(s.scale_shape(shape))}: one per {s.group_size} weights of a row)")
    return problem_lines([("quantised weights of the wrong dtype or shape", bad_codes),
                          (f"quantised weights without their {SCALE_SUFFIX}", no_scale),
                          ("scales whose shape or dtype does not match their weight", bad_scale)])
