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

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <sys/mman.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <mutex>
#include <vector>

#if !(defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__))
#error "the dsv3 CPU kernels need AVX-512 (F, BW, VL); cpu_ext.py keeps the PyTorch path on other CPUs"
#endif
#include <immintrin.h>

// The op namespace; test builds of other instruction-set variants register under their own name.
#ifndef DSV3_NS
#define DSV3_NS dsv3_cpu
#endif
#define DSV3_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
#define DSV3_STR2(x) #x
#define DSV3_STR(x) DSV3_STR2(x)

namespace {

using bf16_t = uint16_t;

inline float bf2f(bf16_t v) {
  uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline bf16_t f2bf(float f) {  // round to nearest even, NaN kept quiet
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<bf16_t>((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<bf16_t>(u >> 16);
}

inline float round_bf(float f) { return bf2f(f2bf(f)); }

const bf16_t* bf_ptr(const at::Tensor& t) { return reinterpret_cast<const bf16_t*>(t.data_ptr<at::BFloat16>()); }
bf16_t* bf_mut(at::Tensor& t) { return reinterpret_cast<bf16_t*>(t.data_ptr<at::BFloat16>()); }

void check_bf16(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == at::kBFloat16, name, " must be bfloat16, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == dim, name, " must have ", dim, " dimensions, got shape ", t.sizes());
  TORCH_CHECK(t.stride(-1) == 1, name, " must have a contiguous last dimension");
}

void check_index(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kLong && t.dim() == dim && t.is_contiguous(), name,
              " must be a contiguous CPU int64 tensor with ", dim, " dimension(s), got ", t.scalar_type(), " ",
              t.sizes());
}

// ---------------------------------------------------------------------------------------------------------------
// Matrix-vector products against weights in a packed layout (built once by `pack`): a [R, D] matrix is stored as
// [ceil(R/16), ceil(D/2), 16, 2], i.e. for each block of 16 output rows, the pairs (w[r, d], w[r, d+1]) of all 16
// rows side by side. One 64-byte load then feeds one bf16 pair-dot instruction for 16 outputs against a broadcast
// pair of the input; the outputs stay in vector registers (no horizontal sums) and every weight is read once per
// tile of up to 3 input rows. Padding rows/columns are zero.

constexpr int64_t kRows = 16;  // output rows per packed block

struct Packed {  // one packed matrix
  const bf16_t* p;
  int64_t R, D;  // logical shape
  int64_t pairs() const { return (D + 1) / 2; }
  int64_t blocks() const { return (R + kRows - 1) / kRows; }
  const bf16_t* block(int64_t rb) const { return p + rb * pairs() * 2 * kRows; }
};

inline __m512 load16(const bf16_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}


// Where products go: float32 rows, or bf16 rows (rounded to nearest even) when b is set. Row t starts at t * ld.
struct Out {
  float* f;
  bf16_t* b;
  int64_t ld;
  Out at(int64_t t) const { return {f ? f + t * ld : nullptr, b ? b + t * ld : nullptr, ld}; }
};

inline __m256i to_bf16x16(__m512 v) {
#if defined(__AVX512BF16__)
  return (__m256i)_mm512_cvtneps_pbh(v);
#else
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  r = _mm512_mask_or_epi32(r, nan, _mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
  return _mm512_cvtepi32_epi16(r);
#endif
}

// 16 lanes rounded to bf16 and widened back (round_bf for a vector).
inline __m512 round_bf16x16(__m512 v) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(to_bf16x16(v)), 16));
}

typedef int32_t __attribute__((may_alias, aligned(2))) pair_t;  // two bf16 inputs read as one 32-bit word

// One pair step of a tile: acc[r][t] += w pairs of row block r (16 rows) x broadcast input pair t.
template <int RB, int TB>
inline void pair_step(__m512 (&acc)[RB][TB], const bf16_t* w, int64_t bstride, const uint32_t (&xs)[TB]) {
#if defined(__AVX512BF16__)
  __m512i wv[RB];
  for (int r = 0; r < RB; ++r) wv[r] = _mm512_loadu_si512(w + r * bstride);
  for (int t = 0; t < TB; ++t) {
    const __m512i xb = _mm512_set1_epi32(static_cast<int>(xs[t]));
    for (int r = 0; r < RB; ++r) acc[r][t] = _mm512_dpbf16_ps(acc[r][t], (__m512bh)wv[r], (__m512bh)xb);
  }
#else
  __m512 we[RB], wo[RB];
  for (int r = 0; r < RB; ++r) {
    const __m512i v = _mm512_loadu_si512(w + r * bstride);
    we[r] = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
    wo[r] = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(static_cast<int>(0xffff0000u))));
  }
  for (int t = 0; t < TB; ++t) {
    const __m512 x0 = _mm512_castsi512_ps(_mm512_set1_epi32(static_cast<int>(xs[t] << 16)));
    const __m512 x1 = _mm512_castsi512_ps(_mm512_set1_epi32(static_cast<int>(xs[t] & 0xffff0000u)));
    for (int r = 0; r < RB; ++r) acc[r][t] = _mm512_fmadd_ps(wo[r], x1, _mm512_fmadd_ps(we[r], x0, acc[r][t]));
  }
#endif
}

