"""The official FP8 checkpoint format: which projections are stored as float8_e4m3fn, their 128x128-block
`weight_scale_inv` companions, the config.json quantization_config that declares it, and the checks of those scales.
The arithmetic (block (de)quantisation) is dsv3/kernels/fp8.py's."""
from __future__ import annotations

import re
from typing import Iterable

from ..kernels import fp8
from .layout import FLOAT_DTYPES, ST_NAMES, CheckpointLayout, problem_lines

SCALE_SUFFIX = "_scale_inv"
SCALE_ATTR = "weight" + SCALE_SUFFIX
FP8_QUANTIZATION_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                           "weight_block_size": [fp8.BLOCK, fp8.BLOCK]}
FP8_MODES = ("dequantize", "keep")  # load_model's fp8_mode: dequantise exactly while loading, or keep FP8
# Projections the official checkpoints store in FP8. The output head, the MTP layer's eh_proj, embeddings, norms,
# the router weight and its bias stay bf16/fp32 there.
_OFFICIAL_FP8_RE = re.compile(r"\.(self_attn\.(q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)"
                              r"|mlp\.(shared_experts\.|experts\.\d+\.)?(gate_proj|up_proj|down_proj))\.weight$")


def official_fp8(name: str) -> bool:
    """Whether the official FP8 checkpoints store checkpoint tensor `name` as FP8 with a weight_scale_inv."""
    return bool(_OFFICIAL_FP8_RE.search(name))


def fp8_scale_problems(layout: CheckpointLayout, names: Iterable[str]) -> list[str]:
    """What is wrong with the scales of FP8 weights `names`, one line per kind of problem (empty: all fine)."""
    no_scale, bad_scale = [], []
    for name in names:
        info, sinfo = layout.tensors[name], layout.tensors.get(name + SCALE_SUFFIX)
        if sinfo is None:
            no_scale.append(layout.where(name))
        elif sinfo.shape != fp8.scale_shape(info.shape) or sinfo.dtype not in FLOAT_DTYPES:
            bad_scale.append(f"{layout.where(sinfo.name)} {list(sinfo.shape)} {ST_NAMES[sinfo.dtype]} (weight "
                             f"{list(info.shape)} needs float {list(fp8.scale_shape(info.shape))})")
    return problem_lines([(f"FP8 weights without their {SCALE_SUFFIX}", no_scale),
                          ("scales whose shape does not match their weight", bad_scale)])
