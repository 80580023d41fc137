// int8 / int4 weights in the products: their packed layout (built by kernels/quant_cpu.py), the quantisation of
// input rows per group, and the integer tile products (AVX-512 VNNI dpbusd / dpwssd, or AVX2 maddubs / madd).
//
// A quantised matrix W [R, D] with groups of G inputs (G = 32; n = D / G groups per row) is one uint8 blob:
//   header (64 bytes, 8 int64): magic "DSV3Q002", kind (1 = int8, 2 = int4), R, D, G, codes offset, scales
//   offset, blob bytes;
//   codes, per panel of 16 output rows (rows padded with zeros to a multiple of 16):
//     int8: [n][G/2 steps][16 rows][2 inputs] int8: 32 bytes = 2 consecutive inputs of each of 16 rows;
//     int4: [n][G/8 step pairs][16 rows][4 inputs] bytes, the low nibble from step 2k, the high one from step 2k+1
//           (64 bytes = 8 inputs of 16 rows); codes c in [0, 15], w = (c - 8) * scale;
//   scales [panels][n][16 rows] float16 (the group scales of the 16 rows side by side).
//   kind 3 (int8x, GGUF's Q5_K / Q6_K / Q5_1 and any mixture of schemes fused into one matrix, quant_cpu.py):
//     codes as int8, w = c * scale_h - min_g with float32 scales per 16 inputs (h) [panels][D/16][16 rows] and
//     float32 mins per 32 (g) [panels][D/32][16 rows] right after them; header G = 16;
//   kind 4 (int4m, GGUF's Q4_K / Q4_1): codes as int4 but without the offset, w = c * scale_g - min_g, float32
//     scales [panels][n][16 rows] then float32 mins [panels][n][16 rows] (6 bits per weight).
//   kind 5 (int6x): kind 3 for codes in [-32, 31] (Q6_K, Q5_K, Q5_1, Q4_K and their mixtures), held in 6 bits:
//     u = c + 32 per group of a panel as 384 bytes: 8 x 32 bytes of nibbles (byte j of chunk k: the low 4 bits of
//     int8x step k's byte j, then of step k + 8's in the high nibble), then 4 x 32 bytes of top bits (byte j of
//     chunk k: the top 2 bits of steps k, k + 4, k + 8, k + 12 at shifts 0, 2, 4, 6); scales and mins as kind 3.
//   kind 6 (int6): kind 5 without mins (all of them zero: Q6_K), the scales alone after the codes (8 bits/weight).
//   kind 7 (int4k, GGUF's Q4_K in its own form): codes as kind 4; scale_g = d_s * sc_g and min_g = dmin_s * m_g per
//     super-block s of 256 inputs: float16 d [panels][D/256][16], float16 dmin [same], uint8 sc [panels][n][16],
//     uint8 m [same] (4.625 bits per weight). A float16 times an 8-bit integer is exact in float32, so these are
//     kind 4's float32 scales and mins exactly, and the product's bits are kind 4's.
//   kind 8 (int6k, GGUF's Q6_K in its own form): u = c + 32 in [0, 63], w = c * scale_h, scale_h = d_s * sc_h per
//     16 inputs; per group of a panel 384 bytes: kind 4's 256 bytes of nibbles of u, then two 64-byte planes of its
//     top two bits (plane p, byte j: nibble vectors b = 4p .. 4p + 3 at shifts 2 (b mod 4); b as in kind 9); float16
//     d [panels][D/256][16], int8 sc [panels][D/16][16] (6.56 bits per weight). int8 activations, as llama.cpp's
//     Q6_K x Q8_K product (per 32 here, per 256 there), and each half's sum S_h = sum u q - 32 s_h.
//   kind 9 (int5k, GGUF's Q5_K in its own form): 5-bit codes c in [0, 31], w = c * scale_g - min_g with kind 7's
//     scales and mins; per group of a panel 320 bytes: kind 4's 256 bytes of nibbles, then 64 bytes of fifth bits
//     (bit b of byte j: the top bit of the code whose nibble is byte j of nibble vector b: b = 2k for the low
//     nibbles of the k-th 64 bytes, 2k + 1 for their high ones). int8 activations, as kind 4 (5.625 bits/weight).
// An input row x is quantised per group g: for int4 matrices to int8 like GGUF's Q8_0 (d_g = max|x| / 127), for
// int8 matrices to int16 (d_g = max|x| / 32767: int8 x int8 would add a second rounding as large as the weights'
// own and cost top-token agreement, docs/quantization.md); q = round_half_even(x / d_g) in float32
// (q = x * (1 / d_g)), s_g = sum of the group's q. Then, exactly in integers, a row's group sum is
// S = sum c q (int4: minus 8 s_g) and y = sum_g (scale_g * d_g) * S in float32, groups in order: the result of a
// row does not depend on the other rows of the call (batch invariance). quant_cpu.linear_quant_acts is the oracle.
#pragma once

