"""CPU inference: weights pre-packed once after loading, with projections that read the same input fused into one
matrix (q_a + kv_a, gate + up).

On the CPU, torch's plain bf16 matmul is slow for the skinny shapes of decoding (a few rows against a large weight).
Two packed forms, both applied in place:
- the C++ kernels' layout (kernels/cpu_ext.py, x86 machines with AVX-512 or AVX2+FMA): every projection, and each
  MoE layer as a single call (router, hit experts, shared experts); 2x faster than oneDNN for decode shapes, within
  ~10% for prefill. int8/int4 weights (kernels/quant.py) become the kernels' quantised blobs (quant_cpu.py), except
  kv_b_proj, whose codes the absorbed attention reads and widens to bf16 one head at a time (a scheme it cannot
  read is dequantised to bf16 here, exactly);
- oneDNN's blocked layout where the kernels cannot be built (bf16 models only; int8/int4 ones then keep the PyTorch
  reference products): 1.5-3x faster than plain matmuls and bit-identical to them (checked in the tests).
The plain weights are then dropped so memory does not double, which makes the packed model an inference-only object
(saving or re-slicing it needs a fresh load).
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from . import fp8, quant_cpu

log = logging.getLogger(__name__)

PACKABLE_DTYPES = (torch.bfloat16,)


class OneDNNWeight:
    """A weight [O, I] in oneDNN's blocked layout; calling it computes x [..., I] -> [..., O]."""

    def __init__(self, w: torch.Tensor):
        self.t = torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.t, None, "none", [None], "")


class KernelWeight:
    """A weight [O, I] in the C++ kernels' layout (bf16 packed, or an int8/int4 blob: quant_cpu.kernel_matrix);
    calling it computes x [..., I] -> [..., O] (rows of a 2-D x may be strided, e.g. a slice of a fused
    projection's output)."""

    def __init__(self, ops, t: torch.Tensor, out_features: int):
        self.ops, self.t, self.out_features = ops, t, out_features

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ops.linear(x.reshape(-1, x.shape[-1]), self.t, self.out_features)
        return y.view(*x.shape[:-1], self.out_features)


def available(dtype: torch.dtype) -> bool:
    if dtype not in PACKABLE_DTYPES or not torch.backends.mkldnn.is_available():
        return False
    try:
        w = torch.randn(8, 16).to(dtype)
        x = torch.randn(2, 16).to(dtype)
        return torch.equal(OneDNNWeight(w)(x), torch.nn.functional.linear(x, w))
    except (RuntimeError, AttributeError):
        return False


