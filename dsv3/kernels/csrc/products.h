// Layer products over packed weights: the MoE call (router, group-limited top-k, routed and shared experts over
// only the experts hit), the dense SwiGLU MLP, a plain linear, the residual add; and the job split across threads.
#pragma once

#include "jobs.h"

namespace {

// ---------------------------------------------------------------------------------------------------------------
// MoE: router + routed experts + shared experts for T tokens in one call.

struct Route {
  std::vector<int64_t> idx;  // [T, K] chosen experts, best first
  std::vector<float> wt;     // [T, K] their weights (normalised, scaled)
};

// Scores from the router logits, then the reference selection: optional bias for choosing only, optional group
// limit (group score = sum of its two best, or its best), top-k, weights from the unbiased scores.
void route_token(const float* logits, const float* bias, int64_t E, int64_t K, int64_t n_group, int64_t topk_group,
                 int64_t group_rule, bool softmax, bool norm_topk, float scale, int64_t* idx, float* wt,
                 std::vector<float>& scores, std::vector<float>& choice, std::vector<int64_t>& order) {
  if (softmax) {
    float mx = -std::numeric_limits<float>::infinity();
    for (int64_t e = 0; e < E; ++e) mx = std::max(mx, logits[e]);
    float sum = 0.f;
    for (int64_t e = 0; e < E; ++e) sum += (scores[e] = std::exp(logits[e] - mx));
    for (int64_t e = 0; e < E; ++e) scores[e] /= sum;
  } else {
    for (int64_t e = 0; e < E; ++e) scores[e] = 1.f / (1.f + std::exp(-logits[e]));
  }
  for (int64_t e = 0; e < E; ++e) {
    choice[e] = bias ? scores[e] + bias[e] : scores[e];
    if (std::isnan(choice[e])) choice[e] = -std::numeric_limits<float>::infinity();  // keeps the ordering strict
  }
  auto better = [&](int64_t a, int64_t b) { return choice[a] > choice[b] || (choice[a] == choice[b] && a < b); };
  if (group_rule != 0 && n_group > 1) {
    const int64_t per = E / n_group;
    std::vector<float> gs(n_group);
    for (int64_t g = 0; g < n_group; ++g) {
      float b1 = -std::numeric_limits<float>::infinity(), b2 = b1;
      for (int64_t e = g * per; e < (g + 1) * per; ++e) {
        if (choice[e] > b1) { b2 = b1; b1 = choice[e]; }
        else if (choice[e] > b2) { b2 = choice[e]; }
      }
      gs[g] = group_rule == 1 ? b1 + b2 : b1;
    }
    std::vector<int64_t> go(n_group);
    for (int64_t g = 0; g < n_group; ++g) go[g] = g;
    std::partial_sort(go.begin(), go.begin() + topk_group, go.end(),
                      [&](int64_t a, int64_t b) { return gs[a] > gs[b] || (gs[a] == gs[b] && a < b); });
    std::vector<char> keep(n_group, 0);
    for (int64_t g = 0; g < topk_group; ++g) keep[go[g]] = 1;
    for (int64_t e = 0; e < E; ++e)
      if (!keep[e / per]) choice[e] = -std::numeric_limits<float>::infinity();
  }
  for (int64_t e = 0; e < E; ++e) order[e] = e;
  std::partial_sort(order.begin(), order.begin() + K, order.end(), better);
  float sum = 0.f;
  for (int64_t k = 0; k < K; ++k) {
    idx[k] = order[k];
    wt[k] = scores[order[k]];
    sum += wt[k];
  }
  for (int64_t k = 0; k < K; ++k) wt[k] = (norm_topk ? wt[k] / (sum + 1e-20f) : wt[k]) * scale;
}

// silu(g) * u with the reference's bf16 rounding after each op.
inline bf16_t swiglu(float g, float u) {
  const float gb = round_bf(g);
  const float sg = round_bf(gb / (1.f + std::exp(-gb)));
  return f2bf(sg * round_bf(u));
}

// The same rule on 16 lanes (exp16 for the exponential).
inline __m256i swiglu16(V16f g, V16f u) {
  const V16f gb = round_bf16x16(g);
  const V16f e = exp16(v16_sub_ps(v16_setzero_ps(), gb));
  const V16f sg = round_bf16x16(v16_div_ps(gb, v16_add_ps(v16_set1_ps(1.f), e)));
  return to_bf16x16(v16_mul_ps(sg, round_bf16x16(u)));
}

// out[i] = swiglu(g[i], u[i]) for n float32 (gate, up) values.
inline void swiglu_row(const float* g, const float* u, int64_t n, bf16_t* out) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), swiglu16(v16_loadu_ps(g + i), v16_loadu_ps(u + i)));
  for (; i < n; ++i) out[i] = swiglu(g[i], u[i]);
}