// Rows [rb0*16, (rb0+RB)*16) for TB inputs: out row t, column r = sum_d w[r, d] x[t][d], rows >= R dropped.
// Every output sums its pairs in the same order (two interleaved partial sums, then their sum) whatever the tile
// and job shapes: a token's result does not depend on which other tokens share the call (batch invariance: greedy
// output is the same alone, batched, or verified with drafts).
template <int RB, int TB>
void ptile(const Packed& m, int64_t rb0, const bf16_t* const* x, const Out& y) {
  constexpr int U = 2;
  const int64_t P = m.pairs(), full = m.D / 2;
  const bf16_t* w = m.block(rb0);
  const int64_t bstride = P * 2 * kRows;
  const pair_t* xp[TB];
  for (int t = 0; t < TB; ++t) xp[t] = reinterpret_cast<const pair_t*>(x[t]);
  __m512 acc[U][RB][TB];
  for (int u = 0; u < U; ++u)
    for (int r = 0; r < RB; ++r)
      for (int t = 0; t < TB; ++t) acc[u][r][t] = _mm512_setzero_ps();
  uint32_t xs[TB];
  int64_t p = 0;
  for (; p + U <= full; p += U)
    for (int u = 0; u < U; ++u) {
      for (int t = 0; t < TB; ++t) xs[t] = static_cast<uint32_t>(xp[t][p + u]);
      pair_step<RB, TB>(acc[u], w + (p + u) * 2 * kRows, bstride, xs);
    }
  for (; p < full; ++p) {
    for (int t = 0; t < TB; ++t) xs[t] = static_cast<uint32_t>(xp[t][p]);
    pair_step<RB, TB>(acc[0], w + p * 2 * kRows, bstride, xs);
  }
  if (full < P) {  // odd D: the last pair is (x[D-1], 0)
    for (int t = 0; t < TB; ++t) xs[t] = x[t][m.D - 1];
    pair_step<RB, TB>(acc[0], w + full * 2 * kRows, bstride, xs);
  }
  for (int u = 1; u < U; ++u)
    for (int r = 0; r < RB; ++r)
      for (int t = 0; t < TB; ++t) acc[0][r][t] = _mm512_add_ps(acc[0][r][t], acc[u][r][t]);
  for (int r = 0; r < RB; ++r) {
    const int64_t row0 = (rb0 + r) * kRows, valid = std::min<int64_t>(kRows, m.R - row0);
    const __mmask16 mask = valid >= kRows ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << valid) - 1);
    for (int t = 0; t < TB; ++t) {
      if (y.b)
        _mm256_mask_storeu_epi16(y.b + t * y.ld + row0, mask, to_bf16x16(acc[0][r][t]));
      else
        _mm512_mask_storeu_ps(y.f + t * y.ld + row0, mask, acc[0][r][t]);
    }
  }
}

template <int RB>
void ptile_rows(const Packed& m, int64_t rb0, const bf16_t* const* x, int tb, const Out& y) {
  switch (tb) {
    case 1: ptile<RB, 1>(m, rb0, x, y); break;
    case 2: ptile<RB, 2>(m, rb0, x, y); break;
    default: ptile<RB, 3>(m, rb0, x, y); break;
  }
}

constexpr int kTokens = 3;  // input rows per tile (2 x 4 x 3 accumulators fit the 32 vector registers)

// Row blocks [rb0, rb1) of m against n input rows x[0..n) into out rows 0..n.
void matvec_blocks(const Packed& m, int64_t rb0, int64_t rb1, const bf16_t* const* x, int64_t n, const Out& y) {
  for (int64_t t0 = 0; t0 < n; t0 += kTokens) {
    const int tb = static_cast<int>(std::min<int64_t>(kTokens, n - t0));
    const Out yt = y.at(t0);
    int64_t rb = rb0;
    for (; rb + 4 <= rb1; rb += 4) ptile_rows<4>(m, rb, x + t0, tb, yt);
    switch (rb1 - rb) {
      case 3: ptile_rows<3>(m, rb, x + t0, tb, yt); break;
      case 2: ptile_rows<2>(m, rb, x + t0, tb, yt); break;
      case 1: ptile_rows<1>(m, rb, x + t0, tb, yt); break;
      default: break;
    }
  }
}

#ifndef DSV3_THP
#define DSV3_THP 1
#endif

// A zeroed bf16 tensor for packed weights. From 2 MiB up it sits in 2 MiB-aligned memory advised for transparent
// huge pages: the products stream weights with far fewer TLB misses, which matter most in virtual machines.
at::Tensor weight_zeros(const std::vector<int64_t>& shape) {
  int64_t numel = 1;
  for (int64_t d : shape) numel *= d;
  const size_t bytes = static_cast<size_t>(numel) * sizeof(bf16_t);
  constexpr size_t kHuge = size_t(2) << 20;
  if (!DSV3_THP || bytes < kHuge) return at::zeros(shape, at::TensorOptions().dtype(at::kBFloat16));
  const size_t alloc = (bytes + kHuge - 1) / kHuge * kHuge;
  void* p = std::aligned_alloc(kHuge, alloc);
  TORCH_CHECK(p != nullptr, "pack: could not allocate ", alloc, " bytes");
  madvise(p, alloc, MADV_HUGEPAGE);  // advice only: where THP is off this is ordinary memory
  std::memset(p, 0, alloc);
  return at::from_blob(p, shape, [](void* q) { std::free(q); }, at::TensorOptions().dtype(at::kBFloat16));
}

// w [..., R, D] -> [..., ceil(R/16), ceil(D/2), 16, 2] (zero padded), the layout the products above read.
at::Tensor pack(const at::Tensor& w) {
  TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == at::kBFloat16 && w.dim() >= 2,
              "pack: expects a bfloat16 CPU tensor [..., R, D], got ", w.scalar_type(), " ", w.sizes());
  const at::Tensor c = w.contiguous();
  const int64_t R = c.size(-2), D = c.size(-1), RB = (R + kRows - 1) / kRows, P = (D + 1) / 2;
  const int64_t M = c.numel() / std::max<int64_t>(1, R * D);
  std::vector<int64_t> shape(c.sizes().begin(), c.sizes().end() - 2);
  shape.insert(shape.end(), {RB, P, kRows, 2});
  at::Tensor out = weight_zeros(shape);
  const bf16_t* src = bf_ptr(c);
  bf16_t* dst = bf_mut(out);
  at::parallel_for(0, M * RB, 1, [&](int64_t a, int64_t b) {
    for (int64_t mb = a; mb < b; ++mb) {
      const int64_t mi = mb / RB, rb = mb % RB;
      const bf16_t* s = src + mi * R * D;
      bf16_t* d = dst + (mi * RB + rb) * P * 2 * kRows;
      for (int64_t i = 0; i < kRows && rb * kRows + i < R; ++i)
        for (int64_t k = 0; k < D; ++k) d[((k / 2) * kRows + i) * 2 + (k % 2)] = s[(rb * kRows + i) * D + k];
    }
  });
  return out;
}

