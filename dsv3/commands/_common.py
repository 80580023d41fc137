"""Flags shared by the commands that load a model and generate (generate, chat, serve)."""
from __future__ import annotations

import argparse
import gc
import os


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", help="checkpoint directory or GGUF file (a .gguf, the first part of a split set, or a "
                                   "directory holding one; default: the embedded model)")
    g.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"],
                   help="compute dtype (default bfloat16; on the CPU its weights are packed for oneDNN)")
    g.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    g.add_argument("--fp8-mode", default="dequantize", choices=["dequantize", "keep"],
                   help="FP8 checkpoints: dequantise while loading, or keep FP8 in memory")
    g.add_argument("--quantize", choices=["int8", "int4"],
                   help="quantise the projections while loading (weight-only, groups of 32; see docs/quantization.md)"
                        "; a checkpoint written by `dsv3 quantize` needs no flag")
    g.add_argument("--max-model-len", type=int, help="context length limit (default: the model's)")
    g.add_argument("--cache-memory", type=_size, help="latent cache budget, e.g. 2GB (default: up to 1 GiB)")
    g.add_argument("--max-num-seqs", type=int, default=64, help="sequences decoded together")
    g.add_argument("--max-num-batched-tokens", type=int, default=512, help="tokens per step (prefill chunk size)")
    g.add_argument("--speculative", default="auto", choices=["auto", "mtp", "off"],
                   help="MTP speculative decoding (auto: on when the checkpoint has MTP layers)")
    g.add_argument("--num-draft-tokens", type=int, default=1,
                   help="drafts per step; beyond the checkpoint's MTP modules the last one runs recurrently")
    g.add_argument("--speculative-max-batch", type=int, default=-1, metavar="N",
                   help="drafting pauses while more than N sequences run (seeded sampled requests draft on); "
                        "-1: the device's default (CPU: 2; GPU: no limit), 0: no limit")
    g = p.add_argument_group("parallel (launch with torchrun --nproc-per-node N -m dsv3 ...)")
    g.add_argument("--tp", type=int, help="tensor-parallel ranks: attention heads, dense MLPs, vocabulary, expert "
                                         "widths (default: the world size / --ep)")
    g.add_argument("--ep", type=int, help="expert-parallel ranks: routed experts (default 1); --tp x --ep = world size")
    g.add_argument("--expert-placement", help="JSON file: a placement of routed experts on EP ranks, or recorded "
                                              "expert loads to balance (see dsv3.parallel.resolve_placement)")
    g.add_argument("--dist-timeout", type=float, help="seconds before a rendezvous or a silent rank fails the run "
                                                      "(default 600, or $DSV3_DIST_TIMEOUT)")


_CKPT = "default: the checkpoint's generation_config.json, else "


def add_sampling_args(p: argparse.ArgumentParser, max_tokens: int = 128) -> None:
    g = p.add_argument_group("sampling", "flags left out take the checkpoint's generation_config.json values "
                                         "(temperature, top_p, top_k, min_p, penalties), then dsv3's defaults")
    g.add_argument("--max-tokens", type=int, default=max_tokens)
    g.add_argument("--temperature", type=float, help=_CKPT + "0 (greedy)")
    g.add_argument("--top-p", type=float, help=_CKPT + "1.0 (off)")
    g.add_argument("--top-k", type=int, help=_CKPT + "0 (off)")
    g.add_argument("--min-p", type=float, help=_CKPT + "0 (off)")
    g.add_argument("--repetition-penalty", type=float, help=_CKPT + "1.0 (off)")
    g.add_argument("--presence-penalty", type=float, help=_CKPT + "0")
    g.add_argument("--frequency-penalty", type=float, help=_CKPT + "0")
    g.add_argument("--greedy", action="store_true", help="greedy decoding (the same as --temperature 0)")
    g.add_argument("--seed", type=int)
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true")


def _size(text: str) -> int:
    units = {"": 1, "B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    t = text.strip().upper()
    num = t.rstrip("KMGIB")
    unit = t[len(num):]
    try:
        return int(float(num) * units[unit])
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 512MB or 2GiB") from None


def spec_summary(out) -> str:
    """', 85% of 68 MTP drafts accepted, 1.84 tokens per step' for a finished output that used speculation, else
    ''."""
    rate = out.metrics.get("spec_acceptance") if out is not None else None
    if rate is None:
        return ""
    return (f", {rate:.0%} of {out.metrics['spec_drafted']} MTP drafts accepted, "
            f"{out.metrics['spec_tokens_per_step']:.2f} tokens per step")


def checkpoint_defaults(args) -> dict:
    """The sampling defaults of --model's generation_config.json (read before the weights load, so a bad file or
    flag fails in a second)."""
    from ..assets import resolve_model
    from ..engine.gen_defaults import read_generation_defaults

    return read_generation_defaults(resolve_model(args.model))


def sampling_params(args, defaults: dict | None = None):
    """The flags given, then `defaults` (the checkpoint's generation_config.json: checkpoint_defaults)."""
    from ..engine.gen_defaults import with_defaults

    if args.greedy and args.temperature not in (None, 0.0):
        raise SystemExit(f"--greedy and --temperature {args.temperature} disagree: pass one of them")
    defaults = {"temperature": 0.0, **(defaults or {})}  # a checkpoint that says nothing: greedy, as before
    return with_defaults(defaults, max_tokens=args.max_tokens,
                         temperature=0.0 if args.greedy else args.temperature, top_p=args.top_p, top_k=args.top_k,
                         min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                         presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                         seed=args.seed, stop=args.stop, ignore_eos=args.ignore_eos or None)


def make_llm(args, **extra):
    from ..engine.llm import LLM

    kw = dict(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
              speculative=args.speculative, num_draft_tokens=args.num_draft_tokens,
              speculative_max_batch=args.speculative_max_batch)
    if args.max_model_len:
        kw["max_model_len"] = args.max_model_len
    if args.cache_memory:
        kw["cache_memory_bytes"] = args.cache_memory
    kw.update(extra)
    if args.tp or args.ep or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from ..engine.distributed import make_parallel_llm

        return make_parallel_llm(args, kw)  # returns on rank 0 only
    llm = LLM(args.model, dtype=args.dtype, device=args.device, fp8_mode=args.fp8_mode, quantize=args.quantize, **kw)
    # This process exists for the model: move everything loaded so far out of the cyclic garbage collector's view,
    # so the collections a step's small allocations trigger stop walking the model again and again (a few percent
    # of a CPU decode step). A library user can do the same after building an LLM; dsv3 does not do it for them.
    gc.collect()
    gc.freeze()
    return llm
