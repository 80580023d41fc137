"""Training checkpoints: the model in the ordinary Hugging Face format (what dsv3.load_model reads), and beside it
the training state without pickle: optimizer tensors and RNG states in training_state.safetensors, everything
scalar (step, data position, optimizer hyper-parameters, the run's config) in training_state.json.

Layout: OUT/checkpoints/step-000123/{config.json, model-*.safetensors, index, tokenizer files,
training_state.safetensors, training_state.json}. A checkpoint is written under a temporary name and renamed,
so the newest complete one is always usable.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import re
import shutil

import torch
from safetensors.torch import load_file, save_file

from ..model.transformer import Transformer
from ..checkpoint import load_model, save_model

log = logging.getLogger(__name__)

STATE_JSON = "training_state.json"
STATE_TENSORS = "training_state.safetensors"
_STEP_DIR = re.compile(r"^step-(\d{6,})$")


def checkpoint_dir(out: str, step: int) -> str:
    return os.path.join(out, "checkpoints", f"step-{step:06d}")


def list_checkpoints(out: str) -> list[tuple[int, str]]:
    root = os.path.join(out, "checkpoints")
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = _STEP_DIR.match(name)
        if m and os.path.exists(os.path.join(root, name, STATE_JSON)):
            found.append((int(m.group(1)), os.path.join(root, name)))
    return sorted(found)


def latest_checkpoint(out: str) -> str | None:
    found = list_checkpoints(out)
    return found[-1][1] if found else None


def _param_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    by_id = {id(p): n for n, p in model.named_parameters()}
    return [by_id[id(p)] for g in optimizer.param_groups for p in g["params"]]


def save_checkpoint(out: str, step: int, model: Transformer, optimizer: torch.optim.Optimizer, state: dict,
                    tokenizer_dir: str, keep: int) -> str:
    final = checkpoint_dir(out, step)
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(model, tmp)  # float32 master weights: resuming must continue from the exact values
    for f in os.listdir(tokenizer_dir):
        shutil.copy2(os.path.join(tokenizer_dir, f), tmp)
    names = _param_names(model, optimizer)
    osd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    for idx, st in osd["state"].items():
        for key, value in st.items():
            t = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"optim.{names[idx]}.{key}"] = t.detach().cpu().contiguous()
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    save_file(tensors, os.path.join(tmp, STATE_TENSORS))
    groups = [{k: v for k, v in g.items() if k != "params"} | {"param_names": [names[i] for i in g["params"]]}
              for g in osd["param_groups"]]
    with open(os.path.join(tmp, STATE_JSON), "w", encoding="utf-8") as f:
        json.dump(dict(state, step=step, optimizer_param_groups=groups), f, indent=2, default=str)
        f.write("\n")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old_step, path in list_checkpoints(out)[:-keep] if keep > 0 else []:
        shutil.rmtree(path, ignore_errors=True)
    return final


def _copy_weights(path: str, model: Transformer) -> list[str]:
    """Load the checkpoint at `path` through the ordinary loader (float32, FP8 dequantised exactly) into `model`;
    returns what does not fit, when anything does not (nothing is copied then)."""
    dev = next(model.parameters()).device
    theirs = load_model(path, dtype=torch.float32, device=dev, progress=False).state_dict()
    ours = model.state_dict()
    missing, unexpected = sorted(set(ours) - set(theirs)), sorted(set(theirs) - set(ours))
    shapes = [f"{k}: {tuple(theirs[k].shape)} vs {tuple(ours[k].shape)}" for k in ours
              if k in theirs and theirs[k].shape != ours[k].shape]
    if missing or unexpected or shapes:
        return [f"missing {missing[:4]}", f"unexpected {unexpected[:4]}", f"shapes (checkpoint vs model) {shapes[:4]}"]
    model.load_state_dict({k: v.to(ours[k].dtype) for k, v in theirs.items()})
    return []


def init_weights(path: str, model: Transformer) -> None:
    """Warm start: copy the weights and routing biases of a model checkpoint (bf16 or official FP8, dequantised
    exactly) into `model`; the optimizer, step and data position start fresh. Shapes must match."""
    problems = _copy_weights(path, model)
    if problems:
        raise ValueError(f"--init-from {path}: its weights do not fit the model being trained (give the same "
                         f"--config as the checkpoint's, or leave --config out): {', '.join(problems)}")


def load_checkpoint(path: str, model: Transformer, optimizer: torch.optim.Optimizer) -> dict:
    """Restore weights (through the ordinary loader), optimizer state and RNG; returns the JSON state."""
    with open(os.path.join(path, STATE_JSON), encoding="utf-8") as f:
        state = json.load(f)
    dev = next(model.parameters()).device
    problems = _copy_weights(path, model)
    if problems:
        raise RuntimeError(f"checkpoint {path} does not match the model being trained: {', '.join(problems)}")
    tensors = load_file(os.path.join(path, STATE_TENSORS))
    names = _param_names(model, optimizer)
    index = {n: i for i, n in enumerate(names)}
    opt_state: dict[int, dict] = {}
    for key, t in tensors.items():
        if not key.startswith("optim."):
            continue
        pname, _, field = key[len("optim."):].rpartition(".")
        if pname not in index:
            raise RuntimeError(f"{path}: optimizer state for {pname!r}, which the model does not have")
        opt_state.setdefault(index[pname], {})[field] = t if field == "step" else t.to(dev)
    groups = copy.deepcopy(state["optimizer_param_groups"])
    for g in groups:
        g["params"] = [index[n] for n in g.pop("param_names")]
    optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return state


def export_model(model: Transformer, path: str, tokenizer_dir: str, fp8: bool = False) -> dict:
    """A deployable copy: bf16 (or FP8 block-quantised projections with bf16 rest); the routing biases stay
    float32, as in the official checkpoints, because their steps (gamma) are below bf16's resolution near 1."""
    export = copy.deepcopy(model).to(torch.bfloat16)
    for (name, buf) in list(export.named_buffers()):
        if name.endswith("e_score_correction_bias"):
            src = model.get_buffer(name)
            mod = export.get_submodule(name.rpartition(".")[0])
            mod._buffers["e_score_correction_bias"] = src.detach().float().clone()
    tmp = path.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    info = save_model(export, tmp, fp8_weights=fp8)
    for f in os.listdir(tokenizer_dir):
        shutil.copy2(os.path.join(tokenizer_dir, f), tmp)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    return info