Packed packed_matrix(const at::Tensor& t, int64_t R, int64_t D, const char* name, int64_t index = -1) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kBFloat16 && t.is_contiguous(), name,
              " must be a contiguous bfloat16 CPU tensor made by pack()");
  const int64_t RB = (R + kRows - 1) / kRows, P = (D + 1) / 2;
  TORCH_CHECK(t.size(-1) == 2 && t.size(-2) == kRows && t.size(-3) == P && t.size(-4) == RB, name, " ", t.sizes(),
              " is not a packed [", R, ", ", D, "] matrix");
  const bf16_t* base = bf_ptr(t);
  return {index < 0 ? base : base + index * RB * P * 2 * kRows, R, D};
}

// ---------------------------------------------------------------------------------------------------------------
// Small float32 vector helpers for the attention (lengths C, R, V: any size).

inline float dot_f32(const float* a, const float* b, int64_t n) {
  __m512 acc = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
  float s = _mm512_reduce_add_ps(acc);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

inline void axpy_f32(float alpha, const float* x, float* y, int64_t n) {  // y += alpha * x
  const __m512 a = _mm512_set1_ps(alpha);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(y + i, _mm512_fmadd_ps(a, _mm512_loadu_ps(x + i), _mm512_loadu_ps(y + i)));
  for (; i < n; ++i) y[i] += alpha * x[i];
}

inline void bf_to_f32(const bf16_t* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(dst + i, load16(src + i));
  for (; i < n; ++i) dst[i] = bf2f(src[i]);
}

// ---------------------------------------------------------------------------------------------------------------
// RMSNorm with the reference rounding: y = bf16(w * bf16(x * rsqrt(mean(x^2) + eps))), statistics in float32.

void rms_norm_row(const bf16_t* x, const bf16_t* w, double eps, int64_t D, bf16_t* y) {
  __m512 acc = _mm512_setzero_ps();
  int64_t d = 0;
  for (; d + 16 <= D; d += 16) {
    const __m512 v = load16(x + d);
    acc = _mm512_fmadd_ps(v, v, acc);
  }
  float ss = _mm512_reduce_add_ps(acc);
  for (int64_t i = d; i < D; ++i) ss += bf2f(x[i]) * bf2f(x[i]);
  const float r = 1.f / std::sqrt(ss / static_cast<float>(D) + static_cast<float>(eps));
  const __m512 rv = _mm512_set1_ps(r);
  for (d = 0; d + 16 <= D; d += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + d),
                        to_bf16x16(_mm512_mul_ps(load16(w + d), round_bf16x16(_mm512_mul_ps(load16(x + d), rv)))));
  for (; d < D; ++d) y[d] = f2bf(bf2f(w[d]) * round_bf(bf2f(x[d]) * r));
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_bf16(x, "rms_norm: x", 2);
  check_bf16(weight, "rms_norm: weight", 1);
  const int64_t T = x.size(0), D = x.size(1);
  TORCH_CHECK(weight.size(0) == D, "rms_norm: weight has ", weight.size(0), " elements for rows of ", D);
  at::Tensor y = at::empty({T, D}, x.options());
  const bf16_t* xp = bf_ptr(x);
  const bf16_t* wp = bf_ptr(weight);
  bf16_t* yp = bf_mut(y);
  const int64_t ldx = x.stride(0);
  at::parallel_for(0, T, 16, [&](int64_t a, int64_t b) {
    for (int64_t t = a; t < b; ++t) rms_norm_row(xp + t * ldx, wp, eps, D, yp + t * D);
  });
  return y;
}

// ---------------------------------------------------------------------------------------------------------------
// MLA: rotary on interleaved pairs (x0, x1), (x2, x3), ... with cos/sin [T, R/2] float32.

inline void rope_row(bf16_t* x, const float* cos, const float* sin, int64_t R) {
  for (int64_t i = 0; i < R / 2; ++i) {
    const float x1 = bf2f(x[2 * i]), x2 = bf2f(x[2 * i + 1]);
    x[2 * i] = f2bf(x1 * cos[i] - x2 * sin[i]);
    x[2 * i + 1] = f2bf(x2 * cos[i] + x1 * sin[i]);
  }
}

// kv_a [T, C+R] (rows may be strided): the new latents, normalised (c_kv) and rotated (k_pe), written to
// cache[slot_mapping[t]] (cache [S, C+R]). cos/sin [T, R/2].
void store_latents_impl(const at::Tensor& kv_a, const at::Tensor& norm_w, double eps, const at::Tensor& cos,
                        const at::Tensor& sin, at::Tensor& cache, const at::Tensor& slot_mapping) {
  check_bf16(kv_a, "store_latents: kv_a", 2);
  check_bf16(norm_w, "store_latents: norm weight", 1);
  check_bf16(cache, "store_latents: cache", 2);
  check_index(slot_mapping, "store_latents: slot_mapping", 1);
  TORCH_CHECK(cache.is_contiguous(), "store_latents: the cache must be contiguous");
  const int64_t T = kv_a.size(0), C = norm_w.size(0), W = cache.size(1), R = W - C;
  TORCH_CHECK(R > 0 && kv_a.size(1) == W, "store_latents: kv_a ", kv_a.sizes(), " and cache ", cache.sizes(),
              " do not match C=", C);
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.is_contiguous() &&
                  sin.is_contiguous() && cos.numel() == T * (R / 2) && sin.numel() == T * (R / 2),
              "store_latents: cos/sin must be contiguous float32 [T, R/2]");
  TORCH_CHECK(slot_mapping.size(0) == T, "store_latents: slot_mapping has ", slot_mapping.size(0), " slots for ", T,
              " tokens");
  const bf16_t* kp = bf_ptr(kv_a);
  bf16_t* cp = bf_mut(cache);
  const float* cs = cos.data_ptr<float>();
  const float* sn = sin.data_ptr<float>();
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  const int64_t S = cache.size(0), ldk = kv_a.stride(0);
  for (int64_t t = 0; t < T; ++t)
    TORCH_CHECK(slots[t] >= 0 && slots[t] < S, "store_latents: slot ", slots[t], " outside the cache of ", S);
  at::parallel_for(0, T, 8, [&](int64_t a, int64_t b) {
    for (int64_t t = a; t < b; ++t) {
      bf16_t* dst = cp + slots[t] * W;
      rms_norm_row(kp + t * ldk, bf_ptr(norm_w), eps, C, dst);
      std::memcpy(dst + C, kp + t * ldk + C, R * sizeof(bf16_t));
      rope_row(dst + C, cs + t * (R / 2), sn + t * (R / 2), R);
    }
  });
}

