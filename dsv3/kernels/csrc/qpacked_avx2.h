// The AVX2 tile products of qpacked.h (included there when the build has no AVX-512 VNNI): each 16-row block as
// two halves of 8 rows with maddubs / madd, the same exact integer group sums and float32 operations per row as
// the AVX-512 tiles, so both builds compute the same bits (tests/test_gguf_kernels.py builds both).
#pragma once

// GGUF's own scales (kinds 7-9) for one half: 8 float16s, and those times 8 8-bit integers (exact in float32).
inline __m256 f16x8(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
template <bool Signed>
inline __m256 times_i8x8(__m256 d, const uint8_t* q) {
  const __m128i v = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q));
  return _mm256_mul_ps(d, _mm256_cvtepi32_ps(Signed ? _mm256_cvtepi8_epi32(v) : _mm256_cvtepu8_epi32(v)));
}


template <int TB, bool M = false, bool K = false, bool B5 = false>
void qtile_int4(const Packed& m, int64_t rb, const QRow* x, const Out& y) {
  const int64_t n = m.D / 32;
  const __m256i nib = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1);
  for (int h = 0; h < 2; ++h) {
    constexpr int64_t gbytes = B5 ? 320 : 256;  // one group of one 16-row panel
    const uint8_t* w = m.q + rb * n * gbytes + h * 32;
    const uint16_t* sc = m.s + rb * n * 16 + h * 8;
    __m256 acc[TB];
    for (int t = 0; t < TB; ++t) acc[t] = _mm256_setzero_ps();
    for (int64_t g = 0; g < n; ++g, w += gbytes) {
      // int16 lanes: 8 steps of at most 2 * 15 * 127 each stay below 2^15; 5-bit codes (31) widen every step.
      __m256i sum[TB];
      for (int t = 0; t < TB; ++t) sum[t] = _mm256_setzero_si256();
      for (int k = 0; k < 4; ++k) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k * 64));
        __m256i lo = _mm256_and_si256(v, nib), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), nib);
        if constexpr (B5) {
          const __m256i pl = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 256)), one = _mm256_set1_epi8(1);
          const __m128i s0 = _mm_cvtsi32_si128(2 * k), s1 = _mm_cvtsi32_si128(2 * k + 1);
          lo = _mm256_or_si256(lo, _mm256_slli_epi16(_mm256_and_si256(_mm256_srl_epi16(pl, s0), one), 4));
          hi = _mm256_or_si256(hi, _mm256_slli_epi16(_mm256_and_si256(_mm256_srl_epi16(pl, s1), one), 4));
        }
        for (int t = 0; t < TB; ++t) {
          const int8_t* xq = x[t].q + g * 32 + 8 * k;
          const __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_set1_epi32(load4(xq))),
                                             _mm256_maddubs_epi16(hi, _mm256_set1_epi32(load4(xq + 4))));
          sum[t] = B5 ? _mm256_add_epi32(sum[t], _mm256_madd_epi16(p, ones)) : _mm256_add_epi16(sum[t], p);
        }
      }
      if constexpr (M) {
        __m256 ws, mn;
        if constexpr (K) {
          const int64_t sb = (rb * (n / 8) + g / 8) * 16 + h * 8, gi = (rb * n + g) * 16 + h * 8;
          ws = times_i8x8<false>(f16x8(m.kd + sb), m.ksc + gi);
          mn = times_i8x8<false>(f16x8(m.kdm + sb), m.km + gi);
        } else {
          ws = _mm256_loadu_ps(m.sf + (rb * n + g) * 16 + h * 8);
          mn = _mm256_loadu_ps(m.mn + (rb * n + g) * 16 + h * 8);
        }
        for (int t = 0; t < TB; ++t) {
          const __m256 r = _mm256_fnmadd_ps(mn, _mm256_set1_ps(static_cast<float>(x[t].s[g])),
                                            _mm256_mul_ps(_mm256_cvtepi32_ps(B5 ? sum[t] : _mm256_madd_epi16(sum[t], ones)), ws));
          acc[t] = _mm256_fmadd_ps(r, _mm256_set1_ps(x[t].d[g]), acc[t]);
        }
        continue;
      }
      const __m256 ws = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sc + g * 16)));
      for (int t = 0; t < TB; ++t) {
        const __m256i s32 = _mm256_sub_epi32(_mm256_madd_epi16(sum[t], ones), _mm256_set1_epi32(8 * x[t].s[g]));
        acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s32), _mm256_mul_ps(ws, _mm256_set1_ps(x[t].d[g])), acc[t]);
      }
    }
    alignas(32) float lanes[8];
    for (int t = 0; t < TB; ++t) {
      _mm256_store_ps(lanes, acc[t]);
      store_rows(y, t, rb * 16 + h * 8, m.R, lanes, 8);
    }
  }
}

