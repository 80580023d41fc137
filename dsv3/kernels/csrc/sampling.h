// Sampling on rows of logits: first-maximum argmax, tempered softmax, inverse-CDF draws and speculative sampling's
// acceptance test, each the arithmetic of its PyTorch reference (dsv3/engine/sampling.py, speculative.py).
#pragma once

#include "common.h"

namespace {

// Index of the first maximum of n bf16 or float32 values, a NaN counting as the maximum (torch.argmax's rule).
inline V16f load16(const float* p) { return v16_loadu_ps(p); }
inline float to_f32(bf16_t v) { return bf2f(v); }
inline float to_f32(float v) { return v; }

template <typename T>
int64_t argmax_row(const T* x, int64_t n) {
  V16f mx = v16_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const V16f v = load16(x + i);
    if (v16_cmp_ps_mask(v, v, _CMP_UNORD_Q)) break;  // a NaN: the scalar scan below finds the first one
    mx = v16_max_ps(mx, v);
  }
  float best = v16_reduce_max_ps(mx);
  int64_t arg = -1;
  for (int64_t j = 0; j < i && arg < 0; j += 16) {  // the first lane holding the maximum
    const M16 hit = v16_cmp_ps_mask(load16(x + j), v16_set1_ps(best), _CMP_EQ_OQ);
    if (hit) arg = j + __builtin_ctz(hit);
  }
  for (; i < n; ++i) {  // the tail (or everything from a block holding a NaN on)
    const float f = to_f32(x[i]);
    if (std::isnan(f)) return i;  // (no NaN before i)
    if (arg < 0 || f > best) {
      best = f;
      arg = i;
    }
  }
  return arg;
}

// x [T, V] bf16 or float32 -> the index of each row's first maximum [T] int64 (a NaN counts as the maximum:
// torch.argmax's rule).
at::Tensor argmax_rows(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() && (x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat) &&
                  x.dim() == 2 && x.stride(1) == 1,
              "argmax_rows: x must be a CPU bfloat16 or float32 [T, V] tensor with contiguous rows, got ",
              x.scalar_type(), " ", x.sizes());
  TORCH_CHECK(x.size(1) > 0, "argmax_rows: rows are empty");
  at::Tensor out = at::empty({x.size(0)}, x.options().dtype(at::kLong));
  int64_t* o = out.data_ptr<int64_t>();
  for (int64_t t = 0; t < x.size(0); ++t)
    o[t] = x.scalar_type() == at::kFloat ? argmax_row(x.data_ptr<float>() + t * x.stride(0), x.size(1))
                                         : argmax_row(bf_ptr(x) + t * x.stride(0), x.size(1));
  return out;
}

// In place: logits[t, v] = -inf where bit v % 32 of bitmask[t, v / 32] is 0 (xgrammar's token bitmask, 1 = allowed).
// logits float32 or bf16 [T, V] with contiguous rows, bitmask int32 [T, >= ceil(V / 32)]; 16 tokens per masked move.
inline uint32_t bits16(const uint32_t* bm, int64_t v) { return (bm[v / 32] >> (v % 32)) & 0xffffu; }

void mask_row(float* row, const uint32_t* bm, int64_t V) {
  const V16f ninf = v16_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t v = 0;
  for (; v + 16 <= V; v += 16) {
    const uint32_t bits = bits16(bm, v);
    if (bits == 0xffffu) continue;
    const M16 keep = static_cast<M16>(bits), drop = static_cast<M16>(~bits & 0xffffu);
    v16_storeu_ps(row + v, v16_add_ps(v16_maskz_mov_ps(keep, v16_loadu_ps(row + v)), v16_maskz_mov_ps(drop, ninf)));
  }
  for (; v < V; ++v)
    if (!((bm[v / 32] >> (v % 32)) & 1u)) row[v] = -std::numeric_limits<float>::infinity();
}

