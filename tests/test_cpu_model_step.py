"""run_model (kernels/cpu_pack.py CpuModelStep): a kernel-only step's embedding, blocks, final norm and head in one C++
call compute exactly what the separate calls compute (Transformer.hidden_states + logits)."""
import pytest
import torch

from dsv3.kernels import cpu_ext

OPS = cpu_ext.load()
pytestmark = pytest.mark.skipif(OPS is None, reason=f"C++ CPU kernels unavailable: {cpu_ext.unsupported_reason()}")

PROMPTS = ["def fibonacci(n):", "import os\n\nclass Config:\n    def __init__(self, path):\n        self.path = path",
           "for i in range(10):"]


def _run(llm, fused: bool, **kw):
    from dsv3 import SamplingParams

    model = llm.model
    saved = model.cpu_model_step
    if not fused:
        model.cpu_model_step = None
    calls = []
    if fused:
        step = saved

        def counted(*a, **k):
            calls.append(1)
            return step(*a, **k)

        model.cpu_model_step = counted
    try:
        outs = llm.generate(PROMPTS, SamplingParams(max_tokens=20, logprobs=3, **kw))
    finally:
        model.cpu_model_step = saved
    return outs, len(calls)


@pytest.mark.parametrize("speculative", ["off", "mtp"])
@pytest.mark.parametrize("quantize", [None, "int4"])
def test_one_call_step_equals_the_separate_calls_bit_for_bit(speculative, quantize):
    # The embedded model; the prompts are short (<= 16 tokens: kernel-only steps whose only wanted logits row is
    # the last) or longer (PyTorch prefill), then decode and, with MTP, verification rows (every row's logits).
    from dsv3 import LLM

    llm = LLM(None, progress=False, speculative=speculative, quantize=quantize, enable_prefix_caching=False)
    assert llm.model.cpu_model_step is not None
    for kw in (dict(temperature=0.0), dict(temperature=0.8, seed=3)):
        want, _ = _run(llm, False, **kw)
        got, calls = _run(llm, True, **kw)
        assert calls > 10
        for w, g in zip(want, got):
            assert g.token_ids == w.token_ids
            assert [x.logprob for x in g.logprobs] == [x.logprob for x in w.logprobs]
            assert [x.top for x in g.logprobs] == [x.top for x in w.logprobs]


def test_run_model_names_bad_ids_and_positions():
    from dsv3 import LLM
    from dsv3.kernels.cpu_pack import CpuModelStep

    llm = LLM(None, progress=False, speculative="off")
    step: CpuModelStep = llm.model.cpu_model_step
    embed, norm, eps = step.args
    cos_t, sin_t = step.rotary.tables(8)
    empty = torch.zeros(0, dtype=torch.long)
    args = (embed, cos_t, sin_t, norm, eps, llm.engine.cache.kv, 0, empty, empty, empty, empty,
            torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(RuntimeError, match="token id 99999 outside the vocabulary"):
        OPS.run_model(step.blocks.id, torch.tensor([99999]), torch.tensor([0]), *args)
    with pytest.raises(RuntimeError, match="outside the rotary table"):
        OPS.run_model(step.blocks.id, torch.tensor([3]), torch.tensor([cos_t.shape[0]]), *args)
    with pytest.raises(RuntimeError, match="1 ids but 2 positions"):
        OPS.run_model(step.blocks.id, torch.tensor([3]), torch.tensor([0, 1]), *args)
