// The block runner: one decoder block per call (block_forward, decode_layer), the registered packed blocks of a
// model (Blocks, run_blocks), MTP drafting in one call (mtp_draft), and the profiling build's section timers.
#pragma once

#include "attention.h"
#include "products.h"
#include "sampling.h"

namespace {

// Section timers of block_forward for profiling builds (cpu_ext.build("dsv3_cpu_timing", ("-DDSV3_TIMING",))):
// section_times() returns the seconds spent per section since the last call; normal builds have no timers and say so.
constexpr int kSections = 8;  // norm+qkv, latents, q (norm, q_b, rope), attention, o_proj+add, norm, ffn, add
#ifdef DSV3_TIMING
std::array<double, kSections> g_section_s{};
struct SectionClock {
  std::chrono::steady_clock::time_point t = std::chrono::steady_clock::now();
  void lap(int i) {
    const auto now = std::chrono::steady_clock::now();
    g_section_s[i] += std::chrono::duration<double>(now - t).count();
    t = now;
  }
};
#else
struct SectionClock {
  void lap(int) {}
};
#endif

std::vector<double> section_times() {
#ifdef DSV3_TIMING
  std::vector<double> out(g_section_s.begin(), g_section_s.end());
  g_section_s.fill(0);
  return out;
#else
  TORCH_CHECK(false, "section_times: this build has no section timers; build the profiling variant with "
              "cpu_ext.build(\"dsv3_cpu_timing\", (\"-DDSV3_TIMING\",)) (benchmarks/cpu_sections.py does)");
#endif
}

// The query tables of mla_decode restricted to the tokens in keep [K] (increasing token indices of x), renumbered
// to 0..K-1: the queries of kept tokens only, in their order.
struct KeptQueries {
  at::Tensor tok, seq, len;
};

KeptQueries kept_queries(const at::Tensor& keep, int64_t T, const at::Tensor& tok, const at::Tensor& seq,
                         const at::Tensor& len) {
  check_index(keep, "keep", 1);
  const int64_t K = keep.size(0);
  const int64_t* kp = keep.data_ptr<int64_t>();
  std::vector<int64_t> where(T, -1);
  for (int64_t i = 0; i < K; ++i) {
    TORCH_CHECK(kp[i] >= 0 && kp[i] < T && (i == 0 || kp[i] > kp[i - 1]), "keep: rows must be increasing and in [0, ",
                T, "), got ", keep);
    where[kp[i]] = i;
  }
  const int64_t Q = tok.size(0);
  const int64_t* tk = tok.data_ptr<int64_t>();
  int64_t n = 0;
  for (int64_t i = 0; i < Q; ++i) {
    TORCH_CHECK(tk[i] >= 0 && tk[i] < T, "keep: query ", i, " has token ", tk[i], " outside the step's ", T);
    n += where[tk[i]] >= 0;
  }
  KeptQueries out{at::empty({n}, tok.options()), at::empty({n}, tok.options()), at::empty({n}, tok.options())};
  int64_t* t2 = out.tok.data_ptr<int64_t>();
  int64_t* s2 = out.seq.data_ptr<int64_t>();
  int64_t* l2 = out.len.data_ptr<int64_t>();
  for (int64_t i = 0, j = 0; i < Q; ++i)
    if (where[tk[i]] >= 0) {
      t2[j] = where[tk[i]];
      s2[j] = seq.data_ptr<int64_t>()[i];
      l2[j++] = len.data_ptr<int64_t>()[i];
    }
  return out;
}

// Rows `rows` of a 2-D tensor whose rows are contiguous (any row stride) as a new contiguous [K, cols] tensor: a
// copy per row (the kept rows of a step are few; index_select's dispatch costs more than the copies).
at::Tensor take_rows(const at::Tensor& t, const at::Tensor& rows) {
  TORCH_CHECK(t.dim() == 2 && t.stride(1) == 1, "take_rows: rows must be contiguous");
  const int64_t K = rows.size(0), cols = t.size(1), bytes = cols * t.element_size();
  at::Tensor out = at::empty({K, cols}, t.options());
  const char* src = static_cast<const char*>(t.data_ptr());
  char* dst = static_cast<char*>(out.data_ptr());
  const int64_t* r = rows.data_ptr<int64_t>();
  for (int64_t i = 0; i < K; ++i) std::memcpy(dst + i * bytes, src + r[i] * t.stride(0) * t.element_size(), bytes);
  return out;
}

// One decoder block for a step whose every query row attends through the kernel tables (decode, verification and
// drafting steps): x [T, D] -> x + attn(norm(x)) + ffn(norm(...)), the same sequence of operations as Block.forward
// with the ops above, in one call. keep (optional, [K] increasing rows): every row's latents go to the cache, but
// only the kept rows are attended and go on through the block; returns [K, D] (an MTP block needs the output of the
// row it drafts from only, while later steps attend to the latents of every verified row).
// The layer's tensors come in `w` in this order:
//   0 input_layernorm, 1 [q_a; kv_a] packed (or q_proj packed when q_lora = 0), 2 kv_a packed (q_lora = 0 only),
//   3 q_a_layernorm, 4 q_b packed, 5 kv_a_layernorm, 6 kv_b_proj (bf16 or codes), 7 o_proj packed,
//   8 post_attention_layernorm,
//   MoE: 9 gate, 10 bias (or empty), 11 w13, 12 w2, 13 shared w13 (or empty), 14 shared w2 (or empty);
//   dense: 9 gate_up packed, 10 down packed;
//   then, for a quantised kv_b_proj (6 its codes), its scales (mla_decode's kv_b_scales).
// dims: H, N, R, V, C, q_lora, is_moe, top_k, n_group, topk_group, group_rule, softmax, norm_topk, inter,
// shared_inter. scal: rms eps, latent eps, softmax scale, routed scaling factor.
// A block's packed matrices, parsed from their tensors (w, dims as block_forward takes them) and checked: once per
// registered block (Blocks), or per call (decode_layer).
struct BlockMats {
  Packed qkv{nullptr, 0, 0}, kva{nullptr, 0, 0}, qb{nullptr, 0, 0}, o{nullptr, 0, 0};
  Packed gate_up{nullptr, 0, 0}, down{nullptr, 0, 0};  // dense blocks
  c10::optional<MoeMats> moe;                          // MoE blocks
};

BlockMats block_mats(const std::vector<at::Tensor>& w, const std::vector<int64_t>& dims, int64_t D, bool every_expert) {
  TORCH_CHECK(dims.size() == 15, "decode_layer: expects 15 dims");
  const int64_t H = dims[0], N = dims[1], R = dims[2], V = dims[3], C = dims[4], q_lora = dims[5];
  const bool is_moe = dims[6] != 0;
  const size_t base = is_moe ? 15u : 11u;
  TORCH_CHECK(w.size() == base || w.size() == base + 1, "decode_layer: expects ", base, " tensors (", base + 1,
              " with kv_b_proj's scales), got ", w.size());
  BlockMats bm;
  if (q_lora > 0) {
    bm.qkv = packed_matrix(w[1], q_lora + C + R, D, "decode_layer: [q_a; kv_a]");
    bm.qb = packed_matrix(w[4], H * (N + R), q_lora, "decode_layer: q_b");
  } else {
    bm.qkv = packed_matrix(w[1], H * (N + R), D, "decode_layer: q_proj");
    bm.kva = packed_matrix(w[2], C + R, D, "decode_layer: kv_a");
  }
  bm.o = packed_matrix(w[7], D, H * V, "decode_layer: o_proj");
  if (is_moe) {
    const auto opt = [](const at::Tensor& t) { return t.numel() ? c10::optional<at::Tensor>(t) : c10::nullopt; };
    bm.moe = moe_mats(w[9], w[11], w[12], dims[13], opt(w[13]), opt(w[14]), dims[14], D, every_expert);
  } else {
    bm.gate_up = packed_matrix(w[9], 2 * dims[13], D, "decode_layer: gate_up");
    bm.down = packed_matrix(w[10], D, dims[13], "decode_layer: down");
  }
  return bm;
}

at::Tensor block_forward(const at::Tensor& x, const std::vector<at::Tensor>& w, const std::vector<int64_t>& dims,
                         const std::vector<double>& scal, at::Tensor cache, const at::Tensor& slot_mapping,
                         const at::Tensor& tok, const at::Tensor& seq, const at::Tensor& len, const at::Tensor& slots,
                         const at::Tensor& cos, const at::Tensor& sin, const c10::optional<at::Tensor>& keep,
                         const BlockMats* parsed = nullptr) {
  TORCH_CHECK(dims.size() == 15 && scal.size() == 4, "decode_layer: expects 15 dims and 4 scalars");
  const int64_t H = dims[0], N = dims[1], R = dims[2], V = dims[3], C = dims[4], q_lora = dims[5];
  const bool is_moe = dims[6] != 0;
  check_bf16(x, "decode_layer: x", 2);
  TORCH_CHECK(x.is_contiguous(), "decode_layer: x must be contiguous");
  const int64_t T = x.size(0), D = x.size(1);
  c10::optional<BlockMats> own;
  if (parsed == nullptr) own = block_mats(w, dims, D, false);
  const BlockMats& bm = parsed ? *parsed : *own;
  SectionClock clock;
  // Attention: every row's latents to the cache, queries of the kept rows.
  const at::Tensor h = rms_norm(x, w[0], scal[0]);
  at::Tensor q_in, kv_a;  // q_in: what q comes from (q_a rows, or normalised x when q_lora = 0)
  if (q_lora > 0) {
    const at::Tensor qkv = linear_m(h, bm.qkv);
    q_in = qkv.narrow(1, 0, q_lora);
    kv_a = qkv.narrow(1, q_lora, C + R);
  } else {
    q_in = h;
    kv_a = linear_m(h, bm.kva);
  }
  clock.lap(0);
  store_latents_impl(kv_a, w[5], scal[1], cos, sin, cache, slot_mapping);
  clock.lap(1);
  at::Tensor xk = x, qcos = cos, qsin = sin, qtok = tok, qseq = seq, qlen = len;
  if (keep.has_value()) {
    const at::Tensor& kr = *keep;
    const KeptQueries kq = kept_queries(kr, T, tok, seq, len);
    qtok = kq.tok;
    qseq = kq.seq;
    qlen = kq.len;
    xk = take_rows(x, kr);
    q_in = take_rows(q_in, kr);
    qcos = take_rows(cos.reshape({T, -1}), kr);
    qsin = take_rows(sin.reshape({T, -1}), kr);
  }
  const int64_t K = xk.size(0);
  if (K == 0) return xk;  // latents only
  at::Tensor q = q_lora > 0 ? linear_m(rms_norm(q_in, w[3], scal[1]), bm.qb) : linear_m(q_in, bm.qkv);
  q = q.view({K, H, N + R});
  rope_q(q, qcos, qsin, N);
  clock.lap(2);
  at::Tensor o = at::empty({K, H, V}, x.options());
  const size_t base = is_moe ? 15u : 11u;
  mla_decode(q, cache, qtok, qseq, qlen, slots, w[6], V, scal[2], o,
             w.size() > base ? c10::optional<at::Tensor>(w[base]) : c10::nullopt);
  clock.lap(3);
  const at::Tensor x1 = add_bf16(xk, linear_m(o.view({K, H * V}), bm.o));
  clock.lap(4);
  // Feed-forward.
  const at::Tensor h2 = rms_norm(x1, w[8], scal[0]);
  clock.lap(5);
  at::Tensor f;
  if (is_moe) {
    const c10::optional<at::Tensor> bias = w[10].numel() ? c10::optional<at::Tensor>(w[10]) : c10::nullopt;
    f = moe_run(h2, *bm.moe, bias, dims[7], dims[8], dims[9], dims[10], dims[11] != 0, dims[12] != 0, scal[3]);
  } else {
    f = mlp_m(h2, bm.gate_up, bm.down, dims[13]);
  }
  clock.lap(6);
  const at::Tensor y = add_bf16(x1, f);
  clock.lap(7);
  return y;
}

at::Tensor decode_layer(const at::Tensor& x, const std::vector<at::Tensor>& w, const std::vector<int64_t>& dims,
                        const std::vector<double>& scal, at::Tensor cache, const at::Tensor& slot_mapping,
                        const at::Tensor& tok, const at::Tensor& seq, const at::Tensor& len, const at::Tensor& slots,
                        const at::Tensor& cos, const at::Tensor& sin) {
  return block_forward(x, w, dims, scal, cache, slot_mapping, tok, seq, len, slots, cos, sin, c10::nullopt);
}

// The packed blocks of a model (or of its MTP module) for run_blocks: each block's tensors, dims and scalars as
// decode_layer takes them, and the cache layer it writes. Built once after packing (CpuBlocks in cpu_pack.py); the
// per-step call then passes no per-layer arguments at all.
struct Blocks : torch::CustomClassHolder {
  std::vector<std::vector<at::Tensor>> w;
  std::vector<std::vector<int64_t>> dims;
  std::vector<std::vector<double>> scal;
  std::vector<int64_t> cache_layer;
  std::vector<BlockMats> mats;  // each block's matrices, parsed once (they point into w's tensors, held above)

