"""LLM: the offline API. Load a checkpoint (the embedded model by default), then generate, chat or stream.

Owns LLM and the hook through which a multi-rank LLM gets its lockstep engine (set_parallel_engine): the torchrun
wrapper, engine/distributed.py, builds on this module and installs itself there, so this module never imports it.
"""
from __future__ import annotations

import logging
import os
from dataclasses import fields
from typing import Any, Callable, Iterator, Sequence as Seq

import torch

from ..assets import resolve_model
from ..kernels.cpu_pack import prepack_for_cpu
from ..checkpoint import load_model
from ..devices import parse_dtype
from .engine import EngineConfig, LLMEngine
from .gen_defaults import apply_defaults, read_generation_defaults, with_defaults
from .request import RequestOutput, run_to_completion
from .sampling import SamplingParams

log = logging.getLogger(__name__)

Message = dict

# (engine, ParallelState) -> the engine a multi-rank LLM uses: engine/distributed.py's attach (a Driver on rank 0, a
# Follower elsewhere), installed when that module is imported (the dsv3.engine package imports it).
_parallel_engine: Callable[[LLMEngine, Any], Any] | None = None


def set_parallel_engine(factory: Callable[[LLMEngine, Any], Any]) -> None:
    """Install how an LLM given a ParallelState of several ranks wraps its engine (engine/distributed.py does)."""
    global _parallel_engine
    _parallel_engine = factory


class LLM:
    def __init__(self, model: str | os.PathLike | None = None, dtype: str | torch.dtype = "bfloat16",
                 device: str | torch.device = "cpu", fp8_mode: str = "dequantize", with_mtp: bool | None = None,
                 progress: bool | None = None, parallel=None, expert_placement=None, cpu_prepack: bool = True,
                 quantize: str | None = None, **engine_kwargs):
        """model: checkpoint directory or GGUF file (default: the embedded model; docs/gguf.md). cpu_prepack: on the CPU in bf16, pack the
        weights for oneDNN (faster, bit-identical, inference only). engine_kwargs: EngineConfig fields
        (max_model_len, cache_memory_bytes, num_blocks, block_size, max_num_seqs, max_num_batched_tokens, ...).
        parallel: a dsv3.parallel.ParallelState (init_parallel under torchrun): this rank loads only its shard and
        the engine becomes a Driver (rank 0) or a Follower (call llm.engine.run() there), see engine/distributed.py.
        expert_placement: see dsv3.parallel.resolve_placement. quantize: "int8" / "int4" weights, quantised while
        loading (see load_model)."""
        known = {f.name for f in fields(EngineConfig)}
        unknown = sorted(set(engine_kwargs) - known)
        if unknown:
            raise ValueError(f"unknown LLM option(s) {unknown}; engine options are {sorted(known)}")
        if isinstance(engine_kwargs.get("cache_dtype"), str):
            engine_kwargs["cache_dtype"] = parse_dtype(engine_kwargs["cache_dtype"])
        self.path = resolve_model(None if model is None else os.fspath(model))
        # What params=None samples with: the checkpoint's generation_config.json over SamplingParams' defaults
        # (read first, so a bad file fails before the weights load).
        self.generation_defaults = read_generation_defaults(self.path)
        if parallel is not None and parallel.world_size > 1:
            from ..parallel import load_sharded

            self.model = load_sharded(self.path, parallel, dtype=dtype, fp8_mode=fp8_mode, with_mtp=with_mtp,
                                      progress=progress, placement=expert_placement, quantize=quantize)
        else:
            self.model = load_model(self.path, dtype=dtype, device=device, fp8_mode=fp8_mode, with_mtp=with_mtp,
                                    progress=progress, quantize=quantize)
        if cpu_prepack and (parallel is None or parallel.world_size == 1):  # sharded layers keep plain weights
            prepack_for_cpu(self.model)
        self.tokenizer = _load_tokenizer(self.path)
        self.engine = LLMEngine(self.model, self.tokenizer, EngineConfig(**engine_kwargs))
        if parallel is not None and parallel.world_size > 1:
            if _parallel_engine is None:
                raise RuntimeError("no multi-rank engine is installed; import dsv3.engine.distributed first")
            self.engine = _parallel_engine(self.engine, parallel)

    # ------------------------------------------------------------------------------------------------------------
    def generate(self, prompts: str | list[int] | Seq[str | list[int]], params: SamplingParams | Seq[SamplingParams]
                 | None = None) -> list[RequestOutput]:
        """Run prompts (strings or token-id lists) to completion together; outputs in prompt order."""
        single = isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int))
        batch = [prompts] if single else list(prompts)
        if not batch:
            raise ValueError("no prompts given")
        plist = _params_list(params, len(batch), self.generation_defaults)
        for p in plist:  # validate everything before queueing anything
            p.validate()
        return run_to_completion(self.engine, batch, plist)

    def stream(self, prompt: str | list[int], params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Yield one RequestOutput per new token (new_text is the printable delta). Closing the generator early
        cancels the request and frees its cache."""
        rid = self.engine.add_request(prompt, apply_defaults(params, self.generation_defaults))
        finished = False
        try:
            while not finished:
                for out in self.engine.step():
                    if out.request_id == rid:
                        finished = out.finished
                        yield out
        finally:
            if not finished:
                self.engine.abort(rid)

    def chat_prompt(self, messages: list[Message]) -> list[int]:
        if self.tokenizer is None:
            raise ValueError(f"{self.path} has no tokenizer, so chat is not available")
        return self.tokenizer.encode_chat(messages, add_generation_prompt=True)

    def chat(self, messages: list[Message] | Seq[list[Message]], params: SamplingParams | None = None
             ) -> list[RequestOutput]:
        """One conversation (a list of {role, content}) or several; returns the assistant replies."""
        convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        return self.generate([self.chat_prompt(c) for c in convs], params)


    def default_sampling_params(self, **given) -> SamplingParams:
        """SamplingParams from `given`, then the checkpoint's generation_config.json, then SamplingParams'
        defaults (what generate/chat/stream use when params is None)."""
        return with_defaults(self.generation_defaults, **given)


def _params_list(params, n: int, defaults: dict) -> list[SamplingParams]:
    if params is None:
        return [apply_defaults(None, defaults) for _ in range(n)]
    if isinstance(params, SamplingParams):
        return [params] * n
    params = list(params)
    if len(params) != n:
        raise ValueError(f"{len(params)} SamplingParams for {n} prompts")
    return params


def _load_tokenizer(path: str):
    from ..gguf.files import is_gguf_path

    if is_gguf_path(path):
        from ..gguf.files import read_gguf
        from ..gguf.tokenizer import gguf_tokenizer

        return gguf_tokenizer(read_gguf(path))
    if not os.path.exists(os.path.join(path, "tokenizer.json")):
        log.warning("%s has no tokenizer.json: prompts must be token ids", path)
        return None
    from ..tokenizer import Tokenizer

    return Tokenizer.from_pretrained(path)
