"""The generation engine: sampling, latent KV cache, scheduler, LLM."""
from .sampling import SamplingParams

__all__ = ["SamplingParams"]