  Blocks(std::vector<at::Tensor> w_flat, std::vector<int64_t> counts, std::vector<int64_t> dims_flat,
         std::vector<double> scal_flat, std::vector<int64_t> cache_layers) {
    const size_t L = counts.size();
    TORCH_CHECK(dims_flat.size() == 15 * L && scal_flat.size() == 4 * L && cache_layers.size() == L,
                "Blocks: ", L, " blocks need 15 dims, 4 scalars and a cache layer each");
    size_t off = 0;
    for (size_t i = 0; i < L; ++i) {
      TORCH_CHECK(off + counts[i] <= w_flat.size(), "Blocks: the tensor counts exceed the tensors given");
      w.emplace_back(w_flat.begin() + off, w_flat.begin() + off + counts[i]);
      off += counts[i];
      dims.emplace_back(dims_flat.begin() + 15 * i, dims_flat.begin() + 15 * (i + 1));
      scal.emplace_back(scal_flat.begin() + 4 * i, scal_flat.begin() + 4 * (i + 1));
      cache_layer.push_back(cache_layers[i]);
    }
    for (size_t i = 0; i < L; ++i) {  // after w is complete: the parsed matrices point into its tensors
      TORCH_CHECK(!w[i].empty() && w[i][0].dim() == 1, "Blocks: block ", i, " does not start with its input norm");
      mats.push_back(block_mats(w[i], dims[i], w[i][0].size(0), true));
    }
  }
};

// Blocks by number. Ops taking a number instead of the object skip the Python binding's conversion of a script
// object argument, which costs ~15 us per call in torch 2.13 (a third of a small model's MTP pass). The registry
// holds weak references: the Python object owning the Blocks keeps it (and its weights) alive.
std::mutex g_blocks_mu;
std::vector<c10::weak_intrusive_ptr<Blocks>> g_blocks;

int64_t register_blocks(const c10::intrusive_ptr<Blocks>& blocks) {
  std::lock_guard<std::mutex> lock(g_blocks_mu);
  g_blocks.emplace_back(blocks);
  return static_cast<int64_t>(g_blocks.size()) - 1;
}

c10::intrusive_ptr<Blocks> blocks_at(int64_t id) {
  std::lock_guard<std::mutex> lock(g_blocks_mu);
  TORCH_CHECK(id >= 0 && id < static_cast<int64_t>(g_blocks.size()), "blocks ", id, " were never registered");
  c10::intrusive_ptr<Blocks> b = g_blocks[id].lock();
  TORCH_CHECK(b, "blocks ", id, " were released (the packed model they belonged to is gone)");
  return b;
}

// Every block of `blocks` in turn on x [T, D]; kv_all [Y, S, W] is the whole latent cache, block i writing layer
// cache_layer[i] - layer_offset of it. keep (optional): the rows the last block carries on (see block_forward).
at::Tensor run_blocks(int64_t blocks_id, const at::Tensor& x, const at::Tensor& kv_all, int64_t layer_offset,
                      const at::Tensor& slot_mapping, const at::Tensor& tok, const at::Tensor& seq,
                      const at::Tensor& len, const at::Tensor& slots, const at::Tensor& cos, const at::Tensor& sin,
                      const c10::optional<at::Tensor>& keep) {
  TORCH_CHECK(kv_all.dim() == 3, "run_blocks: the cache must be [layers, slots, width], got ", kv_all.sizes());
  const c10::intrusive_ptr<Blocks> blocks = blocks_at(blocks_id);
  at::Tensor h = x;
  const size_t L = blocks->w.size();
  for (size_t i = 0; i < L; ++i) {
    const int64_t c = blocks->cache_layer[i] - layer_offset;
    TORCH_CHECK(c >= 0 && c < kv_all.size(0), "run_blocks: cache layer ", c, " outside the cache's ",
                kv_all.size(0));
    h = block_forward(h, blocks->w[i], blocks->dims[i], blocks->scal[i], kv_all.select(0, c), slot_mapping, tok, seq,
                      len, slots, cos, sin, i + 1 == L ? keep : c10::nullopt, &blocks->mats[i]);
  }
  return h;
}


// A step of the main model whose rows all go through the kernel's attention tables, in one call: the embedding rows
// of ids [T], the rotary cos/sin rows of positions [T] from the tables [N, P] (RotaryEmbedding's), every block
// (run_blocks), the final norm; with a head, the logits of rows logit_rows (every row when None) as float32, rounded
// to bf16 first (the head's bf16 product followed by .float(), as the PyTorch side computes them). Returns (h [T, D]
// after the norm, cos [T, P], sin [T, P], logits [K, V] or an empty tensor without a head). Every value equals
// what the separate ops give (the same functions in the same order): only the Python calls between them are gone.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> run_model(
    int64_t blocks_id, const at::Tensor& ids, const at::Tensor& positions, const at::Tensor& embed,
    const at::Tensor& cos_table, const at::Tensor& sin_table, const at::Tensor& norm_w, double eps,
    const at::Tensor& kv_all, int64_t layer_offset, const at::Tensor& slot_mapping, const at::Tensor& tok,
    const at::Tensor& seq, const at::Tensor& len, const at::Tensor& slots, const c10::optional<at::Tensor>& head,
    int64_t vocab, const c10::optional<std::vector<int64_t>>& logit_rows) {
  check_bf16(embed, "run_model: embed", 2);
  TORCH_CHECK(embed.is_contiguous(), "run_model: embed must be contiguous");
  check_index(ids, "run_model: ids", 1);
  check_index(positions, "run_model: positions", 1);
  const int64_t T = ids.size(0), D = embed.size(1);
  TORCH_CHECK(positions.size(0) == T, "run_model: ", T, " ids but ", positions.size(0), " positions");
  TORCH_CHECK(cos_table.scalar_type() == at::kFloat && sin_table.scalar_type() == at::kFloat &&
                  cos_table.dim() == 2 && cos_table.sizes() == sin_table.sizes() && cos_table.is_contiguous() &&
                  sin_table.is_contiguous(),
              "run_model: the rotary tables must be contiguous float32 [N, P] of one shape");
  check_bf16(norm_w, "run_model: norm", 1);
  TORCH_CHECK(norm_w.size(0) == D, "run_model: the final norm has ", norm_w.size(0), " weights for width ", D);
  const int64_t N = cos_table.size(0), P = cos_table.size(1);
  at::Tensor x = at::empty({T, D}, embed.options());
  at::Tensor cos = at::empty({T, P}, cos_table.options()), sin = at::empty({T, P}, sin_table.options());
  const int64_t* id = ids.data_ptr<int64_t>();
  const int64_t* pos = positions.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) {
    TORCH_CHECK(id[t] >= 0 && id[t] < embed.size(0), "run_model: token id ", id[t], " outside the vocabulary of ",
                embed.size(0));
    TORCH_CHECK(pos[t] >= 0 && pos[t] < N, "run_model: position ", pos[t], " outside the rotary table of ", N);
    std::memcpy(bf_mut(x) + t * D, bf_ptr(embed) + id[t] * D, D * sizeof(bf16_t));
    std::memcpy(cos.data_ptr<float>() + t * P, cos_table.data_ptr<float>() + pos[t] * P, P * sizeof(float));
    std::memcpy(sin.data_ptr<float>() + t * P, sin_table.data_ptr<float>() + pos[t] * P, P * sizeof(float));
  }
  const at::Tensor h = rms_norm(run_blocks(blocks_id, x, kv_all, layer_offset, slot_mapping, tok, seq, len, slots,
                                           cos, sin, c10::nullopt), norm_w, eps);
  if (!head.has_value()) return {h, cos, sin, at::empty({0}, cos.options())};
  at::Tensor rows = h;
  if (logit_rows.has_value()) {
    const std::vector<int64_t>& r = *logit_rows;
    rows = at::empty({static_cast<int64_t>(r.size()), D}, h.options());
    for (size_t k = 0; k < r.size(); ++k) {
      TORCH_CHECK(r[k] >= 0 && r[k] < T, "run_model: logit row ", r[k], " outside the ", T, " rows");
      std::memcpy(bf_mut(rows) + k * D, bf_ptr(h) + r[k] * D, D * sizeof(bf16_t));
    }
  }
  if (rows.size(0) == 0) return {h, cos, sin, at::empty({0, vocab}, cos.options())};
  return {h, cos, sin, linear(rows, *head, vocab).to(at::kFloat)};
}