#include "packed.h"

#include <deque>
#include <map>
#include <tuple>
#include <type_traits>

namespace {

constexpr int64_t kQMagic = 0x3230305133565344LL;  // "DSV3Q002" little-endian
constexpr int64_t kQHeaderBytes = 64;
constexpr int64_t kQPanel = 16;
enum QKind : int64_t { kQNone = 0, kQInt8 = 1, kQInt4 = 2, kQInt8X = 3, kQInt4M = 4, kQInt6X = 5, kQInt6 = 6, kQInt4K = 7, kQInt6K = 8, kQInt5K = 9 };
constexpr int64_t kQActGroup = 32;  // inputs per activation group (and per codes group) of every kind

struct QHeader {
  int64_t magic, kind, R, D, G, codes, scales, bytes;
};

// A quantised matrix from blob row `index` of t (uint8 [bytes] or [E, bytes]), checked against the expected shape.
Packed quant_matrix(const at::Tensor& t, int64_t R, int64_t D, const char* name, int64_t index) {
  TORCH_CHECK(t.is_contiguous() && t.size(-1) >= kQHeaderBytes, name, " is not a quantised blob made by quant_cpu.pack");
  const uint8_t* base = t.data_ptr<uint8_t>() + (index < 0 ? 0 : index * t.size(-1));
  QHeader h;
  std::memcpy(&h, base, sizeof(h));
  TORCH_CHECK(h.magic == kQMagic, name, ": not a quantised blob (bad magic); pack it with quant_cpu.pack");
  TORCH_CHECK(h.kind >= kQInt8 && h.kind <= kQInt5K, name, ": unknown quantised kind ", h.kind);
  const bool x16 = h.kind == kQInt8X || h.kind == kQInt6X || h.kind == kQInt6 || h.kind == kQInt6K;  // per 16
  TORCH_CHECK(h.R == R && h.D == D, name, " is a quantised [", h.R, ", ", h.D, "] matrix, expected [", R, ", ", D, "]");
  TORCH_CHECK(h.G == (x16 ? 16 : 32) && D % kQActGroup == 0, name, ": group size ", h.G,
              " is not supported here (32, or 16 for kinds 3 and 5; D a multiple of 32)");
  TORCH_CHECK(h.bytes == t.size(-1), name, ": blob of ", t.size(-1), " bytes, its header says ", h.bytes);
  Packed m{nullptr, R, D};
  m.kind = h.kind;
  m.G = h.G;
  m.q = base + h.codes;
  m.s = reinterpret_cast<const uint16_t*>(base + h.scales);
  if (h.kind == kQInt4K || h.kind == kQInt6K || h.kind == kQInt5K) {
    TORCH_CHECK(D % 256 == 0, name, ": kind ", h.kind, " needs D a multiple of 256, not ", D);
    const int64_t panels = (R + kQPanel - 1) / kQPanel, supers = panels * (D / 256) * kQPanel;
    m.kd = reinterpret_cast<const uint16_t*>(base + h.scales);
    if (h.kind != kQInt6K) {
      m.kdm = m.kd + supers;
      m.ksc = reinterpret_cast<const uint8_t*>(m.kdm + supers);
      m.km = m.ksc + panels * (D / 32) * kQPanel;
      TORCH_CHECK(h.scales + 4 * supers + 2 * panels * (D / 32) * kQPanel <= h.bytes, name,
                  ": blob too short for its scales and mins");
    } else {
      m.ksc = reinterpret_cast<const uint8_t*>(m.kd + supers);
      TORCH_CHECK(h.scales + 2 * supers + panels * (D / 16) * kQPanel <= h.bytes, name, ": blob too short for its scales");
    }
  } else if (x16 || h.kind == kQInt4M) {
    const int64_t panels = (R + kQPanel - 1) / kQPanel, per = x16 ? D / 16 : D / 32;
    const int64_t mins = h.kind == kQInt6 ? 0 : D / 32;  // per row
    m.sf = reinterpret_cast<const float*>(base + h.scales);
    m.mn = mins ? m.sf + panels * per * kQPanel : nullptr;
    TORCH_CHECK(h.scales + panels * (per + mins) * kQPanel * 4 <= h.bytes, name,
                ": blob too short for its scales and mins");
  }
  return m;
}

// ---------------------------------------------------------------------------------------------------------------
// Input rows quantised per group (to int8 for int4 matrices, to int16 for int8 matrices).

struct QRow {
  const int8_t* q;    // [D] (int4 matrices; else null)
  const int16_t* q16; // [D] (int8 matrices; else null)
  const float* d;     // [n] group scales
  const int32_t* s;   // [n] group sums of q
  const int32_t* s16; // [2n] sums of q per 16 inputs (int4 matrices; else null)
};

constexpr int kActBits[10] = {0, 16, 8, 16, 8, 16, 16, 8, 8, 8};  // by QKind: the activation width each matrix kind reads

inline float rne_int(float v) { return std::nearbyint(v); }  // round half to even (the default rounding mode)

template <typename X, typename Q>
void quantize_row(const X* x, int64_t D, int64_t G, Q* q, float* d, int32_t* s, int32_t* s16) {
  constexpr float qmax = std::is_same_v<Q, int8_t> ? 127.f : 32767.f;
  for (int64_t g = 0; g < D / G; ++g) {
    const X* xg = x + g * G;
    float amax = 0.f;
    for (int64_t i = 0; i < G; ++i) amax = std::max(amax, std::fabs(static_cast<float>(xg[i])));
    const float dg = amax / qmax;
    const float inv = dg != 0.f ? 1.f / dg : 0.f;
    int32_t sum = 0, half = 0;
    for (int64_t i = 0; i < G; ++i) {
      const float v = std::max(-qmax, std::min(qmax, rne_int(static_cast<float>(xg[i]) * inv)));
      q[g * G + i] = static_cast<Q>(v);
      sum += static_cast<int32_t>(v);
      if (i < 16) half += static_cast<int32_t>(v);
    }
    d[g] = dg;
    s[g] = sum;
    if (s16) s16[2 * g] = half, s16[2 * g + 1] = sum - half;
  }
}

struct Bf16Val {  // a bf16 read as float (for quantize_row's template)
  bf16_t v;
  explicit operator float() const { return bf2f(v); }
};

// quantize_row on bf16 inputs; with AVX-512 and groups of 32, two 16-lane halves per group with the same operations
// (a NaN input skipped by the group's max and clamped to qmax, round half to even, the sum of integers exact in
// float32), so it returns the scalar loop's bits (tests/test_quant_kernels.py compares the builds).
template <typename Q>
void quantize_row_bf16(const bf16_t* x, int64_t D, int64_t G, Q* q, float* d, int32_t* s, int32_t* s16) {
#if defined(DSV3_AVX512)
  if (G == 32) {
    constexpr float qmax = std::is_same_v<Q, int8_t> ? 127.f : 32767.f;
    const __m512 absmask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
    const __m512 hi = _mm512_set1_ps(qmax), lo = _mm512_set1_ps(-qmax);
    for (int64_t g = 0; g < D / 32; ++g) {
      const __m512 a = load16(x + g * 32), b = load16(x + g * 32 + 16);
      // max_ps(v, acc) keeps acc where v is NaN, as std::max(acc, v) does
      const __m512 m = _mm512_max_ps(_mm512_and_ps(b, absmask), _mm512_max_ps(_mm512_and_ps(a, absmask),
                                                                                _mm512_setzero_ps()));
      const float dg = _mm512_reduce_max_ps(m) / qmax;
      const __m512 inv = _mm512_set1_ps(dg != 0.f ? 1.f / dg : 0.f);
      constexpr int rne = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
      // min_ps(v, qmax) gives qmax for NaN, as std::min(qmax, v) does
      const __m512 qa = _mm512_max_ps(_mm512_min_ps(_mm512_roundscale_ps(_mm512_mul_ps(a, inv), rne), hi), lo);
      const __m512 qb = _mm512_max_ps(_mm512_min_ps(_mm512_roundscale_ps(_mm512_mul_ps(b, inv), rne), hi), lo);
      const __m512i ia = _mm512_cvtps_epi32(qa), ib = _mm512_cvtps_epi32(qb);
      if constexpr (std::is_same_v<Q, int8_t>) {
        _mm_storeu_si128(reinterpret_cast<__m128i*>(q + g * 32), _mm512_cvtepi32_epi8(ia));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(q + g * 32 + 16), _mm512_cvtepi32_epi8(ib));
      } else {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + g * 32), _mm512_cvtepi32_epi16(ia));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + g * 32 + 16), _mm512_cvtepi32_epi16(ib));
      }
      d[g] = dg;
      s[g] = static_cast<int32_t>(_mm512_reduce_add_ps(_mm512_add_ps(qa, qb)));  // |sum| < 2^21: exact
      if (s16) s16[2 * g] = static_cast<int32_t>(_mm512_reduce_add_ps(qa)), s16[2 * g + 1] = s[g] - s16[2 * g];
    }
    return;
  }
