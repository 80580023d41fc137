"""The trainer end to end on a tiny model: exact resumption, checkpoints that load through dsv3.load_model, the
data pipeline's split and windows, the learning-rate schedule, and clear errors for bad input."""
import json
import os
import shutil

import numpy as np
import pytest
import torch

import dsv3
from dsv3.train import TrainConfig, lr_at, train
from dsv3.train.data import Sampler, Windows, resolve_docs, split_docs, stdlib_docs, stdlib_root

_FILES = ["json/decoder.py", "json/encoder.py", "glob.py", "fnmatch.py", "shlex.py", "textwrap.py", "string.py",
          "queue.py", "bisect.py", "heapq.py"]


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    for f in _FILES:
        shutil.copy(os.path.join(stdlib_root(), f), d / f.replace("/", "_"))
    return str(d)


def _cfg(corpus_dir, tmp_path, name, **kw):
    base = dict(model="train-tiny", data=[corpus_dir], out=str(tmp_path / name), cache_dir=str(tmp_path / "cache"),
                steps=6, batch_size=4, grad_accum=2, seq_len=32, warmup=2, eval_every=3, eval_windows=4,
                save_every=2, threads=1, progress=False, plot=False)
    base.update(kw)
    return TrainConfig(**base)


def _losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [(r["step"], r["loss"], r["ce"]) for r in map(json.loads, f) if "loss" in r]


def test_resume_matches_uninterrupted_run_exactly(corpus_dir, tmp_path):
    full = train(_cfg(corpus_dir, tmp_path, "full"))
    train(_cfg(corpus_dir, tmp_path, "split", stop_at=3))
    assert not os.path.exists(tmp_path / "split" / "final")
    resumed = train(_cfg(corpus_dir, tmp_path, "split", resume=True))
    assert _losses(tmp_path / "full") == _losses(tmp_path / "split")  # bit-identical, step by step
    assert len(_losses(tmp_path / "split")) == 6
    assert full["eval"] == resumed["eval"]
    a, b = full["model"].state_dict(), resumed["model"].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # The aux-free bias moved (it is part of what must be restored).
    assert any(v.abs().sum() > 0 for k, v in a.items() if k.endswith("e_score_correction_bias"))


def test_checkpoints_load_through_load_model(corpus_dir, tmp_path):
    res = train(_cfg(corpus_dir, tmp_path, "ck", steps=2, grad_accum=1, eval_every=0, save_every=1,
                     keep_checkpoints=1, export_fp8=True))
    ckpts = sorted(os.listdir(tmp_path / "ck" / "checkpoints"))
    assert ckpts == ["step-000002"]  # keep_checkpoints=1 removed step 1
    ck = tmp_path / "ck" / "checkpoints" / "step-000002"
    assert {"tokenizer.json", "tokenizer_config.json", "training_state.json", "training_state.safetensors",
            "config.json", "model.safetensors.index.json"} <= set(os.listdir(ck))
    loaded = dsv3.load_model(ck, dtype=torch.float32)
    trained = res["model"]
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in trained.state_dict().items())
    # The final export is in the official FP8 format and still loads (and is close to the trained weights).
    final = dsv3.load_model(res["final"], dtype=torch.float32)
    conf = json.loads((tmp_path / "ck" / "final" / "config.json").read_text())
    assert conf["quantization_config"]["quant_method"] == "fp8"
    ids = torch.randint(0, trained.cfg.vocab_size, (1, 12))
    with torch.no_grad():
        ref, got = trained(ids), final(ids)
    assert (ref - got).abs().max() < 0.1 * ref.abs().max()
    assert torch.equal(final.model.layers[1].mlp.gate.e_score_correction_bias,
                       trained.model.layers[1].mlp.gate.e_score_correction_bias)  # kept float32


def test_balance_modes_and_logs(corpus_dir, tmp_path):
    for mode in ("none", "aux"):
        res = train(_cfg(corpus_dir, tmp_path, mode, steps=2, grad_accum=1, balance=mode, eval_every=0,
                         save_every=0, log_csv=True))
        rec = [json.loads(l) for l in open(tmp_path / mode / "metrics.jsonl")]
        step = rec[0]
        assert {"loss", "ce", "mtp_ce", "balance_loss", "tokens_per_s", "maxvio", "maxvio_layers", "loads",
                "bias", "lr", "grad_norm"} <= set(step)
        assert len(step["loads"]) == 2 and sum(step["loads"][0]) == 4 * 32 * 2
        assert (step["balance_loss"] > 0) == (mode == "aux")
        biases = [v for k, v in res["model"].state_dict().items() if k.endswith("e_score_correction_bias")]
        assert all(b.abs().sum() == 0 for b in biases)  # only aux-free moves the bias
        assert "eval" in rec[-1] and rec[-1]["eval"]["bpb"] > 0
        assert (tmp_path / mode / "metrics.csv").read_text().startswith("step,loss,ce")


