"""Tensor and expert parallelism on the CPU with gloo, on the tiny FP8 checkpoint.

Starting a Python process that imports torch is the expensive part on a small shared machine, so four worker
processes are started once and run every multi-rank scenario in phases, each phase its own process group on its own
port: TP+EP 2x2 (FP8 kept), then TP 2 and EP 2 side by side, then a killed follower and a killed driver side by side,
then a frozen follower (the collective timeout) and a rendezvous nobody joins. Each scenario is asserted in its own
test. torchrun itself is exercised by the two-"node" generate run and the 2-rank server.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from dsv3.config import ModelConfig
from dsv3.engine.llm import LLM
from dsv3.engine.sampling import SamplingParams
from dsv3.parallel import (ParallelError, ParallelState, balanced_placement, contiguous_placement, rank_loads,
                           record_expert_loads, resolve_placement, resolve_sizes, shard_model)

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [[5, 17, 33, 2, 90, 41, 7], [12, 250, 3, 3, 8, 101, 64, 200, 9, 14, 77, 5, 6, 19, 301, 28, 40, 11, 2],
           [230, 6, 77, 1, 45]]
SAMPLED_SEED = 7
LOGIT_IDS = torch.tensor([[3, 141, 59, 26, 53, 58, 97, 93, 238, 46, 264, 33, 83, 279, 50, 28, 88, 41, 97, 169]])
TIMEOUT_S = 60.0
RDZV_TIMEOUT_S = 3.0
HANG_TIMEOUT_S = 6.0
# Experts of the tiny model (16) on two EP ranks, deliberately not two contiguous ranges.
PLACEMENT = {"placement": [[0, 3, 5, 6, 9, 10, 12, 15], [1, 2, 4, 7, 8, 11, 13, 14]]}
GGUF_PLACEMENT = {"placement": [[0, 3, 5, 6], [1, 2, 4, 7]]}  # the tiny GGUF model's 8 experts


def _params() -> list[SamplingParams]:
    greedy = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    # A seeded sampled request in the same batch: rank 0's draws must reach the others (lockstep, no divergence).
    sampled = SamplingParams(temperature=0.9, top_p=0.9, seed=SAMPLED_SEED, max_tokens=8, ignore_eos=True)
    return [greedy, greedy, sampled]


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


# ------------------------------------------------------------------------------------------------------------------
# The worker pool
def _join(port: int, rank: int, world: int, tp: int | None, ep: int | None, timeout_s: float) -> ParallelState:
    from dsv3.parallel import init_parallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    return init_parallel(tp, ep, timeout_s=timeout_s)


def _scenario(out: Path, tag: str, ckpt: str, port: int, rank: int, world: int, tp: int, ep: int,
              fp8_mode: str = "dequantize", placement=None, fail_at_step: int | None = None, fail: str = "kill",
              timeout_s: float = TIMEOUT_S, quantize: str | None = None) -> None:
    """One multi-rank run: every rank's logits of LOGIT_IDS, then rank 0 generates PROMPTS through the engine.
    fail_at_step: this rank dies (fail='kill') or freezes (fail='stop') at the start of that engine step."""
    result: dict = {"rank": rank}
    ps = _join(port, rank, world, tp, ep, timeout_s)
    try:
        llm = LLM(ckpt, dtype="float32", fp8_mode=fp8_mode, parallel=ps, expert_placement=placement, num_blocks=64,
                  max_num_seqs=8, quantize=quantize)
        with torch.inference_mode():
            torch.save(llm.model(LOGIT_IDS), out / f"{tag}-logits-{rank}.pt")
        result["fp8_weights"] = sum(p.dtype == torch.float8_e4m3fn for p in llm.model.parameters())
        result["weight_bytes"] = sum(p.numel() * p.element_size() for p in llm.model.parameters())
        result["int_weights"] = sum(getattr(m, "quant", None) is not None for m in llm.model.modules())
        engine = llm.engine.engine
        if fail_at_step is not None:
            real_step, calls = engine.step, [0]

            def step():
                calls[0] += 1
                if calls[0] == fail_at_step:
                    (out / f"{tag}-failed-at").write_text(str(time.time()))
                    os.kill(os.getpid(), signal.SIGKILL if fail == "kill" else signal.SIGSTOP)
                return real_step()
            engine.step = step
        if ps.is_driver:
            outs = llm.generate(PROMPTS, _params())
            result["tokens"] = [o.token_ids for o in outs]
            llm.engine.close()
        else:
            llm.engine.run()
        result["stats"] = {k: engine.stats[k] for k in ("steps", "generated_tokens", "finished")}
    except ParallelError as e:
        result.update(error=str(e), error_time=time.time())
    except Exception:  # anything else: the traceback in the result, where the test shows it
        result.update(error=traceback.format_exc(), error_time=time.time())
    finally:
        (out / f"{tag}-{rank}.json").write_text(json.dumps(result))
        ps.shutdown()


def _pool_worker(proc: int, out: Path, ckpt: str, ports: list[int], gguf_file: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    # Phase 1: all four ranks, 2 x 2, FP8 kept in memory (block-aligned slices stay FP8, the others are cut).
    _scenario(out, "tp2ep2", ckpt, ports[0], proc, 4, 2, 2, fp8_mode="keep")
    # Phase 2: two independent 2-rank jobs side by side.
    if proc < 2:
        _scenario(out, "tp2", ckpt, ports[1], proc, 2, 2, 1)
    else:
        _scenario(out, "ep2", ckpt, ports[2], proc - 2, 2, 1, 2, placement=PLACEMENT)
    # Phase 2b: int4 weights under TP 2 and int8 under EP 2, quantised by each rank from its own slices.
    if proc < 2:
        _scenario(out, "tp2-int4", ckpt, ports[7], proc, 2, 2, 1, quantize="int4")
    else:
        _scenario(out, "ep2-int8", ckpt, ports[8], proc - 2, 2, 1, 2, quantize="int8")
    # Phase 2c: a GGUF file (quantised blocks of several types) under TP 2 and under EP 2 with scattered experts.
    if proc < 2:
        _scenario(out, "tp2-gguf", gguf_file, ports[9], proc, 2, 2, 1)
    else:
        _scenario(out, "ep2-gguf", gguf_file, ports[10], proc - 2, 2, 1, 2, placement=GGUF_PLACEMENT)
    # Phase 3: a follower killed mid-run (procs 0, 1) and a driver killed mid-run (procs 2, 3).
    if proc < 2:
        _scenario(out, "kill-follower", ckpt, ports[3], proc, 2, 2, 1, fail_at_step=3 if proc == 1 else None)
    else:
        _scenario(out, "kill-driver", ckpt, ports[4], proc - 2, 2, 2, 1, fail_at_step=3 if proc == 2 else None)
    # Phase 4: a frozen follower (proc 3 as rank 1 of proc 0): only the collective timeout can catch it.
    if proc in (0, 3):
        _scenario(out, "frozen", ckpt, ports[5], 0 if proc == 0 else 1, 2, 2, 1, timeout_s=HANG_TIMEOUT_S,
                  fail_at_step=2 if proc == 3 else None, fail="stop")
    # Phase 5: a rendezvous for two that nobody else joins.
    if proc == 0:
        t0 = time.time()
        try:
            _join(ports[6], 0, 2, 2, 1, RDZV_TIMEOUT_S)
            res = {"error": None}
        except ParallelError as e:
            res = {"error": str(e)}
        res["seconds"] = time.time() - t0
        (out / "rendezvous.json").write_text(json.dumps(res))


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    from test_gguf_files import gguf_tiny_cfg, write_gguf
    from test_gguf_model import TP_TYPES

    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_gguf(path, gguf_tiny_cfg(), TP_TYPES)
    return path


@pytest.fixture(scope="module")
def pool(tiny_ckpt, gguf_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("parallel")
    ctx = mp.get_context("spawn")
    ports = _free_ports(11)
    procs = [ctx.Process(target=_pool_worker, args=(i, out, str(tiny_ckpt), ports, str(gguf_file)))
             for i in range(4)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + 300
    for i, p in enumerate(procs):
        if i == 3:  # frozen on purpose in phase 4: release it once proc 0 is through
            procs[0].join(max(1, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
        p.join(max(1, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    codes = [p.exitcode for p in procs]

    def load(name: str) -> dict:
        path = out / f"{name}.json"
        assert path.exists(), f"{name} left no result; worker exit codes {codes}"
        return json.loads(path.read_text())

    return {"out": out, "codes": codes, "load": load}


@pytest.fixture(scope="module")
def reference(tiny_ckpt):
    llm = LLM(tiny_ckpt, dtype="float32", num_blocks=64, max_num_seqs=8)
    with torch.inference_mode():
        logits = llm.model(LOGIT_IDS)
    outs = llm.generate(PROMPTS, _params())
    return {"logits": logits, "tokens": [o.token_ids for o in outs]}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def reference_quantized(tiny_ckpt):
    out = {}
    for q in ("int4", "int8"):
        llm = LLM(tiny_ckpt, dtype="float32", num_blocks=64, max_num_seqs=8, quantize=q)
        with torch.inference_mode():
            logits = llm.model(LOGIT_IDS)
        outs = llm.generate(PROMPTS, _params())
        out[q] = {"logits": logits, "tokens": [o.token_ids for o in outs],
                  "int_weights": sum(getattr(m, "quant", None) is not None for m in llm.model.modules())}
    return out


def _check_run(pool, reference, tag: str, world: int) -> list[dict]:
    results = [pool["load"](f"{tag}-{r}") for r in range(world)]
    for r, res in enumerate(results):
        assert "error" not in res, res
        logits = torch.load(pool["out"] / f"{tag}-logits-{r}.pt")
        assert logits.shape == reference["logits"].shape
        assert _rel(logits, reference["logits"]) <= 1e-5, (tag, r)
    greedy, sampled = results[0]["tokens"][:2], results[0]["tokens"][2]
    assert greedy == reference["tokens"][:2]
    assert len(sampled) == 8
    # Every follower replica appended exactly what rank 0 did.
    assert all(res["stats"] == results[0]["stats"] for res in results), [res["stats"] for res in results]
    return results


# ------------------------------------------------------------------------------------------------------------------
def test_tp2_matches_single_process(pool, reference, tiny_ckpt):
    results = _check_run(pool, reference, "tp2", 2)
    assert all(res["fp8_weights"] == 0 for res in results)  # dequantised while loading
    single = LLM(tiny_ckpt, dtype="float32", num_blocks=4)
    single_bytes = sum(p.numel() * p.element_size() for p in single.model.parameters())
    # Everything but norms, q_a/kv_a, the router and eh_proj is split in two.
    assert all(res["weight_bytes"] < 0.6 * single_bytes for res in results)


def test_ep2_with_a_configured_placement_matches_single_process(pool, reference):
    _check_run(pool, reference, "ep2", 2)


def test_tp2_ep2_fp8_kept_matches_single_process(pool, reference):
    results = _check_run(pool, reference, "tp2ep2", 4)
    # Block-aligned slices stay FP8 (with their scales sliced alike); the rest were cut exactly.
    assert all(res["fp8_weights"] > 0 for res in results)


@pytest.mark.parametrize("tag,q", [("tp2-int4", "int4"), ("ep2-int8", "int8")])
def test_quantized_tp2_and_ep2_match_the_single_process(pool, reference_quantized, reference, tag, q):
    # Groups of 32 never straddle these splits, so each rank's codes and scales are the single process's slices:
    # the same quantised model, computed in parts.
    results = _check_run(pool, reference_quantized[q], tag, 2)
    # Every weight quantised on every rank (none left in float32 for cutting a group).
    assert all(res["int_weights"] == reference_quantized[q]["int_weights"] for res in results)
    assert _rel(reference_quantized[q]["logits"], reference["logits"]) > 1e-3  # really quantised


@pytest.fixture(scope="module")
def reference_gguf(gguf_file):
    llm = LLM(str(gguf_file), dtype="float32", num_blocks=64, max_num_seqs=8)
    with torch.inference_mode():
        logits = llm.model(LOGIT_IDS)
    outs = llm.generate(PROMPTS, _params())
    return {"logits": logits, "tokens": [o.token_ids for o in outs],
            "int_weights": sum(getattr(m, "quant", None) is not None for m in llm.model.modules())}


@pytest.mark.parametrize("tag", ["tp2-gguf", "ep2-gguf"])
def test_gguf_under_tp2_and_ep2_matches_the_single_process(pool, reference_gguf, tag):
    # Each rank reads only its windows of the file's blocks; the quantised projections keep their codes.
    results = _check_run(pool, reference_gguf, tag, 2)
    assert reference_gguf["int_weights"] > 10
    assert all(res["int_weights"] == reference_gguf["int_weights"] for res in results)


def test_killed_follower_ends_the_driver_with_an_error(pool):
    assert pool["codes"][1] == -signal.SIGKILL
    res = pool["load"]("kill-follower-0")
    assert "tokens" not in res and "peer rank died" in res["error"], res
    died = float((pool["out"] / "kill-follower-failed-at").read_text())
    assert res["error_time"] - died < 30


def test_killed_driver_ends_the_follower_with_an_error(pool):
    assert pool["codes"][2] == -signal.SIGKILL
    res = pool["load"]("kill-driver-1")
    assert "peer rank died" in res["error"], res
    died = float((pool["out"] / "kill-driver-failed-at").read_text())
    assert res["error_time"] - died < 30


def test_frozen_follower_times_out(pool):
    res = pool["load"]("frozen-0")
    assert "error" in res and f"within {HANG_TIMEOUT_S:g} s" in res["error"], res
    froze = float((pool["out"] / "frozen-failed-at").read_text())
    assert res["error_time"] - froze < HANG_TIMEOUT_S + 15


def test_rendezvous_timeout_is_a_clear_error(pool):
    res = pool["load"]("rendezvous")
    assert res["error"] and "rendezvous" in res["error"] and "did not complete" in res["error"], res
    assert res["seconds"] < RDZV_TIMEOUT_S + 20
    assert pool["codes"][0] == 0 and pool["codes"][3] == -signal.SIGKILL  # 3 was frozen, then killed by us


# ------------------------------------------------------------------------------------------------------------------
# torchrun
def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")


def test_two_node_torchrun_generate_matches_single_process(tiny_ckpt, tmp_path):
    prompt = "def fibonacci(n):"
    ref = LLM(tiny_ckpt, dtype="float32").generate(prompt, SamplingParams(temperature=0, max_tokens=8,
                                                                          ignore_eos=True))[0]
    (port,) = _free_ports(1)
    procs, logs = [], []
    for node in (0, 1):
        log = open(tmp_path / f"node{node}.err", "wb")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node),
               "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
               "--rdzv-id", "dsv3-test", "-m", "dsv3", "generate", "--model", str(tiny_ckpt), "--tp", "2", "--json", "--greedy",
               "--dtype", "float32",
               "--max-tokens", "8", "--ignore-eos", "--dist-timeout", "60", prompt]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, cwd=ROOT, env=_env()))
        logs.append(log)
    outs = []
    for p, log in zip(procs, logs):
        try:
            outs.append(p.communicate(timeout=240)[0].decode())
        finally:
            if p.poll() is None:
                p.kill()
            log.close()
    errs = [(tmp_path / f"node{n}.err").read_text(errors="replace")[-3000:] for n in (0, 1)]
    assert [p.returncode for p in procs] == [0, 0], errs
    printed = [o for o in outs if o.strip()]
    assert len(printed) == 1, outs  # only global rank 0 prints
    got = json.loads(printed[0])
    assert got["token_ids"] == ref.token_ids and got["text"] == ref.text


def test_serve_under_torchrun_answers_the_openai_client(tiny_ckpt, tmp_path):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    openai = pytest.importorskip("openai")
    httpx = pytest.importorskip("httpx")
    messages = [{"role": "user", "content": "Name a prime."}]
    ref = LLM(tiny_ckpt, dtype="float32").chat(messages, SamplingParams(temperature=0, max_tokens=8,
                                                                         ignore_eos=True))[0]
    port, master = _free_ports(2)
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", str(master), "-m", "dsv3", "serve", "--model", str(tiny_ckpt), "--tp", "2",
               "--port", str(port), "--served-model-name", "tiny", "--dist-timeout", "60", "--dtype", "float32"]
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=_env(),
                                start_new_session=True)
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 180
            while True:
                assert proc.poll() is None, log_path.read_text(errors="replace")
                assert time.monotonic() < deadline, log_path.read_text(errors="replace")
                try:
                    if httpx.get(url + "/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.3)
            client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
            out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0,
                                                 extra_body={"ignore_eos": True})
            assert out.choices[0].message.content == ref.text
            assert out.usage.completion_tokens == 8
            chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=8,
                                                         temperature=0, stream=True,
                                                         extra_body={"ignore_eos": True}))
            assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ref.text
            client.close()
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)  # torchrun forwards it to both ranks
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
    text = log_path.read_text(errors="replace")
    # torchrun prints its own traceback when it is sent SIGTERM; the ranks themselves must stop quietly.
    assert f"{ROOT / 'dsv3'}" not in text and "dsv3: " not in text, text[-3000:]
    assert "engine stopped" in text


# ------------------------------------------------------------------------------------------------------------------
# In-process: sizes, placements, sharded shapes
def test_sizes_and_launch_errors():
    assert resolve_sizes(4, None, None) == (4, 1)
    assert resolve_sizes(4, None, 2) == (2, 2)
    assert resolve_sizes(4, 2, None) == (2, 2)
    with pytest.raises(ValueError, match="torchrun --nproc-per-node 2"):
        resolve_sizes(1, 2, None)
    with pytest.raises(ValueError, match="must equal the number of processes"):
        resolve_sizes(4, 3, None)


def test_cli_without_torchrun_says_how_to_launch(tiny_ckpt, capsys, monkeypatch):
    from dsv3.cli import main

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(["generate", "--model", str(tiny_ckpt), "--tp", "2", "hello"]) == 1
    captured = capsys.readouterr()
    assert "torchrun --nproc-per-node 2" in captured.err and captured.out == ""


def test_balanced_placement_lowers_the_busiest_rank():
    loads = [900, 850, 800, 700, 40, 30, 20, 10, 300, 250, 200, 150, 100, 90, 80, 60]
    before = rank_loads(loads, contiguous_placement(16, 4))
    placement = balanced_placement(loads, 4)
    after = rank_loads(loads, placement)
    assert sorted(e for p in placement for e in p) == list(range(16))
    assert all(len(p) == 4 for p in placement)  # same memory per rank as the even split
    assert max(after) < max(before) and sum(after) == sum(before)
    assert max(after) / (sum(loads) / 4) < 1.15


def test_resolve_placement_forms_and_errors(tiny_ckpt, tmp_path):
    cfg = ModelConfig.from_pretrained(tiny_ckpt)  # MoE layers 1, 2 and the MTP layer 3
    p = resolve_placement(PLACEMENT, cfg, 2)
    assert set(p) == {1, 2, 3} and p[1] == PLACEMENT["placement"]
    path = tmp_path / "loads.json"
    path.write_text(json.dumps({"loads": {"1": list(range(16)), "2": [5] * 16}}))
    p = resolve_placement(str(path), cfg, 4)
    assert set(p) == {1, 2} and max(rank_loads(list(range(16)), p[1])) == 30  # 120 tokens / 4 ranks, exactly
    with pytest.raises(ValueError, match="exactly once"):
        resolve_placement({"placement": [[0, 1], [2, 3]]}, cfg, 2)
    with pytest.raises(ValueError, match="not a MoE layer"):
        resolve_placement({"loads": {"0": [1] * 16}}, cfg, 2)
    with pytest.raises(ValueError, match="16 non-negative numbers"):
        resolve_placement({"loads": {"1": [1] * 3}}, cfg, 2)


def test_record_expert_loads_counts_every_routed_pair(tiny_ckpt):
    import dsv3

    model = dsv3.load_model(tiny_ckpt, dtype=torch.float32, with_mtp=False)
    loads = record_expert_loads(model, [LOGIT_IDS, LOGIT_IDS[0, :7]])
    cfg = model.cfg
    assert set(loads) == {1, 2}
    assert all(sum(c) == (20 + 7) * cfg.num_experts_per_tok for c in loads.values())


def test_shard_shapes_and_windows(tiny_ckpt):
    from dsv3.model.transformer import build_model

    cfg = ModelConfig.from_pretrained(tiny_ckpt)
    model = build_model(cfg, "meta", with_mtp=False)
    ps = ParallelState(rank=3, world_size=4, tp_size=2, tp_rank=1, ep_size=2, ep_rank=1)
    windows = shard_model(model, ps)
    attn, moe = model.model.layers[1].self_attn, model.model.layers[1].mlp
    assert attn.n_heads == 2 and attn.q_b_proj.weight.shape == (2 * 48, 96)
    assert windows["model.layers.1.self_attn.q_b_proj.weight"] == (slice(96, 192),)
    assert windows["model.layers.1.self_attn.o_proj.weight"] == (slice(None), slice(64, 128))
    assert moe.experts.owned == list(range(8, 16)) and moe.experts.gate_proj.weight.shape == (8, 32, 160)
    assert windows["model.layers.1.mlp.experts.down_proj.weight"] == (slice(8, 16), slice(None), slice(32, 64))
    assert moe.shared_experts.gate_proj.weight.shape == (16, 160)  # 64 wide over all 4 ranks
    assert model.model.embed_tokens.weight.shape == (160, 160) and model.lm_head.weight.shape == (160, 160)
    with pytest.raises(ValueError, match="cannot be split"):
        shard_model(build_model(cfg, "meta", with_mtp=False),
                    ParallelState(rank=0, world_size=8, tp_size=8, tp_rank=0))