#endif
  quantize_row(reinterpret_cast<const Bf16Val*>(x), D, G, q, d, s, s16);
}

// The quantised rows of one call's products, made once per (row, D, G) and shared by every matrix that reads it.
struct QActs {
  struct Rows {
    std::vector<int8_t> q;
    std::vector<int16_t> q16;
    std::vector<float> d;
    std::vector<int32_t> s, s16;
  };
  std::map<std::tuple<const void*, int64_t, int64_t, int>, QRow> index;
  std::deque<Rows> store;
  std::deque<std::vector<QRow>> lists;

  // The quantised form (to `bits` = 8 or 16) of n bf16 rows x[0..n) of length D (new ones quantised in parallel).
  const QRow* rows(const bf16_t* const* x, int64_t n, int64_t D, int64_t G, int bits) {
    std::vector<int64_t> todo;
    std::vector<QRow>& out = lists.emplace_back(n);
    for (int64_t t = 0; t < n; ++t) {
      auto it = index.find({x[t], D, G, bits});
      if (it != index.end()) out[t] = it->second;
      else todo.push_back(t);
    }
    if (!todo.empty()) {
      const int64_t m = static_cast<int64_t>(todo.size()), ng = D / G;
      Rows& r = store.emplace_back();
      if (bits == 8) r.q.resize(m * D);
      else r.q16.resize(m * D);
      r.d.resize(m * ng);
      r.s.resize(m * ng);
      if (bits == 8) r.s16.resize(2 * m * ng);
      at::parallel_for(0, m, 16, [&](int64_t a, int64_t b) {
        for (int64_t i = a; i < b; ++i) {
          const bf16_t* xi = x[todo[i]];
          if (bits == 8)
            quantize_row_bf16(xi, D, G, r.q.data() + i * D, r.d.data() + i * ng, r.s.data() + i * ng,
                              r.s16.data() + 2 * i * ng);
          else quantize_row_bf16(xi, D, G, r.q16.data() + i * D, r.d.data() + i * ng, r.s.data() + i * ng, nullptr);
        }
      });
      for (int64_t i = 0; i < m; ++i) {
        const QRow row{bits == 8 ? r.q.data() + i * D : nullptr, bits == 8 ? nullptr : r.q16.data() + i * D,
                       r.d.data() + i * ng, r.s.data() + i * ng, bits == 8 ? r.s16.data() + 2 * i * ng : nullptr};
        // (a row pointer given twice in one call has one entry: the first)
        out[todo[i]] =
            index.emplace(std::make_tuple(static_cast<const void*>(x[todo[i]]), D, G, bits), row).first->second;
      }
    }
    return out.data();
  }
};

