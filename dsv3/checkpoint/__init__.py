"""Hugging Face safetensors checkpoints <-> the model, one module a job:

  layout.py   a checkpoint on disk: shard index, validated headers, the tensor inventory (no data read)
  fp8.py      the official FP8 format: which projections, their block scales, quantization_config
  quantized.py  dsv3's int8/int4 format (`dsv3 quantize`): codes + float16 group scales, quantization_config
  targets.py  model tensor <- checkpoint tensor(s) (experts stacked into [E, ...]), every check before a byte is read
  reader.py   windows of tensor bytes into place, converting dtypes / dequantising FP8 through a small staging buffer
  load.py     load_model / load_weights: build on the meta device, plan, stream (quantize= int8/int4 on the way)
  write.py    save_model / write_checkpoint / output_directory: sharded safetensors written under temporary names

Peak memory while loading is the loaded model plus a few MB; only the bytes of loaded tensors are read; nothing
here unpickles. A new weight format is a sibling module that plugs into targets.py (what a tensor may be stored as)
and reader.py/load.py (how its bytes become the model's tensors).
"""
from .layout import CheckpointError, CheckpointLayout
from .load import load_model, load_weights, model_bytes, open_checkpoint
from .write import output_directory, save_model, write_checkpoint

__all__ = ["CheckpointError", "CheckpointLayout", "load_model", "load_weights", "model_bytes", "open_checkpoint",
           "output_directory", "save_model", "write_checkpoint"]
