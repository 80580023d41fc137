"""Data parallelism on the CPU: 2 gloo ranks train the same global batch as 1 process (same loss curve) and apply
the same all-reduced bias update (biases identical across ranks)."""
import json
import os
import shutil
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from dsv3.train import TrainConfig, train
from dsv3.train.data import stdlib_root

_FILES = ["json/decoder.py", "json/encoder.py", "glob.py", "fnmatch.py", "shlex.py", "textwrap.py"]


def _config(corpus, out, cache, grad_accum):
    return dict(model="train-tiny", data=[corpus], out=out, cache_dir=cache, steps=4, batch_size=4,
                grad_accum=grad_accum, seq_len=32, warmup=1, eval_every=0, save_every=0, threads=1,
                progress=False, plot=False, gamma=0.01)


def _worker(rank, world, port, cfg, result_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        res = train(TrainConfig(**cfg))
        biases = {k: v.contiguous() for k, v in res["model"].state_dict().items()
                  if k.endswith("e_score_correction_bias")}
        save_file(biases, os.path.join(result_dir, f"bias-{rank}.safetensors"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _steps(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if "loss" in r]


def _replayed_bias(steps, layer):
    """The aux-free bias of MoE layer `layer` rebuilt from the logged per-step loads: b += gamma * sign(mean - load)."""
    bias = torch.zeros(len(steps[0]["loads"][layer]))
    for r in steps:
        counts = torch.tensor(r["loads"][layer], dtype=torch.float32)
        if r["gamma"]:
            bias.add_(torch.sign(counts.mean() - counts), alpha=r["gamma"])
    return bias


def test_two_gloo_ranks_match_one_process(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for f in _FILES:
        shutil.copy(os.path.join(stdlib_root(), f), corpus / f.replace("/", "_"))
    cache = str(tmp_path / "cache")
    # One process: the global batch of 4 windows as 2 micro-batches of 2.
    single = train(TrainConfig(**_config(str(corpus), str(tmp_path / "single"), cache, grad_accum=2)))
    # Two ranks: each takes one micro-batch of 2 of the same global batch.
    mp.spawn(_worker, args=(2, _free_port(), _config(str(corpus), str(tmp_path / "dp"), cache, 1), str(tmp_path)),
             nprocs=2, join=True)
    b0, b1 = (load_file(str(tmp_path / f"bias-{r}.safetensors")) for r in (0, 1))
    assert b0.keys() == b1.keys() and len(b0) == 2
    s, d = _steps(tmp_path / "single"), _steps(tmp_path / "dp")
    single_state = single["model"].state_dict()
    for i, k in enumerate(sorted(b0, key=lambda n: int(n.split(".")[2]))):
        assert torch.equal(b0[k], b1[k]), k
        # each rank applied the update of the all-reduced (global) counts, step after step
        assert torch.equal(b0[k], _replayed_bias(d, i)), k
        assert torch.equal(single_state[k], _replayed_bias(s, i)), k
        assert torch.allclose(b0[k], single_state[k], atol=0.021)  # at most a routing flip or so apart
    assert any(b.abs().sum() > 0 for b in b0.values())  # the biases did move (one layer's +-1 steps may cancel)
    assert len(s) == len(d) == 4
    for a, b in zip(s, d):
        assert a["ce"] == pytest.approx(b["ce"], rel=1e-4)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
        assert a["loads"] == b["loads"] or a["step"] > 1  # step 1 routes identical weights: counts agree exactly