// ---------------------------------------------------------------------------------------------------------------
// Tile products: one 16-row block x TB input rows, all groups. Lanes are output rows, so a group's integer sum needs
// no horizontal reduction. With AVX-512 VNNI one 512-bit dpbusd (int4: unsigned codes x int8 inputs, 4 per lane) or
// dpwssd (int8: codes widened to int16 x int16 inputs, 2 per lane) forms 16 rows' partial sums; on AVX2 the block is
// two halves of 8 rows, with maddubs / madd. Both give the same exact integer group sums and then the same float32
// operations per row, so every build computes the same bits.

inline int32_t load4(const void* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

inline void store_rows(const Out& y, int64_t t, int64_t row0, int64_t R, const float* lanes, int64_t count) {
  const int64_t valid = std::min<int64_t>(count, R - row0);
  if (valid <= 0) return;
  if (y.b) {
    bf16_t* p = y.b + t * y.ld + row0;
    for (int64_t i = 0; i < valid; ++i) p[i] = f2bf(lanes[i]);
  } else {
    float* p = y.f + t * y.ld + row0;
    for (int64_t i = 0; i < valid; ++i) p[i] = lanes[i];
  }
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define DSV3_QVNNI 1

// GGUF's own scales (kinds 7-9): 16 float16s, and those times 16 8-bit integers (exact in float32).
inline __m512 f16x16(const uint16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
template <bool Signed>
inline __m512 times_i8x16(__m512 d, const uint8_t* q) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
  return _mm512_mul_ps(d, _mm512_cvtepi32_ps(Signed ? _mm512_cvtepi8_epi32(v) : _mm512_cvtepu8_epi32(v)));
}

// M (kind int4m): codes without the offset, float32 scales, the group's min times its activation sum taken off.
template <int TB, bool M = false, bool K = false, bool B5 = false>
void qtile_int4(const Packed& m, int64_t rb, const QRow* x, const Out& y) {
  const int64_t n = m.D / 32;
  const __m512i nib = _mm512_set1_epi8(0x0f);
  constexpr int64_t gbytes = B5 ? 320 : 256;  // one group of one 16-row panel
  const uint8_t* w = m.q + rb * n * gbytes;
  const uint16_t* sc = m.s + rb * n * 16;
  __m512 acc[TB];
  for (int t = 0; t < TB; ++t) acc[t] = _mm512_setzero_ps();
  for (int64_t g = 0; g < n; ++g, w += gbytes) {
    __m512i sum[TB];
    for (int t = 0; t < TB; ++t) sum[t] = _mm512_setzero_si512();
    for (int k = 0; k < 4; ++k) {
      const __m512i v = _mm512_loadu_si512(w + k * 64);
      __m512i lo = _mm512_and_si512(v, nib), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nib);
      if constexpr (B5) {  // the fifth bits: bit 2k (low nibbles) and 2k + 1 (high ones) of each plane byte
        const __m512i pl = _mm512_loadu_si512(w + 256), one = _mm512_set1_epi8(1);
        const __m128i s0 = _mm_cvtsi32_si128(2 * k), s1 = _mm_cvtsi32_si128(2 * k + 1);
        lo = _mm512_or_si512(lo, _mm512_slli_epi16(_mm512_and_si512(_mm512_srl_epi16(pl, s0), one), 4));
        hi = _mm512_or_si512(hi, _mm512_slli_epi16(_mm512_and_si512(_mm512_srl_epi16(pl, s1), one), 4));
      }
      for (int t = 0; t < TB; ++t) {
        const int8_t* xq = x[t].q + g * 32 + 8 * k;
        sum[t] = _mm512_dpbusd_epi32(sum[t], lo, _mm512_set1_epi32(load4(xq)));
        sum[t] = _mm512_dpbusd_epi32(sum[t], hi, _mm512_set1_epi32(load4(xq + 4)));
      }
    }
    if constexpr (M) {
      __m512 ws, mn;
      if constexpr (K) {  // float16 per super-block times uint8 per group: exact in float32
        const int64_t sb = (rb * (n / 8) + g / 8) * 16, gi = (rb * n + g) * 16;
        ws = times_i8x16<false>(f16x16(m.kd + sb), m.ksc + gi);
        mn = times_i8x16<false>(f16x16(m.kdm + sb), m.km + gi);
      } else {
        ws = _mm512_loadu_ps(m.sf + (rb * n + g) * 16);
        mn = _mm512_loadu_ps(m.mn + (rb * n + g) * 16);
      }
      for (int t = 0; t < TB; ++t) {
        const __m512 r = _mm512_fnmadd_ps(mn, _mm512_set1_ps(static_cast<float>(x[t].s[g])),
                                          _mm512_mul_ps(_mm512_cvtepi32_ps(sum[t]), ws));
        acc[t] = _mm512_fmadd_ps(r, _mm512_set1_ps(x[t].d[g]), acc[t]);
      }
      continue;
    }
    const __m512 ws = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sc + g * 16)));
    for (int t = 0; t < TB; ++t) {
      const __m512i s32 = _mm512_sub_epi32(sum[t], _mm512_set1_epi32(8 * x[t].s[g]));
      acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s32), _mm512_mul_ps(ws, _mm512_set1_ps(x[t].d[g])), acc[t]);
    }
  }
  alignas(64) float lanes[16];
  for (int t = 0; t < TB; ++t) {
    _mm512_store_ps(lanes, acc[t]);
    store_rows(y, t, rb * 16, m.R, lanes, 16);
  }
}