void mask_row(bf16_t* row, const uint32_t* bm, int64_t V) {
  constexpr uint16_t kNegInf = 0xff80;  // bf16 -inf
  int64_t v = 0;
#if defined(DSV3_AVX512)
  const __m256i ninf = _mm256_set1_epi16(static_cast<short>(kNegInf));
  for (; v + 16 <= V; v += 16) {
    const uint32_t bits = bits16(bm, v);
    if (bits == 0xffffu) continue;
    __m256i* p = reinterpret_cast<__m256i*>(row + v);
    _mm256_storeu_si256(p, _mm256_mask_mov_epi16(ninf, static_cast<__mmask16>(bits), _mm256_loadu_si256(p)));
  }
#endif
  for (; v < V; ++v)
    if (!((bm[v / 32] >> (v % 32)) & 1u)) std::memcpy(row + v, &kNegInf, 2);
}

void mask_logits(at::Tensor logits, const at::Tensor& bitmask) {
  TORCH_CHECK(logits.device().is_cpu() && (logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kBFloat16)
                  && logits.dim() == 2 && logits.stride(1) == 1,
              "mask_logits: logits must be a CPU float32 or bfloat16 [T, V] tensor with contiguous rows, got ",
              logits.scalar_type(), " ", logits.sizes());
  const int64_t T = logits.size(0), V = logits.size(1);
  TORCH_CHECK(bitmask.device().is_cpu() && bitmask.scalar_type() == at::kInt && bitmask.dim() == 2 &&
                  bitmask.is_contiguous() && bitmask.size(0) == T && bitmask.size(1) * 32 >= V,
              "mask_logits: bitmask must be a contiguous CPU int32 [", T, ", >= ", (V + 31) / 32, "] tensor, got ",
              bitmask.scalar_type(), " ", bitmask.sizes());
  const uint32_t* bm = reinterpret_cast<const uint32_t*>(bitmask.data_ptr<int32_t>());
  for (int64_t t = 0; t < T; ++t) {
    if (logits.scalar_type() == at::kFloat) mask_row(logits.data_ptr<float>() + t * logits.stride(0), bm, V);
    else mask_row(bf_mut(logits) + t * logits.stride(0), bm, V);
    bm += bitmask.size(1);
  }
}

// The first index whose float64 running sum of p[0..V) exceeds min(u * total, the double just below total): the
// inverse-CDF draw of draw_inverse_cdf for one row (zero-mass tokens are never picked).
int64_t inverse_cdf_row(const float* p, int64_t V, float u, std::vector<double>& c) {
  c.resize(V);
  double acc = 0.0;
  for (int64_t i = 0; i < V; ++i) c[i] = acc += static_cast<double>(p[i]);
  const double total = c[V - 1];
  const double target = std::min(static_cast<double>(u) * total, std::nextafter(total, 0.0));
  // torch.searchsorted(right=True): the number of entries <= target (a binary search over the sorted sums).
  return std::upper_bound(c.begin(), c.end(), target) - c.begin();
}

// Inverse-CDF draws, the same arithmetic as sampling.draw_inverse_cdf (the reference): probs [B, V] float32 >= 0
// (unnormalised, each row with some mass), u [B] float32 in [0, 1) -> [B] int64, the first token whose float64
// running sum (summed in order, like torch.cumsum) exceeds min(u * total, the double just below total).
at::Tensor draw_inverse_cdf(const at::Tensor& probs, const at::Tensor& u) {
  TORCH_CHECK(probs.device().is_cpu() && probs.scalar_type() == at::kFloat && probs.dim() == 2 && probs.is_contiguous(),
              "draw_inverse_cdf: probs must be a contiguous CPU float32 [B, V] tensor, got ", probs.scalar_type(), " ",
              probs.sizes());
  TORCH_CHECK(u.device().is_cpu() && u.scalar_type() == at::kFloat && u.dim() == 1 && u.size(0) == probs.size(0),
              "draw_inverse_cdf: u must be a CPU float32 [", probs.size(0), "] tensor, got ", u.scalar_type(), " ",
              u.sizes());
  const int64_t B = probs.size(0), V = probs.size(1);
  TORCH_CHECK(V > 0, "draw_inverse_cdf: empty rows");
  at::Tensor out = at::empty({B}, probs.options().dtype(at::kLong));
  const at::Tensor uc = u.contiguous();
  std::vector<double> c;
  for (int64_t b = 0; b < B; ++b)
    out.data_ptr<int64_t>()[b] = inverse_cdf_row(probs.data_ptr<float>() + b * V, V, uc.data_ptr<float>()[b], c);
  return out;
}

