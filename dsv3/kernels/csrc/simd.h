// The 16-lane vector layer the kernels are written in: V16f (16 float32), V16i (16 int32), M16 (a 16-bit lane
// mask) and the v16_* operations on them, named after the AVX-512 intrinsics they stand for.
//
// On an AVX-512 CPU (F, BW, VL) every name is the AVX-512 intrinsic itself (a macro: the instruction stream is the
// one the kernels had before this layer existed). On an AVX2 + FMA CPU each vector is a pair of 256-bit registers
// and each operation two AVX2 instructions (masks become lane-select vectors): the same kernels, the same
// summation orders per lane, at half the vector width. Anything else stops the build; cpu_ext.py then keeps the
// PyTorch path.
#pragma once

#include <immintrin.h>

#include <cstdint>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define DSV3_AVX512 1

using V16f = __m512;
using V16i = __m512i;
using M16 = __mmask16;
#define v16_add_epi32 _mm512_add_epi32
#define v16_add_ps _mm512_add_ps
#define v16_and_si512 _mm512_and_si512
#define v16_castps_si512 _mm512_castps_si512
#define v16_castsi512_ps _mm512_castsi512_ps
#define v16_cmp_ps_mask _mm512_cmp_ps_mask
#define v16_cvtepi32_epi16 _mm512_cvtepi32_epi16
#define v16_cvtepu16_epi32 _mm512_cvtepu16_epi32
#define v16_div_ps _mm512_div_ps
#define v16_fmadd_ps _mm512_fmadd_ps
#define v16_fnmadd_ps _mm512_fnmadd_ps
#define v16_loadu_ps _mm512_loadu_ps
#define v16_loadu_si512 _mm512_loadu_si512
#define v16_mask_or_epi32 _mm512_mask_or_epi32
#define v16_mask_storeu_ps _mm512_mask_storeu_ps
#define v16_maskz_loadu_ps _mm512_maskz_loadu_ps
#define v16_maskz_mov_ps _mm512_maskz_mov_ps
#define v16_max_ps _mm512_max_ps
#define v16_min_ps _mm512_min_ps
#define v16_mul_ps _mm512_mul_ps
#define v16_reduce_add_ps _mm512_reduce_add_ps
#define v16_reduce_max_ps _mm512_reduce_max_ps
#define v16_roundscale_ps _mm512_roundscale_ps
#define v16_scalef_ps _mm512_scalef_ps
#define v16_set1_epi32 _mm512_set1_epi32
#define v16_set1_ps _mm512_set1_ps
#define v16_setzero_ps _mm512_setzero_ps
#define v16_slli_epi32 _mm512_slli_epi32
#define v16_srli_epi32 _mm512_srli_epi32
#define v16_storeu_ps _mm512_storeu_ps
#define v16_sub_ps _mm512_sub_ps
#define v16_mask_store_bf16 _mm256_mask_storeu_epi16  // 16 bf16 lanes (AVX-512 BW + VL)

#elif defined(__AVX2__) && defined(__FMA__)
#define DSV3_AVX2 1

namespace {

struct V16f {
  __m256 lo, hi;
};
struct V16i {
  __m256i lo, hi;
};
using M16 = uint16_t;

#define DSV3_V16 static inline __attribute__((always_inline))

DSV3_V16 __m256i lanes8(unsigned m) {  // bit i of m -> all ones in lane i
  const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  return _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(static_cast<int>(m & 0xffu)), bit), bit);
}

DSV3_V16 V16f v16_setzero_ps() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
DSV3_V16 V16f v16_set1_ps(float a) { return {_mm256_set1_ps(a), _mm256_set1_ps(a)}; }
DSV3_V16 V16i v16_set1_epi32(int a) { return {_mm256_set1_epi32(a), _mm256_set1_epi32(a)}; }
DSV3_V16 V16f v16_loadu_ps(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
DSV3_V16 V16i v16_loadu_si512(const void* p) {
  const __m256i* q = static_cast<const __m256i*>(p);
  return {_mm256_loadu_si256(q), _mm256_loadu_si256(q + 1)};
}
DSV3_V16 void v16_storeu_ps(float* p, V16f a) {
  _mm256_storeu_ps(p, a.lo);
  _mm256_storeu_ps(p + 8, a.hi);
}
DSV3_V16 V16f v16_add_ps(V16f a, V16f b) { return {_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)}; }
DSV3_V16 V16f v16_sub_ps(V16f a, V16f b) { return {_mm256_sub_ps(a.lo, b.lo), _mm256_sub_ps(a.hi, b.hi)}; }
DSV3_V16 V16f v16_mul_ps(V16f a, V16f b) { return {_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)}; }
DSV3_V16 V16f v16_div_ps(V16f a, V16f b) { return {_mm256_div_ps(a.lo, b.lo), _mm256_div_ps(a.hi, b.hi)}; }
DSV3_V16 V16f v16_max_ps(V16f a, V16f b) { return {_mm256_max_ps(a.lo, b.lo), _mm256_max_ps(a.hi, b.hi)}; }
DSV3_V16 V16f v16_min_ps(V16f a, V16f b) { return {_mm256_min_ps(a.lo, b.lo), _mm256_min_ps(a.hi, b.hi)}; }
DSV3_V16 V16f v16_fmadd_ps(V16f a, V16f b, V16f c) {
  return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)};
}
DSV3_V16 V16f v16_fnmadd_ps(V16f a, V16f b, V16f c) {
  return {_mm256_fnmadd_ps(a.lo, b.lo, c.lo), _mm256_fnmadd_ps(a.hi, b.hi, c.hi)};
}
DSV3_V16 V16i v16_add_epi32(V16i a, V16i b) { return {_mm256_add_epi32(a.lo, b.lo), _mm256_add_epi32(a.hi, b.hi)}; }
DSV3_V16 V16i v16_and_si512(V16i a, V16i b) { return {_mm256_and_si256(a.lo, b.lo), _mm256_and_si256(a.hi, b.hi)}; }
DSV3_V16 V16i v16_srli_epi32(V16i a, int n) { return {_mm256_srli_epi32(a.lo, n), _mm256_srli_epi32(a.hi, n)}; }
DSV3_V16 V16i v16_slli_epi32(V16i a, int n) { return {_mm256_slli_epi32(a.lo, n), _mm256_slli_epi32(a.hi, n)}; }
DSV3_V16 V16f v16_castsi512_ps(V16i a) { return {_mm256_castsi256_ps(a.lo), _mm256_castsi256_ps(a.hi)}; }
DSV3_V16 V16i v16_castps_si512(V16f a) { return {_mm256_castps_si256(a.lo), _mm256_castps_si256(a.hi)}; }

