"""dsv3: run, serve, plan and train the DeepSeek-V3 model family."""
from .config import ModelConfig
from .engine.llm import LLM
from .engine.sampling import SamplingParams
from .checkpoint import CheckpointError, load_model, save_model

__version__ = "0.1.0"
__all__ = ["ModelConfig", "LLM", "SamplingParams", "load_model", "save_model", "CheckpointError"]