// X (kind int8x): the group's two 16-input halves keep their own sums for their own float32 scales, and the
// group's min times its activation sum is taken off: y += d_g (s_h0 S_h0 + s_h1 S_h1 - min_g sum_g q).
template <int TB, bool X = false, bool S6 = false, bool MN = true, bool K = false>
void qtile_int8(const Packed& m, int64_t rb, const QRow* x, const Out& y) {
  const int64_t n = m.D / 32;
  constexpr int64_t gbytes = S6 ? 384 : 512;  // one group of one 16-row panel
  const int8_t* w = reinterpret_cast<const int8_t*>(m.q) + rb * n * gbytes;
  const uint16_t* sc = m.s + rb * n * 16;
  __m512 acc[TB];
  for (int t = 0; t < TB; ++t) acc[t] = _mm512_setzero_ps();
  for (int64_t g = 0; g < n; ++g, w += gbytes) {
    __m512i sum[TB], sum2[TB];  // a lane adds 32 products of at most 127 * 32767: below 2^27
    for (int t = 0; t < TB; ++t) sum[t] = sum2[t] = _mm512_setzero_si512();
    for (int k = 0; k < 16; ++k) {
      __m256i c8;
      if constexpr (S6) {
        const __m256i nib = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + (k & 7) * 32));
        const __m256i top = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 256 + (k & 3) * 32));
        const __m256i lo = _mm256_and_si256(k < 8 ? nib : _mm256_srli_epi16(nib, 4), _mm256_set1_epi8(0x0f));
        const __m256i hi = _mm256_and_si256(_mm256_srl_epi16(top, _mm_cvtsi32_si128(2 * (k >> 2))),
                                            _mm256_set1_epi8(0x03));
        c8 = _mm256_sub_epi8(_mm256_or_si256(lo, _mm256_slli_epi16(hi, 4)), _mm256_set1_epi8(32));
      } else {
        c8 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k * 32));
      }
      const __m512i wk = _mm512_cvtepi8_epi16(c8);
      for (int t = 0; t < TB; ++t) {
        const __m512i xk = _mm512_set1_epi32(load4(x[t].q16 + g * 32 + 2 * k));
        if (X && k >= 8) sum2[t] = _mm512_dpwssd_epi32(sum2[t], wk, xk);
        else sum[t] = _mm512_dpwssd_epi32(sum[t], wk, xk);
      }
    }
    if constexpr (X) {
      __m512 s0, s1;
      if constexpr (K) {  // float16 per super-block times int8 per 16 inputs: exact in float32
        const __m512 d = f16x16(m.kd + (rb * (n / 8) + g / 8) * 16);
        const uint8_t* k2 = m.ksc + (rb * 2 * n + 2 * g) * 16;
        s0 = times_i8x16<true>(d, k2);
        s1 = times_i8x16<true>(d, k2 + 16);
      } else {
        const float* s2 = m.sf + (rb * 2 * n + 2 * g) * 16;
        s0 = _mm512_loadu_ps(s2);
        s1 = _mm512_loadu_ps(s2 + 16);
      }
      const __m512 mn = MN ? _mm512_loadu_ps(m.mn + (rb * n + g) * 16) : _mm512_setzero_ps();
      for (int t = 0; t < TB; ++t) {
        __m512 r = _mm512_mul_ps(_mm512_cvtepi32_ps(sum[t]), s0);
        r = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum2[t]), s1, r);
        if constexpr (MN) r = _mm512_fnmadd_ps(mn, _mm512_set1_ps(static_cast<float>(x[t].s[g])), r);
        acc[t] = _mm512_fmadd_ps(r, _mm512_set1_ps(x[t].d[g]), acc[t]);
      }
      continue;
    }
    const __m512 ws = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sc + g * 16)));
    for (int t = 0; t < TB; ++t)
      acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum[t]), _mm512_mul_ps(ws, _mm512_set1_ps(x[t].d[g])), acc[t]);
  }
  alignas(64) float lanes[16];
  for (int t = 0; t < TB; ++t) {
    _mm512_store_ps(lanes, acc[t]);
    store_rows(y, t, rb * 16, m.R, lanes, 16);
  }
}