// 16 uint16 -> 16 int32 (zero extended), and back keeping the low 16 bits of each lane.
DSV3_V16 V16i v16_cvtepu16_epi32(__m256i a) {
  return {_mm256_cvtepu16_epi32(_mm256_castsi256_si128(a)), _mm256_cvtepu16_epi32(_mm256_extracti128_si256(a, 1))};
}
DSV3_V16 __m256i v16_cvtepi32_epi16(V16i a) {
  const __m256i low = _mm256_set1_epi32(0xffff);  // lanes in [0, 65535]: the unsigned saturating pack is exact
  const __m256i p = _mm256_packus_epi32(_mm256_and_si256(a.lo, low), _mm256_and_si256(a.hi, low));
  return _mm256_permute4x64_epi64(p, 0xd8);  // packus interleaves 128-bit halves: restore the lane order
}

DSV3_V16 float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
DSV3_V16 float v16_reduce_add_ps(V16f a) { return hsum8(_mm256_add_ps(a.lo, a.hi)); }
DSV3_V16 float v16_reduce_max_ps(V16f a) {
  const __m256 m = _mm256_max_ps(a.lo, a.hi);
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}

template <int P>
DSV3_V16 M16 v16_cmp_ps_mask_t(V16f a, V16f b) {
  const int lo = _mm256_movemask_ps(_mm256_cmp_ps(a.lo, b.lo, P));
  const int hi = _mm256_movemask_ps(_mm256_cmp_ps(a.hi, b.hi, P));
  return static_cast<M16>(lo | (hi << 8));
}
#define v16_cmp_ps_mask(a, b, p) v16_cmp_ps_mask_t<(p)>((a), (b))

template <int P>
DSV3_V16 V16f v16_roundscale_ps_t(V16f a) { return {_mm256_round_ps(a.lo, P), _mm256_round_ps(a.hi, P)}; }
#define v16_roundscale_ps(a, p) v16_roundscale_ps_t<(p)>((a))

// a * 2^n for integral n in [-126, 128] (exp16's range), as two exact power-of-two factors so that neither
// factor's exponent leaves the normal range.
DSV3_V16 __m256 scalef8(__m256 a, __m256 n) {
  const __m256i ni = _mm256_cvtps_epi32(n);
  const __m256i h = _mm256_srai_epi32(ni, 1);
  const __m256 f1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(h, _mm256_set1_epi32(127)), 23));
  const __m256 f2 = _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_add_epi32(_mm256_sub_epi32(ni, h), _mm256_set1_epi32(127)), 23));
  return _mm256_mul_ps(_mm256_mul_ps(a, f1), f2);
}
DSV3_V16 V16f v16_scalef_ps(V16f a, V16f n) { return {scalef8(a.lo, n.lo), scalef8(a.hi, n.hi)}; }

DSV3_V16 V16f v16_maskz_loadu_ps(M16 m, const float* p) {
  return {_mm256_maskload_ps(p, lanes8(m)), _mm256_maskload_ps(p + 8, lanes8(m >> 8))};
}
DSV3_V16 void v16_mask_storeu_ps(float* p, M16 m, V16f a) {
  _mm256_maskstore_ps(p, lanes8(m), a.lo);
  _mm256_maskstore_ps(p + 8, lanes8(m >> 8), a.hi);
}
DSV3_V16 V16f v16_maskz_mov_ps(M16 m, V16f a) {
  return {_mm256_and_ps(_mm256_castsi256_ps(lanes8(m)), a.lo), _mm256_and_ps(_mm256_castsi256_ps(lanes8(m >> 8)), a.hi)};
}
DSV3_V16 V16i v16_mask_or_epi32(V16i src, M16 m, V16i a, V16i b) {
  return {_mm256_blendv_epi8(src.lo, _mm256_or_si256(a.lo, b.lo), lanes8(m)),
          _mm256_blendv_epi8(src.hi, _mm256_or_si256(a.hi, b.hi), lanes8(m >> 8))};
}
// 16 bf16 lanes of v to p where m has a bit (lanes outside m are not touched: p may end there).
DSV3_V16 void v16_mask_store_bf16(uint16_t* p, M16 m, __m256i v) {
  if (m == 0xffff) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v);
    return;
  }
  alignas(32) uint16_t lanes[16];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), v);
  for (int i = 0; i < 16; ++i)
    if (m >> i & 1) p[i] = lanes[i];
}

#undef DSV3_V16

}  // namespace

#else
#error "the dsv3 CPU kernels need AVX-512 (F, BW, VL) or AVX2 with FMA; cpu_ext.py keeps the PyTorch path on other CPUs"
#endif
