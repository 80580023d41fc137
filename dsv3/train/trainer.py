"""`dsv3.train.train(config)`: DeepSeek-V3's training recipe for small and medium models.

One optimizer step = `batch_size` windows of seq_len + 1 tokens, split into grad_accum micro-batches on each of
the data-parallel ranks. Loss = CE + lambda/D * sum_k CE_k (MTP) + balance loss (sequence-wise with aux-free,
batch-wise with aux). After each step the aux-free bias moves by gamma * sign(mean load - load) using the step's
counts summed over micro-batches and ranks. AdamW, linear warmup then cosine decay, global-norm clipping.

Everything the next step depends on (weights, biases, optimizer moments, step, data position, RNG) is in the
checkpoint, so a resumed run continues bit for bit.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from ..model.transformer import Transformer, build_model
from ..tokenizer_build import BOS, EOS, save_tokenizer_files
from ..devices import parse_device
from .balance import BALANCE_MODES, Balancer, Schedule, max_violation, moe_modules, set_recording
from .checkpoint import export_model, init_weights, latest_checkpoint, load_checkpoint, save_checkpoint
from .configs import resolve_model_config
from .data import Corpus, Sampler, Windows, build_corpus
from .mtp import compute_losses, mtp_loss
from .runlog import RunLog

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "bf16", "fp32")


@dataclass
class TrainConfig:
    model: object = "train-tiny"  # preset name, config.json / checkpoint dir, dict or ModelConfig
    data: list[str] = field(default_factory=lambda: ["stdlib"])
    tokenizer: str | None = None  # tokenizer.json or checkpoint dir; default: train a BPE of the model's vocab_size
    out: str = "runs/train"
    cache_dir: str | None = None
    holdout_percent: int = 2
    # recipe
    steps: int = 200
    batch_size: int = 8  # windows per optimizer step, over all ranks and micro-batches
    grad_accum: int = 1
    seq_len: int = 256
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup: int = 20
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    # balancing (paper: gamma 0.001 for the first 14.3T of 14.8T tokens, then 0; sequence-wise alpha 1e-4)
    balance: str = "aux-free"
    gamma: float = 1e-3
    gamma_until: float = 14.3 / 14.8
    alpha: float | None = None  # None: 1e-4 (aux-free's sequence-wise loss) or 1e-2 (aux)
    # MTP (paper: lambda 0.3 for the first 10T tokens, 0.1 for the remaining 4.8T)
    mtp_lambda: float = 0.3
    mtp_lambda_late: float = 0.1
    mtp_switch: float = 10 / 14.8
    # A draft stage after training: only the MTP module(s) learn, from the frozen main model's own distributions
    # (train/mtp.py); their loss has weight 1, lambda is unused, and only their routing biases move.
    mtp_only: bool = False
    # runtime
    precision: str = "auto"
    device: str = "auto"
    seed: int = 0
    threads: int | None = None
    eval_every: int = 100
    eval_windows: int = 32
    save_every: int = 100
    keep_checkpoints: int = 2
    log_csv: bool = False
    plot: bool = True
    export_fp8: bool = False
    stop_at: int | None = None  # leave after this step with a checkpoint (a planned interruption)
    resume: bool | str = False  # True: the newest checkpoint in `out`; a path: that checkpoint
    init_from: str | None = None  # a model checkpoint whose weights start this run (optimizer and schedule fresh;
    # ignored when resuming, where the run's own checkpoint has the weights)
    progress: bool | None = None

    def resolved_alpha(self) -> float:
        if self.alpha is not None:
            return self.alpha
        return {"aux": 1e-2, "aux-free": 1e-4}.get(self.balance, 0.0)

    def validate(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"train config: {name} = {getattr(self, name)!r}: {why}")

        if self.balance not in BALANCE_MODES:
            raise bad("balance", f"choose one of {BALANCE_MODES}")
        if self.precision not in PRECISIONS:
            raise bad("precision", f"choose one of {PRECISIONS}")
        for name in ("steps", "batch_size", "grad_accum", "seq_len", "eval_windows"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise bad(name, "must be a positive integer")
        if self.lr <= 0:
            raise bad("lr", "must be positive")
        if self.warmup < 0:
            raise bad("warmup", "must be >= 0")
        if self.gamma < 0:
            raise bad("gamma", "must be >= 0")
        if self.mtp_lambda < 0 or self.mtp_lambda_late < 0:
            raise bad("mtp_lambda", "must be >= 0")
        if isinstance(self.data, str):
            self.data = [self.data]
        resolve_model_config(self.model)  # a bad path or preset name fails here, before any data work
        if self.init_from is not None and not os.path.exists(os.path.join(self.init_from, "config.json")):
            raise bad("init_from", "not a checkpoint directory (it has no config.json)")

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        if not isinstance(d["model"], (str, dict)):
            d["model"] = d["model"].to_dict()
        return d


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warmup to lr over `warmup` steps, then cosine decay to lr * min_lr_ratio at the last step."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    span = max(1, cfg.steps - cfg.warmup)
    progress = min(1.0, (step - cfg.warmup) / span)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


# ------------------------------------------------------------------------------------------------------------------
class _Objective(torch.nn.Module):
    """Wraps the model so that one forward call computes every loss (DistributedDataParallel hooks a forward)."""

    def __init__(self, model: Transformer, distill: bool = False):
        super().__init__()
        self.model, self.distill = model, distill

    def forward(self, tokens: torch.Tensor) -> dict:
        l = compute_losses(self.model, tokens, distill=self.distill)
        return {"main": l.main, "mtp": l.mtp, "mtp_correct": l.mtp_correct, "main_correct": l.main_correct}


def _dist_env() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _device(cfg: TrainConfig, rank: int) -> torch.device:
    if cfg.device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", rank % torch.cuda.device_count())
        return torch.device("cpu")
    return parse_device(cfg.device)


def _autocast(cfg: TrainConfig, device: torch.device):
    use = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda"
                                      and torch.cuda.is_bf16_supported())
    if not use:
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16)


@torch.no_grad()
def evaluate(model: Transformer, windows: Windows, corpus: Corpus, n_windows: int, micro: int,
             device: torch.device, autocast) -> dict:
    """Held-out metrics on n_windows windows spread evenly over the held-out stream (fixed, so evaluations are
    comparable; spread, because neighbouring windows come from the same file and files differ a lot: the stdlib's
    encoding tables are far easier than its tests): loss, perplexity, bits per byte, top-1 accuracy of the main
    head and of each MTP module, and global MaxVio per MoE layer."""
    was_training = model.training
    model.eval()
    layers = moe_modules(model)
    counts = [torch.zeros(m.gate.weight.shape[0]) for _, m in layers]
    nll = nbytes = ntok = main_hits = 0.0
    mtp_nll: list[float] = []
    mtp_hits: list[float] = []
    mtp_tok: list[float] = []
    idx = np.unique(np.linspace(0, len(windows) - 1, min(n_windows, len(windows))).round().astype(np.int64))
    for i in range(0, len(idx), micro):
        tokens = windows.get(idx[i:i + micro]).to(device)
        with autocast():
            l = compute_losses(model, tokens)
        n = tokens[:, 1:].numel()
        nll += float(l.main) * n
        ntok += n
        main_hits += float(l.main_correct)
        nbytes += float(corpus.token_bytes[tokens[:, 1:].cpu().numpy()].sum())
        for k, (ce, hit, cnt) in enumerate(zip(l.mtp, l.mtp_correct, l.mtp_count)):
            if k == len(mtp_nll):
                mtp_nll.append(0.0), mtp_hits.append(0.0), mtp_tok.append(0.0)
            mtp_nll[k] += float(ce) * cnt
            mtp_hits[k] += float(hit)
            mtp_tok[k] += cnt
        for j, (_, m) in enumerate(layers):
            if m.last_routing is not None:
                counts[j] += torch.bincount(m.last_routing[0].reshape(-1).cpu(), minlength=len(counts[j])).float()
                m.last_routing = None
    model.train(was_training)
    loss = nll / ntok
    vio = [max_violation(c) for c in counts]
    return {
        "loss": loss, "ppl": math.exp(min(loss, 50.0)), "bpb": nll / math.log(2) / max(nbytes, 1.0),
        "top1": main_hits / ntok, "tokens": int(ntok),
        "mtp_loss": [a / b for a, b in zip(mtp_nll, mtp_tok)], "mtp_top1": [a / b for a, b in zip(mtp_hits, mtp_tok)],
        "maxvio_global": float(np.mean(vio)) if vio else 0.0, "maxvio_global_layers": vio,
    }


# ------------------------------------------------------------------------------------------------------------------
def train(config: TrainConfig | dict) -> dict:
    """Train (or resume) a model; returns the last evaluation and the paths written."""
    cfg = config if isinstance(config, TrainConfig) else TrainConfig(**config)
    cfg.validate()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    rank, world = _dist_env()
    is_main = rank == 0
    device = _device(cfg, rank)
    autocast = _autocast(cfg, device)
    if cfg.batch_size % (cfg.grad_accum * world):
        raise ValueError(f"batch_size {cfg.batch_size} must be divisible by grad_accum {cfg.grad_accum} x "
                         f"data-parallel ranks {world}")
    micro = cfg.batch_size // (cfg.grad_accum * world)
    os.makedirs(cfg.out, exist_ok=True)

    resume_from = None
    if cfg.resume:
        resume_from = cfg.resume if isinstance(cfg.resume, str) else latest_checkpoint(cfg.out)
        if resume_from is None:
            raise FileNotFoundError(f"--resume: no checkpoint under {os.path.join(cfg.out, 'checkpoints')}")

    # Data. Rank 0 trains the tokenizer and fills the cache first so the other ranks only read it.
    model_cfg = resolve_model_config(cfg.model)
    tok_dir = os.path.join(cfg.out, "tokenizer")
    # A warm start keeps the checkpoint's tokenizer unless told otherwise: its embeddings are indexed by it.
    tok_source = resume_from or cfg.tokenizer or cfg.init_from
    corpus = None
    for turn in ((0, 1) if world > 1 else (0,)):
        if (rank == 0) == (turn == 0):
            corpus = build_corpus(cfg.data, model_cfg.vocab_size, cfg.cache_dir, tok_source, cfg.holdout_percent)
        if world > 1:
            dist.barrier()
    if is_main and not os.path.exists(os.path.join(tok_dir, "tokenizer.json")):
        save_tokenizer_files(corpus.tokenizer, tok_dir, model_max_length=model_cfg.max_position_embeddings)
    if world > 1:
        dist.barrier()
    vocab = corpus.tokenizer.get_vocab_size()
    model_cfg = model_cfg.with_overrides(vocab_size=vocab, bos_token_id=corpus.tokenizer.token_to_id(BOS),
                                         eos_token_id=corpus.tokenizer.token_to_id(EOS), quantization_config=None)
    train_w, eval_w = Windows(corpus.train, cfg.seq_len), Windows(corpus.heldout, cfg.seq_len)
    sampler = Sampler(len(train_w), cfg.seed)

    torch.manual_seed(cfg.seed)
    model = build_model(model_cfg, device, torch.float32)
    if cfg.init_from and not resume_from:
        init_weights(cfg.init_from, model)
        log.info("weights initialised from %s", cfg.init_from)
    if cfg.mtp_only:
        if not model.mtp_layers:
            raise ValueError("--mtp-only trains the MTP module(s), and this model has none (num_nextn_predict_layers "
                             "is 0)")
        own = {id(p) for layer in model.mtp_layers for p in layer.parameters()}
        for p in model.parameters():
            p.requires_grad_(id(p) in own)
    model.train()
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in trained if p.ndim >= 2 and "norm" not in n]
    no_decay = [p for n, p in trained if not (p.ndim >= 2 and "norm" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=tuple(cfg.betas))
    step, cursor = 0, 0
    if resume_from:
        st = load_checkpoint(resume_from, model, optimizer)
        step, cursor = st["step"], st["cursor"]
        if st["config"]["batch_size"] != cfg.batch_size:
            raise ValueError(f"resuming {resume_from}: batch_size {cfg.batch_size} differs from the run's "
                             f"{st['config']['batch_size']}; the data position would not line up")
        log.info("resumed from %s at step %d", resume_from, step)
    alpha = cfg.resolved_alpha()
    # (--mtp-only: the frozen main layers' biases must not move, so only the MTP modules' are balanced)
    balanced = torch.nn.ModuleList(model.mtp_layers) if cfg.mtp_only else model
    balancer = Balancer(balanced, cfg.balance, alpha)
    gamma_s = Schedule(cfg.gamma if cfg.balance == "aux-free" else 0.0, 0.0, cfg.gamma_until)
    lam_s = Schedule(cfg.mtp_lambda, cfg.mtp_lambda_late, cfg.mtp_switch)
    objective: torch.nn.Module = _Objective(model, distill=cfg.mtp_only)
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        # Buffers are not broadcast: each rank applies the same all-reduced bias update, which the DP test checks.
        objective = DDP(objective, broadcast_buffers=False,
                        device_ids=[device.index] if device.type == "cuda" else None)

    runlog = RunLog(cfg.out, enabled=is_main, write_csv=cfg.log_csv, resume_step=step if resume_from else None)
    if is_main:
        with open(os.path.join(cfg.out, "train_config.json"), "w", encoding="utf-8") as f:
            json.dump(dict(cfg.to_json(), model_config=model_cfg.to_dict(), world_size=world), f, indent=2,
                      default=str)
        n_params = sum(p.numel() for p in model.parameters())
        log.info("model: %.2fM parameters, vocab %d; data: %d train / %d held-out tokens; unigram baseline %.3f",
                 n_params / 1e6, vocab, len(corpus.train), len(corpus.heldout), corpus.unigram_baseline())

    from tqdm.auto import tqdm
    bar = tqdm(total=cfg.steps, initial=step, disable=not is_main if cfg.progress is None else not cfg.progress,
               desc="train", dynamic_ncols=True)
    last_eval: dict = {}
    stop = min(cfg.steps, cfg.stop_at) if cfg.stop_at else cfg.steps

    def checkpoint(at: int) -> str | None:
        path = None
        if is_main:
            path = save_checkpoint(cfg.out, at, model, optimizer,
                                   {"cursor": cursor, "config": cfg.to_json(), "world_size": world,
                                    "eval": last_eval}, tok_dir, cfg.keep_checkpoints)
        if world > 1:
            dist.barrier()
        return path

    try:
        while step < stop:
            t0 = time.perf_counter()
            lr = lr_at(cfg, step)
            for g in optimizer.param_groups:
                g["lr"] = lr
            gamma, lam = gamma_s.at(step, cfg.steps), lam_s.at(step, cfg.steps)
            batch = sampler.take(cursor, cfg.batch_size)
            sums = torch.zeros(3 + len(model.mtp_layers))  # main, balance, total, mtp_k...
            for m in range(cfg.grad_accum):
                lo = (m * world + rank) * micro
                tokens = train_w.get(batch[lo:lo + micro]).to(device)
                sync = m == cfg.grad_accum - 1 or world == 1
                ctx = contextlib.nullcontext() if sync else objective.no_sync()
                with ctx:
                    with autocast():
                        out = objective(tokens)
                        bal = balancer.collect(micro).to(device)
                        if cfg.mtp_only:  # the main CE has no gradient here: the MTP loss alone, weight 1
                            loss = mtp_loss(out["mtp"], 1.0).to(device) + bal
                        else:
                            loss = out["main"] + mtp_loss(out["mtp"], lam).to(device) + bal
                    (loss / cfg.grad_accum).backward()
                sums += torch.stack([out["main"].detach(), bal.detach(), loss.detach()] + [x.detach() for x in out["mtp"]]).float().cpu()
            cursor += cfg.batch_size
            grad_norm = float(torch.nn.utils.clip_grad_norm_([p for _, p in trained],
                                                             cfg.grad_clip if cfg.grad_clip > 0 else float("inf")))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            counts = balancer.finish_step(gamma)
            if world > 1:
                dist.all_reduce(sums, op=dist.ReduceOp.SUM)
            sums /= cfg.grad_accum * world
            step += 1
            dt = time.perf_counter() - t0
            vio = [max_violation(c) for c in counts]
            rec = {
                "step": step, "loss": float(sums[2]), "ce": float(sums[0]), "balance_loss": float(sums[1]),
                "mtp_ce": [float(x) for x in sums[3:]], "lr": lr, "gamma": gamma, "mtp_lambda": lam,
                "grad_norm": grad_norm, "tokens_per_s": cfg.batch_size * cfg.seq_len / dt,
                "maxvio": float(np.mean(vio)) if vio else 0.0, "maxvio_layers": vio,
                "loads": [c.int().tolist() for c in counts], "bias": balancer.bias_stats(),
            }
            runlog.step(rec)
            bar.update(1)
            bar.set_postfix(loss=f"{rec['ce']:.3f}", maxvio=f"{rec['maxvio']:.2f}",
                            tok_s=f"{rec['tokens_per_s']:.0f}", refresh=False)
            if (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps:
                last_eval = evaluate(model, eval_w, corpus, cfg.eval_windows, micro, device, autocast)
                set_recording(balanced, bool(balancer.layers))
                runlog.eval(step, last_eval)
                if is_main:
                    bar.write(f"step {step}: held-out loss {last_eval['loss']:.4f} bpb {last_eval['bpb']:.4f} "
                              f"mtp top1 {last_eval['mtp_top1']} maxvio {last_eval['maxvio_global']:.3f}")
            if (cfg.save_every and step % cfg.save_every == 0) or step == stop:
                checkpoint(step)
    except KeyboardInterrupt:
        if step and not os.path.isdir(os.path.join(cfg.out, "checkpoints", f"step-{step:06d}")):
            log.warning("interrupted: saving a checkpoint at step %d", step)
            checkpoint(step)
        raise
    finally:
        bar.close()
        runlog.close()

    result = {"step": step, "eval": last_eval, "out": cfg.out, "unigram_baseline": corpus.unigram_baseline()}
    if step >= cfg.steps and is_main:
        final = os.path.join(cfg.out, "final")
        export_model(model, final, tok_dir, fp8=cfg.export_fp8)
        result["final"] = final
        result["final_bytes"] = sum(os.path.getsize(os.path.join(final, f)) for f in os.listdir(final))
        log.info("final model: %s (%.1f MB)", final, result["final_bytes"] / 1e6)
        if cfg.plot:
            runlog.plot(os.path.join(cfg.out, "curves.png"))
        with open(os.path.join(cfg.out, "result.json"), "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
    if world > 1:
        dist.barrier()
    result["model"] = model  # for callers that keep going in the same process (tests, benchmarks)
    return result
