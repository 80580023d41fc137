#!/usr/bin/env python3
"""How good is a small trained checkpoint (default: the embedded model)? The numbers issue 24 asks for.

1. Held-out loss (nats/token), bits per byte, top-1 and the MTP module's top-1, on
   - "stdlib held-out": the standard library's held-out split of docs/training.md (the hash split of train/data.py;
     the same files whatever else a run trained on), and its code-only part (encodings/ tables left out);
   - "held-out packages": the installed distributions of train/sources.HELDOUT_PACKAGES, never trained on.
   Every window of 256 tokens of each set (up to --max-windows, spread evenly), the checkpoint loaded as shipped
   (FP8 dequantised to float32).
2. Greedy MTP draft acceptance through dsv3.LLM (one draft token), on openings of held-out stdlib files.
3. Repetition: --samples seeded samples of 128 tokens from short function-header prompts with the checkpoint's
   sampling defaults (generation_config.json) and each --settings variant; a sample "repeats" when some token
   sequence occurs more than 3 times in a row (issue 24's criterion). Reports how many are free of that.

  python benchmarks/embedded_model.py [--model PATH] [--samples 20] [--max-windows 800] [--json OUT]
         [--settings "frequency_penalty=0.3" "repetition_penalty=1.1"]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch

PROMPTS = [
    "def fibonacci(n):", "def is_prime(n):", "def read_json(path):", "def flatten(items):", "def gcd(a, b):",
    "def reverse_words(text):", "def count_lines(filename):", "def merge_dicts(a, b):", "def factorial(n):",
    "def binary_search(items, target):", "def parse_args(argv=None):", "def chunks(seq, size):",
    "def median(values):", "def slugify(title):", "def unique(items):", "def load_config(path):",
    "def bubble_sort(items):", "def word_count(text):", "def is_palindrome(s):", "def celsius_to_fahrenheit(c):",
]
SEQ = 256


def repeats(ids: list[int], times: int = 4) -> bool:
    """True when some token sequence occurs `times` (or more) times in a row in ids."""
    n = len(ids)
    for L in range(1, n // times + 1):
        for i in range(0, n - times * L + 1):
            unit = ids[i:i + L]
            if all(ids[i + k * L:i + (k + 1) * L] == unit for k in range(1, times)):
                return True
    return False


def eval_set(model, tok, docs, max_windows: int) -> dict:
    from dsv3.train.data import Windows, encode_docs, read_texts, token_byte_lengths
    from dsv3.train.mtp import compute_losses

    windows = Windows(encode_docs(tok, read_texts(docs)), SEQ)
    n = len(windows)
    idx = np.unique(np.linspace(0, n - 1, min(n, max_windows)).round().astype(np.int64))
    nll = hits = ntok = nbytes = mtp_hits = mtp_tok = 0.0
    lengths = token_byte_lengths(tok)
    with torch.no_grad():
        for j in range(0, len(idx), 16):
            t = windows.get(idx[j:j + 16])
            losses = compute_losses(model, t)
            k = t[:, 1:].numel()
            nll += float(losses.main) * k
            ntok += k
            hits += float(losses.main_correct)
            nbytes += float(lengths[t[:, 1:].numpy()].sum())
            if losses.mtp_correct:
                mtp_hits += float(losses.mtp_correct[0])
                mtp_tok += losses.mtp_count[0]
    return {"files": len(docs), "windows": len(idx), "tokens": int(ntok), "loss": nll / ntok,
            "bpb": nll / math.log(2) / max(nbytes, 1.0), "top1": hits / ntok,
            "mtp_top1": mtp_hits / mtp_tok if mtp_tok else None}


def acceptance(llm, n_prompts: int = 8, max_tokens: int = 64) -> dict:
    from dsv3.engine.sampling import SamplingParams
    from dsv3.train.data import read_text, split_docs, stdlib_docs

    _, held = split_docs(stdlib_docs())
    prompts = [t[:600] for t in (read_text(d.path) for d in held if not d.rel.startswith("encodings/"))
               if t and len(t) > 800][:n_prompts]
    outs = llm.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
    drafted = sum(o.metrics.get("spec_drafted", 0) for o in outs)
    accepted = sum(o.metrics.get("spec_accepted", 0) for o in outs)
    rates = [o.metrics["spec_acceptance"] for o in outs if o.metrics.get("spec_acceptance") is not None]
    return {"prompts": len(prompts), "drafted": drafted, "accepted": accepted,
            "acceptance": accepted / drafted if drafted else (float(np.mean(rates)) if rates else None)}


def samples(llm, n: int, extra: dict) -> dict:
    params = [llm.default_sampling_params(max_tokens=128, seed=i, ignore_eos=True, **extra) for i in range(n)]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
    outs = llm.generate(prompts, params)
    flags = [repeats(list(o.token_ids)) for o in outs]
    p = params[0]
    return {"settings": {"temperature": p.temperature, "top_p": p.top_p, "top_k": p.top_k,
                         "repetition_penalty": p.repetition_penalty, "frequency_penalty": p.frequency_penalty,
                         "presence_penalty": p.presence_penalty},
            "free_of_repetition": flags.count(False), "samples": n,
            "texts": [pr + o.text for pr, o in zip(prompts, outs)]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint directory (default: the embedded model)")
    ap.add_argument("--samples", type=int, default=20)
    ap.add_argument("--max-windows", type=int, default=800)
    ap.add_argument("--settings", nargs="*", default=[], help="extra sampling variants, e.g. frequency_penalty=0.3")
    ap.add_argument("--show", type=int, default=2, help="print this many samples of the default settings")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()

    import dsv3
    from dsv3.assets import resolve_model
    from dsv3.train.data import is_heldout, load_tokenizer, resolve_docs, stdlib_docs

    path = resolve_model(args.model)
    tok = load_tokenizer(path)
    model = dsv3.load_model(path, dtype=torch.float32, progress=False)
    model.eval()
    held = [d for d in stdlib_docs() if is_heldout(d.rel)]
    sets = {"stdlib held-out": held, "stdlib held-out, code only": [d for d in held
                                                                    if not d.rel.startswith("encodings/")]}
    try:
        sets["held-out packages"] = resolve_docs(["heldout-packages"])
    except ValueError as e:
        print(f"held-out packages skipped: {e}", file=sys.stderr)
    t0 = time.perf_counter()
    results: dict = {"model": path, "date": time.strftime("%Y-%m-%d"), "eval": {}}
    for name, docs in sets.items():
        results["eval"][name] = eval_set(model, tok, docs, args.max_windows)
    del model
    print(f"{'set':28s} {'files':>5s} {'tokens':>8s} {'loss':>7s} {'bpb':>6s} {'top-1':>6s} {'MTP top-1':>9s}")
    for name, r in results["eval"].items():
        mtp = f"{r['mtp_top1']:.3f}" if r["mtp_top1"] is not None else "-"
        print(f"{name:28s} {r['files']:5d} {r['tokens']:8d} {r['loss']:7.3f} {r['bpb']:6.3f} {r['top1']:6.3f} "
              f"{mtp:>9s}")
    print(f"(evaluation {time.perf_counter() - t0:.0f} s)")

    llm = dsv3.LLM(path, speculative_max_batch=0, max_model_len=1024)  # draft at any batch size
    results["acceptance"] = acceptance(llm)
    print(f"greedy MTP draft acceptance: {results['acceptance']['acceptance']:.3f} "
          f"({results['acceptance']['accepted']} of {results['acceptance']['drafted']} drafts)")
    variants = [{}]
    for s in args.settings:
        k, _, v = s.partition("=")
        variants.append({k.strip(): float(v)})
    results["samples"] = []
    for extra in variants:
        r = samples(llm, args.samples, extra)
        results["samples"].append(r)
        print(f"samples free of a sequence repeated > 3 times in a row: {r['free_of_repetition']}/{r['samples']} "
              f"with {', '.join(f'{k} {v:g}' for k, v in r['settings'].items())}")
    for text in results["samples"][0]["texts"][:args.show]:
        print("-" * 60 + "\n" + text)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
