"""Tensor/expert parallel inference on one machine: per-rank memory and time spent in collectives per step.

A small DeepSeek-V3-architecture model in the official FP8 format (written once with dsv3.tiny's writer, bigger
than the test model) is run with world sizes 1, 2 and 4 (TP only, EP only, TP x EP), each rank a process on gloo.
Every run prefills the same prompts, then decodes greedily; per decode step it reports the wall time, the time
inside collectives (the model's all-reduces and all-gathers, and the engine's control broadcasts), how many
collectives ran and the bytes they moved, all on rank 0 (the driver) and the slowest rank. Memory per rank is the
weights held (parameters + FP8 scales) and the latent cache (replicated on every rank).

It also records expert loads on the single-process model over the prompts and shows, per MoE layer, the busiest EP
rank's load over the mean with the contiguous split and with the balanced placement (dsv3.parallel).

    python benchmarks/parallel.py                         # prints a Markdown table
    python benchmarks/parallel.py --json runs/parallel.json --decode-steps 32
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

# hidden 512, 8 heads, 32 experts (top 4 of 4 groups), 4 layers (1 dense) + MTP: ~37 M parameters.
MODEL = dict(vocab_size=1024, hidden_size=512, intermediate_size=1536, moe_intermediate_size=256, num_hidden_layers=4,
             first_k_dense_replace=1, num_attention_heads=8, num_key_value_heads=8, n_routed_experts=32,
             n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2, q_lora_rank=256, kv_lora_rank=128,
             qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64)
CONFIGS = [(1, 1), (2, 1), (1, 2), (4, 1), (2, 2)]  # (tp, ep)
NUM_BLOCKS = 256
BLOCK = 16


def _prompts(n: int, length: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(2, vocab, (length,), generator=g).tolist() for _ in range(n)]


def _rank(rank: int, world: int, port: int, tp: int, ep: int, ckpt: str, args, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS=str(args.threads))
    torch.set_num_threads(args.threads)
    from dsv3.engine.llm import LLM
    from dsv3.engine.sampling import SamplingParams
    from dsv3.parallel import init_parallel

    ps = init_parallel(tp, ep, timeout_s=300)
    llm = LLM(ckpt, dtype=args.dtype, parallel=ps, num_blocks=NUM_BLOCKS, block_size=BLOCK, speculative="off",
              max_num_seqs=args.batch, max_num_batched_tokens=args.batch * args.prompt_len, progress=False)
    engine = llm.engine.engine if ps.world_size > 1 else llm.engine
    weights = sum(t.numel() * t.element_size() for t in list(llm.model.parameters()) + list(llm.model.buffers()))
    steps = []
    if ps.is_driver:
        params = SamplingParams(temperature=0, max_tokens=args.decode_steps + args.warmup + 1, ignore_eos=True)
        for p in _prompts(args.batch, args.prompt_len, llm.model.cfg.vocab_size):
            llm.engine.add_request(p, params)
        t0 = time.perf_counter()
        llm.engine.step()  # the whole prefill fits one step
        prefill_s = time.perf_counter() - t0
        for i in range(args.warmup + args.decode_steps):
            ps.comm.reset()
            t0 = time.perf_counter()
            llm.engine.step()
            if i >= args.warmup:
                steps.append(_step_record(ps, time.perf_counter() - t0))
        while llm.engine.has_unfinished():
            llm.engine.step()
        if ps.world_size > 1:
            llm.engine.close()
    else:
        # Followers time their steps too: wrap the engine's step.
        real, count = engine.step, [0]

        def step():
            ps.comm.reset()
            t0 = time.perf_counter()
            outs = real()
            count[0] += 1
            if args.warmup + 1 < count[0] <= args.warmup + 1 + args.decode_steps:
                steps.append(_step_record(ps, time.perf_counter() - t0))
            return outs
        engine.step = step
        llm.engine.run()
        prefill_s = None
    with open(os.path.join(out, f"{tp}x{ep}-{rank}.json"), "w") as f:
        json.dump({"rank": rank, "weights": weights, "cache": engine.cache.total_bytes, "steps": steps,
                   "prefill_s": prefill_s}, f)
    ps.shutdown()


def _step_record(ps, wall: float) -> dict:
    c = ps.comm
    return {"wall": wall, "comm": c.total_seconds, "calls": sum(c.calls.values()), "bytes": sum(c.nbytes.values()),
            "by_kind": {k: [c.calls[k], c.seconds[k], c.nbytes[k]] for k in c.calls}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _summary(tp: int, ep: int, out: str) -> dict:
    world = tp * ep
    ranks = [json.load(open(os.path.join(out, f"{tp}x{ep}-{r}.json"))) for r in range(world)]

    def mean(rank: dict, key: str) -> float:
        return sum(s[key] for s in rank["steps"]) / max(1, len(rank["steps"]))

    r0 = ranks[0]
    return {"tp": tp, "ep": ep, "world": world, "weights_mib": [r["weights"] / 2**20 for r in ranks],
            "cache_mib": r0["cache"] / 2**20, "step_ms": mean(r0, "wall") * 1e3, "comm_ms": mean(r0, "comm") * 1e3,
            "comm_ms_max_rank": max(mean(r, "comm") for r in ranks) * 1e3, "calls": mean(r0, "calls"),
            "kib": mean(r0, "bytes") / 2**10, "prefill_ms": r0["prefill_s"] * 1e3,
            "by_kind": {k: [v[0], v[1] * 1e3 / len(r0["steps"])] for k, v in _sum_kinds(r0["steps"]).items()}}


def _sum_kinds(steps: list[dict]) -> dict:
    total: dict = {}
    for s in steps:
        for k, (n, sec, b) in s["by_kind"].items():
            t = total.setdefault(k, [0, 0.0])
            t[0] += n / len(steps)
            t[1] += sec
    return total


def _placement_rows(ckpt: str, args) -> list[dict]:
    import dsv3
    from dsv3.parallel import balanced_placement, placement_report, record_expert_loads

    model = dsv3.load_model(ckpt, dtype=torch.float32, with_mtp=False)
    prompts = _prompts(args.calib_prompts, args.prompt_len, model.cfg.vocab_size)
    loads = record_expert_loads(model, [torch.tensor(p) for p in prompts])
    rows = []
    for ep in (2, 4):
        placements = {i: balanced_placement(l, ep) for i, l in loads.items()}
        for row in placement_report(loads, placements, ep):
            rows.append(dict(row, ep=ep))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8, help="sequences decoded together")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--decode-steps", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    ap.add_argument("--calib-prompts", type=int, default=64, help="prompts of the expert-load calibration")
    ap.add_argument("--configs", default=",".join(f"{t}x{e}" for t, e in CONFIGS), help="TPxEP,... to run")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    from dsv3.tiny import write_tiny_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = os.path.join(tmp, "ckpt")
        write_tiny_checkpoint(ckpt, **MODEL)
        results = []
        for cfg in args.configs.split(","):
            tp, ep = map(int, cfg.split("x"))
            mp.spawn(_rank, args=(tp * ep, _free_port(), tp, ep, ckpt, args, tmp), nprocs=tp * ep, join=True)
            results.append(_summary(tp, ep, tmp))
            print(f"done {cfg}", file=sys.stderr, flush=True)
        placement = _placement_rows(ckpt, args)
    print(f"model: {MODEL['num_hidden_layers']} layers, hidden {MODEL['hidden_size']}, {MODEL['num_attention_heads']} "
          f"heads, {MODEL['n_routed_experts']} experts top-{MODEL['num_experts_per_tok']}, FP8 checkpoint loaded in "
          f"{args.dtype}; batch {args.batch} x prompt {args.prompt_len}, {args.decode_steps} decode steps, "
          f"{args.threads} thread(s) per rank\n")
    print("| tp x ep | world | weights / rank (MiB) | latent cache / rank (MiB) | decode step (ms) | in collectives, "
          "rank 0 (ms) | in collectives, max rank (ms) | collectives / step | KiB moved / step (rank 0) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        w = r["weights_mib"]
        weights = f"{w[0]:.1f}" if max(w) - min(w) < 0.05 else f"{min(w):.1f}-{max(w):.1f}"
        print(f"| {r['tp']} x {r['ep']} | {r['world']} | {weights} | {r['cache_mib']:.1f} | {r['step_ms']:.1f} | "
              f"{r['comm_ms']:.1f} ({100 * r['comm_ms'] / r['step_ms']:.0f}%) | {r['comm_ms_max_rank']:.1f} | "
              f"{r['calls']:.0f} | {r['kib']:.0f} |")
    print("\nper kind, rank 0 (calls / step, ms / step):")
    for r in results:
        kinds = ", ".join(f"{k} {n:.0f} / {ms:.2f}" for k, (n, ms) in sorted(r["by_kind"].items()))
        print(f"- {r['tp']} x {r['ep']}: {kinds or 'none'}")
    print("\n| ep | MoE layer | tokens per EP rank, contiguous | busiest / mean | balanced placement | busiest / mean |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row in placement:
        print(f"| {row['ep']} | {row['layer']} | {[int(x) for x in row['before']]} | "
              f"{row['max_over_mean_before']:.3f} | {[int(x) for x in row['after']]} | "
              f"{row['max_over_mean_after']:.3f} |")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"results": results, "placement": placement, "args": vars(args)}, f, indent=1)


if __name__ == "__main__":
    main()