def test_lr_schedule():
    cfg = TrainConfig(steps=100, warmup=10, lr=1.0, min_lr_ratio=0.1)
    assert lr_at(cfg, 0) == pytest.approx(0.1)
    assert lr_at(cfg, 9) == pytest.approx(1.0)
    assert lr_at(cfg, 10) == pytest.approx(1.0)
    assert lr_at(cfg, 55) == pytest.approx(0.55)
    assert lr_at(cfg, 100) == pytest.approx(0.1)


def test_stdlib_split_is_deterministic_and_disjoint():
    docs = stdlib_docs()
    train_docs, held = split_docs(docs)
    assert len(held) >= 5 and len(train_docs) > 20 * len(held)
    assert not {d.rel for d in held} & {d.rel for d in train_docs}
    assert all("site-packages" not in d.path for d in docs)
    assert split_docs(list(reversed(docs)))[1] == held or sorted(d.rel for d in split_docs(docs)[1]) == \
        sorted(d.rel for d in held)


def test_windows_and_sampler():
    w = Windows(np.arange(21, dtype=np.uint16), seq_len=5)  # 4 windows of 6 tokens, overlapping by one
    assert len(w) == 4
    assert w.get([1]).tolist() == [[5, 6, 7, 8, 9, 10]]
    s = Sampler(4, seed=1)
    first = s.take(0, 8)
    assert sorted(first[:4].tolist()) == [0, 1, 2, 3] and sorted(first[4:].tolist()) == [0, 1, 2, 3]
    assert Sampler(4, seed=1).take(3, 3).tolist() == first[3:6].tolist()  # position is the only state


