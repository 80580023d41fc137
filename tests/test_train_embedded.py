"""The model shipped in dsv3/assets/default-model (trained by `dsv3 train`, see docs/training.md): it loads through
the ordinary path, has the DeepSeek-V3 architecture features, fits the size budget, and predicts held-out stdlib
files far better than any unigram model could."""
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import dsv3
from dsv3.assets import DEFAULT_MODEL_DIR
from dsv3.train.data import read_text, split_docs, stdlib_docs

SEQ = 256  # the training window length
N_FILES, WINDOWS_PER_FILE = 5, 4


@pytest.fixture(scope="module")
def shipped():
    if not os.path.exists(os.path.join(DEFAULT_MODEL_DIR, "config.json")):
        pytest.fail(f"no model in {DEFAULT_MODEL_DIR}")
    from tokenizers import Tokenizer

    model = dsv3.load_model(DEFAULT_MODEL_DIR, dtype=torch.float32, progress=False)
    return model, Tokenizer.from_file(os.path.join(DEFAULT_MODEL_DIR, "tokenizer.json"))


def _heldout_windows(tok):
    """Windows of SEQ + 1 tokens from the first N_FILES held-out stdlib files that fill WINDOWS_PER_FILE of them.
    The codec tables under encodings/ are skipped: they are far easier than code and would flatter the model."""
    _, held = split_docs(stdlib_docs())
    out, files = [], 0
    for d in (d for d in held if not d.rel.startswith("encodings/")):
        text = read_text(d.path)
        ids = tok.encode(text, add_special_tokens=False).ids if text else []
        if len(ids) > WINDOWS_PER_FILE * SEQ:
            out += [torch.tensor(ids[i * SEQ: (i + 1) * SEQ + 1]) for i in range(WINDOWS_PER_FILE)]
            files += 1
        if files == N_FILES:
            break
    assert files == N_FILES, "too few held-out stdlib files of sufficient length"
    return torch.stack(out)


def test_architecture_and_size():
    conf = json.load(open(os.path.join(DEFAULT_MODEL_DIR, "config.json")))
    cfg = dsv3.ModelConfig.from_pretrained(DEFAULT_MODEL_DIR)
    assert cfg.q_lora_rank and cfg.rope.is_yarn and cfg.first_k_dense_replace == 1
    assert cfg.n_group > 1 and cfg.topk_method == "noaux_tc" and cfg.scoring_func == "sigmoid"
    assert cfg.n_shared_experts == 1 and cfg.num_nextn_predict_layers == 1
    assert conf["quantization_config"]["quant_method"] == "fp8"
    size = sum(os.path.getsize(os.path.join(DEFAULT_MODEL_DIR, f)) for f in os.listdir(DEFAULT_MODEL_DIR))
    assert size < 60e6  # issue 24: <= 60 MB on disk
    assert cfg.num_hidden_layers >= 8  # the MTP module a small part of the model


def test_heldout_loss_far_below_unigram_and_mtp_predicts(shipped):
    model, tok = shipped
    ids = _heldout_windows(tok)
    with torch.no_grad():
        h = model.hidden_states(ids[:, :-1])
        loss = F.cross_entropy(model.logits(h).flatten(0, 1), ids[:, 1:].flatten()).item()
        # MTP module 1 at position i sees t_{i+1} and predicts t_{i+2}.
        mtp_logits, _ = model.mtp(1, h[:, :-1], ids[:, 1:-1])
        mtp_top1 = (mtp_logits.argmax(-1) == ids[:, 2:]).float().mean().item()
    # The best any unigram model can do on these tokens (a lower bound for a unigram model trained elsewhere):
    # their own empirical entropy.
    counts = np.bincount(ids[:, 1:].flatten().numpy())
    p = counts[counts > 0] / counts.sum()
    unigram = float(-(p * np.log(p)).sum())
    print(f"held-out loss {loss:.3f} nats/token, unigram entropy {unigram:.3f}, MTP top-1 {mtp_top1:.3f}")
    assert loss < 0.7 * unigram and loss < unigram - 1.5, (loss, unigram)
    assert mtp_top1 > 0.2, mtp_top1


def test_bias_was_trained(shipped):
    model, _ = shipped
    biases = [m.gate.e_score_correction_bias for m in (l.mlp for l in model.model.layers) if hasattr(m, "gate")]
    assert len(biases) == model.cfg.num_hidden_layers - 1 + 1  # MoE layers + the MTP module's
    assert all(b.abs().max() > 0 for b in biases)
