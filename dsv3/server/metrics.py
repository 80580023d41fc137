"""Prometheus text exposition for the server, without a client library: counters, gauges and histograms.

Counters and histograms are updated from two threads (the engine thread records tokens and latencies, the event
loop records HTTP statuses), so every update takes the registry's lock. Gauges are read from the engine snapshot
when /metrics is scraped.
"""
from __future__ import annotations

import math
import threading
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

# Latency buckets in seconds: from one fast GPU decode step up to a long CPU prefill.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0,
                   10.0, 20.0, 40.0, 80.0)
PREFIX = "dsv3_"


def _fmt(v: float) -> str:
    if v == math.inf:
        return "+Inf"
    if float(v).is_integer():
        return str(int(v))
    return repr(float(v))


def _labels(names: tuple[str, ...], values: tuple[Any, ...], extra: str = "") -> str:
    parts = [f'{k}="{_escape(str(v))}"' for k, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _escape(s: str) -> str:
    return s.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class _Metric:
    kind = ""

    def __init__(self, registry: Registry, name: str, help_text: str, labels: tuple[str, ...] = ()):
        self.name = PREFIX + name
        self.help = help_text
        self.label_names = labels
        self._lock = registry.lock
        registry.metrics.append(self)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    kind = "counter"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.values: dict[tuple, float] = defaultdict(float)
        if not self.label_names:
            self.values[()] = 0.0  # unlabelled counters are exported as 0 before their first event

    def inc(self, amount: float = 1.0, *labels: Any) -> None:
        with self._lock:
            self.values[tuple(labels)] += amount

    def get(self, *labels: Any) -> float:
        return self.values.get(tuple(labels), 0.0)

    def render(self) -> list[str]:
        return self.header() + [f"{self.name}{_labels(self.label_names, k)} {_fmt(v)}"
                                for k, v in sorted(self.values.items())]


class Gauge(_Metric):
    """Set just before rendering (from the engine snapshot), so it holds no lock of its own. kind="counter" for
    cumulative values the engine counts itself."""

    def __init__(self, *args, kind: str = "gauge", **kwargs):
        super().__init__(*args, **kwargs)
        self.kind = kind
        self.value = 0.0

    def render(self) -> list[str]:
        return self.header() + [f"{self.name} {_fmt(self.value)}"]


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, *args, buckets: Iterable[float] = LATENCY_BUCKETS, **kwargs):
        super().__init__(*args, **kwargs)
        self.bounds = tuple(sorted(buckets)) + (math.inf,)
        self.counts = [0] * len(self.bounds)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float, times: int = 1) -> None:
        with self._lock:
            for i, b in enumerate(self.bounds):
                if value <= b:
                    self.counts[i] += times
                    break
            self.sum += value * times
            self.count += times

    def render(self) -> list[str]:
        lines = self.header()
        running = 0
        for b, c in zip(self.bounds, self.counts):
            running += c
            lines.append(f'{self.name}_bucket{{le="{_fmt(b)}"}} {running}')
        lines += [f"{self.name}_sum {_fmt(self.sum)}", f"{self.name}_count {self.count}"]
        return lines


class Registry:
    def __init__(self):
        self.lock = threading.Lock()
        self.metrics: list[_Metric] = []

    def render(self) -> str:
        with self.lock:
            lines = [line for m in self.metrics for line in m.render()]
        return "\n".join(lines) + "\n"