// The same for bf16 (gate, up) values.
inline void swiglu_row(const bf16_t* g, const bf16_t* u, int64_t n, bf16_t* out) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), swiglu16(load16(g + i), load16(u + i)));
  for (; i < n; ++i) out[i] = swiglu(bf2f(g[i]), bf2f(u[i]));
}

// An MoE layer's matrices, checked: gate_w packed [E, D] (or float32 [E, D]); w13 packed [E][2I, D] ([gate; up]
// rows); w2 packed [E][D, I]; the shared expert (optional) packed [2Is, D] and [D, Is]. With every_expert, each
// expert's matrices are parsed here once (Blocks: a decode step then reads no blob header); otherwise on use.
struct MoeMats {
  const at::Tensor* w13;
  const at::Tensor* w2;
  int64_t E, D, I, Is;
  bool gate_f32, has_shared;
  const float* gate_wf;
  Packed gate{nullptr, 0, 0}, s13{nullptr, 0, 0}, s2{nullptr, 0, 0};
  std::vector<Packed> e13, e2;
  Packed up(int64_t e) const { return e13.empty() ? packed_matrix(*w13, 2 * I, D, "moe: w13", e) : e13[e]; }
  Packed down(int64_t e) const { return e2.empty() ? packed_matrix(*w2, D, I, "moe: w2", e) : e2[e]; }
};

MoeMats moe_mats(const at::Tensor& gate_w, const at::Tensor& w13, const at::Tensor& w2, int64_t I,
                 const c10::optional<at::Tensor>& shared_w13, const c10::optional<at::Tensor>& shared_w2, int64_t Is,
                 int64_t D, bool every_expert) {
  MoeMats mm;
  mm.w13 = &w13;
  mm.w2 = &w2;
  mm.E = w13.size(0);
  mm.D = D;
  mm.I = I;
  mm.Is = Is;
  const int64_t E = mm.E;
  mm.gate_f32 = gate_w.scalar_type() == at::kFloat;
  TORCH_CHECK(!mm.gate_f32 || (gate_w.is_contiguous() && gate_w.dim() == 2 && gate_w.size(0) == E && gate_w.size(1) == D),
              "moe: a float32 gate weight must be a contiguous [E, D] = [", E, ", ", D, "] tensor, got ", gate_w.sizes());
  mm.gate_wf = mm.gate_f32 ? gate_w.data_ptr<float>() : nullptr;
  if (!mm.gate_f32) mm.gate = packed_matrix(gate_w, E, D, "moe: gate weight");
  for (int64_t e = 0; e < E; e += std::max<int64_t>(1, E - 1)) {  // shape checks on the first and last expert
    packed_matrix(w13, 2 * I, D, "moe: w13", e);
    packed_matrix(w2, D, I, "moe: w2", e);
  }
  TORCH_CHECK(w13.dim() == (w13.scalar_type() == at::kByte ? 2 : 5) && w2.dim() == (w2.scalar_type() == at::kByte ? 2 : 5)
              && w2.size(0) == E, "moe: w13 and w2 must be packed [E, ...] stacks (bf16 pack() or quantised blobs)");
  if (every_expert)
    for (int64_t e = 0; e < E; ++e) {
      mm.e13.push_back(packed_matrix(w13, 2 * I, D, "moe: w13", e));
      mm.e2.push_back(packed_matrix(w2, D, I, "moe: w2", e));
    }
  mm.has_shared = shared_w13.has_value();
  TORCH_CHECK(mm.has_shared == shared_w2.has_value() && (!mm.has_shared || Is > 0),
              "moe: give both shared_w13 and shared_w2 (and their width Is > 0), or neither");
  if (mm.has_shared) {
    mm.s13 = packed_matrix(*shared_w13, 2 * Is, D, "moe: shared_w13");
    mm.s2 = packed_matrix(*shared_w2, D, Is, "moe: shared_w2");
  }
  return mm;
}