void store_latents(const at::Tensor& kv_a, const at::Tensor& norm_w, double eps, const at::Tensor& cos,
                   const at::Tensor& sin, at::Tensor cache, const at::Tensor& slot_mapping) {
  store_latents_impl(kv_a, norm_w, eps, cos, sin, cache, slot_mapping);
}

// q [T, H, N+R]: rotate the last R of every head in place with cos/sin [T, R/2].
void rope_q(at::Tensor& q, const at::Tensor& cos, const at::Tensor& sin, int64_t nope) {
  check_bf16(q, "rope_q: q", 3);
  TORCH_CHECK(q.is_contiguous(), "rope_q: q must be contiguous");
  const int64_t T = q.size(0), H = q.size(1), R = q.size(2) - nope;
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.is_contiguous() &&
                  sin.is_contiguous() && cos.numel() == T * (R / 2) && sin.numel() == T * (R / 2),
              "rope_q: cos/sin must be contiguous float32 [T, R/2]");
  bf16_t* qp = bf_mut(q);
  const float* cs = cos.data_ptr<float>();
  const float* sn = sin.data_ptr<float>();
  at::parallel_for(0, T, 8, [&](int64_t a, int64_t b) {
    for (int64_t t = a; t < b; ++t)
      for (int64_t h = 0; h < H; ++h) rope_row(qp + (t * H + h) * (nope + R) + nope, cs + t * (R / 2), sn + t * (R / 2), R);
  });
}

// q [T, H, N+R]: rotate the last R of every head in place. kv_a [T, C+R]: stored as store_latents does.
void mla_prepare(at::Tensor q, const at::Tensor& kv_a, const at::Tensor& norm_w, double eps, const at::Tensor& cos,
                 const at::Tensor& sin, at::Tensor cache, const at::Tensor& slot_mapping, int64_t nope) {
  TORCH_CHECK(q.size(0) == kv_a.size(0), "mla_prepare: q has ", q.size(0), " rows and kv_a ", kv_a.size(0));
  TORCH_CHECK(q.size(2) - nope == cache.size(1) - norm_w.size(0), "mla_prepare: q's rope width ", q.size(2) - nope,
              " differs from the cache's ", cache.size(1) - norm_w.size(0));
  store_latents_impl(kv_a, norm_w, eps, cos, sin, cache, slot_mapping);
  rope_q(q, cos, sin, nope);
}

// Absorbed attention for Q query rows. Query i is token tok[i] of q [T, H, N+R] (q_pe already rotated); it attends
// to the first len[i] context positions of sequence seq[i], whose cache slots are slots[seq[i], :]. kv_b [H*(N+V), C]
// is kv_b_proj's weight: per head W_uk [N, C] then W_uv [V, C]. Writes out[tok[i]] ([T, H, V]).
constexpr int64_t kTile = 8;  // context positions per online-softmax step (their float32 rows stay in L1)

// exp(x) for 16 lanes (Cephes' single-precision polynomial, ~1 ulp).
inline __m512 exp16(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.3f)), _mm512_set1_ps(88.7f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(p, n);
}

// s[j] = q . rows[j] (W wide) for the nj <= kTile rows of a tile: one accumulator per row, so the rows' sums run
// side by side instead of waiting on each other.
inline void tile_scores(const float* q, const float* rows, int64_t W, int64_t nj, float* s) {
  __m512 a[kTile];
  for (int64_t j = 0; j < kTile; ++j) a[j] = _mm512_setzero_ps();
  int64_t w = 0;
  for (; w + 16 <= W; w += 16) {
    const __m512 qv = _mm512_loadu_ps(q + w);
    for (int64_t j = 0; j < nj; ++j) a[j] = _mm512_fmadd_ps(qv, _mm512_loadu_ps(rows + j * W + w), a[j]);
  }
  if (w < W) {
    const __mmask16 mk = static_cast<__mmask16>((1u << (W - w)) - 1);
    const __m512 qv = _mm512_maskz_loadu_ps(mk, q + w);
    for (int64_t j = 0; j < nj; ++j) a[j] = _mm512_fmadd_ps(qv, _mm512_maskz_loadu_ps(mk, rows + j * W + w), a[j]);
  }
  for (int64_t j = 0; j < nj; ++j) s[j] = _mm512_reduce_add_ps(a[j]);
}

// acc = acc * corr + sum_j p[j] * rows[j][:C], each 16-wide piece of acc loaded and stored once per tile.
inline void tile_accumulate(float* acc, float corr, const float* p, const float* rows, int64_t W, int64_t nj,
                            int64_t C) {
  const __m512 cv = _mm512_set1_ps(corr);
  int64_t c = 0;
  for (; c + 16 <= C; c += 16) {
    __m512 o = _mm512_mul_ps(_mm512_loadu_ps(acc + c), cv);
    for (int64_t j = 0; j < nj; ++j) o = _mm512_fmadd_ps(_mm512_set1_ps(p[j]), _mm512_loadu_ps(rows + j * W + c), o);
    _mm512_storeu_ps(acc + c, o);
  }
  for (; c < C; ++c) {
    float o = acc[c] * corr;
    for (int64_t j = 0; j < nj; ++j) o += p[j] * rows[j * W + c];
    acc[c] = o;
  }
}

