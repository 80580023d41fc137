"""Deployment planner: memory, layouts and speed bounds for a model of the family on given hardware
(docs/plan.md states every formula and assumption). This package file owns nothing but the public API:

  inventory.py   the tensor inventory and byte model (tensors, bytes per precision, cache and checkpoint sizes)
  layouts.py     the layouts (GPUs / CPU offload / CPU, precision, the choice) and plan(), the report dict
  rendering.py   render(), the text report

Pure arithmetic on a ModelConfig and hardware figures. `plan()` returns a dict with stable keys (what `dsv3 plan
--json` prints); `render()` turns it into the text report.
"""
from .inventory import (CACHE_DTYPES, COMPONENTS, FP8_BLOCK, HEAD_PRECISION, PRECISIONS, QUANT_GROUP,
                        QUANT_PRECISIONS, ModelTotals, Tensor, expected_experts_touched, linear_bytes, model_tensors,
                        predicted_cache_bytes, predicted_checkpoint_bytes, predicted_weight_bytes, tensor_bytes)
from .layouts import PlanRequest, plan
from .rendering import render

__all__ = [
    "CACHE_DTYPES", "COMPONENTS", "FP8_BLOCK", "HEAD_PRECISION", "PRECISIONS", "QUANT_GROUP", "QUANT_PRECISIONS",
    "ModelTotals", "PlanRequest", "Tensor", "expected_experts_touched", "linear_bytes", "model_tensors", "plan",
    "predicted_cache_bytes", "predicted_checkpoint_bytes", "predicted_weight_bytes", "render", "tensor_bytes",
]