// Router + routed experts + shared experts for x [T, D] (D as in mm). Returns [T, D] bf16.
at::Tensor moe_run(const at::Tensor& x, const MoeMats& mm, const c10::optional<at::Tensor>& bias, int64_t K,
                   int64_t n_group, int64_t topk_group, int64_t group_rule, bool softmax, bool norm_topk,
                   double scale) {
  check_bf16(x, "moe: x", 2);
  TORCH_CHECK(x.is_contiguous() && x.size(1) == mm.D, "moe: x must be a contiguous [T, ", mm.D, "] tensor");
  const int64_t T = x.size(0), D = mm.D, E = mm.E, I = mm.I, Is = mm.Is;
  const bool gate_f32 = mm.gate_f32, has_shared = mm.has_shared;
  const Packed &gate = mm.gate, &s13 = mm.s13, &s2 = mm.s2;
  TORCH_CHECK(K >= 1 && K <= E, "moe: top_k ", K, " outside [1, ", E, "]");
  TORCH_CHECK(group_rule == 0 || (n_group >= 1 && E % n_group == 0 && topk_group >= 1 && topk_group <= n_group),
              "moe: ", E, " experts cannot form ", n_group, " groups with topk_group ", topk_group);
  const float* bp = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == E,
                "moe: bias must be a contiguous float32 [E]");
    bp = bias->data_ptr<float>();
  }
  const bf16_t* xp = bf_ptr(x);
  at::Tensor out = at::empty({T, D}, x.options());
  if (T == 0) return out;

  // 1. Router logits [T, E] in float32 (a float32 gate weight is used as is, like the reference).
  std::vector<const bf16_t*> xrows(T);
  for (int64_t t = 0; t < T; ++t) xrows[t] = xp + t * D;
  std::vector<float> logits(T * E);
  if (gate_f32) {
    // Work items of (token, 16 experts) for a large router, so a decode step's (one token, E x D float32 weights:
    // 7 MB a layer on DeepSeek-V3) is split across the threads too; a small one (under 256 KB) stays one item per
    // token, as a fork costs more than it saves. Every logit is the same dot product whatever the split.
    const float* gw = mm.gate_wf;
    const int64_t ec = E * D >= 65536 ? 16 : E, nb = (E + ec - 1) / ec;
    at::parallel_for(0, T * nb, 1, [&](int64_t a, int64_t b) {
      std::vector<float> xf(D);
      int64_t cur = -1;
      for (int64_t i = a; i < b; ++i) {
        const int64_t t = i / nb, e1 = std::min(E, (i % nb + 1) * ec);
        if (t != cur) bf_to_f32(xrows[t], xf.data(), D);
        cur = t;
        for (int64_t e = (i % nb) * ec; e < e1; ++e) logits[t * E + e] = dot_f32(xf.data(), gw + e * D, D);
      }
    });
  } else {
    Jobs jobs;
    add_jobs(jobs, gate, xrows.data(), T, Out{logits.data(), nullptr, E});
    run_jobs(jobs);
  }
  // 2. Routing, then the token-expert pairs grouped by expert (token order inside each expert).
  Route rt{std::vector<int64_t>(T * K), std::vector<float>(T * K)};
  {
    std::vector<float> scores(E), choice(E);
    std::vector<int64_t> order(E);
    for (int64_t t = 0; t < T; ++t)
      route_token(logits.data() + t * E, bp, E, K, n_group, topk_group, group_rule, softmax, norm_topk,
                  static_cast<float>(scale), rt.idx.data() + t * K, rt.wt.data() + t * K, scores, choice, order);
  }
  const int64_t P = T * K;
  std::vector<int64_t> count(E, 0), start(E + 1, 0), pair_of(P);
  for (int64_t p = 0; p < P; ++p) ++count[rt.idx[p]];
  for (int64_t e = 0; e < E; ++e) start[e + 1] = start[e] + count[e];
  std::vector<const bf16_t*> pair_x(P);
  {
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t t = 0; t < T; ++t)
      for (int64_t k = 0; k < K; ++k) {
        const int64_t p = fill[rt.idx[t * K + k]]++;
        pair_of[t * K + k] = p;
        pair_x[p] = xrows[t];
      }
  }
  // 3. gate and up projections of every hit expert (and the shared expert on all tokens).
  std::vector<float> h13(P * 2 * I), hs13(has_shared ? T * 2 * Is : 0);
  {
    Jobs jobs;
    for (int64_t e = 0; e < E; ++e)
      if (count[e])
        add_jobs(jobs, mm.up(e), pair_x.data() + start[e], count[e],
                 Out{h13.data() + start[e] * 2 * I, nullptr, 2 * I});
    if (has_shared) add_jobs(jobs, s13, xrows.data(), T, Out{hs13.data(), nullptr, 2 * Is});
    run_jobs(jobs);
  }
  // 4. silu(gate) * up in bf16, the input of the down projections.
  std::vector<bf16_t> act(P * I), acts(has_shared ? T * Is : 0);
  at::parallel_for(0, P + (has_shared ? T : 0), 16, [&](int64_t a, int64_t b) {
    for (int64_t p = a; p < b; ++p) {
      if (p < P) {
        const float* hp = h13.data() + p * 2 * I;
        swiglu_row(hp, hp + I, I, act.data() + p * I);
      } else {
        const float* hp = hs13.data() + (p - P) * 2 * Is;
        swiglu_row(hp, hp + Is, Is, acts.data() + (p - P) * Is);
      }
    }
  });
  // 5. down projections.
  std::vector<const bf16_t*> act_rows(P), acts_rows(has_shared ? T : 0);
  for (int64_t p = 0; p < P; ++p) act_rows[p] = act.data() + p * I;
  for (int64_t t = 0; t < (has_shared ? T : 0); ++t) acts_rows[t] = acts.data() + t * Is;
  std::vector<float> y(P * D), ys(has_shared ? T * D : 0);
  {
    Jobs jobs;
    for (int64_t e = 0; e < E; ++e)
      if (count[e])
        add_jobs(jobs, mm.down(e), act_rows.data() + start[e], count[e],
                 Out{y.data() + start[e] * D, nullptr, D});
    if (has_shared) add_jobs(jobs, s2, acts_rows.data(), T, Out{ys.data(), nullptr, D});
    run_jobs(jobs);
  }
  // 6. out = bf16(sum_k w_k * bf16(y_k)) + bf16(shared), in bf16 like the reference.
  bf16_t* op = bf_mut(out);
  at::parallel_for(0, T, 4, [&](int64_t a, int64_t b) {
    for (int64_t t = a; t < b; ++t) {
      int64_t d = 0;
      for (; d + 16 <= D; d += 16) {
        V16f s = v16_setzero_ps();
        for (int64_t k = 0; k < K; ++k)
          s = v16_fmadd_ps(v16_set1_ps(rt.wt[t * K + k]),
                              round_bf16x16(v16_loadu_ps(y.data() + pair_of[t * K + k] * D + d)), s);
        V16f v = round_bf16x16(s);
        if (has_shared) v = v16_add_ps(v, round_bf16x16(v16_loadu_ps(ys.data() + t * D + d)));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(op + t * D + d), to_bf16x16(v));
      }
      for (; d < D; ++d) {
        float s = 0.f;
        for (int64_t k = 0; k < K; ++k) s = std::fma(rt.wt[t * K + k], round_bf(y[pair_of[t * K + k] * D + d]), s);
        float v = round_bf(s);
        if (has_shared) v = v + round_bf(ys[t * D + d]);
        op[t * D + d] = f2bf(v);
      }
    }
  });
  return out;
}

