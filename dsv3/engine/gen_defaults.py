"""A checkpoint's sampling defaults: generation_config.json's temperature, top_p, top_k, min_p and penalties.

What a request leaves out comes from here, then from SamplingParams' own defaults, as vLLM does with a checkpoint's
generation_config.json (`--generation-config auto`). `do_sample: false` means greedy (Hugging Face's meaning), so
its temperature is 0 whatever the file says. Used by `LLM.generate/chat/stream` (params=None), `dsv3 generate` /
`dsv3 chat` (flags left out) and the server (fields a request leaves out or sends as null).
"""
from __future__ import annotations

import json
import os

from .sampling import SamplingParams

FILE = "generation_config.json"
# generation_config.json keys taken as defaults (Hugging Face's names, which SamplingParams shares).
SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                 "frequency_penalty")


def read_generation_defaults(path: str | os.PathLike | None) -> dict:
    """{field: value} for the sampling keys a checkpoint directory's generation_config.json sets; {} for a GGUF
    file, a directory without one, or None. A file that does not parse, or a value SamplingParams refuses, raises
    ValueError naming the file and the key."""
    if path is None or not os.path.isdir(path):
        return {}
    f = os.path.join(os.fspath(path), FILE)
    if not os.path.exists(f):
        return {}
    try:
        with open(f, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{f} is not valid JSON ({e}); fix it or delete it to sample with dsv3's defaults") from None
    if not isinstance(data, dict):
        raise ValueError(f"{f} must hold a JSON object, not {type(data).__name__}")
    out = {}
    for key in SAMPLING_KEYS:
        value = data.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{f}: {key} must be a number, got {value!r}")
        out[key] = int(value) if key == "top_k" else float(value)
    if data.get("do_sample") is False:
        out["temperature"] = 0.0
    try:
        SamplingParams(**out)
    except ValueError as e:
        raise ValueError(f"{f}: {str(e).removeprefix('SamplingParams.')}; fix the file or delete the key") from None
    return out


def with_defaults(defaults: dict, **given) -> SamplingParams:
    """SamplingParams from the fields given (None = not given), then `defaults`, then SamplingParams' own."""
    return SamplingParams(**{**defaults, **{k: v for k, v in given.items() if v is not None}})


def apply_defaults(params: SamplingParams | None, defaults: dict) -> SamplingParams:
    """params as given, or (None) the checkpoint's defaults over SamplingParams()."""
    return params if params is not None else with_defaults(defaults)
