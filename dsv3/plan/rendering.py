"""The planner's text report: render() turns the dict plan() returns into what `dsv3 plan` prints (without --json).
Formatting only: every figure is already in the dict.
"""
from __future__ import annotations

from ..hardware import GIB
from .inventory import gib


def _num(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n:,.0f}"


def _rate(x: float | None) -> str:
    return "-" if x is None else f"{x:,.1f}" if x < 100 else f"{x:,.0f}"


def render(r: dict) -> str:
    hw = r["hardware"]
    g, c = hw["gpu"], hw["cpu"]
    lines = [f"{r['model']} ({r['model_type']}): {_num(r['params_total'])} parameters, {_num(r['params_active'])} "
             f"active per token" + (f", MTP {_num(r['params_mtp'])}" if r["params_mtp"] else ""),
             f"weights {r['precision']}, KV cache {r['cache_dtype']}, context {r['context']:,} x concurrency "
             f"{r['concurrency']}" + (", MTP loaded" if r["mtp"] else ""),
             "hardware: " + (f"{g['count']}x {g['name']} ({g['memory_bytes'] / GIB:g} GiB"
                             + (f", {g['bandwidth'] / 1e12:.2f} TB/s" if g["bandwidth"] else "") + f", {g['from']})"
                             if g else "no GPU")
             + f"; CPU {gib(c['memory_bytes'])} ({c['sources'].get('memory', '')}), "
               f"{c['bandwidth'] / 1e9:.0f} GB/s ({c['sources'].get('bandwidth', '')}), "
               f"{c['flops'] / 1e12:.2f} TFLOPS ({c['sources'].get('flops', '')})",
             "",
             f"{'component':<16}{'parameters':>12}{'bytes':>14}"]
    for comp in r["components"]:
        note = "" if r["mtp"] or comp["name"] != "mtp" else "   (not loaded)"
        lines.append(f"{comp['name']:<16}{_num(comp['params']):>12}{gib(comp['bytes']):>14}{note}")
    lines += [f"{'resident total':<16}{'':>12}{gib(r['weights_bytes']):>14}",
              f"checkpoint on disk: {gib(r['checkpoint_bytes'])} ({r['checkpoint_bytes'] / 1e9:.1f} GB)",
              "",
              f"KV cache (MLA latent, {r['cache_dtype']}): {r['kv_bytes_per_token']:,} bytes/token"
              + (f" ({r['kv_bytes_per_token_loaded']:,} with the MTP layer)" if r["mtp"] else "")
              + f"; {r['context']:,} x {r['concurrency']} tokens = {gib(r['kv_cache_bytes'])}"
                f" per replica (every tensor-parallel rank holds the whole latent)",
              f"workspace: activations of a {r['workspace_chunk_tokens']:,}-token step (see docs/plan.md)",
              "",
              "layouts (per device: weights + KV cache + workspace + runtime reserve; speeds are upper bounds)"]
    for lay in r["layouts"]:
        d = lay["decode"]
        verdict = "fits" if lay["fits"] else "does not fit"
        lines.append(f"  {lay['name']:<7}{lay['label']}: {verdict}: {lay['reason']}")
        if lay["fits"]:
            batch = "" if r["concurrency"] == 1 else (
                f", <= {_rate(d['tokens_per_s_per_seq_upper'])} per sequence and "
                f"{_rate(d['tokens_per_s_aggregate_upper'])} aggregate at {r['concurrency']} sequences")
            lines.append(f"  {'':<7}decode <= {_rate(d['tokens_per_s_single_stream_upper'])} tok/s single stream"
                         f"{batch}; prefill <= {_rate(lay['prefill']['tokens_per_s_upper'])} tok/s; room for "
                         f"{lay['max_concurrency']} sequences of {r['context']:,} tokens")
    lines.append("")
    if r["fits"]:
        lines += [f"recommendation: {r['layout']} ({r['layout_label']})", f"  {r['recommended_command']}"]
        later = r["recommended_not_yet_available"]
        if later:
            lines.append(f"  not yet available: {' '.join(later)} (flags this layout needs that the CLI does "
                         f"not have yet; without them the line above runs, but not as planned)")
            if r["runnable_layout"]:
                lines += [f"runnable today: {r['runnable_layout']} ({r['runnable_layout_label']})",
                          f"  {r['runnable_command']}"]
            else:
                lines.append("runnable today: no layout that fits runs as planned without those flags")
    else:
        lines.append("recommendation: nothing fits at this precision, context and concurrency"
                     + (f"; the GPU layout needs at least {r['min_gpus_for_gpu_layout']}x {g['name']}"
                        if g and r["min_gpus_for_gpu_layout"] else "")
                     + "; try --precision int4, a shorter --context, --cache-dtype fp8 or more memory")
    cost = r["cost"]
    if cost:
        parts = []
        if cost["local_per_mtok"] is not None:
            parts.append(f"local >= ${cost['local_per_mtok']:.2f} per million output tokens at the bound")
        if cost["api_price_per_mtok"] is not None:
            parts.append(f"hosted ${cost['api_price_per_mtok']:.2f}")
        if cost["break_even_tokens_per_s"] is not None:
            parts.append(f"break-even at {cost['break_even_tokens_per_s']:,.0f} tok/s aggregate")
        lines.append("cost: " + ("; ".join(parts) if parts else "needs a GPU layout that fits and --gpu-hour-price"))
    lines += [f"note: {n}" for n in r["notes"]]
    return "\n".join(lines)