// The op: x [T, D] through an MoE layer given by its tensors (moe_mats' layout), every blob header read per call.
at::Tensor moe(const at::Tensor& x, const at::Tensor& gate_w, const c10::optional<at::Tensor>& bias, int64_t K,
               int64_t n_group, int64_t topk_group, int64_t group_rule, bool softmax, bool norm_topk, double scale,
               const at::Tensor& w13, const at::Tensor& w2, int64_t I, const c10::optional<at::Tensor>& shared_w13,
               const c10::optional<at::Tensor>& shared_w2, int64_t Is) {
  check_bf16(x, "moe: x", 2);
  const MoeMats mm = moe_mats(gate_w, w13, w2, I, shared_w13, shared_w2, Is, x.size(1), false);
  return moe_run(x, mm, bias, K, n_group, topk_group, group_rule, softmax, norm_topk, scale);
}

// y = x W^T for a packed W [R, D]: x [T, D] bf16 (rows may be strided) -> [T, R] bf16.
// With f32_out the products come back in float32, unrounded (the kernel tests compare them with their oracles).
at::Tensor linear_m(const at::Tensor& x, const Packed& m, bool f32_out = false) {
  check_bf16(x, "linear: x", 2);
  const int64_t T = x.size(0), ldx = x.stride(0), R = m.R;
  TORCH_CHECK(x.size(1) == m.D, "linear: x has ", x.size(1), " columns for a [", m.R, ", ", m.D, "] matrix");
  at::Tensor out = at::empty({T, R}, f32_out ? x.options().dtype(at::kFloat) : x.options());
  if (T == 0) return out;
  std::vector<const bf16_t*> rows(T);
  for (int64_t t = 0; t < T; ++t) rows[t] = bf_ptr(x) + t * ldx;
  Jobs jobs;
  add_jobs(jobs, m, rows.data(), T,
           f32_out ? Out{out.data_ptr<float>(), nullptr, R} : Out{nullptr, bf_mut(out), R});
  run_jobs(jobs);
  return out;
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& w, int64_t R, bool f32_out = false) {
  check_bf16(x, "linear: x", 2);
  return linear_m(x, packed_matrix(w, R, x.size(1), "linear: weight"), f32_out);
}