void mla_decode(const at::Tensor& q, const at::Tensor& kv, const at::Tensor& tok, const at::Tensor& seq,
                const at::Tensor& len, const at::Tensor& slots, const at::Tensor& kv_b, int64_t v_dim, double scale,
                at::Tensor out) {
  check_bf16(q, "mla_decode: q", 3);
  check_bf16(kv, "mla_decode: kv", 2);
  check_bf16(kv_b, "mla_decode: kv_b", 2);
  check_bf16(out, "mla_decode: out", 3);
  check_index(tok, "mla_decode: tok", 1);
  check_index(seq, "mla_decode: seq", 1);
  check_index(len, "mla_decode: len", 1);
  check_index(slots, "mla_decode: slots", 2);
  TORCH_CHECK(q.is_contiguous() && kv.is_contiguous() && kv_b.is_contiguous() && out.is_contiguous(),
              "mla_decode: q, kv, kv_b and out must be contiguous");
  const int64_t T = q.size(0), H = q.size(1), C = kv_b.size(1), W = kv.size(1), R = W - C, N = q.size(2) - R;
  const int64_t V = v_dim, Q = tok.size(0), Lm = slots.size(1), S = kv.size(0);
  TORCH_CHECK(N > 0 && kv_b.size(0) == H * (N + V), "mla_decode: kv_b ", kv_b.sizes(), " does not fit H=", H,
              " N=", N, " V=", V);
  TORCH_CHECK(out.size(0) == T && out.size(1) == H && out.size(2) == V, "mla_decode: out must be [T, H, V]");
  TORCH_CHECK(seq.size(0) == Q && len.size(0) == Q, "mla_decode: tok, seq and len must have the same length");
  const int64_t* tk = tok.data_ptr<int64_t>();
  const int64_t* sq = seq.data_ptr<int64_t>();
  const int64_t* ln = len.data_ptr<int64_t>();
  const int64_t* sl = slots.data_ptr<int64_t>();
  for (int64_t i = 0; i < Q; ++i) {
    TORCH_CHECK(tk[i] >= 0 && tk[i] < T && sq[i] >= 0 && sq[i] < slots.size(0) && ln[i] >= 1 && ln[i] <= Lm,
                "mla_decode: query ", i, " has token ", tk[i], ", sequence ", sq[i], ", length ", ln[i],
                " outside the step's tables");
    for (int64_t j = 0; j < ln[i]; ++j)
      TORCH_CHECK(sl[sq[i] * Lm + j] >= 0 && sl[sq[i] * Lm + j] < S, "mla_decode: slot outside the cache");
  }
  const bf16_t* qp = bf_ptr(q);
  const bf16_t* kvp = bf_ptr(kv);
  const bf16_t* wp = bf_ptr(kv_b);
  bf16_t* op = bf_mut(out);
  // Groups: runs of consecutive queries of one sequence (its decode row, or its verification rows) convert each
  // context tile once for all of them. Work items: (group, block of heads), enough to keep every thread busy at
  // batch 1. A query's arithmetic is the same whatever its group and head block (batch invariance).
  std::vector<int64_t> gstart;
  for (int64_t i = 0; i < Q; ++i)
    if (i == 0 || sq[i] != sq[i - 1]) gstart.push_back(i);
  gstart.push_back(Q);
  const int64_t G = static_cast<int64_t>(gstart.size()) - 1;
  const int64_t threads = at::get_num_threads();
  const int64_t splits = std::min<int64_t>(H, std::max<int64_t>(1, (2 * threads + G - 1) / G));
  const int64_t hb = (H + splits - 1) / splits, nhb = (H + hb - 1) / hb;
  const float sc = static_cast<float>(scale);
  at::parallel_for(0, G * nhb, 1, [&](int64_t a, int64_t b) {
    std::vector<float> qc, acc, m, l, rows(kTile * W), wrow(std::max(C, N + R)), s(16);
    for (int64_t it = a; it < b; ++it) {
      const int64_t g = it / nhb, h0 = (it % nhb) * hb, h1 = std::min(H, h0 + hb), nh = h1 - h0;
      const int64_t q0 = gstart[g], nq = gstart[g + 1] - q0;
      const int64_t* ctx = sl + sq[q0] * Lm;
      int64_t Lmax = 0;
      for (int64_t qi = 0; qi < nq; ++qi) Lmax = std::max(Lmax, ln[q0 + qi]);
      qc.assign(nq * nh * W, 0.f);
      acc.assign(nq * nh * C, 0.f);
      m.assign(nq * nh, -std::numeric_limits<float>::infinity());
      l.assign(nq * nh, 0.f);
      // q_c = scale * q_nope W_uk (float32), then scale * q_pe: one W-wide query per (query, head).
      for (int64_t qi = 0; qi < nq; ++qi)
        for (int64_t h = h0; h < h1; ++h) {
          float* qh = qc.data() + (qi * nh + h - h0) * W;
          const bf16_t* qrow = qp + (tk[q0 + qi] * H + h) * (N + R);
          for (int64_t n = 0; n < N; ++n) {
            bf_to_f32(wp + (h * (N + V) + n) * C, wrow.data(), C);
            axpy_f32(sc * bf2f(qrow[n]), wrow.data(), qh, C);
          }
          for (int64_t r = 0; r < R; ++r) qh[C + r] = sc * bf2f(qrow[N + r]);
        }
      for (int64_t j0 = 0; j0 < Lmax; j0 += kTile) {
        const int64_t tile = std::min(kTile, Lmax - j0);
        for (int64_t j = 0; j < tile; ++j) bf_to_f32(kvp + ctx[j0 + j] * W, rows.data() + j * W, W);
        for (int64_t qi = 0; qi < nq; ++qi) {
          if (j0 >= ln[q0 + qi]) continue;  // past this query's causal end
          const int64_t nj = std::min(kTile, ln[q0 + qi] - j0);
          for (int64_t h = 0; h < nh; ++h) {
            const int64_t k = qi * nh + h;
            float* sh = s.data();
            tile_scores(qc.data() + k * W, rows.data(), W, nj, sh);
            float mx = m[k];
            for (int64_t j = 0; j < nj; ++j) mx = std::max(mx, sh[j]);
            const float corr = std::exp(m[k] - mx);  // exp(-inf) = 0 on the first tile
            const __mmask16 live = static_cast<__mmask16>((1u << nj) - 1);
            const __m512 p =
                _mm512_maskz_mov_ps(live, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(live, sh), _mm512_set1_ps(mx))));
            _mm512_storeu_ps(sh, p);  // the tile's probabilities
            l[k] = l[k] * corr + _mm512_reduce_add_ps(p);
            m[k] = mx;
            tile_accumulate(acc.data() + k * C, corr, sh, rows.data(), W, nj, C);
          }
        }
      }
      // o = (acc / l) W_uv^T per (query, head), rounded once to bf16.
      for (int64_t qi = 0; qi < nq; ++qi)
        for (int64_t h = h0; h < h1; ++h) {
          const int64_t k = qi * nh + h - h0;
          float* ah = acc.data() + k * C;
          const float inv = 1.f / l[k];
          for (int64_t c = 0; c < C; ++c) ah[c] *= inv;
          bf16_t* orow = op + (tk[q0 + qi] * H + h) * V;
          for (int64_t v = 0; v < V; ++v) {
            bf_to_f32(wp + (h * (N + V) + N + v) * C, wrow.data(), C);
            orow[v] = f2bf(dot_f32(ah, wrow.data(), C));
          }
        }
    }
  });
}

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
inline __m256i swiglu16(__m512 g, __m512 u) {
  const __m512 gb = round_bf16x16(g);
  const __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), gb));
  const __m512 sg = round_bf16x16(_mm512_div_ps(gb, _mm512_add_ps(_mm512_set1_ps(1.f), e)));
  return to_bf16x16(_mm512_mul_ps(sg, round_bf16x16(u)));
}

