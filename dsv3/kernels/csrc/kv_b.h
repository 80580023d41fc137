// kv_b_proj's weight as the absorbed decode attention (attention.h, mla_decode) reads it: plain bf16, or a quantised
// model's codes with their scales, widened to bf16 as the products need them.
#pragma once

#include "common.h"

namespace {

// kv_b_proj's weight as mla_decode reads it: plain bf16 [H*(N+V), C], or a quantised model's codes in groups of 32
// along C (4-bit: two per byte, column 2j in the low nibble of byte j, uint8 [rows, C/2]; 8-bit: int8 [rows, C])
// with their scales: float16 or float32 [rows, C/32] (w = (q - offset) s, offset 8 for 4-bit codes, else 0), or
// float32 [rows, C/32, 2] holding (s, m) (w = q s - m, unsigned codes). The attention reads the codes and widens a
// head's rows to bf16 (bf16 of the exact float32 value: what dequantising the weight to bf16 gives), so a
// quantised model streams a quarter (4-bit) or half (8-bit) of the bytes of its bf16 copy.
struct KvB {
  const bf16_t* bf = nullptr;
  const uint8_t* codes = nullptr;
  const at::Half* s16 = nullptr;
  const float* s32 = nullptr;
  int bits = 16;
  bool with_min = false;
  int64_t C = 0, row_bytes = 0;
};

KvB kv_b_view(const at::Tensor& kv_b, const c10::optional<at::Tensor>& scales) {
  KvB w;
  const int64_t rows = kv_b.size(0);
  TORCH_CHECK(kv_b.device().is_cpu() && kv_b.dim() == 2 && kv_b.is_contiguous(),
              "mla_decode: kv_b must be a contiguous CPU matrix, got ", kv_b.sizes());
  if (!scales.has_value() || !scales->defined() || scales->numel() == 0) {
    check_bf16(kv_b, "mla_decode: kv_b (no scales given)", 2);
    w.bf = bf_ptr(kv_b);
    w.C = kv_b.size(1);
    return w;
  }
  const at::Tensor& s = *scales;
  TORCH_CHECK(s.is_contiguous() && s.size(0) == rows && (s.dim() == 2 || (s.dim() == 3 && s.size(2) == 2)),
              "mla_decode: kv_b scales must be [", rows, ", C/32] or [", rows, ", C/32, 2], got ", s.sizes());
  w.C = 32 * s.size(1);
  w.with_min = s.dim() == 3;
  if (kv_b.scalar_type() == at::kChar && kv_b.size(1) == w.C) {
    w.bits = 8;
  } else {
    TORCH_CHECK(kv_b.scalar_type() == at::kByte && 2 * kv_b.size(1) == w.C, "mla_decode: kv_b codes ",
                kv_b.scalar_type(), " ", kv_b.sizes(), " do not fit scales ", s.sizes(),
                " (int8 [rows, C] or uint8 [rows, C/2] for groups of 32 along C)");
    w.bits = 4;
  }
  if (s.scalar_type() == at::kHalf && !w.with_min) {
    w.s16 = s.data_ptr<at::Half>();
  } else {
    TORCH_CHECK(s.scalar_type() == at::kFloat, "mla_decode: kv_b scales must be float16 or float32, got ",
                s.scalar_type());
    w.s32 = s.data_ptr<float>();
  }
  w.codes = static_cast<const uint8_t*>(kv_b.data_ptr());
  w.row_bytes = kv_b.size(1);
  return w;
}

// 16 codes from 16 bytes as float32 (signed: int8 codes, else unsigned).
inline V16f codes16(__m128i v, bool sign) {
#if defined(DSV3_AVX512)
  return _mm512_cvtepi32_ps(sign ? _mm512_cvtepi8_epi32(v) : _mm512_cvtepu8_epi32(v));
#else
  const __m128i h = _mm_srli_si128(v, 8);
  V16f r;
  r.lo = _mm256_cvtepi32_ps(sign ? _mm256_cvtepi8_epi32(v) : _mm256_cvtepu8_epi32(v));
  r.hi = _mm256_cvtepi32_ps(sign ? _mm256_cvtepi8_epi32(h) : _mm256_cvtepu8_epi32(h));
  return r;
#endif
}

// Group g of row r of a quantised kv_b as 32 float32 weights (lo: columns 0..15, hi: 16..31), q s - m with the
// product exact (a code of at most 8 bits times a float16 or a K-quant's float32 scale) and one rounding for the
// subtraction: quant.dequantize's float32 values, which rounded to bf16 are the weight dequantised to bf16.
// Group g of row r's scale s and the m taken off: w = q s - m.
inline void kv_b_scale(const KvB& w, int64_t r, int64_t g, float& s, float& m) {
  const int64_t G = w.C / 32;
  if (w.s16 != nullptr) {
    s = _cvtsh_ss(w.s16[r * G + g].x);  // (F16C: one instruction)
    m = (w.bits == 4 ? 8.f : 0.f) * s;
  } else if (w.with_min) {
    s = w.s32[(r * G + g) * 2];
    m = w.s32[(r * G + g) * 2 + 1];
  } else {
    s = w.s32[r * G + g];
    m = (w.bits == 4 ? 8.f : 0.f) * s;
  }
}

inline void kv_b_group(const KvB& w, int64_t r, int64_t g, V16f& lo, V16f& hi) {
  float s, m;
  kv_b_scale(w, r, g, s, m);
  const uint8_t* c = w.codes + r * w.row_bytes;
  __m128i x, y;
  if (w.bits == 4) {
    const __m128i nib = _mm_set1_epi8(0x0f);
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(c + 16 * g));
    const __m128i l = _mm_and_si128(v, nib), h = _mm_and_si128(_mm_srli_epi16(v, 4), nib);
    x = _mm_unpacklo_epi8(l, h);  // columns 0..15 of the group
    y = _mm_unpackhi_epi8(l, h);  // 16..31
  } else {
    x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(c + 32 * g));
    y = _mm_loadu_si128(reinterpret_cast<const __m128i*>(c + 32 * g + 16));
  }
  const V16f sv = v16_set1_ps(s), mv = v16_set1_ps(m);
  lo = v16_sub_ps(v16_mul_ps(codes16(x, w.bits == 8), sv), mv);
  hi = v16_sub_ps(v16_mul_ps(codes16(y, w.bits == 8), sv), mv);
}