class CpuBlocks:
    """Packed decoder blocks run by one C++ call (run_blocks -> block_forward in kernels/csrc/cpu_kernels.cpp) in
    steps whose every query row goes through the kernel's attention tables: the main model's blocks (from
    Transformer.hidden_states) or one MTP block (from Block.forward). Their tensors are handed to C++ once, here."""

    def __init__(self, ops, blocks: list[nn.Module], cfg):
        w_flat, counts, dims, scal, cache_layers = [], [], [], [], []
        for block in blocks:
            w, d, sc = self._describe(block, cfg)
            w_flat += w
            counts.append(len(w))
            dims += d
            scal += sc
            cache_layers.append(block.layer_idx)
        self.ops = ops
        self.handle = getattr(torch.classes, ops.name).Blocks(w_flat, counts, dims, scal, cache_layers)  # owns them
        self.id = ops.register_blocks(self.handle)  # what the ops take (cheaper to pass than the object)

    @staticmethod
    def _describe(block: nn.Module, cfg) -> tuple[list[torch.Tensor], list[int], list[float]]:
        """One block's tensors, dims and scalars in block_forward's order (see the C++ comment there)."""
        a = block.self_attn
        empty = torch.empty(0, dtype=torch.bfloat16)
        q_lora = cfg.q_lora_rank or 0
        if q_lora:
            proj = [a.packed_qkv_a.t, empty, a.q_a_layernorm.weight, a.q_b_proj.packed.t]
        else:
            proj = [a.q_proj.packed.t, a.kv_a_proj_with_mqa.packed.t, empty, empty]
        kv_b, kv_b_scales = kv_b_args(a.kv_b_proj)
        w = [block.input_layernorm.weight, *proj, a.kv_a_layernorm.weight, kv_b, a.o_proj.packed.t,
             block.post_attention_layernorm.weight]
        mlp = block.mlp
        moe = getattr(mlp, "cpu_moe", None)
        if moe is not None:
            shared = moe.shared or (empty, empty)
            w += [moe.gate, moe.bias if moe.bias is not None else torch.empty(0), moe.w13, moe.w2, *shared]
            k, n_group, topk_group, rule, softmax, norm_topk, scaling = moe.args
            ffn = [1, k, n_group, topk_group, rule, int(softmax), int(norm_topk), moe.inter, moe.shared_inter]
        else:
            w += [mlp.packed_gate_up.t, mlp.down_proj.packed.t]
            ffn, scaling = [0, 0, 0, 0, 0, 0, 0, mlp.down_proj.in_features, 0], 1.0
        if kv_b_scales is not None:
            w.append(kv_b_scales)  # after the block's other tensors (block_forward's order)
        dims = [a.n_heads, a.nope, a.rope, a.v_dim, a.rank, q_lora, *ffn]
        scal = [block.input_layernorm.eps, a.kv_a_layernorm.eps, a.softmax_scale, scaling]
        return w, dims, scal

    def __call__(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx,
                 keep: torch.Tensor | None = None) -> torch.Tensor:
        """x [1, T, D], cos/sin [1, T, P], ctx: the engine's StepContext -> [1, T, D]; with keep [K] (increasing
        rows) every row's latents are stored but the last block goes on for the kept rows only -> [1, K, D]."""
        k = ctx.kernel_rows
        T = x.shape[1]
        y = self.ops.run_blocks(self.id, x.reshape(T, -1), ctx.cache.kv, ctx.layer_offset, ctx.slot_mapping,
                                k.tok, k.seq, k.len, k.slots, cos.reshape(T, -1), sin.reshape(T, -1), keep)
        return y[None]


class CpuModelStep:
    """A step of the main model whose rows all go through the kernel's attention tables as one C++ call (run_model):
    embedding, rotary tables, every block, the final norm and, when the head is packed, the wanted rows' logits.
    It computes exactly what Transformer.hidden_states + logits compute there, without their Python calls."""

    def __init__(self, ops, model: nn.Module):
        self.ops, self.rotary, self.blocks = ops, model.rotary, model.cpu_blocks
        head = model.lm_head
        self.head = head.packed.t if head is not None and isinstance(head.packed, KernelWeight) else None
        norm = model.model.norm
        self.args = (model.model.embed_tokens.weight, norm.weight, norm.eps)
        self.vocab = model.cfg.vocab_size

    @staticmethod
    def applies(model: nn.Module) -> bool:
        """Whether run_model takes this model's tensors as they are (bf16 embedding and final norm)."""
        return (model.model.embed_tokens.weight.dtype == torch.bfloat16
                and model.model.embed_tokens.weight.is_contiguous()
                and model.model.norm.weight.dtype == torch.bfloat16)

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx,
                 logit_rows: list[int] | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """input_ids, positions [1, T] (contiguous rows), ctx: a kernel-only StepContext (its max_position set),
        logit_rows: the rows whose logits are wanted (None: all) -> (h [T, D] after the final norm, logits [K, V]
        float32, or None without a packed head). Sets ctx.rope for an MTP pass over the same rows."""
        k = ctx.kernel_rows
        cos_t, sin_t = self.rotary.tables(ctx.max_position + 1)
        embed, norm, eps = self.args
        h, cos, sin, logits = self.ops.run_model(
            self.blocks.id, input_ids[0], positions[0], embed, cos_t, sin_t, norm, eps, ctx.cache.kv,
            ctx.layer_offset, ctx.slot_mapping, k.tok, k.seq, k.len, k.slots, self.head, self.vocab, logit_rows)
        ctx.rope = (cos, sin)
        return h, (logits if self.head is not None else None)


