"""CPU pre-packing (oneDNN layout, fused projections) against the plain model."""
import copy

import pytest
import torch

from dsv3 import ModelConfig
from dsv3.kernels.cpu_pack import available, prepack_for_cpu
from dsv3.model import build_model
from hf_ref import v3

pytestmark = pytest.mark.skipif(not available(torch.bfloat16), reason="oneDNN bf16 packing unavailable")


@pytest.mark.parametrize("q_lora", [32, None])
def test_packed_model_matches_plain(q_lora):
    torch.manual_seed(0)
    plain = build_model(ModelConfig.from_dict(v3(q_lora_rank=q_lora)), "cpu", torch.bfloat16).eval()
    packed = copy.deepcopy(plain)
    assert prepack_for_cpu(packed, kernels=False)  # oneDNN only; the C++ kernels: tests/test_cpu_kernels.py
    ids = torch.randint(0, 256, (2, 19))
    with torch.no_grad():
        want = plain(ids).float()
        got = packed(ids).float()
        want_abs, got_abs = plain(ids, impl="absorbed").float(), packed(ids, impl="absorbed").float()
    # oneDNN runs the same products: the results are bit-identical, fused projections included.
    assert torch.equal(got, want)
    assert torch.equal(got_abs, want_abs)
    # The plain weights are dropped, so packing does not double memory.
    assert packed.lm_head.weight.numel() == 0 and packed.model.layers[1].mlp.experts.gate_proj.weight.numel() == 0


def test_float32_and_fp8_models_are_left_alone():
    model = build_model(ModelConfig.from_dict(v3()), "cpu", torch.float32)
    assert not prepack_for_cpu(model)
    assert model.lm_head.packed is None