// Drafting with an MTP module in one call: for each row t, the module's input is the main model's final hidden
// state h[t] and the embedding of next_ids[t]. Steps: enorm(embed) and hnorm(h), eh_proj of their concatenation,
// the MTP block (run_blocks), shared_head.norm, the shared LM head. With keep ([K] increasing rows), every row's
// latents are stored but only the kept rows go through attention, the block's FFN and the head. Returns the draft
// token per row [K], the logits [K, V] bf16 when return_logits (else an empty tensor, or see below) and the block's
// output [K, D] (what a further, recurrent draft starts from). The draft token is the argmax of the module's logits
// (the first maximum, as torch.argmax: greedy drafts), unless temperatures [K] and u [K] are given: then a row with
// temperature t > 0 draws its token from q = softmax(logits / t) with u (tempered_softmax_row and inverse_cdf_row:
// what sampling.tempered_softmax and draw_inverse_cdf give), a row with t = 0 takes the argmax, and the second
// output is q [K, V] float32 (rows of t = 0 unspecified): the draft distributions speculative sampling needs.
std::tuple<at::Tensor, at::Tensor, at::Tensor> mtp_draft(int64_t mtp, const at::Tensor& embed, const at::Tensor& enorm,
                            const at::Tensor& hnorm, const at::Tensor& eh_proj, const at::Tensor& head_norm,
                            const at::Tensor& lm_head, int64_t vocab, double eps, const at::Tensor& h,
                            const at::Tensor& next_ids, const at::Tensor& kv_all, int64_t layer_offset,
                            const at::Tensor& slot_mapping, const at::Tensor& tok, const at::Tensor& seq,
                            const at::Tensor& len, const at::Tensor& slots, const at::Tensor& cos,
                            const at::Tensor& sin, const c10::optional<at::Tensor>& keep, bool return_logits,
                            const c10::optional<std::vector<double>>& temperatures,
                            const c10::optional<at::Tensor>& u) {
  check_bf16(embed, "mtp_draft: embed", 2);
  check_bf16(h, "mtp_draft: h", 2);
  check_index(next_ids, "mtp_draft: next_ids", 1);
  TORCH_CHECK(embed.is_contiguous(), "mtp_draft: embed must be contiguous");
  const int64_t T = h.size(0), D = h.size(1);
  TORCH_CHECK(next_ids.size(0) == T && embed.size(1) == D, "mtp_draft: ", T, " rows of width ", D,
              " need as many next ids and an embedding of that width");
  check_bf16(enorm, "mtp_draft: enorm", 1);
  check_bf16(hnorm, "mtp_draft: hnorm", 1);
  TORCH_CHECK(enorm.size(0) == D && hnorm.size(0) == D, "mtp_draft: enorm/hnorm must have ", D, " weights");
  at::Tensor cat = at::empty({T, 2 * D}, h.options());
  const int64_t* ids = next_ids.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) {
    TORCH_CHECK(ids[t] >= 0 && ids[t] < embed.size(0), "mtp_draft: token id ", ids[t], " outside the vocabulary");
    rms_norm_row(bf_ptr(embed) + ids[t] * D, bf_ptr(enorm), eps, D, bf_mut(cat) + t * 2 * D);
    rms_norm_row(bf_ptr(h) + t * h.stride(0), bf_ptr(hnorm), eps, D, bf_mut(cat) + t * 2 * D + D);
  }
  const at::Tensor x = run_blocks(mtp, linear(cat, eh_proj, D), kv_all, layer_offset, slot_mapping, tok, seq, len,
                                  slots, cos, sin, keep);  // [K, D]
  const int64_t K = x.size(0);
  if (K == 0)  // latents only: no row drafts
    return {at::empty({0}, next_ids.options()), at::empty({0, vocab}, h.options().dtype(temperatures ? at::kFloat
                                                                                                     : at::kBFloat16)),
            x};
  const at::Tensor logits = linear(rms_norm(x, head_norm, eps), lm_head, vocab);  // [K, V] bf16
  at::Tensor out = at::empty({K}, next_ids.options());
  const bf16_t* lp = bf_ptr(logits);
  if (!temperatures.has_value()) {
    for (int64_t t = 0; t < K; ++t) out.data_ptr<int64_t>()[t] = argmax_row(lp + t * vocab, vocab);
    return {out, return_logits ? logits : at::empty({0}, logits.options()), x};
  }
  const std::vector<double>& temps = *temperatures;
  TORCH_CHECK(!return_logits, "mtp_draft: return_logits and temperatures exclude each other");
  TORCH_CHECK(static_cast<int64_t>(temps.size()) == K && u.has_value() && u->device().is_cpu() &&
                  u->scalar_type() == at::kFloat && u->dim() == 1 && u->size(0) == K,
              "mtp_draft: sampled drafts need ", K, " temperatures (one per drafting row, 0 = greedy) and a CPU "
              "float32 u [", K, "]");
  const at::Tensor uc = u->contiguous();
  at::Tensor q = at::empty({K, vocab}, logits.options().dtype(at::kFloat));
  std::vector<double> c;
  for (int64_t t = 0; t < K; ++t) {
    if (temps[t] == 0) {
      out.data_ptr<int64_t>()[t] = argmax_row(lp + t * vocab, vocab);
      continue;
    }
    float* qt = q.data_ptr<float>() + t * vocab;
    TORCH_CHECK(tempered_softmax_row(lp + t * vocab, vocab, checked_temperature(temps[t], "mtp_draft"), qt),
                "mtp_draft: row ", t, " has no finite logit");
    out.data_ptr<int64_t>()[t] = inverse_cdf_row(qt, vocab, uc.data_ptr<float>()[t], c);
  }
  return {out, q, x};
}

}  // namespace