#if defined(__AVX512BF16__)
// Group g of row r of 4-bit codes as 32 bf16 weights in column order, by table: the group's 16 possible weights
// bf16(q s - m), q = 0..15, computed as kv_b_group computes each one (so the same bits), then picked by the codes
// (vpermw) - about half the instructions of widening every code to float32 and rounding it.
inline __m512i kv_b_group_bf16_4bit(const KvB& w, int64_t r, int64_t g) {
  float s, m;
  kv_b_scale(w, r, g, s, m);
  const __m512 q = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512 vals = _mm512_sub_ps(_mm512_mul_ps(q, _mm512_set1_ps(s)), _mm512_set1_ps(m));
  const __m512i table = _mm512_castsi256_si512((__m256i)_mm512_cvtneps_pbh(vals));  // words 0..15 used
  // byte j of the group holds columns 2j (low nibble) and 2j+1 (high): dword j -> words (lo, hi)
  const uint8_t* c = w.codes + r * w.row_bytes + 16 * g;
  const __m512i d = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c)));
  const __m512i idx = _mm512_and_si512(_mm512_or_si512(d, _mm512_slli_epi32(d, 12)), _mm512_set1_epi32(0x000f000f));
  return _mm512_permutexvar_epi16(idx, table);
}
#endif

// Rows r0..r0+n-1 of a quantised kv_b widened to bf16 into out [n, C].
void kv_b_rows_bf16(const KvB& w, int64_t r0, int64_t n, bf16_t* out) {
  for (int64_t r = r0; r < r0 + n; ++r)
    for (int64_t g = 0; g < w.C / 32; ++g) {
      V16f lo, hi;
      kv_b_group(w, r, g, lo, hi);
      bf16_t* o = out + (r - r0) * w.C + 32 * g;
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(o), to_bf16x16(lo));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + 16), to_bf16x16(hi));
    }
}

// Rows of kv_b for the absorbed products (a head's W_uk or W_uv): plain bf16 (bf, C per row), or rows r0.. of
// the codes of w (then bf is unused).
struct KvRows {
  const bf16_t* bf;
  const KvB* w;
  int64_t r0, C;
  KvRows at(int64_t i) const { return {w == nullptr ? bf + i * C : nullptr, w, r0 + i, C}; }  // from row i on
#if defined(__AVX512BF16__)
  // 32 bf16 weights of row i, columns c..c+31 (c a multiple of 32)
  __m512i bf32(int64_t i, int64_t c) const {
    if (w == nullptr) return _mm512_loadu_si512(bf + i * C + c);
    if (w->bits == 4) return kv_b_group_bf16_4bit(*w, r0 + i, c / 32);
    V16f lo, hi;
    kv_b_group(*w, r0 + i, c / 32, lo, hi);
    return (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
  }
#endif
  // row i's weights (bf16 values) as float32 into out [C]; tmp: C bf16 of scratch
  void row_f32(int64_t i, float* out, bf16_t* tmp) const {
    if (w == nullptr) return bf_to_f32(bf + i * C, out, C);
    kv_b_rows_bf16(*w, r0 + i, 1, tmp);
    bf_to_f32(tmp, out, C);
  }
};

}  // namespace