// Kind int6k: u's nibbles and top bits joined per byte, dpbusd with the int8 inputs per 16-input half (loads 0-1:
// inputs 0-15, loads 2-3: 16-31), S_h = U_h - 32 s_h, then y += d_g (scale_h0 S_0 + scale_h1 S_1).
template <int TB>
void qtile_int6k(const Packed& m, int64_t rb, const QRow* x, const Out& y) {
  const int64_t n = m.D / 32;
  const __m512i nib = _mm512_set1_epi8(0x0f), topm = _mm512_set1_epi8(0x30);
  const uint8_t* w = m.q + rb * n * 384;
  __m512 acc[TB];
  for (int t = 0; t < TB; ++t) acc[t] = _mm512_setzero_ps();
  for (int64_t g = 0; g < n; ++g, w += 384) {
    __m512i sum[TB][2];
    for (int t = 0; t < TB; ++t) sum[t][0] = sum[t][1] = _mm512_setzero_si512();
    const __m512i p0 = _mm512_loadu_si512(w + 256), p1 = _mm512_loadu_si512(w + 320);
    for (int k = 0; k < 4; ++k) {
      const __m512i v = _mm512_loadu_si512(w + k * 64), pl = k < 2 ? p0 : p1;
      // vector 2k's top bits sit at shift 4 (k odd) or 0 (k even) of its plane, 2k + 1's at 6 or 2: moved to 4-5
      const __m512i tl = (k & 1) ? pl : _mm512_slli_epi16(pl, 4);
      const __m512i th = (k & 1) ? _mm512_srli_epi16(pl, 2) : _mm512_slli_epi16(pl, 2);
      const __m512i lo = _mm512_or_si512(_mm512_and_si512(v, nib), _mm512_and_si512(tl, topm));
      const __m512i hi = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(v, 4), nib), _mm512_and_si512(th, topm));
      for (int t = 0; t < TB; ++t) {
        const int8_t* xq = x[t].q + g * 32 + 8 * k;
        sum[t][k >> 1] = _mm512_dpbusd_epi32(sum[t][k >> 1], lo, _mm512_set1_epi32(load4(xq)));
        sum[t][k >> 1] = _mm512_dpbusd_epi32(sum[t][k >> 1], hi, _mm512_set1_epi32(load4(xq + 4)));
      }
    }
    const __m512 d = f16x16(m.kd + (rb * (n / 8) + g / 8) * 16);
    const uint8_t* k2 = m.ksc + (rb * 2 * n + 2 * g) * 16;
    const __m512 s0 = times_i8x16<true>(d, k2), s1 = times_i8x16<true>(d, k2 + 16);
    for (int t = 0; t < TB; ++t) {
      const __m512i h0 = _mm512_sub_epi32(sum[t][0], _mm512_set1_epi32(32 * x[t].s16[2 * g]));
      const __m512i h1 = _mm512_sub_epi32(sum[t][1], _mm512_set1_epi32(32 * x[t].s16[2 * g + 1]));
      __m512 r = _mm512_mul_ps(_mm512_cvtepi32_ps(h0), s0);
      r = _mm512_fmadd_ps(_mm512_cvtepi32_ps(h1), s1, r);
      acc[t] = _mm512_fmadd_ps(r, _mm512_set1_ps(x[t].d[g]), acc[t]);
    }
  }
  alignas(64) float lanes[16];
  for (int t = 0; t < TB; ++t) {
    _mm512_store_ps(lanes, acc[t]);
    store_rows(y, t, rb * 16, m.R, lanes, 16);
  }
}

