"""dsv3/server/metrics.py without a server: what /metrics exports, parsed back with prometheus_client's parser."""
from __future__ import annotations

import math
import threading
import types

import pytest

prometheus_client = pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families

from dsv3.server.metrics import LATENCY_BUCKETS, ServerMetrics, parse_metrics

# Every metric /metrics has exported since it was written by hand, in order, with its type: names as in the
# `# TYPE` lines (counters with their _total).
EXPECTED = (
    ("dsv3_requests_total", "counter"),
    ("dsv3_request_finished_total", "counter"),
    ("dsv3_prompt_tokens_total", "counter"),
    ("dsv3_generation_tokens_total", "counter"),
    ("dsv3_time_to_first_token_seconds", "histogram"),
    ("dsv3_inter_token_latency_seconds", "histogram"),
    ("dsv3_request_latency_seconds", "histogram"),
    ("dsv3_num_requests_waiting", "gauge"),
    ("dsv3_num_requests_running", "gauge"),
    ("dsv3_num_requests_in_flight", "gauge"),
    ("dsv3_cache_blocks_used", "gauge"),
    ("dsv3_cache_blocks_total", "gauge"),
    ("dsv3_cache_usage_ratio", "gauge"),
    ("dsv3_prefix_cache_hit_ratio", "gauge"),
    ("dsv3_preemptions_total", "counter"),
    ("dsv3_spec_decode_draft_tokens_total", "counter"),
    ("dsv3_spec_decode_accepted_tokens_total", "counter"),
    ("dsv3_spec_decode_acceptance_ratio", "gauge"),
    ("dsv3_spec_decode_verify_steps_total", "counter"),
    ("dsv3_spec_decode_tokens_per_step", "gauge"),
)
HISTOGRAMS = [n for n, t in EXPECTED if t == "histogram"]
LE = ["0.001", "0.0025", "0.005", "0.01", "0.025", "0.05", "0.075", "0.1", "0.15", "0.2", "0.3", "0.5", "0.75",
      "1.0", "2.5", "5.0", "10.0", "20.0", "40.0", "80.0", "+Inf"]


def snapshot(**stats) -> dict:
    return {"waiting": 2, "running": 3, "in_flight": 5, "blocks_used": 16, "blocks_total": 64, "cache_usage": 0.25,
            "prefix_hit_rate": 0.5, "preemptions": 4, "stats": stats}


def group(*prompt_lens: int, arrival: float = 0.0, last=None):
    return types.SimpleNamespace(prompt_lens=list(prompt_lens), arrival=arrival,
                                 last_token_time=list(last) if last is not None else [None] * len(prompt_lens))


def out(finished: bool = False, reason: str | None = None):
    return types.SimpleNamespace(finished=finished, finish_reason=reason)


def families(text: str) -> dict:
    """Exposition name (counters with _total, as in `# TYPE`) -> parsed family."""
    return {f.name + ("_total" if f.type == "counter" else ""): f for f in text_string_to_metric_families(text)}


def test_names_types_and_help_parse():
    text = ServerMetrics().render(snapshot())
    fams = families(text)
    assert [(n, f.type) for n, f in fams.items()] == list(EXPECTED)
    type_lines = [line.split()[2:] for line in text.splitlines() if line.startswith("# TYPE ")]
    assert type_lines == [[n, t] for n, t in EXPECTED]
    assert all(f.documentation for f in fams.values())
    assert fams["dsv3_cache_usage_ratio"].documentation == "cache_blocks_used / cache_blocks_total."
    # No _created series (prometheus_client's own counters would add them), nothing beyond the table.
    assert "_created" not in text
    samples = {s.name for f in fams.values() for s in f.samples}
    labelled = {"dsv3_requests_total", "dsv3_request_finished_total"}  # no series before their first event
    assert samples == ({n for n, t in EXPECTED if t != "histogram"} - labelled
                       | {n + suffix for n in HISTOGRAMS for suffix in ("_bucket", "_sum", "_count")})


def test_before_any_event():
    fams = families(ServerMetrics().render(snapshot()))
    # Labelled counters have no series until a label set is used; unlabelled ones start at 0.
    assert fams["dsv3_requests_total"].samples == [] and fams["dsv3_request_finished_total"].samples == []
    assert [s.value for s in fams["dsv3_prompt_tokens_total"].samples] == [0.0]
    for name in HISTOGRAMS:
        buckets = [s for s in fams[name].samples if s.name == name + "_bucket"]
        assert [s.labels for s in buckets] == [{"le": le} for le in LE]
        assert all(s.value == 0 for s in fams[name].samples)