// out[i] = swiglu(g[i], u[i]) for n float32 (gate, up) values.
inline void swiglu_row(const float* g, const float* u, int64_t n, bf16_t* out) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), swiglu16(_mm512_loadu_ps(g + i), _mm512_loadu_ps(u + i)));
  for (; i < n; ++i) out[i] = swiglu(g[i], u[i]);
}

// The same for bf16 (gate, up) values.
inline void swiglu_row(const bf16_t* g, const bf16_t* u, int64_t n, bf16_t* out) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), swiglu16(load16(g + i), load16(u + i)));
  for (; i < n; ++i) out[i] = swiglu(bf2f(g[i]), bf2f(u[i]));
}

struct Job {  // row blocks [rb0, rb1) of one packed matrix against n input rows
  Packed m;
  int64_t rb0, rb1;
  const bf16_t* const* x;
  int64_t n;
  Out y;
};

void run_jobs(const std::vector<Job>& jobs) {
  at::parallel_for(0, static_cast<int64_t>(jobs.size()), 1, [&](int64_t a, int64_t b) {
    for (int64_t j = a; j < b; ++j) matvec_blocks(jobs[j].m, jobs[j].rb0, jobs[j].rb1, jobs[j].x, jobs[j].n, jobs[j].y);
  });
}

// Jobs for out[t, r] = m[r, :] . x[t]. Each job streams a useful amount of weights (32 KiB for a few input rows,
// 128 KiB for more) over at most 48 input rows; a large product is cut into at least 4 jobs per thread so the
// threads finish together.
void add_jobs(std::vector<Job>& jobs, const Packed& m, const bf16_t* const* x, int64_t n, const Out& y) {
  const int64_t bytes_per_block = m.pairs() * 2 * kRows * 2;
  const int64_t tchunk = n <= 8 * kTokens ? n : 8 * kTokens;
  const int64_t tjobs = (n + tchunk - 1) / tchunk;
  int64_t chunk = std::max<int64_t>(1, (n <= 4 ? (32 << 10) : (128 << 10)) / bytes_per_block);
  const int64_t min_jobs = 4 * at::get_num_threads();
  if (m.blocks() * tjobs < min_jobs * chunk)
    chunk = std::max<int64_t>(1, (m.blocks() * tjobs + min_jobs - 1) / min_jobs);
  chunk = std::min(m.blocks(), (chunk + 3) / 4 * 4);  // whole 4-block tiles: enough accumulation chains
  for (int64_t t0 = 0; t0 < n; t0 += tchunk)
    for (int64_t rb = 0; rb < m.blocks(); rb += chunk)
      jobs.push_back({m, rb, std::min(m.blocks(), rb + chunk), x + t0, std::min(tchunk, n - t0), y.at(t0)});
}