class CpuMtpDraft:
    """Drafting with MTP module 1 as one C++ call (mtp_draft): embedding, the two input norms, eh_proj, the MTP
    block, its head norm and the shared LM head, then each row's draft (argmax, or a draw at a temperature)."""

    def __init__(self, ops, model: nn.Module):
        mtp = model.mtp_layers[0]
        self.ops, self.rotary = ops, model.rotary
        self.layer = mtp.cpu_layer  # (holding it keeps its registered blocks alive)
        self.args = (model.model.embed_tokens.weight, mtp.enorm.weight, mtp.hnorm.weight, mtp.eh_proj.packed.t,
                     mtp.shared_head.norm.weight, model.lm_head.packed.t, model.cfg.vocab_size, mtp.enorm.eps)

    def __call__(self, h: torch.Tensor, next_ids: torch.Tensor, positions: torch.Tensor, ctx,
                 keep: torch.Tensor | None = None, logits: bool = False, temperatures: list[float] | None = None,
                 u: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """h [T, D] (the main model's final hidden states), next_ids [T], positions [1, T] -> (draft ids [T], the
        logits [T, V] bf16 when asked for (else None), the MTP block's output [T, D]); with keep [K] (increasing),
        every row's MTP latents are stored but attention, the block's FFN and the head run for the kept rows
        alone, and the outputs have K rows. Drafts are the argmaxes, unless temperatures (one per output row, 0 =
        greedy) and u [K] are given: then rows with a temperature draw from q = softmax(logits / t) with their u,
        and the second output is q [K, V] float32 instead of the logits (sampling.tempered_softmax and
        draw_inverse_cdf's values, in the same call)."""
        k = ctx.kernel_rows
        rope = getattr(ctx, "rope", None)  # the step's own tables when this pass follows it over the same rows
        cos, sin = rope if rope is not None else self.rotary.cos_sin(positions[0])
        ids, second, out = self.ops.mtp_draft(self.layer.id, *self.args, h.contiguous(), next_ids.contiguous(),
                                              ctx.cache.kv, ctx.layer_offset, ctx.slot_mapping, k.tok, k.seq, k.len,
                                              k.slots, cos, sin, keep, logits, temperatures, u)
        return ids, (second if logits or temperatures is not None else None), out


def _drop(param_owner: nn.Module, name: str = "weight") -> None:
    p = getattr(param_owner, name)
    setattr(param_owner, name, nn.Parameter(p.new_empty(0), requires_grad=False))
    if getattr(param_owner, "weight_scale", None) is not None:  # int8/int4 group scales: now inside the blob
        param_owner.weight_scale = None


def _dequantize(lin: nn.Module, dtype: torch.dtype) -> None:
    """Make a quantised Linear hold its exact dequantised weight in dtype instead (a no-op for a plain one)."""
    if lin.quant is None:
        return
    w = lin.effective_weight(dtype)
    lin._parameters["weight"] = nn.Parameter(w, requires_grad=False)
    lin.weight_scale = None
    lin.quant = None


def kv_b_codes_readable(lin: nn.Module) -> bool:
    """Whether the C++ absorbed attention (mla_decode) reads this quantised kv_b_proj as it is: groups of 32 along
    the latent dimension, 4-bit codes packed two to a byte or 8-bit ones, float16 scales or float32 scales (and
    mins); anything else (GGUF's 16-wide Q6_K groups, ...) is dequantised to bf16 at packing."""
    s = lin.quant
    if s is None or s.group_size != 32 or lin.weight_scale is None or not lin.weight.is_contiguous():
        return False
    codes = {4: torch.uint8, 8: torch.int8}.get(s.bits)
    return (codes is not None and lin.weight.dtype == codes and lin.weight_scale.is_contiguous()
            and (s.scale_dtype == torch.float32 or (s.scale_dtype == torch.float16 and not s.with_min)))


def kv_b_args(lin: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """kv_b_proj as mla_decode takes it: (bf16 weight, None) or (codes, scales)."""
    return (lin.weight, lin.weight_scale) if lin.quant is not None else (lin.weight, None)


def _is_kv_b(model: nn.Module, lin: nn.Module) -> bool:
    """Whether lin is a kv_b_proj: whatever its scheme, packing never needs the quantised kernels for it (the absorbed
    attention reads its codes, or it is dequantised to the compute dtype)."""
    return any(getattr(b.self_attn, "kv_b_proj", None) is lin for b in list(model.main_layers) + list(model.mtp_layers))


@torch.no_grad()
def prepack_for_cpu(model: nn.Module, kernels: bool = True) -> bool:
    """Pack a loaded CPU model in place; returns False (and changes nothing) when packing is unavailable for its
    dtype or the model holds FP8 weights. kernels: use the C++ CPU kernels (kernels/cpu_ext.py) when they can be
    built here (projections, MoE layers, norms and decode attention); otherwise, or with kernels=False, oneDNN."""
    from ..model.layers import MLP, Linear, RMSNorm
    from ..model.mla import MLA
    from ..model.moe import MoE, CpuMoE, Experts, StackedLinear

    dtype = model.model.embed_tokens.weight.dtype
    if model.model.embed_tokens.weight.device.type != "cpu" or dtype not in PACKABLE_DTYPES:
        return False
    linears = [m for m in model.modules() if isinstance(m, (Linear, StackedLinear))]
    if any(m.weight.dtype == fp8.FP8_DTYPE for m in linears):
        return False
    quantised = any(m.quant is not None for m in linears)
    # Weights in a scheme the kernels do not run (GGUF's K-quants) stay on the exact PyTorch reference: inside a
    # decoder block that means no packing at all (the C++ block call needs every weight of a block in its layout);
    # the head and MTP's eh_proj are separate calls, so only they are left unpacked.
    standalone = {id(model.lm_head)} | {id(m.eh_proj) for m in model.mtp_layers}
    foreign = [m for m in linears if m.quant is not None and not quant_cpu.supported(m.quant)]
    if any(id(m) not in standalone for m in foreign if not _is_kv_b(model, m)):
        log.info("not packing for the CPU kernels: the model holds %s weights, which the kernels do not run; they "
                 "run on the exact (slower) PyTorch reference", ", ".join(sorted({m.quant.name for m in foreign})))
        return False
    unpacked = {id(m) for m in foreign}
    ops = None
    if kernels:
        from . import cpu_ext

        ops = cpu_ext.load()
    if ops is None and (quantised or not available(dtype)):  # oneDNN's bf16 layout needs AVX-512 (or AVX-NE-CONVERT)
        return False

    def pack(*lins: nn.Module):
        """One packed matrix for the projections `lins` (their outputs stacked along the rows), their weights dropped."""
        rows = sum(lin.out_features for lin in lins)
        if ops is None:
            p = OneDNNWeight(torch.cat([lin.weight for lin in lins]))
        else:
            p = KernelWeight(ops, quant_cpu.kernel_matrix(ops, list(lins)), rows)
        for lin in lins:
            _drop(lin)
        return p

    handled: set[int] = set()  # modules whose weights the C++ MoE kernel owns
    if ops is not None:
        for m in model.modules():
            if isinstance(m, MoE):
                m.cpu_moe = CpuMoE(ops, m, model.cfg)
                owned = [m.gate, m.experts.gate_proj, m.experts.up_proj, m.experts.down_proj]
                if m.shared_experts is not None:
                    owned += [m.shared_experts.gate_proj, m.shared_experts.up_proj, m.shared_experts.down_proj]
                    handled.add(id(m.shared_experts))
                handled.add(id(m.experts))
                for lin in owned:
                    _drop(lin)
                    handled.add(id(lin))
            elif isinstance(m, (RMSNorm, MLA)):
                m.cpu_ops = ops
    for m in model.modules():
        if id(m) in handled:
            continue
        if isinstance(m, MLA):
            if hasattr(m, "q_a_proj"):
                m.packed_qkv_a = pack(m.q_a_proj, m.kv_a_proj_with_mqa)
            for lin in (getattr(m, "q_proj", None), getattr(m, "q_b_proj", None), m.o_proj):
                if lin is not None:
                    lin.packed = pack(lin)
            if ops is None or not kv_b_codes_readable(m.kv_b_proj):
                _dequantize(m.kv_b_proj, dtype)  # plain: the absorbed attention splits it per head
            # (else it keeps its codes: the C++ attention widens one head at a time, the PyTorch path dequantises)
        elif isinstance(m, MLP):
            m.packed_gate_up = pack(m.gate_proj, m.up_proj)
            m.down_proj.packed = pack(m.down_proj)
        elif isinstance(m, Experts):
            g, u, d = m.gate_proj.weight, m.up_proj.weight, m.down_proj.weight
            m.packed = [(OneDNNWeight(torch.cat([g[e], u[e]])), OneDNNWeight(d[e])) for e in range(m.n_experts)]
            for lin in (m.gate_proj, m.up_proj, m.down_proj):
                _drop(lin)
    for name, m in model.named_modules():  # the rest (lm_head, MTP eh_proj); kv_b_proj is split per head instead
        if (isinstance(m, Linear) and id(m) not in handled and m.packed is None and m.weight.numel()
                and not name.endswith("kv_b_proj") and id(m) not in unpacked):
            m.packed = pack(m)
    if ops is not None:
        model.cpu_blocks = CpuBlocks(ops, model.main_layers, model.cfg)
        if CpuModelStep.applies(model):
            model.cpu_model_step = CpuModelStep(ops, model)
        for m in model.mtp_layers:
            m.cpu_layer = CpuBlocks(ops, [m], model.cfg)
        if (model.mtp_layers and model.lm_head is not None and model.lm_head.packed is not None
                and all(m.eh_proj.packed is not None for m in model.mtp_layers)):  # (a tied head stays plain)
            model.cpu_mtp_draft = CpuMtpDraft(ops, model)
    model.prepacked = True
    model.cpu_kernels = ops is not None
    log.info("packed the model's projections for %s", "the C++ CPU kernels (projections, MoE layers, norms, decode "
             "attention)" if ops is not None else "oneDNN CPU matmuls")
    return True


def resident_weight_bytes(model: nn.Module) -> int:
    """Bytes of weights a model holds, packed or not: its parameters and buffers plus every tensor the packed forms
    keep (oneDNN layouts, the C++ kernels' panels and quantised blobs, the MoE and block tables), each storage
    counted once."""
    seen: dict[int, int] = {}
    visited: set[int] = set()

    def walk(v) -> None:
        if id(v) in visited:
            return
        visited.add(id(v))
        if isinstance(v, torch.Tensor):
            if v.numel() and v.device.type != "meta":
                seen.setdefault(v.untyped_storage().data_ptr(), v.untyped_storage().nbytes())
        elif isinstance(v, (list, tuple)):
            for x in v:
                walk(x)
        elif isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, nn.Module):
            for t in list(v.parameters(recurse=False)) + list(v.buffers(recurse=False)):
                walk(t)
            for k, x in vars(v).items():
                if k not in ("_parameters", "_buffers", "_modules"):
                    walk(x)
            for c in v.children():
                walk(c)
        elif hasattr(v, "__dict__") and type(v).__module__.startswith("dsv3."):
            for x in vars(v).values():
                walk(x)

    walk(model)
    return sum(seen.values())