def test_recorded_values():
    m = ServerMetrics()
    g1 = group(5, 7, arrival=0.0, last=[None, 0.3])
    g2 = group(3, arrival=0.1, last=[0.2])
    m.on_added(g1)
    m.on_added(g2)
    # g1/0: first token (TTFT 0.5); g1/1: three tokens of one speculative step after 0.3 s, sharing the 0.2 s gap,
    # then finishing; g2/0: one token 0.3 s after its last, finishing without a reason.
    m.on_outputs([(g1, 0, out()), (g1, 1, out()), (g1, 1, out()), (g1, 1, out(True, "stop")),
                  (g2, 0, out(True, None))], 0.5)
    m.on_aborted(g1, 0)
    for endpoint, status in [("/v1/completions", "200"), ("/v1/completions", "200"), ("/v1/chat/completions", "400"),
                             ("other", 'a"b\\c\nd')]:
        m.requests.inc(1, endpoint, status)
    m_ = parse_metrics(m.render(snapshot(spec_drafted=10, spec_accepted=4, spec_verify_steps=8)))

    assert m_['dsv3_requests_total{endpoint="/v1/completions",status="200"}'] == 2
    assert m_['dsv3_requests_total{endpoint="/v1/chat/completions",status="400"}'] == 1
    assert m_['dsv3_requests_total{endpoint="other",status="a\\"b\\\\c\\nd"}'] == 1  # escaped as written
    assert m_['dsv3_request_finished_total{reason="stop"}'] == 1
    assert m_['dsv3_request_finished_total{reason="unknown"}'] == 1
    assert m_['dsv3_request_finished_total{reason="abort"}'] == 1
    assert m_["dsv3_prompt_tokens_total"] == 15 and m_["dsv3_generation_tokens_total"] == 5

    ttft = "dsv3_time_to_first_token_seconds"
    assert m_[ttft + "_count"] == 1 and m_[ttft + "_sum"] == pytest.approx(0.5)
    assert m_[ttft + '_bucket{le="0.3"}'] == 0 and m_[ttft + '_bucket{le="0.5"}'] == 1
    itl = "dsv3_inter_token_latency_seconds"
    assert m_[itl + "_count"] == 4  # three tokens of g1/1 (0.2/3 s each) and one of g2/0 (0.3 s)
    assert m_[itl + "_sum"] == pytest.approx(0.2 + 0.3)
    assert m_[itl + '_bucket{le="0.05"}'] == 0 and m_[itl + '_bucket{le="0.075"}'] == 3
    assert m_[itl + '_bucket{le="0.2"}'] == 3 and m_[itl + '_bucket{le="0.3"}'] == 4
    e2e = "dsv3_request_latency_seconds"
    assert m_[e2e + "_count"] == 2 and m_[e2e + "_sum"] == pytest.approx(0.5 + 0.4)
    for name in HISTOGRAMS:
        cumulative = [m_[f'{name}_bucket{{le="{le}"}}'] for le in LE]
        assert cumulative == sorted(cumulative) and cumulative[-1] == m_[name + "_count"]

    assert (m_["dsv3_num_requests_waiting"], m_["dsv3_num_requests_running"], m_["dsv3_num_requests_in_flight"]) \
        == (2, 3, 5)
    assert (m_["dsv3_cache_blocks_used"], m_["dsv3_cache_blocks_total"], m_["dsv3_cache_usage_ratio"]) == (16, 64, 0.25)
    assert m_["dsv3_prefix_cache_hit_ratio"] == 0.5 and m_["dsv3_preemptions_total"] == 4
    assert m_["dsv3_spec_decode_draft_tokens_total"] == 10 and m_["dsv3_spec_decode_accepted_tokens_total"] == 4
    assert m_["dsv3_spec_decode_acceptance_ratio"] == pytest.approx(0.4)
    assert m_["dsv3_spec_decode_verify_steps_total"] == 8
    assert m_["dsv3_spec_decode_tokens_per_step"] == pytest.approx((4 + 8) / 8)

    # Without speculation the ratios are 0, not a division by zero.
    m_ = parse_metrics(m.render(snapshot()))
    assert m_["dsv3_spec_decode_acceptance_ratio"] == 0 and m_["dsv3_spec_decode_tokens_per_step"] == 0


def test_bucket_bounds():
    assert [prometheus_client.utils.floatToGoString(b) for b in LATENCY_BUCKETS] + ["+Inf"] == LE
    m = ServerMetrics()
    for v in (0.001, 0.0010001, 80.0, 81.0):  # upper bounds are inclusive
        m.e2e.observe(v)
    m_ = parse_metrics(m.render(snapshot()))
    name = "dsv3_request_latency_seconds_bucket"
    assert m_[name + '{le="0.001"}'] == 1 and m_[name + '{le="0.0025"}'] == 2
    assert m_[name + '{le="40.0"}'] == 2 and m_[name + '{le="80.0"}'] == 3 and m_[name + '{le="+Inf"}'] == 4
    assert math.isinf(m.e2e.bounds[-1])


def test_servers_do_not_share_a_registry():
    a, b = ServerMetrics(), ServerMetrics()
    a.generation_tokens.inc(7)
    a.requests.inc(1, "/health", "200")
    assert a.registry is not b.registry
    ma, mb = parse_metrics(a.render(snapshot())), parse_metrics(b.render(snapshot()))
    assert ma["dsv3_generation_tokens_total"] == 7 and mb["dsv3_generation_tokens_total"] == 0
    assert 'dsv3_requests_total{endpoint="/health",status="200"}' not in mb
    # Nothing lands in prometheus_client's process-wide default registry.
    assert not [f for f in prometheus_client.REGISTRY.collect() if f.name.startswith("dsv3_")]


def test_concurrent_updates_are_not_lost():
    m = ServerMetrics()
    g = group(1, last=[0.0])

    def engine():
        for _ in range(5000):
            m.on_outputs([(g, 0, out())], 0.01)

    def event_loop():
        for i in range(5000):
            m.requests.inc(1, "/v1/completions", "200")
            if i % 500 == 0:
                m.render(snapshot())  # scrapes while the engine threads record

    threads = [threading.Thread(target=engine), threading.Thread(target=engine), threading.Thread(target=event_loop)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    m_ = parse_metrics(m.render(snapshot()))
    assert m_["dsv3_generation_tokens_total"] == 10000
    assert m_["dsv3_inter_token_latency_seconds_count"] == 10000
    assert m_['dsv3_inter_token_latency_seconds_bucket{le="0.01"}'] == 10000
    assert m_['dsv3_requests_total{endpoint="/v1/completions",status="200"}'] == 5000
