"""The server's /metrics: counters, gauges and histograms, written in Prometheus' text format by prometheus_client.

The engine thread records tokens and latencies and the event loop records HTTP statuses into plain Python counters
and histograms below, under one lock; a custom prometheus_client collector turns them into metric families when
/metrics is scraped, and prometheus_client does the formatting. Gauges are read from the engine snapshot at scrape
time.

Why not prometheus_client's own Counter/Histogram objects: measured (one engine step's on_outputs, best of 15,
2-core shared x86_64 CPU, prometheus_client 0.26) they cost 3.2 / 169 / 288 us per step at batch 1 / 64 decode /
64 speculative (2 tokens each, 4 finishing) against 2.4 / 120 / 151 us for these plain counters, and 1.7 against
0.5 us per HTTP request: a lock per value, label lookups, and no weighted observe for the tokens of one speculative
step. They would also add `_created` series unless disabled process-wide. The custom collector keeps the engine
loop's cost where it was and changes nothing in the exported names, types, labels or buckets.

Each ServerMetrics has its own CollectorRegistry, so several servers (or tests) in one process do not collide.
"""
from __future__ import annotations

import math
import threading
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

# Latency buckets in seconds: from one fast GPU decode step up to a long CPU prefill.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0,
                   10.0, 20.0, 40.0, 80.0)
PREFIX = "dsv3_"


class Counter:
    """A counter, optionally labelled, updated under the shared lock. Unlabelled counters are exported as 0 before
    their first event; a labelled one has no samples until a label set is first used."""

    def __init__(self, lock: threading.Lock, name: str, help_text: str, labels: tuple[str, ...] = ()):
        self.name = PREFIX + name
        self.help = help_text
        self.label_names = labels
        self._lock = lock
        self.values: dict[tuple, float] = defaultdict(float)
        if not labels:
            self.values[()] = 0.0

    def inc(self, amount: float = 1.0, *labels: Any) -> None:
        with self._lock:
            self.values[tuple(labels)] += amount

    def get(self, *labels: Any) -> float:
        return self.values.get(tuple(labels), 0.0)

    def copy(self) -> Any:  # under the lock
        return list(self.values.items())

    def family(self, values) -> Metric:  # from copy(), outside the lock
        f = CounterMetricFamily(self.name, self.help, labels=self.label_names)
        for key, value in sorted(values):
            f.add_metric([str(v) for v in key], value)
        return f


class Histogram:
    """Bucket counts (not cumulative), sum and count, updated under the shared lock. observe(value, times) records
    `times` equal observations at once (the tokens of one speculative step share their gap)."""

    def __init__(self, lock: threading.Lock, name: str, help_text: str, buckets: Iterable[float] = LATENCY_BUCKETS):
        self.name = PREFIX + name
        self.help = help_text
        self._lock = lock
        self.bounds = tuple(sorted(buckets)) + (math.inf,)
        self._le = [floatToGoString(b) for b in self.bounds]
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

    def copy(self) -> Any:  # under the lock
        return list(self.counts), self.sum

    def family(self, values) -> Metric:  # from copy(), outside the lock
        counts, total = values
        running, buckets = 0, []
        for le, c in zip(self._le, counts):
            running += c
            buckets.append((le, running))
        # _count is the +Inf bucket: equal to self.count except for NaN observations, which land in no bucket.
        f = HistogramMetricFamily(self.name, self.help)
        f.add_metric([], buckets, total)
        return f


class _Collector(Collector):
    def __init__(self, metrics: ServerMetrics):
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        m = self.metrics
        with m.lock:  # the engine thread waits on this: copy the numbers, build the families after
            values = [x.copy() for x in m.recorded]
        families = [x.family(v) for x, v in zip(m.recorded, values)]
        families += [(CounterMetricFamily if counter else GaugeMetricFamily)(PREFIX + name, help_text, value=value)
                     for (name, help_text, counter, _), value in zip(GAUGES, m.gauge_values)]
        # The order /metrics has always had: counters, histograms, then what the snapshot gives.
        return iter(families)


def _ratio(a: float, b: float) -> float:
    return a / b if b else 0.0


def _stat(key: str) -> Callable[[dict[str, Any]], float]:
    return lambda s: s["stats"].get(key, 0)