// softmax(x / t) of one row of V logits in float32 into y (-inf = a masked token, which gets exactly 0). x / t is
// IEEE float32 division (the values PyTorch's `x.float() / t` gives); exp is exp16 (~1 ulp), so probabilities match
// torch.softmax to a few ulp, not bit for bit. Returns false (y unspecified) when the row has no finite logit.
template <typename T>
bool tempered_softmax_row(const T* x, int64_t V, float t, float* y) {
  const V16f neg_inf = v16_set1_ps(-std::numeric_limits<float>::infinity());
  const V16f tv = v16_set1_ps(t);
  V16f mx = neg_inf;
  int64_t i = 0;
  for (; i + 16 <= V; i += 16) {  // y = x / t, and the row's maximum
    const V16f q = v16_div_ps(load16(x + i), tv);
    v16_storeu_ps(y + i, q);
    mx = v16_max_ps(mx, q);
  }
  float m = v16_reduce_max_ps(mx);
  for (; i < V; ++i) {
    y[i] = to_f32(x[i]) / t;
    m = std::max(m, y[i]);
  }
  if (!std::isfinite(m)) return false;
  const V16f mv = v16_set1_ps(m);
  V16f acc = v16_setzero_ps();
  for (i = 0; i + 16 <= V; i += 16) {  // e = exp(y - max), 0 where y = -inf; their sum
    const V16f q = v16_loadu_ps(y + i);
    const M16 live = v16_cmp_ps_mask(q, neg_inf, _CMP_NEQ_OQ);
    const V16f e = v16_maskz_mov_ps(live, exp16(v16_sub_ps(q, mv)));
    v16_storeu_ps(y + i, e);
    acc = v16_add_ps(acc, e);
  }
  float sum = v16_reduce_add_ps(acc);
  for (; i < V; ++i) {
    y[i] = std::isinf(y[i]) && y[i] < 0 ? 0.f : std::exp(y[i] - m);
    sum += y[i];
  }
  const float inv = 1.f / sum;
  const V16f iv = v16_set1_ps(inv);
  for (i = 0; i + 16 <= V; i += 16) v16_storeu_ps(y + i, v16_mul_ps(v16_loadu_ps(y + i), iv));
  for (; i < V; ++i) y[i] *= inv;
  return true;
}

float checked_temperature(double temperature, const char* op) {
  const float t = static_cast<float>(temperature);  // (torch divides float32 rows by a scalar in float32 too)
  TORCH_CHECK(t > 0 && std::isfinite(t), op, ": temperature ", temperature,
              " must be finite and > 0 (greedy rows take the argmax instead)");
  return t;
}

// softmax(x / t) of each row: x [B, V] bf16 or float32 (contiguous rows), t > 0 -> probs [B, V] float32
// (tempered_softmax_row).
at::Tensor tempered_softmax(const at::Tensor& x, double temperature) {
  TORCH_CHECK(x.device().is_cpu() && (x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat) &&
                  x.dim() == 2 && x.stride(1) == 1,
              "tempered_softmax: x must be a CPU bfloat16 or float32 [B, V] tensor with contiguous rows, got ",
              x.scalar_type(), " ", x.sizes());
  const float t = checked_temperature(temperature, "tempered_softmax");
  const int64_t B = x.size(0), V = x.size(1);
  TORCH_CHECK(V > 0, "tempered_softmax: empty rows");
  at::Tensor out = at::empty({B, V}, x.options().dtype(at::kFloat));
  for (int64_t b = 0; b < B; ++b) {
    float* y = out.data_ptr<float>() + b * V;
    const bool ok = x.scalar_type() == at::kFloat ? tempered_softmax_row(x.data_ptr<float>() + b * x.stride(0), V, t, y)
                                                  : tempered_softmax_row(bf_ptr(x) + b * x.stride(0), V, t, y);
    TORCH_CHECK(ok, "tempered_softmax: row ", b, " has no finite logit (all masked, or inf/NaN)");
  }
  return out;
}

