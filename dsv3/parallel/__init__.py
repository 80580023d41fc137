"""Tensor and expert parallelism on torch.distributed (docs/parallel.md). This package file owns nothing but the
public API, re-exported from its modules:

  state.py     process groups and parallel state: ParallelState, ParallelError, init_parallel, resolve_sizes, split
  layers.py    the parallel layers (TP linears, vocabulary-parallel embedding and head, the rank's MoE part)
  experts.py   expert placement: which routed experts each EP rank holds
  loading.py   sharding a meta-device model and loading a rank's slices from a Hugging Face checkpoint

Rank layout: rank = ep_rank * tp + tp_rank; every rank sees every token of a step. Attention heads, dense MLPs and
the vocabulary split over the TP group; routed experts over the EP ranks, each expert's width over TP; the shared
experts' width over all ranks. The latent cache is replicated. Sharding happens on the meta-device model before
loading, so a rank allocates and reads only its own slices; FP8 scales are sliced with the weights.
"""
from .experts import (Placement, balanced_placement, check_placement, contiguous_placement, placement_report,
                      rank_loads, record_expert_loads, resolve_placement)
from .layers import (ParallelExperts, ParallelHead, ParallelMoE, RowParallelLinear, TiedParallelHead,
                     VocabParallelEmbedding, split_mlp)
from .loading import load_sharded, shard_model
from .state import (DEFAULT_TIMEOUT_S, GROUPS, CommStats, ParallelError, ParallelState, init_parallel, resolve_sizes,
                    split)

__all__ = [
    "CommStats", "DEFAULT_TIMEOUT_S", "GROUPS", "ParallelError", "ParallelExperts", "ParallelHead", "ParallelMoE",
    "ParallelState", "Placement", "RowParallelLinear", "TiedParallelHead", "VocabParallelEmbedding",
    "balanced_placement", "check_placement", "contiguous_placement", "init_parallel", "load_sharded",
    "placement_report", "rank_loads", "record_expert_loads", "resolve_placement", "resolve_sizes", "shard_model",
    "split", "split_mlp",
]
