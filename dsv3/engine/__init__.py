"""The generation engine: sampling, latent KV cache, scheduler, LLMEngine, LLM, the torchrun lockstep.

The package itself owns only its wiring: it exports SamplingParams and imports engine/distributed.py, which
installs the multi-rank engine into LLM (llm.set_parallel_engine), so that LLM(parallel=...) works however the
engine is imported while llm.py never imports distributed.py.
"""
from . import distributed  # noqa: F401  (installs the multi-rank engine into LLM: llm.set_parallel_engine)
from .sampling import SamplingParams

__all__ = ["SamplingParams"]
