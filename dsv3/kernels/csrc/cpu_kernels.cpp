// dsv3 CPU kernels for bf16 inference: the decode-critical pieces of a layer as single calls.
//
// Compiled on first use by dsv3/kernels/cpu_ext.py (torch.utils.cpp_extension, -O3 -march=native, AVX-512 CPUs) and
// registered as torch.ops.dsv3_cpu.*. Each op replaces a chain of small PyTorch ops whose dispatch cost, not arithmetic,
// dominates a decode step on the CPU:
//   pack/linear  bf16 products against weights packed once in a pair-interleaved layout (decode shapes stream the
//                weights at memory bandwidth);
//   rms_norm     RMSNorm with the reference rounding (statistics in float32, scaled in bf16);
//   mla_prepare  rotary on the queries (in place), kv_a_layernorm + rotary on the new latent, written to the cache;
//   mla_decode   absorbed MLA attention of query rows straight from the latent cache through slot tables
//                (online softmax, no gathered context, no per-head expansion);
//   moe          router (sigmoid/softmax, bias for selection only, group-limited top-k) + routed and shared experts
//                as bf16 dot products over only the experts hit, weights read once per call;
//   decode_layer a whole decoder block (the ops above in Block.forward's order) for steps made only of decode and
//                verification rows.
// Every output is computed in an order that does not depend on the other rows of the call (batch invariance).
// Dimension letters: T tokens, D hidden, E experts, K experts per token, I expert intermediate, H heads,
// N/R/V head dims (nope, rope, value), C kv_lora_rank, W = C + R, Q query rows, B sequences, Lm context slots.
// The Python implementations in dsv3/model/ stay the oracle: tests/test_cpu_kernels.py checks every op against them.

// The source is split by kernel family into headers included here (one translation unit, so the compiler inlines
// across them as before): common.h (conversions, checks, vector helpers), packed.h (the packed layout and its tile
// products), attention.h (RMSNorm, MLA), products.h (MoE, MLP, linear), sampling.h, block.h (the decoder-block
// runner, MTP drafting). cpu_ext.py builds this file and hashes every file of csrc/ into the build key.

// The op namespace; test builds of other instruction-set variants register under their own name.
#ifndef DSV3_NS
#define DSV3_NS dsv3_cpu
#endif
#define DSV3_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
#define DSV3_STR2(x) #x
#define DSV3_STR(x) DSV3_STR2(x)

#include "block.h"

namespace {


std::string capability() {
#if defined(__AVX512BF16__)
  return "avx512_bf16";
#elif defined(DSV3_AVX512)
  return "avx512";
#else
  return "avx2";
#endif
}

}  // namespace

DSV3_LIBRARY(DSV3_NS, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor", &rms_norm);
  m.def("mla_prepare(Tensor(a!) q, Tensor kv_a, Tensor norm_w, float eps, Tensor cos, Tensor sin, Tensor(b!) cache, "
        "Tensor slot_mapping, int nope) -> ()", &mla_prepare);
  m.def("mla_decode(Tensor q, Tensor kv, Tensor tok, Tensor seq, Tensor len, Tensor slots, Tensor kv_b, int v_dim, "
        "float scale, Tensor(a!) out, Tensor? kv_b_scales=None) -> ()", &mla_decode);
  m.def("pack(Tensor w) -> Tensor", &pack);
  m.def("linear(Tensor x, Tensor w, int out_features) -> Tensor",
        [](const at::Tensor& x, const at::Tensor& w, int64_t R) { return linear(x, w, R); });
  m.def("linear_f32(Tensor x, Tensor w, int out_features) -> Tensor",
        [](const at::Tensor& x, const at::Tensor& w, int64_t R) { return linear(x, w, R, true); });
  m.def("moe(Tensor x, Tensor gate_w, Tensor? bias, int top_k, int n_group, int topk_group, int group_rule, "
        "bool softmax, bool norm_topk, float scale, Tensor w13, Tensor w2, int inter, Tensor? shared_w13, "
        "Tensor? shared_w2, int shared_inter) -> Tensor", &moe);
  m.def("decode_layer(Tensor x, Tensor[] w, int[] dims, float[] scal, Tensor(a!) cache, Tensor slot_mapping, "
        "Tensor tok, Tensor seq, Tensor len, Tensor slots, Tensor cos, Tensor sin) -> Tensor", &decode_layer);
  m.class_<Blocks>("Blocks").def(torch::init<std::vector<at::Tensor>, std::vector<int64_t>, std::vector<int64_t>,
                                              std::vector<double>, std::vector<int64_t>>());
  m.def("register_blocks(__torch__.torch.classes." DSV3_STR(DSV3_NS) ".Blocks blocks) -> int", &register_blocks);
  m.def("run_blocks(int blocks, Tensor x, Tensor(a!) kv_all, "
        "int layer_offset, Tensor slot_mapping, Tensor tok, Tensor seq, Tensor len, Tensor slots, Tensor cos, Tensor sin, "
        "Tensor? keep=None) -> Tensor",
        &run_blocks);
  m.def("run_model(int blocks, Tensor ids, Tensor positions, Tensor embed, Tensor cos_table, Tensor sin_table, "
        "Tensor norm, float eps, Tensor(a!) kv_all, int layer_offset, Tensor slot_mapping, Tensor tok, Tensor seq, "
        "Tensor len, Tensor slots, Tensor? head=None, int vocab=0, int[]? logit_rows=None) "
        "-> (Tensor, Tensor, Tensor, Tensor)", &run_model);
  m.def("mtp_draft(int mtp, Tensor embed, Tensor enorm, "
        "Tensor hnorm, Tensor eh_proj, Tensor head_norm, Tensor lm_head, int vocab, float eps, Tensor h, "
        "Tensor next_ids, Tensor(a!) kv_all, int layer_offset, Tensor slot_mapping, Tensor tok, Tensor seq, "
        "Tensor len, Tensor slots, Tensor cos, Tensor sin, Tensor? keep=None, bool return_logits=False, "
        "float[]? temperatures=None, Tensor? u=None) -> (Tensor, Tensor, Tensor)", &mtp_draft);
  m.def("store_latents(Tensor kv_a, Tensor norm_w, float eps, Tensor cos, Tensor sin, Tensor(a!) cache, "
        "Tensor slot_mapping) -> ()", &store_latents);
  m.def("argmax_rows(Tensor x) -> Tensor", &argmax_rows);
  m.def("mask_logits(Tensor(a!) logits, Tensor bitmask) -> ()", &mask_logits);
  m.def("draw_inverse_cdf(Tensor probs, Tensor u) -> Tensor", &draw_inverse_cdf);
  m.def("tempered_softmax(Tensor x, float t) -> Tensor", &tempered_softmax);
  m.def("speculative_accept(Tensor p, Tensor[] q, int[] drafts, int[] counts, Tensor u) -> (int[], int[])",
        &speculative_accept);
  m.def("section_times() -> float[]", &section_times);
  m.def("capability() -> str", &capability);
}