// x [T, D]; gate_w packed [E, D]; w13 packed [E][2I, D] ([gate; up] rows); w2 packed [E][D, I]; the shared expert
// (optional) packed [2Is, D] and [D, Is]. Returns [T, D] bf16.
at::Tensor moe(const at::Tensor& x, const at::Tensor& gate_w, const c10::optional<at::Tensor>& bias, int64_t K,
               int64_t n_group, int64_t topk_group, int64_t group_rule, bool softmax, bool norm_topk, double scale,
               const at::Tensor& w13, const at::Tensor& w2, int64_t I, const c10::optional<at::Tensor>& shared_w13,
               const c10::optional<at::Tensor>& shared_w2, int64_t Is) {
  check_bf16(x, "moe: x", 2);
  TORCH_CHECK(x.is_contiguous(), "moe: x must be contiguous");
  const int64_t T = x.size(0), D = x.size(1), E = w13.size(0);
  const bool gate_f32 = gate_w.scalar_type() == at::kFloat;
  TORCH_CHECK(!gate_f32 || (gate_w.is_contiguous() && gate_w.dim() == 2 && gate_w.size(0) == E && gate_w.size(1) == D),
              "moe: a float32 gate weight must be a contiguous [E, D] = [", E, ", ", D, "] tensor, got ", gate_w.sizes());
  const Packed gate = gate_f32 ? Packed{nullptr, E, D} : packed_matrix(gate_w, E, D, "moe: gate weight");
  for (int64_t e = 0; e < E; e += std::max<int64_t>(1, E - 1)) {  // shape checks on the first and last expert
    packed_matrix(w13, 2 * I, D, "moe: w13", e);
    packed_matrix(w2, D, I, "moe: w2", e);
  }
  TORCH_CHECK(w13.dim() == 5 && w2.dim() == 5 && w2.size(0) == E, "moe: w13 and w2 must be packed [E, ...] stacks");
  TORCH_CHECK(K >= 1 && K <= E, "moe: top_k ", K, " outside [1, ", E, "]");
  TORCH_CHECK(group_rule == 0 || (n_group >= 1 && E % n_group == 0 && topk_group >= 1 && topk_group <= n_group),
              "moe: ", E, " experts cannot form ", n_group, " groups with topk_group ", topk_group);
  const float* bp = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == E,
                "moe: bias must be a contiguous float32 [E]");
    bp = bias->data_ptr<float>();
  }
  const bool has_shared = shared_w13.has_value();
  TORCH_CHECK(has_shared == shared_w2.has_value() && (!has_shared || Is > 0),
              "moe: give both shared_w13 and shared_w2 (and their width Is > 0), or neither");
  const Packed s13 = has_shared ? packed_matrix(*shared_w13, 2 * Is, D, "moe: shared_w13") : Packed{nullptr, 0, 0};
  const Packed s2 = has_shared ? packed_matrix(*shared_w2, D, Is, "moe: shared_w2") : Packed{nullptr, 0, 0};
  const bf16_t* xp = bf_ptr(x);
  at::Tensor out = at::empty({T, D}, x.options());
  if (T == 0) return out;

  // 1. Router logits [T, E] in float32 (a float32 gate weight is used as is, like the reference).
  std::vector<const bf16_t*> xrows(T);
  for (int64_t t = 0; t < T; ++t) xrows[t] = xp + t * D;
  std::vector<float> logits(T * E);
  if (gate_f32) {
    const float* gw = gate_w.data_ptr<float>();
    at::parallel_for(0, T, 1, [&](int64_t a, int64_t b) {
      std::vector<float> xf(D);
      for (int64_t t = a; t < b; ++t) {
        bf_to_f32(xrows[t], xf.data(), D);
        for (int64_t e = 0; e < E; ++e) logits[t * E + e] = dot_f32(xf.data(), gw + e * D, D);
      }
    });
  } else {
    std::vector<Job> jobs;
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
    std::vector<Job> jobs;
    for (int64_t e = 0; e < E; ++e)
      if (count[e])
        add_jobs(jobs, packed_matrix(w13, 2 * I, D, "moe: w13", e), pair_x.data() + start[e], count[e],
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
    std::vector<Job> jobs;
    for (int64_t e = 0; e < E; ++e)
      if (count[e])
        add_jobs(jobs, packed_matrix(w2, D, I, "moe: w2", e), act_rows.data() + start[e], count[e],
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
        __m512 s = _mm512_setzero_ps();
        for (int64_t k = 0; k < K; ++k)
          s = _mm512_fmadd_ps(_mm512_set1_ps(rt.wt[t * K + k]),
                              round_bf16x16(_mm512_loadu_ps(y.data() + pair_of[t * K + k] * D + d)), s);
        __m512 v = round_bf16x16(s);
        if (has_shared) v = _mm512_add_ps(v, round_bf16x16(_mm512_loadu_ps(ys.data() + t * D + d)));
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

// y = x W^T for a packed W [R, D]: x [T, D] bf16 (rows may be strided) -> [T, R] bf16.
at::Tensor linear(const at::Tensor& x, const at::Tensor& w, int64_t R) {
  check_bf16(x, "linear: x", 2);
  const int64_t T = x.size(0), D = x.size(1), ldx = x.stride(0);
  const Packed m = packed_matrix(w, R, D, "linear: weight");
  at::Tensor out = at::empty({T, R}, x.options());
  if (T == 0) return out;
  std::vector<const bf16_t*> rows(T);
  for (int64_t t = 0; t < T; ++t) rows[t] = bf_ptr(x) + t * ldx;
  std::vector<Job> jobs;
  add_jobs(jobs, m, rows.data(), T, Out{nullptr, bf_mut(out), R});
  run_jobs(jobs);
  return out;
}

// SwiGLU MLP (dense layers): down(silu(gate(x)) * up(x)) with gate_up packed [2I, D] and down packed [D, I].
at::Tensor mlp(const at::Tensor& x, const at::Tensor& gate_up, const at::Tensor& down, int64_t I) {
  const int64_t T = x.size(0), D = x.size(1);
  const at::Tensor h = linear(x, gate_up, 2 * I);  // [T, 2I] bf16, like the reference's two projections
  at::Tensor act = at::empty({T, I}, x.options());
  const bf16_t* hp = bf_ptr(h);
  bf16_t* ap = bf_mut(act);
  for (int64_t t = 0; t < T; ++t) swiglu_row(hp + t * 2 * I, hp + t * 2 * I + I, I, ap + t * I);
  return linear(act, down, D);
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
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(op + i), to_bf16x16(_mm512_add_ps(load16(ap + i), load16(bp + i))));
  for (; i < n; ++i) op[i] = f2bf(bf2f(ap[i]) + bf2f(bp[i]));
  return out;
}

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
//   3 q_a_layernorm, 4 q_b packed, 5 kv_a_layernorm, 6 kv_b_proj (plain), 7 o_proj packed, 8 post_attention_layernorm,
//   MoE: 9 gate, 10 bias (or empty), 11 w13, 12 w2, 13 shared w13 (or empty), 14 shared w2 (or empty);
//   dense: 9 gate_up packed, 10 down packed.
// dims: H, N, R, V, C, q_lora, is_moe, top_k, n_group, topk_group, group_rule, softmax, norm_topk, inter,
// shared_inter. scal: rms eps, latent eps, softmax scale, routed scaling factor.
at::Tensor block_forward(const at::Tensor& x, const std::vector<at::Tensor>& w, const std::vector<int64_t>& dims,
                         const std::vector<double>& scal, at::Tensor cache, const at::Tensor& slot_mapping,
                         const at::Tensor& tok, const at::Tensor& seq, const at::Tensor& len, const at::Tensor& slots,
                         const at::Tensor& cos, const at::Tensor& sin, const c10::optional<at::Tensor>& keep) {
  TORCH_CHECK(dims.size() == 15 && scal.size() == 4, "decode_layer: expects 15 dims and 4 scalars");
  const int64_t H = dims[0], N = dims[1], R = dims[2], V = dims[3], C = dims[4], q_lora = dims[5];
  const bool is_moe = dims[6] != 0;
  TORCH_CHECK(w.size() == (is_moe ? 15u : 11u), "decode_layer: expects ", is_moe ? 15 : 11, " tensors, got ",
              w.size());
  check_bf16(x, "decode_layer: x", 2);
  TORCH_CHECK(x.is_contiguous(), "decode_layer: x must be contiguous");
  const int64_t T = x.size(0), D = x.size(1);
  SectionClock clock;
  // Attention: every row's latents to the cache, queries of the kept rows.
  const at::Tensor h = rms_norm(x, w[0], scal[0]);
  at::Tensor q_in, kv_a;  // q_in: what q comes from (q_a rows, or normalised x when q_lora = 0)
  if (q_lora > 0) {
    const at::Tensor qkv = linear(h, w[1], q_lora + C + R);
    q_in = qkv.narrow(1, 0, q_lora);
    kv_a = qkv.narrow(1, q_lora, C + R);
  } else {
    q_in = h;
    kv_a = linear(h, w[2], C + R);
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
  at::Tensor q = q_lora > 0 ? linear(rms_norm(q_in, w[3], scal[1]), w[4], H * (N + R)) : linear(q_in, w[1], H * (N + R));
  q = q.view({K, H, N + R});
  rope_q(q, qcos, qsin, N);
  clock.lap(2);
  at::Tensor o = at::empty({K, H, V}, x.options());
  mla_decode(q, cache, qtok, qseq, qlen, slots, w[6], V, scal[2], o);
  clock.lap(3);
  const at::Tensor x1 = add_bf16(xk, linear(o.view({K, H * V}), w[7], D));
  clock.lap(4);
  // Feed-forward.
  const at::Tensor h2 = rms_norm(x1, w[8], scal[0]);
  clock.lap(5);
  at::Tensor f;
  if (is_moe) {
    const auto opt = [](const at::Tensor& t) { return t.numel() ? c10::optional<at::Tensor>(t) : c10::nullopt; };
    f = moe(h2, w[9], opt(w[10]), dims[7], dims[8], dims[9], dims[10], dims[11] != 0, dims[12] != 0, scal[3], w[11],
            w[12], dims[13], opt(w[13]), opt(w[14]), dims[14]);
  } else {
    f = mlp(h2, w[9], w[10], dims[13]);
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
                      len, slots, cos, sin, i + 1 == L ? keep : c10::nullopt);
  }
  return h;
}


// Index of the first maximum of n bf16 or float32 values, a NaN counting as the maximum (torch.argmax's rule).
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline float to_f32(bf16_t v) { return bf2f(v); }
inline float to_f32(float v) { return v; }

template <typename T>
int64_t argmax_row(const T* x, int64_t n) {
  __m512 mx = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 v = load16(x + i);
    if (_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q)) break;  // a NaN: the scalar scan below finds the first one
    mx = _mm512_max_ps(mx, v);
  }
  float best = _mm512_reduce_max_ps(mx);
  int64_t arg = -1;
  for (int64_t j = 0; j < i && arg < 0; j += 16) {  // the first lane holding the maximum
    const __mmask16 hit = _mm512_cmp_ps_mask(load16(x + j), _mm512_set1_ps(best), _CMP_EQ_OQ);
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
  const __m512 neg_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  const __m512 tv = _mm512_set1_ps(t);
  __m512 mx = neg_inf;
  int64_t i = 0;
  for (; i + 16 <= V; i += 16) {  // y = x / t, and the row's maximum
    const __m512 q = _mm512_div_ps(load16(x + i), tv);
    _mm512_storeu_ps(y + i, q);
    mx = _mm512_max_ps(mx, q);
  }
  float m = _mm512_reduce_max_ps(mx);
  for (; i < V; ++i) {
    y[i] = to_f32(x[i]) / t;
    m = std::max(m, y[i]);
  }
  if (!std::isfinite(m)) return false;
  const __m512 mv = _mm512_set1_ps(m);
  __m512 acc = _mm512_setzero_ps();
  for (i = 0; i + 16 <= V; i += 16) {  // e = exp(y - max), 0 where y = -inf; their sum
    const __m512 q = _mm512_loadu_ps(y + i);
    const __mmask16 live = _mm512_cmp_ps_mask(q, neg_inf, _CMP_NEQ_OQ);
    const __m512 e = _mm512_maskz_mov_ps(live, exp16(_mm512_sub_ps(q, mv)));
    _mm512_storeu_ps(y + i, e);
    acc = _mm512_add_ps(acc, e);
  }
  float sum = _mm512_reduce_add_ps(acc);
  for (; i < V; ++i) {
    y[i] = std::isinf(y[i]) && y[i] < 0 ? 0.f : std::exp(y[i] - m);
    sum += y[i];
  }
  const float inv = 1.f / sum;
  const __m512 iv = _mm512_set1_ps(inv);
  for (i = 0; i + 16 <= V; i += 16) _mm512_storeu_ps(y + i, _mm512_mul_ps(_mm512_loadu_ps(y + i), iv));
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

std::string capability() {
#if defined(__AVX512BF16__)
  return "avx512_bf16";
#else
  return "avx512";
#endif
}

}  // namespace

DSV3_LIBRARY(DSV3_NS, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor", &rms_norm);
  m.def("mla_prepare(Tensor(a!) q, Tensor kv_a, Tensor norm_w, float eps, Tensor cos, Tensor sin, Tensor(b!) cache, "
        "Tensor slot_mapping, int nope) -> ()", &mla_prepare);
  m.def("mla_decode(Tensor q, Tensor kv, Tensor tok, Tensor seq, Tensor len, Tensor slots, Tensor kv_b, int v_dim, "
        "float scale, Tensor(a!) out) -> ()", &mla_decode);
  m.def("pack(Tensor w) -> Tensor", &pack);
  m.def("linear(Tensor x, Tensor w, int out_features) -> Tensor", &linear);
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
  m.def("mtp_draft(int mtp, Tensor embed, Tensor enorm, "
        "Tensor hnorm, Tensor eh_proj, Tensor head_norm, Tensor lm_head, int vocab, float eps, Tensor h, "
        "Tensor next_ids, Tensor(a!) kv_all, int layer_offset, Tensor slot_mapping, Tensor tok, Tensor seq, "
        "Tensor len, Tensor slots, Tensor cos, Tensor sin, Tensor? keep=None, bool return_logits=False, "
        "float[]? temperatures=None, Tensor? u=None) -> (Tensor, Tensor, Tensor)", &mtp_draft);
  m.def("store_latents(Tensor kv_a, Tensor norm_w, float eps, Tensor cos, Tensor sin, Tensor(a!) cache, "
        "Tensor slot_mapping) -> ()", &store_latents);
  m.def("argmax_rows(Tensor x) -> Tensor", &argmax_rows);
  m.def("draw_inverse_cdf(Tensor probs, Tensor u) -> Tensor", &draw_inverse_cdf);
  m.def("tempered_softmax(Tensor x, float t) -> Tensor", &tempered_softmax);
  m.def("speculative_accept(Tensor p, Tensor[] q, int[] drafts, int[] counts, Tensor u) -> (int[], int[])",
        &speculative_accept);
  m.def("section_times() -> float[]", &section_times);
  m.def("capability() -> str", &capability);
}