template <int TB, bool X = false, bool S6 = false, bool MN = true, bool K = false>
void qtile_int8(const Packed& m, int64_t rb, const QRow* x, const Out& y) {
  const int64_t n = m.D / 32;
  constexpr int64_t gbytes = S6 ? 384 : 512;  // one group of one 16-row panel
  for (int h = 0; h < 2; ++h) {
    const int8_t* w = reinterpret_cast<const int8_t*>(m.q) + rb * n * gbytes + h * 16;
    const uint16_t* sc = m.s + rb * n * 16 + h * 8;
    __m256 acc[TB];
    for (int t = 0; t < TB; ++t) acc[t] = _mm256_setzero_ps();
    for (int64_t g = 0; g < n; ++g, w += gbytes) {
      __m256i sum[TB], sum2[TB];  // a lane adds 32 products of at most 127 * 32767: below 2^27
      for (int t = 0; t < TB; ++t) sum[t] = sum2[t] = _mm256_setzero_si256();
      for (int k = 0; k < 16; ++k) {
        __m128i c8;
        if constexpr (S6) {
          const __m128i nib = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + (k & 7) * 32));
          const __m128i top = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + 256 + (k & 3) * 32));
          const __m128i lo = _mm_and_si128(k < 8 ? nib : _mm_srli_epi16(nib, 4), _mm_set1_epi8(0x0f));
          const __m128i hi = _mm_and_si128(_mm_srl_epi16(top, _mm_cvtsi32_si128(2 * (k >> 2))), _mm_set1_epi8(0x03));
          c8 = _mm_sub_epi8(_mm_or_si128(lo, _mm_slli_epi16(hi, 4)), _mm_set1_epi8(32));
        } else {
          c8 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + k * 32));
        }
        const __m256i wk = _mm256_cvtepi8_epi16(c8);
        for (int t = 0; t < TB; ++t) {
          const __m256i v = _mm256_madd_epi16(wk, _mm256_set1_epi32(load4(x[t].q16 + g * 32 + 2 * k)));
          if (X && k >= 8) sum2[t] = _mm256_add_epi32(sum2[t], v);
          else sum[t] = _mm256_add_epi32(sum[t], v);
        }
      }
      if constexpr (X) {
        __m256 s0, s1;
        if constexpr (K) {
          const __m256 d = f16x8(m.kd + (rb * (n / 8) + g / 8) * 16 + h * 8);
          const uint8_t* k2 = m.ksc + (rb * 2 * n + 2 * g) * 16 + h * 8;
          s0 = times_i8x8<true>(d, k2);
          s1 = times_i8x8<true>(d, k2 + 16);
        } else {
          const float* s2 = m.sf + (rb * 2 * n + 2 * g) * 16 + h * 8;
          s0 = _mm256_loadu_ps(s2);
          s1 = _mm256_loadu_ps(s2 + 16);
        }
        const __m256 mn = MN ? _mm256_loadu_ps(m.mn + (rb * n + g) * 16 + h * 8) : _mm256_setzero_ps();
        for (int t = 0; t < TB; ++t) {
          __m256 r = _mm256_mul_ps(_mm256_cvtepi32_ps(sum[t]), s0);
          r = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum2[t]), s1, r);
          if constexpr (MN) r = _mm256_fnmadd_ps(mn, _mm256_set1_ps(static_cast<float>(x[t].s[g])), r);
          acc[t] = _mm256_fmadd_ps(r, _mm256_set1_ps(x[t].d[g]), acc[t]);
        }
        continue;
      }
      const __m256 ws = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sc + g * 16)));
      for (int t = 0; t < TB; ++t)
        acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum[t]), _mm256_mul_ps(ws, _mm256_set1_ps(x[t].d[g])), acc[t]);
    }
    alignas(32) float lanes[8];
    for (int t = 0; t < TB; ++t) {
      _mm256_store_ps(lanes, acc[t]);
      store_rows(y, t, rb * 16 + h * 8, m.R, lanes, 8);
    }
  }
}