// Speculative sampling's acceptance and final draw for S sequences in one call (speculative.accept_and_draw_reference
// is the PyTorch oracle). p [n, V] float32: the target distributions, sequence s's counts[s] + 1 rows back to back;
// q: one [V] float32 draft distribution per draft, in the same order as drafts [sum(counts)]; u [n] float32: per
// sequence one uniform per draft (its acceptance test) and then one for the final token. Draft j of a sequence is
// kept while u_j * q_j(x_j) < p_j(x_j) (u < p/q without a division, in float64). At the first rejection the final token is drawn
// from max(0, p_j - q_j) (from p_j when that is all zero: p == q up to rounding); when every draft is kept, from the
// last row's p. Returns (accepted drafts [S], final tokens [S]).
std::tuple<std::vector<int64_t>, std::vector<int64_t>> speculative_accept(const at::Tensor& p,
                                                                        const std::vector<at::Tensor>& q,
                                                                        const std::vector<int64_t>& drafts,
                                                                        const std::vector<int64_t>& counts,
                                                                        const at::Tensor& u) {
  TORCH_CHECK(p.device().is_cpu() && p.scalar_type() == at::kFloat && p.dim() == 2 && p.is_contiguous(),
              "speculative_accept: p must be a contiguous CPU float32 [n, V] tensor, got ", p.scalar_type(), " ",
              p.sizes());
  const int64_t n = p.size(0), V = p.size(1), S = counts.size(), Dn = drafts.size();
  TORCH_CHECK(u.device().is_cpu() && u.scalar_type() == at::kFloat && u.dim() == 1 && u.size(0) == n,
              "speculative_accept: u must be a CPU float32 [", n, "] tensor (one per row of p), got ",
              u.scalar_type(), " ", u.sizes());
  TORCH_CHECK(static_cast<int64_t>(q.size()) == Dn, "speculative_accept: ", Dn, " drafts but ", q.size(),
              " draft distributions");
  const int64_t* cnt = counts.data();
  int64_t rows = 0;
  for (int64_t s = 0; s < S; ++s) {
    TORCH_CHECK(cnt[s] >= 0, "speculative_accept: negative draft count");
    rows += cnt[s] + 1;
  }
  TORCH_CHECK(rows == n && rows - S == Dn, "speculative_accept: ", S, " sequences with ", rows - S,
              " drafts need ", rows, " rows of p and ", rows - S, " drafts, got ", n, " and ", Dn);
  const int64_t* dr = drafts.data();
  for (int64_t j = 0; j < Dn; ++j) {
    TORCH_CHECK(dr[j] >= 0 && dr[j] < V, "speculative_accept: draft token ", dr[j], " outside the vocabulary");
    TORCH_CHECK(q[j].device().is_cpu() && q[j].scalar_type() == at::kFloat && q[j].dim() == 1 && q[j].size(0) == V &&
                    q[j].is_contiguous(),
                "speculative_accept: draft distribution ", j, " must be a contiguous CPU float32 [", V, "] tensor");
  }
  const at::Tensor uc = u.contiguous();
  const float* up = uc.data_ptr<float>();
  const float* pp = p.data_ptr<float>();
  std::vector<int64_t> accepted(S), final_tok(S);
  std::vector<float> residual(V);
  std::vector<double> c;
  int64_t r0 = 0, d0 = 0;  // this sequence's first row of p and first draft
  for (int64_t s = 0; s < S; ++s) {
    const int64_t d = cnt[s];
    int64_t a = 0;
    while (a < d && static_cast<double>(up[r0 + a]) * q[d0 + a].data_ptr<float>()[dr[d0 + a]] <
                        pp[(r0 + a) * V + dr[d0 + a]])  // (in float64, as the reference's Python floats)
      ++a;
    const float* dist = pp + (r0 + a) * V;  // every draft kept: the last row's p
    if (a < d) {
      const float* qa = q[d0 + a].data_ptr<float>();
      float mass = 0.f;
      for (int64_t i = 0; i < V; ++i) {
        residual[i] = std::max(dist[i] - qa[i], 0.f);
        mass += residual[i];
      }
      if (mass > 0) dist = residual.data();
    }
    accepted[s] = a;
    final_tok[s] = inverse_cdf_row(dist, V, up[r0 + d], c);
    r0 += d + 1;
    d0 += d;
  }
  return {accepted, final_tok};
}

}  // namespace
