"""Load balancing for training: the bias update rule, the sequence-wise and batch-wise balance losses against
written-out formulas, MaxVio, and the bias acting on expert selection only."""
import pytest
import torch

from dsv3 import ModelConfig
from dsv3.model.moe import route
from dsv3.train.balance import Balancer, Schedule, balance_loss, max_violation, update_bias
from dsv3.train.configs import TRAIN_PRESETS
from dsv3.model import build_model


def test_bias_update_rule():
    bias = torch.tensor([0.5, 0.0, -0.1, 0.2])
    counts = torch.tensor([3.0, 1.0, 2.0, 2.0])  # mean 2: expert 0 overloaded, 1 underloaded, 2 and 3 exact
    update_bias(bias, counts, 0.001)
    assert torch.allclose(bias, torch.tensor([0.499, 0.001, -0.1, 0.2]))
    before = bias.clone()
    update_bias(bias, counts, 0.0)  # gamma 0 (end of training) freezes the bias
    assert torch.equal(bias, before)


def test_gamma_and_lambda_schedules():
    s = Schedule(0.001, 0.0, 0.9)
    assert [s.at(i, 10) for i in (0, 8, 9)] == [0.001, 0.001, 0.0]


def _written_out(indices, scores, n_seq):
    T, K = indices.shape
    E = scores.shape[1]
    S = T // n_seq
    total = 0.0
    for b in range(n_seq):
        seq = 0.0
        for i in range(E):
            count = sum(int(i in indices[t].tolist()) for t in range(b * S, (b + 1) * S))
            f = E / (K * S) * count
            P = sum(float(scores[t, i] / scores[t].sum()) for t in range(b * S, (b + 1) * S)) / S
            seq += f * P
        total += seq
    return total / n_seq


@pytest.mark.parametrize("n_seq", [1, 3])
def test_balance_loss_matches_written_out_formula(n_seq):
    T, E, K = 12, 6, 2
    scores = torch.rand(T, E)
    indices = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
    got = balance_loss(indices, scores, n_seq)
    assert got.item() == pytest.approx(_written_out(indices, scores, n_seq), rel=1e-5)


def test_balance_loss_is_one_when_perfectly_balanced_and_has_gradient():
    E = 4  # experts; each token picks 2
    indices = torch.tensor([[0, 1], [2, 3], [0, 1], [2, 3]])
    scores = torch.full((4, E), 0.3, requires_grad=True)  # equal normalised scores 1/E
    loss = balance_loss(indices, scores, 1)
    assert loss.item() == pytest.approx(1.0)
    loss.backward()
    assert scores.grad is not None


def test_max_violation():
    assert max_violation(torch.tensor([2.0, 2.0, 2.0])) == 0.0
    assert max_violation(torch.tensor([4.0, 1.0, 1.0])) == pytest.approx(1.0)


def test_bias_changes_selection_but_not_weights():
    cfg = ModelConfig.from_dict(dict(TRAIN_PRESETS["train-tiny"]))
    logits = torch.randn(16, cfg.n_routed_experts)
    w0, i0, s0 = route(logits, cfg, torch.zeros(cfg.n_routed_experts))
    bias = torch.zeros(cfg.n_routed_experts)
    bias[3] = 10.0  # expert 3 must now be chosen for every token
    w1, i1, s1 = route(logits, cfg, bias)
    assert (i1 == 3).any(-1).all() and not torch.equal(i0, i1)
    assert torch.equal(s0, s1)  # scores come from the gate alone
    # The weights are the unbiased scores of the chosen experts, normalised and scaled.
    expect = s1.gather(1, i1)
    expect = expect / expect.sum(-1, keepdim=True) * cfg.routed_scaling_factor
    assert torch.allclose(w1, expect)


def test_balancer_counts_and_updates_every_moe_layer_including_mtp():
    torch.manual_seed(0)
    cfg = ModelConfig.from_dict(dict(TRAIN_PRESETS["train-tiny"], vocab_size=64))
    model = build_model(cfg, "cpu", torch.float32)
    bal = Balancer(model, "aux-free", 1e-4)
    assert bal.names == ["model.layers.1.mlp", "model.layers.2.mlp"]  # main MoE layer + the MTP module's
    from dsv3.train.mtp import compute_losses
    tokens = torch.randint(0, 64, (2, 9))
    compute_losses(model, tokens)
    loss = bal.collect(n_seq=2)
    assert loss.item() > 0 and loss.requires_grad
    counts = bal.finish_step(gamma=0.01)
    assert counts[0].sum() == 2 * 8 * cfg.num_experts_per_tok  # 2 sequences x 8 positions x K
    assert counts[1].sum() == 2 * 7 * cfg.num_experts_per_tok  # the MTP module sees one position fewer
    for (_, m), c in zip(bal.layers, counts):
        expect = 0.01 * torch.sign(c.mean() - c)
        assert torch.allclose(m.gate.e_score_correction_bias, expect)


def test_aux_free_needs_the_bias():
    cfg = ModelConfig.from_dict(dict(TRAIN_PRESETS["train-tiny"], topk_method="group_limited_greedy"))
    with pytest.raises(ValueError, match="aux-free"):
        Balancer(build_model(cfg, "cpu", torch.float32), "aux-free", 1e-4)
    with pytest.raises(ValueError, match="balance mode"):
        Balancer(build_model(cfg, "cpu", torch.float32), "auxfree", 1e-4)
