// The packed bf16 weight layout (built once by `pack`) and the tile products that stream it: matrix-vector
// and small matrix-matrix products with a batch-invariant summation order, which the layer products build on.
#pragma once

#include "common.h"

namespace {

// ---------------------------------------------------------------------------------------------------------------
// Matrix-vector products against weights in a packed layout (built once by `pack`): a [R, D] matrix is stored as
// [ceil(R/16), ceil(D/2), 16, 2], i.e. for each block of 16 output rows, the pairs (w[r, d], w[r, d+1]) of all 16
// rows side by side. One 64-byte load then feeds one bf16 pair-dot instruction for 16 outputs against a broadcast
// pair of the input; the outputs stay in vector registers (no horizontal sums) and every weight is read once per
// tile of up to 3 input rows. Padding rows/columns are zero.

constexpr int64_t kRows = 16;  // output rows per packed block
#if defined(DSV3_AVX512)
constexpr int kChains = 2;  // interleaved partial sums per output (hide the FMA latency)
#else
constexpr int kChains = 1;
#endif

struct Packed {  // one packed matrix: bf16 (p), or int8/int4 codes and scales (kind != 0: qpacked.h)
  const bf16_t* p;
  int64_t R, D;  // logical shape
  int64_t kind = 0, G = 0;
  const uint8_t* q = nullptr;
  const uint16_t* s = nullptr;
  const float* sf = nullptr;  // kQInt8X: float32 scales per 16 inputs
  const float* mn = nullptr;  // kQInt8X: float32 mins per 32 inputs
  const uint16_t* kd = nullptr;  // kQInt4K / kQInt6K: float16 super-block scales [panels][D/256][16]
  const uint16_t* kdm = nullptr;  // kQInt4K: float16 super-block mins [panels][D/256][16]
  const uint8_t* ksc = nullptr;   // kQInt4K: uint8 scales [panels][D/32][16]; kQInt6K: int8 [panels][D/16][16]
  const uint8_t* km = nullptr;    // kQInt4K: uint8 mins [panels][D/32][16]
  int64_t pairs() const { return (D + 1) / 2; }
  int64_t blocks() const { return (R + kRows - 1) / kRows; }
  const bf16_t* block(int64_t rb) const { return p + rb * pairs() * 2 * kRows; }
};


// Where products go: float32 rows, or bf16 rows (rounded to nearest even) when b is set. Row t starts at t * ld.
struct Out {
  float* f;
  bf16_t* b;
  int64_t ld;
  Out at(int64_t t) const { return {f ? f + t * ld : nullptr, b ? b + t * ld : nullptr, ld}; }
};

typedef int32_t __attribute__((may_alias, aligned(2))) pair_t;  // two bf16 inputs read as one 32-bit word

// One pair step of a tile: acc[r][t] += w pairs of row block r (16 rows) x broadcast input pair t.
template <int RB, int TB>
inline void pair_step(V16f (&acc)[RB][TB], const bf16_t* w, int64_t bstride, const uint32_t (&xs)[TB]) {
#if defined(__AVX512BF16__)
  V16i wv[RB];
  for (int r = 0; r < RB; ++r) wv[r] = v16_loadu_si512(w + r * bstride);
  for (int t = 0; t < TB; ++t) {
    const V16i xb = v16_set1_epi32(static_cast<int>(xs[t]));
    for (int r = 0; r < RB; ++r) acc[r][t] = _mm512_dpbf16_ps(acc[r][t], (__m512bh)wv[r], (__m512bh)xb);
  }
#else
  V16f we[RB], wo[RB];
  for (int r = 0; r < RB; ++r) {
    const V16i v = v16_loadu_si512(w + r * bstride);
    we[r] = v16_castsi512_ps(v16_slli_epi32(v, 16));
    wo[r] = v16_castsi512_ps(v16_and_si512(v, v16_set1_epi32(static_cast<int>(0xffff0000u))));
  }
  for (int t = 0; t < TB; ++t) {
    const V16f x0 = v16_castsi512_ps(v16_set1_epi32(static_cast<int>(xs[t] << 16)));
    const V16f x1 = v16_castsi512_ps(v16_set1_epi32(static_cast<int>(xs[t] & 0xffff0000u)));
    for (int r = 0; r < RB; ++r) acc[r][t] = v16_fmadd_ps(wo[r], x1, v16_fmadd_ps(we[r], x0, acc[r][t]));
  }
#endif
}

// Rows [rb0*16, (rb0+RB)*16) for TB inputs: out row t, column r = sum_d w[r, d] x[t][d], rows >= R dropped.
// Every output sums its pairs in the same order (two interleaved partial sums, then their sum) whatever the tile
// and job shapes: a token's result does not depend on which other tokens share the call (batch invariance: greedy
// output is the same alone, batched, or verified with drafts).
template <int RB, int TB>
void ptile(const Packed& m, int64_t rb0, const bf16_t* const* x, const Out& y) {
  constexpr int U = kChains;
  const int64_t P = m.pairs(), full = m.D / 2;
  const bf16_t* w = m.block(rb0);
  const int64_t bstride = P * 2 * kRows;
  const pair_t* xp[TB];
  for (int t = 0; t < TB; ++t) xp[t] = reinterpret_cast<const pair_t*>(x[t]);
  V16f acc[U][RB][TB];
  for (int u = 0; u < U; ++u)
    for (int r = 0; r < RB; ++r)
      for (int t = 0; t < TB; ++t) acc[u][r][t] = v16_setzero_ps();
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
      for (int t = 0; t < TB; ++t) acc[0][r][t] = v16_add_ps(acc[0][r][t], acc[u][r][t]);
  for (int r = 0; r < RB; ++r) {
    const int64_t row0 = (rb0 + r) * kRows, valid = std::min<int64_t>(kRows, m.R - row0);
    const M16 mask = valid >= kRows ? static_cast<M16>(0xffff) : static_cast<M16>((1u << valid) - 1);
    for (int t = 0; t < TB; ++t) {
      if (y.b)
        v16_mask_store_bf16(y.b + t * y.ld + row0, mask, to_bf16x16(acc[0][r][t]));
      else
        v16_mask_storeu_ps(y.f + t * y.ld + row0, mask, acc[0][r][t]);
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

// Tile shapes per vector width: with AVX-512, 2 chains x 4 row blocks x 3 input rows of accumulators fit the 32
// registers; with AVX2 a 16-lane vector takes two of the 16 registers, so one chain of at most 2 x 3.
constexpr int kTokens = 3;  // input rows per tile
#if defined(DSV3_AVX512)
constexpr int kTileBlocks = 4;
#else
constexpr int kTileBlocks = 2;
#endif

// Row blocks [rb0, rb1) of m against n input rows x[0..n) into out rows 0..n.
void matvec_blocks(const Packed& m, int64_t rb0, int64_t rb1, const bf16_t* const* x, int64_t n, const Out& y) {
  for (int64_t t0 = 0; t0 < n; t0 += kTokens) {
    const int tb = static_cast<int>(std::min<int64_t>(kTokens, n - t0));
    const Out yt = y.at(t0);
    int64_t rb = rb0;
    for (; rb + kTileBlocks <= rb1; rb += kTileBlocks) ptile_rows<kTileBlocks>(m, rb, x + t0, tb, yt);
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

Packed quant_matrix(const at::Tensor& t, int64_t R, int64_t D, const char* name, int64_t index);  // qpacked.h

// The matrix behind a packed tensor: bf16 from pack(), or a uint8 blob of quantised codes (quant_cpu.pack).
Packed packed_matrix(const at::Tensor& t, int64_t R, int64_t D, const char* name, int64_t index = -1) {
  if (t.scalar_type() == at::kByte) return quant_matrix(t, R, D, name, index);
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kBFloat16 && t.is_contiguous(), name,
              " must be a contiguous bfloat16 CPU tensor made by pack()");
  const int64_t RB = (R + kRows - 1) / kRows, P = (D + 1) / 2;
  TORCH_CHECK(t.size(-1) == 2 && t.size(-2) == kRows && t.size(-3) == P && t.size(-4) == RB, name, " ", t.sizes(),
              " is not a packed [", R, ", ", D, "] matrix");
  const bf16_t* base = bf_ptr(t);
  return {index < 0 ? base : base + index * RB * P * 2 * kRows, R, D};
}

}  // namespace