class ServerMetrics:
    """Everything /metrics exports, and the AsyncEngine observer hooks that feed it."""

    def __init__(self):
        r = self.registry = Registry()
        self.requests = Counter(r, "requests_total", "HTTP requests answered, by endpoint and status code.",
                                ("endpoint", "status"))
        self.finished = Counter(r, "request_finished_total", "Completions (one per choice) by finish reason.",
                                ("reason",))
        self.prompt_tokens = Counter(r, "prompt_tokens_total", "Prompt tokens of admitted requests.")
        self.generation_tokens = Counter(r, "generation_tokens_total", "Tokens generated.")
        self.ttft = Histogram(r, "time_to_first_token_seconds",
                              "From receiving the HTTP request to the first generated token.")
        self.itl = Histogram(r, "inter_token_latency_seconds",
                             "Between consecutive generated tokens of one completion.")
        self.e2e = Histogram(r, "request_latency_seconds",
                             "From receiving the HTTP request to the completion's last token.")
        self.waiting = Gauge(r, "num_requests_waiting", "Engine requests queued, not yet scheduled.")
        self.running = Gauge(r, "num_requests_running", "Engine requests in the running batch.")
        self.in_flight = Gauge(r, "num_requests_in_flight", "Engine requests the server is waiting on.")
        self.blocks_used = Gauge(r, "cache_blocks_used", "Latent cache blocks held by requests.")
        self.blocks_total = Gauge(r, "cache_blocks_total", "Latent cache blocks in all.")
        self.cache_usage = Gauge(r, "cache_usage_ratio", "cache_blocks_used / cache_blocks_total.")
        self.prefix_hit = Gauge(r, "prefix_cache_hit_ratio", "Prompt blocks found in the prefix cache.")
        self.preemptions = Gauge(r, "preemptions_total", "Sequences preempted for cache space.", kind="counter")
        self.spec_drafted = Gauge(r, "spec_decode_draft_tokens_total", "Speculative draft tokens proposed.",
                                  kind="counter")
        self.spec_accepted = Gauge(r, "spec_decode_accepted_tokens_total", "Speculative draft tokens accepted.",
                                   kind="counter")
        self.spec_rate = Gauge(r, "spec_decode_acceptance_ratio", "Accepted / proposed draft tokens (0 if none).")
        self.spec_steps = Gauge(r, "spec_decode_verify_steps_total", "Speculative verification steps (per sequence).",
                                kind="counter")
        self.spec_tokens_per_step = Gauge(r, "spec_decode_tokens_per_step",
                                          "Tokens a verification step appends: accepted drafts + 1 (0 if none).")

    # -- AsyncEngine observer (engine thread) ---------------------------------------------------------------------
    def on_added(self, group) -> None:
        self.prompt_tokens.inc(sum(group.prompt_lens))

    def on_outputs(self, batch, now: float) -> None:
        per_seq: dict[tuple[int, int], int] = defaultdict(int)
        for group, index, out in batch:
            per_seq[id(group), index] += 1
        seen = set()
        for group, index, out in batch:
            key = (id(group), index)
            if key not in seen:
                seen.add(key)
                k = per_seq[key]
                self.generation_tokens.inc(k)
                last = group.last_token_time[index]
                if last is None:
                    self.ttft.observe(now - group.arrival)
                else:
                    # Tokens that arrive together in one speculative step share the gap evenly.
                    self.itl.observe((now - last) / k, k)
            if out.finished:
                self.finished.inc(1, out.finish_reason or "unknown")
                self.e2e.observe(now - group.arrival)

    def on_aborted(self, group, index: int) -> None:
        self.finished.inc(1, "abort")

    # -- exposition (event loop) ----------------------------------------------------------------------------------
    def render(self, snapshot: dict[str, Any]) -> str:
        self.waiting.value = snapshot["waiting"]
        self.running.value = snapshot["running"]
        self.in_flight.value = snapshot["in_flight"]
        self.blocks_used.value = snapshot["blocks_used"]
        self.blocks_total.value = snapshot["blocks_total"]
        self.cache_usage.value = snapshot["cache_usage"]
        self.prefix_hit.value = snapshot["prefix_hit_rate"]
        self.preemptions.value = snapshot["preemptions"]
        stats = snapshot["stats"]
        drafted, accepted = stats.get("spec_drafted", 0), stats.get("spec_accepted", 0)
        self.spec_drafted.value = drafted
        self.spec_accepted.value = accepted
        self.spec_rate.value = accepted / drafted if drafted else 0.0
        steps = stats.get("spec_verify_steps", 0)
        self.spec_steps.value = steps
        self.spec_tokens_per_step.value = (accepted + steps) / steps if steps else 0.0
        return self.registry.render()


def parse_metrics(text: str) -> dict[str, float]:
    """Sample name (with labels, as written) -> value; for tests and the load benchmark."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out