# Read from the engine snapshot at scrape time: (name, help, exported as a counter (cumulative), value).
GAUGES: tuple[tuple[str, str, bool, Callable[[dict[str, Any]], float]], ...] = (
    ("num_requests_waiting", "Engine requests queued, not yet scheduled.", False, lambda s: s["waiting"]),
    ("num_requests_running", "Engine requests in the running batch.", False, lambda s: s["running"]),
    ("num_requests_in_flight", "Engine requests the server is waiting on.", False, lambda s: s["in_flight"]),
    ("cache_blocks_used", "Latent cache blocks held by requests.", False, lambda s: s["blocks_used"]),
    ("cache_blocks_total", "Latent cache blocks in all.", False, lambda s: s["blocks_total"]),
    ("cache_usage_ratio", "cache_blocks_used / cache_blocks_total.", False, lambda s: s["cache_usage"]),
    ("prefix_cache_hit_ratio", "Prompt blocks found in the prefix cache.", False, lambda s: s["prefix_hit_rate"]),
    ("preemptions_total", "Sequences preempted for cache space.", True, lambda s: s["preemptions"]),
    ("spec_decode_draft_tokens_total", "Speculative draft tokens proposed.", True, _stat("spec_drafted")),
    ("spec_decode_accepted_tokens_total", "Speculative draft tokens accepted.", True, _stat("spec_accepted")),
    ("spec_decode_acceptance_ratio", "Accepted / proposed draft tokens (0 if none).", False,
     lambda s: _ratio(_stat("spec_accepted")(s), _stat("spec_drafted")(s))),
    ("spec_decode_verify_steps_total", "Speculative verification steps (per sequence).", True,
     _stat("spec_verify_steps")),
    ("spec_decode_tokens_per_step", "Tokens a verification step appends: accepted drafts + 1 (0 if none).", False,
     lambda s: _ratio(_stat("spec_accepted")(s) + _stat("spec_verify_steps")(s), _stat("spec_verify_steps")(s))),
)


class ServerMetrics:
    """Everything /metrics exports, and the AsyncEngine observer hooks that feed it."""

    def __init__(self):
        lock = self.lock = threading.Lock()
        self.requests = Counter(lock, "requests_total", "HTTP requests answered, by endpoint and status code.",
                                ("endpoint", "status"))
        self.finished = Counter(lock, "request_finished_total", "Completions (one per choice) by finish reason.",
                                ("reason",))
        self.prompt_tokens = Counter(lock, "prompt_tokens_total", "Prompt tokens of admitted requests.")
        self.generation_tokens = Counter(lock, "generation_tokens_total", "Tokens generated.")
        self.ttft = Histogram(lock, "time_to_first_token_seconds",
                              "From receiving the HTTP request to the first generated token.")
        self.itl = Histogram(lock, "inter_token_latency_seconds",
                             "Between consecutive generated tokens of one completion.")
        self.e2e = Histogram(lock, "request_latency_seconds",
                             "From receiving the HTTP request to the completion's last token.")
        self.recorded = (self.requests, self.finished, self.prompt_tokens, self.generation_tokens, self.ttft,
                         self.itl, self.e2e)
        self.gauge_values = [0.0] * len(GAUGES)  # from the last snapshot render() was given
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(self))

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

    def on_failed(self, group, index: int) -> None:
        """The engine ended one request with an error (the rest of its step went on)."""
        self.finished.inc(1, "error")

    # -- exposition (event loop) ----------------------------------------------------------------------------------
    def render(self, snapshot: dict[str, Any]) -> str:
        """The text for /metrics (Prometheus text format 0.0.4), with the gauges taken from `snapshot`."""
        self.gauge_values = [value(snapshot) for _, _, _, value in GAUGES]
        return generate_latest(self.registry).decode()


def parse_metrics(text: str) -> dict[str, float]:
    """Sample name with its labels as written (`name{a="x",b="y"}`) -> value; for tests and the load benchmark."""
    def esc(v: str) -> str:
        return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')

    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{esc(v)}"' for k, v in s.labels.items())
            out[s.name + ("{" + labels + "}" if labels else "")] = s.value
    return out