constexpr int kQTileMax = 8;  // input rows per tile at most (accumulators + sums: 16 of the 32 vector registers)

#else  // AVX2: each 16-row block as two halves of 8 rows
#include "qpacked_avx2.h"
#endif

template <int TB>
void qtile_block(const Packed& m, int64_t rb, const QRow* x, const Out& y) {
  if (m.kind == kQInt4) qtile_int4<TB>(m, rb, x, y);
  else if (m.kind == kQInt4M) qtile_int4<TB, true>(m, rb, x, y);
  else if (m.kind == kQInt8X) qtile_int8<TB, true>(m, rb, x, y);
  else if (m.kind == kQInt6X) qtile_int8<TB, true, true>(m, rb, x, y);
  else if (m.kind == kQInt6) qtile_int8<TB, true, true, false>(m, rb, x, y);
  else if (m.kind == kQInt4K) qtile_int4<TB, true, true>(m, rb, x, y);
  else if (m.kind == kQInt5K) qtile_int4<TB, true, true, true>(m, rb, x, y);
  else if (m.kind == kQInt6K) qtile_int6k<TB>(m, rb, x, y);
  else qtile_int8<TB>(m, rb, x, y);
}

// Row blocks [rb0, rb1) of a quantised m against n quantised input rows x[0..n) into out rows 0..n: tiles of the
// most input rows that remain (up to kQTileMax), each block's weights read once per tile.
void qmatvec_blocks(const Packed& m, int64_t rb0, int64_t rb1, const QRow* x, int64_t n, const Out& y) {
  for (int64_t t0 = 0; t0 < n;) {
    const int64_t left = n - t0;
    const int tb = left >= 8 && kQTileMax >= 8 ? 8 : left >= 4 ? 4 : left >= 2 ? 2 : 1;
    const Out yt = y.at(t0);
    for (int64_t rb = rb0; rb < rb1; ++rb) {
      if (tb == 8) qtile_block<kQTileMax >= 8 ? 8 : 4>(m, rb, x + t0, yt);
      else if (tb == 4) qtile_block<4>(m, rb, x + t0, yt);
      else if (tb == 2) qtile_block<2>(m, rb, x + t0, yt);
      else qtile_block<1>(m, rb, x + t0, yt);
    }
    t0 += tb;
  }
}

}  // namespace
