"""Structured outputs' cost: N concurrent json_schema requests against the same requests unconstrained (tokens/s,
target >= 0.85x), and xgrammar's compile time for a 20-field schema.

Each round runs the constrained batch first, then the unconstrained one with every request held to the number of
tokens its constrained twin produced (ignore_eos), so both batches have the same shape step by step and differ only
by the grammar work (mask fill, mask apply, matcher advance). Rounds alternate the order to even out drift.

    PYTHONPATH=. python benchmarks/structured.py                      # embedded model, 16 requests, 3 rounds
    PYTHONPATH=. python benchmarks/structured.py --requests 4 --rounds 1 --max-tokens 48   # smoke test

Prints a table and one JSON line.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

from dsv3.engine.guided import GrammarBackend, GuidedDecoding
from dsv3.engine.llm import LLM
from dsv3.engine.sampling import SamplingParams

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "kind": {"enum": ["a", "b", "c"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 4},
        "home": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                  "zip": {"type": "integer", "minimum": 0, "maximum": 99999}},
                 "required": ["city", "zip"], "additionalProperties": False},
    },
    "required": ["name", "age", "kind", "tags", "home"],
    "additionalProperties": False,
}


def twenty_fields() -> dict:
    kinds = [{"type": "string", "maxLength": 20}, {"type": "integer", "minimum": -1000, "maximum": 1000},
             {"type": "number"}, {"type": "boolean"}, {"enum": ["red", "green", "blue", "other"]},
             {"type": "array", "items": {"type": "integer"}, "maxItems": 8},
             {"type": "object", "properties": {"x": {"type": "number"}, "y": {"type": "number"}},
              "required": ["x", "y"]},
             {"type": "string", "pattern": "[A-Z]{3}-[0-9]{4}"}, {"anyOf": [{"type": "string"}, {"type": "null"}]},
             {"type": "array", "items": {"type": "object", "properties": {"k": {"type": "string"}}}}]
    props = {f"field_{i:02d}": kinds[i % len(kinds)] for i in range(20)}
    return {"type": "object", "properties": props, "required": sorted(props), "additionalProperties": False}


def run_batch(llm: LLM, prompts: list[str], params: list[SamplingParams]) -> tuple[float, list]:
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    return time.perf_counter() - t0, outs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint directory (default: the embedded model)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--speculative", default="auto", choices=["auto", "mtp", "off"])
    ap.add_argument("--temperature", type=float, default=1.0)
    args = ap.parse_args()

    llm = LLM(args.model, dtype=args.dtype, speculative=args.speculative, max_num_seqs=max(16, args.requests))
    engine = llm.engine

    # Compile time: a fresh backend (no cache), the 20-field schema, then the cached lookup.
    t0 = time.perf_counter()
    backend = GrammarBackend(llm.tokenizer, engine.cfg.vocab_size, sorted(engine.eos_ids))
    t_info = time.perf_counter() - t0
    big = GuidedDecoding(json=twenty_fields())
    t0 = time.perf_counter()
    backend.compile(big)
    t_compile = time.perf_counter() - t0
    t0 = time.perf_counter()
    backend.compile(big)
    t_cached = time.perf_counter() - t0

    guided = GuidedDecoding(json=SCHEMA)
    engine.guided_backend().compile(guided)  # the run measures decoding, not the first compile
    prompts = [f"Record {i}:" for i in range(args.requests)]
    llm.generate(prompts[:2], SamplingParams(max_tokens=8))  # warm-up
    rows = []
    for r in range(args.rounds):
        cons = [SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=1000 * r + i,
                               guided=guided) for i in range(args.requests)]
        t_c, outs = run_batch(llm, prompts, cons)
        lens = [len(o.token_ids) for o in outs]
        free = [SamplingParams(max_tokens=n, temperature=args.temperature, seed=1000 * r + i, ignore_eos=True)
                for i, n in enumerate(lens)]
        if r % 2:
            t_f, _ = run_batch(llm, prompts, free)
            t_c, outs = run_batch(llm, prompts, cons)
        else:
            t_f, _ = run_batch(llm, prompts, free)
        tokens = sum(lens)
        valid = sum(1 for o in outs if o.finish_reason == "stop")
        rows.append({"round": r, "tokens": tokens, "constrained_tok_s": tokens / t_c, "free_tok_s": tokens / t_f,
                     "ratio": t_f / t_c, "finished_json": valid})

    print(f"{'round':>5} {'tokens':>7} {'json tok/s':>11} {'free tok/s':>11} {'ratio':>6} {'complete':>9}")
    for row in rows:
        print(f"{row['round']:>5} {row['tokens']:>7} {row['constrained_tok_s']:>11.1f} {row['free_tok_s']:>11.1f} "
              f"{row['ratio']:>6.3f} {row['finished_json']:>5}/{args.requests}")
    ratio = statistics.median(r["ratio"] for r in rows)
    print(f"median ratio {ratio:.3f} (target >= 0.85); tokenizer info {t_info * 1e3:.0f} ms; 20-field schema "
          f"compile {t_compile * 1e3:.1f} ms, cached {t_cached * 1e6:.0f} us")
    print(json.dumps({"requests": args.requests, "dtype": args.dtype, "speculative": args.speculative,
                      "rounds": rows, "median_ratio": ratio, "tokenizer_info_s": t_info,
                      "compile_20_fields_s": t_compile, "compile_cached_s": t_cached}))


if __name__ == "__main__":
    main()
