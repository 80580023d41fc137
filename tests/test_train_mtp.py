"""The MTP objective: module k sees t_{i+k} and is scored against t_{i+k+1}; loss = lambda/D * sum_k CE_k."""
import pytest
import torch
import torch.nn.functional as F

from dsv3 import ModelConfig
from dsv3.model import build_model
from dsv3.train.configs import TRAIN_PRESETS
from dsv3.train.mtp import compute_losses, mtp_loss, mtp_targets


def test_targets_shift_by_k():
    tokens = torch.arange(10).view(1, 10)  # S = 9
    for k in (1, 2, 3):
        nxt, tgt = mtp_targets(tokens, k)
        assert nxt.tolist() == [list(range(k, 9))]
        assert tgt.tolist() == [list(range(k + 1, 10))]


def test_losses_match_a_manual_forward_with_two_modules():
    torch.manual_seed(0)
    cfg = ModelConfig.from_dict(dict(TRAIN_PRESETS["train-tiny"], vocab_size=50, num_nextn_predict_layers=2))
    model = build_model(cfg, "cpu", torch.float32)
    tokens = torch.randint(0, 50, (2, 8))
    got = compute_losses(model, tokens)
    S = 7
    h = model.hidden_states(tokens[:, :S])
    assert got.main.item() == pytest.approx(F.cross_entropy(model.logits(h).flatten(0, 1),
                                                            tokens[:, 1:].flatten()).item(), rel=1e-6)
    lg1, h1 = model.mtp(1, h[:, :6], tokens[:, 1:7])  # position i: h_i and t_{i+1} -> t_{i+2}
    ce1 = F.cross_entropy(lg1.flatten(0, 1), tokens[:, 2:8].flatten())
    lg2, _ = model.mtp(2, h1[:, :5], tokens[:, 2:7])  # depth 2: h1_i and t_{i+2} -> t_{i+3}
    ce2 = F.cross_entropy(lg2.flatten(0, 1), tokens[:, 3:8].flatten())
    assert got.mtp[0].item() == pytest.approx(ce1.item(), rel=1e-6)
    assert got.mtp[1].item() == pytest.approx(ce2.item(), rel=1e-6)
    assert got.mtp_count == [12, 10]
    total = mtp_loss(got.mtp, 0.3)
    assert total.item() == pytest.approx(0.3 / 2 * (ce1.item() + ce2.item()), rel=1e-6)


def test_mtp_shares_embedding_and_head():
    cfg = ModelConfig.from_dict(dict(TRAIN_PRESETS["train-tiny"], vocab_size=50))
    model = build_model(cfg, "cpu", torch.float32)
    loss = mtp_loss(compute_losses(model, torch.randint(0, 50, (1, 6))).mtp, 1.0)
    loss.backward()
    # The MTP loss alone trains the shared head and embedding, and the MTP block's own weights.
    assert model.lm_head.weight.grad.abs().sum() > 0
    assert model.model.embed_tokens.weight.grad.abs().sum() > 0
    assert model.mtp_layers[0].eh_proj.weight.grad.abs().sum() > 0
    assert mtp_loss([], 0.3).item() == 0.0


def test_too_short_sequence_is_rejected():
    cfg = ModelConfig.from_dict(dict(TRAIN_PRESETS["train-tiny"], vocab_size=50))
    with pytest.raises(ValueError, match="too short"):
        compute_losses(build_model(cfg, "cpu", torch.float32), torch.randint(0, 50, (1, 2)))
