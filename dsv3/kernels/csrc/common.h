// Shared by every kernel family: the includes, the vector layer (simd.h), bf16 <-> float32 conversion with the
// reference rounding (scalar and 16 lanes), argument checks, and small float32 vector helpers (dot, axpy, exp16).
#pragma once

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

#include "simd.h"  // the 16-lane vector layer: AVX-512, or AVX2 + FMA (anything else stops the build)

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


inline V16f load16(const bf16_t* p) {
  return v16_castsi512_ps(v16_slli_epi32(v16_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}

inline __m256i to_bf16x16(V16f v) {
#if defined(__AVX512BF16__)
  return (__m256i)_mm512_cvtneps_pbh(v);
#else
  const V16i u = v16_castps_si512(v);
  const V16i lsb = v16_and_si512(v16_srli_epi32(u, 16), v16_set1_epi32(1));
  V16i r = v16_srli_epi32(v16_add_epi32(u, v16_add_epi32(lsb, v16_set1_epi32(0x7fff))), 16);
  const M16 nan = v16_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  r = v16_mask_or_epi32(r, nan, v16_srli_epi32(u, 16), v16_set1_epi32(0x40));
  return v16_cvtepi32_epi16(r);
#endif
}

// 16 lanes rounded to bf16 and widened back (round_bf for a vector).
inline V16f round_bf16x16(V16f v) {
  return v16_castsi512_ps(v16_slli_epi32(v16_cvtepu16_epi32(to_bf16x16(v)), 16));
}


// ---------------------------------------------------------------------------------------------------------------
// Small float32 vector helpers for the attention (lengths C, R, V: any size).

inline float dot_f32(const float* a, const float* b, int64_t n) {
  V16f acc = v16_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) acc = v16_fmadd_ps(v16_loadu_ps(a + i), v16_loadu_ps(b + i), acc);
  float s = v16_reduce_add_ps(acc);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

inline void axpy_f32(float alpha, const float* x, float* y, int64_t n) {  // y += alpha * x
  const V16f a = v16_set1_ps(alpha);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) v16_storeu_ps(y + i, v16_fmadd_ps(a, v16_loadu_ps(x + i), v16_loadu_ps(y + i)));
  for (; i < n; ++i) y[i] += alpha * x[i];
}

inline void bf_to_f32(const bf16_t* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) v16_storeu_ps(dst + i, load16(src + i));
  for (; i < n; ++i) dst[i] = bf2f(src[i]);
}


// exp(x) for 16 lanes (Cephes' single-precision polynomial, ~1 ulp).
inline V16f exp16(V16f x) {
  x = v16_min_ps(v16_max_ps(x, v16_set1_ps(-87.3f)), v16_set1_ps(88.7f));
  const V16f n = v16_roundscale_ps(v16_mul_ps(x, v16_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  V16f r = v16_fnmadd_ps(n, v16_set1_ps(0.693359375f), x);
  r = v16_fnmadd_ps(n, v16_set1_ps(-2.12194440e-4f), r);
  V16f p = v16_set1_ps(1.9875691500e-4f);
  p = v16_fmadd_ps(p, r, v16_set1_ps(1.3981999507e-3f));
  p = v16_fmadd_ps(p, r, v16_set1_ps(8.3334519073e-3f));
  p = v16_fmadd_ps(p, r, v16_set1_ps(4.1665795894e-2f));
  p = v16_fmadd_ps(p, r, v16_set1_ps(1.6666665459e-1f));
  p = v16_fmadd_ps(p, r, v16_set1_ps(5.0000001201e-1f));
  p = v16_fmadd_ps(v16_mul_ps(p, r), r, v16_add_ps(r, v16_set1_ps(1.f)));
  return v16_scalef_ps(p, n);
}

}  // namespace
