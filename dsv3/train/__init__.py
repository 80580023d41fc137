"""Training with DeepSeek-V3's recipe: auxiliary-loss-free balancing, the sequence-wise balance loss and MTP.

`train(TrainConfig(...))` or `train({...})`; `dsv3 train` on the command line. See docs/training.md.
"""
from .trainer import TrainConfig, evaluate, lr_at, train

__all__ = ["TrainConfig", "train", "evaluate", "lr_at"]