def test_bad_inputs_have_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_docs([str(tmp_path / "missing")])
    with pytest.raises(ValueError, match="matched no files"):
        resolve_docs([str(tmp_path / "*.nothing")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="matched no files"):
        resolve_docs([str(tmp_path / "empty")])
    with pytest.raises(ValueError, match="unknown model config"):
        TrainConfig(model="no-such-preset").validate()
    with pytest.raises(ValueError, match="balance"):
        TrainConfig(balance="sometimes").validate()
    with pytest.raises(ValueError, match="divisible"):
        train(TrainConfig(model="train-tiny", data=[os.path.join(stdlib_root(), "glob.py")], batch_size=3,
                          grad_accum=2, out=str(tmp_path / "x"), cache_dir=str(tmp_path / "c")))
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(TrainConfig(model="train-tiny", resume=True, out=str(tmp_path / "nothing-here")))


def test_cli_flags_map_to_the_config(tmp_path):
    import argparse

    from dsv3.commands import train as cmd

    p = argparse.ArgumentParser()
    cmd.add_parser(p.add_subparsers(dest="command"))
    args = p.parse_args(["train", "--config", "train-small", "--data", "stdlib", "--steps", "7", "--batch-size", "16",
                         "--seq-len", "128", "--lr", "2e-3", "--balance", "aux", "--alpha", "0.001", "--gamma", "0",
                         "--mtp-lambda", "0.2", "--out", str(tmp_path / "o"), "--export-fp8"])
    cfg = cmd.build_config(args)
    assert (cfg.model, cfg.data, cfg.steps, cfg.batch_size, cfg.seq_len, cfg.lr, cfg.balance, cfg.alpha, cfg.gamma,
            cfg.mtp_lambda, cfg.export_fp8) == ("train-small", ["stdlib"], 7, 16, 128, 2e-3, "aux", 0.001, 0.0, 0.2,
                                                True)
    with pytest.raises(SystemExit):
        p.parse_args(["train", "--balance", "sometimes"])


def test_split_edge_cases_and_single_file(tmp_path):
    from dsv3.train.data import Doc, build_corpus

    docs = [Doc(f"/x/{i}", f"{i}.py") for i in range(3)]
    train_docs, held = split_docs(docs, percent=0)
    assert len(held) == 1 and len(train_docs) == 2
    train_docs, held = split_docs(docs, percent=100)
    assert len(held) == 1 and len(train_docs) == 2
    c = build_corpus([os.path.join(stdlib_root(), "glob.py")], 300, cache_dir=str(tmp_path))
    assert len(c.train) > 100 and len(c.heldout) == len(c.train)
    assert c.tokenizer.get_vocab_size() <= 300
    assert c.unigram_baseline() > 0


def test_init_from_warm_starts_from_an_exported_model(corpus_dir, tmp_path):
    """--init-from: a new run starts from a checkpoint's weights and routing biases (here the FP8 export of a
    first run), with a fresh optimizer and schedule; the config and tokenizer default to the checkpoint's."""
    import argparse

    from dsv3.commands import train as cmd

    first = train(_cfg(corpus_dir, tmp_path, "first", steps=4, grad_accum=1, eval_every=0, save_every=0,
                       export_fp8=True))
    p = argparse.ArgumentParser()
    cmd.add_parser(p.add_subparsers(dest="command"))
    cfg = cmd.build_config(p.parse_args(["train", "--init-from", first["final"], "--data", corpus_dir]))
    assert cfg.model == first["final"] and cfg.init_from == first["final"]
    # lr 1e-12 and gamma 0: the step changes nothing measurable, so the evaluation is the exported model's.
    second = train(_cfg(corpus_dir, tmp_path, "second", model=first["final"], init_from=first["final"], steps=1,
                        lr=1e-12, gamma=0.0, warmup=0, grad_accum=1, eval_every=0, save_every=0))
    exported = dsv3.load_model(first["final"], dtype=torch.float32)
    got = second["model"].state_dict()
    for k, v in exported.state_dict().items():
        assert torch.allclose(got[k], v, atol=1e-6), k
    assert abs(second["eval"]["loss"] - first["eval"]["loss"]) < 0.05  # the FP8 export's rounding only
    with pytest.raises(ValueError, match="do not fit the model being trained"):
        train(_cfg(corpus_dir, tmp_path, "wrong", model="train-small", init_from=first["final"], steps=1))
    with pytest.raises(ValueError, match="no config.json"):
        TrainConfig(init_from=str(tmp_path)).validate()


def test_mtp_only_trains_the_draft_module_alone_on_the_main_models_distribution(corpus_dir, tmp_path):
    """--mtp-only: the main model (its weights and routing biases) stays bit for bit; the MTP module learns, and
    its loss is the cross-entropy against the main model's own next-token distribution."""
    first = train(_cfg(corpus_dir, tmp_path, "base", steps=4, grad_accum=1, eval_every=0, save_every=0))
    before = {k: v.clone() for k, v in first["model"].state_dict().items()}
    res = train(_cfg(corpus_dir, tmp_path, "draft", model=first["final"], init_from=first["final"], steps=4,
                     grad_accum=1, eval_every=0, save_every=0, mtp_only=True, lr=1e-2, gamma=1e-2))
    after = res["model"].state_dict()
    n_main = res["model"].cfg.num_hidden_layers
    mtp_keys = [k for k in after if k.startswith(f"model.layers.{n_main}.")]
    assert mtp_keys and any(not torch.equal(after[k], before[k].to(after[k].dtype)) for k in mtp_keys)
    loaded = dsv3.load_model(first["final"], dtype=torch.float32).state_dict()
    assert all(torch.equal(after[k], loaded[k]) for k in after if k not in mtp_keys)  # trunk, embedding, head
    # The logged MTP loss is the soft cross-entropy, at least the teacher's entropy, never below it.
    from dsv3.train.mtp import compute_losses

    tokens = torch.randint(0, res["model"].cfg.vocab_size, (2, 17))
    with torch.no_grad():
        soft = compute_losses(res["model"], tokens, distill=True)
        p = res["model"](tokens[:, :16]).float().softmax(-1)[:, 1:16]
        entropy = -(p * p.clamp_min(1e-30).log()).sum(-1).mean()
    assert float(soft.mtp[0]) >= float(entropy) - 1e-4
    with pytest.raises(ValueError, match="has none"):
        from dsv3.train.configs import resolve_model_config

        no_mtp = dict(resolve_model_config("train-tiny").to_dict(), num_nextn_predict_layers=0)
        train(_cfg(corpus_dir, tmp_path, "nomtp", model=no_mtp, mtp_only=True, steps=1))


def test_documents_start_with_bos_as_prompts_do():
    """Training streams hold [bos] doc [eos] per document: a prompt, which the tokenizer starts with bos, then looks
    like the start of a file the model has trained on, not like a token it never saw."""
    from dsv3.assets import default_model_path
    from dsv3.tokenizer import Tokenizer
    from dsv3.train.data import encode_docs

    tok = Tokenizer.from_pretrained(default_model_path())
    assert tok.add_bos and tok.bos_id is not None
    texts = ["def f():\n    pass\n", "x = 1\n"]
    stream = encode_docs(tok._tok, texts).tolist()
    want = []
    for t in texts:
        prompt = tok.encode(t)  # what inference feeds the model for this text
        assert prompt[0] == tok.bos_id
        want += prompt + [tok.eos_ids[0]]
    assert stream == want
