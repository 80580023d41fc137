"""Running llama.cpp's GGUF files (architecture deepseek2) directly: files.py reads and checks them, config.py maps
the metadata to ModelConfig, names.py the tensor names, blocks.py repacks the block formats losslessly into dsv3's
quantised weights, load.py loads a model, tokenizer.py builds the tokenizer from the metadata. docs/gguf.md."""
from .config import gguf_config
from .files import GGUFError, GGUFModel, gguf_parts, is_gguf_path, read_gguf
from .load import load_gguf_model, open_gguf

__all__ = ["GGUFError", "GGUFModel", "gguf_config", "gguf_parts", "is_gguf_path", "load_gguf_model", "open_gguf",
           "read_gguf"]