// Kind int6k (qpacked.h's qtile_int6k) on 8-row halves: maddubs pairs (at most 2 * 63 * 127) widened per load.
template <int TB>
void qtile_int6k(const Packed& m, int64_t rb, const QRow* x, const Out& y) {
  const int64_t n = m.D / 32;
  const __m256i nib = _mm256_set1_epi8(0x0f), topm = _mm256_set1_epi8(0x30), ones = _mm256_set1_epi16(1);
  for (int h = 0; h < 2; ++h) {
    const uint8_t* w = m.q + rb * n * 384 + h * 32;
    __m256 acc[TB];
    for (int t = 0; t < TB; ++t) acc[t] = _mm256_setzero_ps();
    for (int64_t g = 0; g < n; ++g, w += 384) {
      __m256i sum[TB][2];
      for (int t = 0; t < TB; ++t) sum[t][0] = sum[t][1] = _mm256_setzero_si256();
      const __m256i p0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 256));
      const __m256i p1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 320));
      for (int k = 0; k < 4; ++k) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k * 64)), pl = k < 2 ? p0 : p1;
        const __m256i tl = (k & 1) ? pl : _mm256_slli_epi16(pl, 4);
        const __m256i th = (k & 1) ? _mm256_srli_epi16(pl, 2) : _mm256_slli_epi16(pl, 2);
        const __m256i lo = _mm256_or_si256(_mm256_and_si256(v, nib), _mm256_and_si256(tl, topm));
        const __m256i hi = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(v, 4), nib), _mm256_and_si256(th, topm));
        for (int t = 0; t < TB; ++t) {
          const int8_t* xq = x[t].q + g * 32 + 8 * k;
          const __m256i p = _mm256_add_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(lo, _mm256_set1_epi32(load4(xq))), ones),
                                             _mm256_madd_epi16(_mm256_maddubs_epi16(hi, _mm256_set1_epi32(load4(xq + 4))), ones));
          sum[t][k >> 1] = _mm256_add_epi32(sum[t][k >> 1], p);
        }
      }
      const __m256 d = f16x8(m.kd + (rb * (n / 8) + g / 8) * 16 + h * 8);
      const uint8_t* k2 = m.ksc + (rb * 2 * n + 2 * g) * 16 + h * 8;
      const __m256 s0 = times_i8x8<true>(d, k2), s1 = times_i8x8<true>(d, k2 + 16);
      for (int t = 0; t < TB; ++t) {
        const __m256i h0 = _mm256_sub_epi32(sum[t][0], _mm256_set1_epi32(32 * x[t].s16[2 * g]));
        const __m256i h1 = _mm256_sub_epi32(sum[t][1], _mm256_set1_epi32(32 * x[t].s16[2 * g + 1]));
        __m256 r = _mm256_mul_ps(_mm256_cvtepi32_ps(h0), s0);
        r = _mm256_fmadd_ps(_mm256_cvtepi32_ps(h1), s1, r);
        acc[t] = _mm256_fmadd_ps(r, _mm256_set1_ps(x[t].d[g]), acc[t]);
      }
    }
    alignas(32) float lanes[8];
    for (int t = 0; t < TB; ++t) {
      _mm256_store_ps(lanes, acc[t]);
      store_rows(y, t, rb * 16 + h * 8, m.R, lanes, 8);
    }
  }
}

constexpr int kQTileMax = 4;  // input rows per tile at most (16 registers)