// SwiGLU MLP (dense layers): down(silu(gate(x)) * up(x)) with gate_up packed [2I, D] and down packed [D, I].
at::Tensor mlp_m(const at::Tensor& x, const Packed& gate_up, const Packed& down, int64_t I) {
  const int64_t T = x.size(0);
  TORCH_CHECK(gate_up.R == 2 * I && down.D == I, "mlp: gate_up [", gate_up.R, ", ", gate_up.D, "] and down [", down.R,
              ", ", down.D, "] do not fit the width ", I);
  const at::Tensor h = linear_m(x, gate_up, false);  // [T, 2I] bf16, like the reference's two projections
  at::Tensor act = at::empty({T, I}, x.options());
  const bf16_t* hp = bf_ptr(h);
  bf16_t* ap = bf_mut(act);
  for (int64_t t = 0; t < T; ++t) swiglu_row(hp + t * 2 * I, hp + t * 2 * I + I, I, ap + t * I);
  return linear_m(act, down);
}

at::Tensor mlp(const at::Tensor& x, const at::Tensor& gate_up, const at::Tensor& down, int64_t I) {
  const int64_t D = x.size(1);
  return mlp_m(x, packed_matrix(gate_up, 2 * I, D, "linear: weight"), packed_matrix(down, D, I, "linear: weight"), I);
}

// a + b in bf16 (the residual adds), a new tensor.
at::Tensor add_bf16(const at::Tensor& a, const at::Tensor& b) {
  at::Tensor out = at::empty_like(a);
  const bf16_t* ap = bf_ptr(a);
  const bf16_t* bp = bf_ptr(b);
  bf16_t* op = bf_mut(out);
  const int64_t n = a.numel();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(op + i), to_bf16x16(v16_add_ps(load16(ap + i), load16(bp + i))));
  for (; i < n; ++i) op[i] = f2bf(bf2f(ap[i]) + bf2f(bp[i]));
  return out;
}

}  // namespace
