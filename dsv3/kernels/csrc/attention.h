// RMSNorm and MLA attention: rotary, latent normalisation and cache writes (mla_prepare, store_latents), and
// the absorbed decode attention straight from the latent cache (mla_decode, online softmax).
#pragma once

#include "common.h"
#include "kv_b.h"

namespace {

// ---------------------------------------------------------------------------------------------------------------
// RMSNorm with the reference rounding: y = bf16(w * bf16(x * rsqrt(mean(x^2) + eps))), statistics in float32.

void rms_norm_row(const bf16_t* x, const bf16_t* w, double eps, int64_t D, bf16_t* y) {
  V16f acc = v16_setzero_ps();
  int64_t d = 0;
  for (; d + 16 <= D; d += 16) {
    const V16f v = load16(x + d);
    acc = v16_fmadd_ps(v, v, acc);
  }
  float ss = v16_reduce_add_ps(acc);
  for (int64_t i = d; i < D; ++i) ss += bf2f(x[i]) * bf2f(x[i]);
  const float r = 1.f / std::sqrt(ss / static_cast<float>(D) + static_cast<float>(eps));
  const V16f rv = v16_set1_ps(r);
  for (d = 0; d + 16 <= D; d += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + d),
                        to_bf16x16(v16_mul_ps(load16(w + d), round_bf16x16(v16_mul_ps(load16(x + d), rv)))));
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


// s[j] = q . rows[j] (W wide) for the nj <= kTile rows of a tile: one accumulator per row, so the rows' sums run
// side by side instead of waiting on each other. NJ > 0: nj == NJ known at compile time (a full tile: the row loop
// unrolls and the accumulators stay in registers; the same operations in the same order as the general case).
template <int64_t NJ>
inline void tile_scores_n(const float* q, const float* rows, int64_t W, int64_t nj, float* s) {
  const int64_t n = NJ > 0 ? NJ : nj;
  V16f a[kTile];
  for (int64_t j = 0; j < kTile; ++j) a[j] = v16_setzero_ps();
  int64_t w = 0;
  for (; w + 16 <= W; w += 16) {
    const V16f qv = v16_loadu_ps(q + w);
    for (int64_t j = 0; j < n; ++j) a[j] = v16_fmadd_ps(qv, v16_loadu_ps(rows + j * W + w), a[j]);
  }
  if (w < W) {
    const M16 mk = static_cast<M16>((1u << (W - w)) - 1);
    const V16f qv = v16_maskz_loadu_ps(mk, q + w);
    for (int64_t j = 0; j < n; ++j) a[j] = v16_fmadd_ps(qv, v16_maskz_loadu_ps(mk, rows + j * W + w), a[j]);
  }
  for (int64_t j = 0; j < n; ++j) s[j] = v16_reduce_add_ps(a[j]);
}

inline void tile_scores(const float* q, const float* rows, int64_t W, int64_t nj, float* s) {
  if (nj == kTile) return tile_scores_n<kTile>(q, rows, W, nj, s);
  tile_scores_n<0>(q, rows, W, nj, s);
}

// acc = acc * corr + sum_j p[j] * rows[j][:C], each 16-wide piece of acc loaded and stored once per tile (NJ as
// in tile_scores_n).
template <int64_t NJ>
inline void tile_accumulate_n(float* acc, float corr, const float* p, const float* rows, int64_t W, int64_t nj,
                              int64_t C) {
  const int64_t n = NJ > 0 ? NJ : nj;
  const V16f cv = v16_set1_ps(corr);
  V16f pv[kTile];
  for (int64_t j = 0; j < n; ++j) pv[j] = v16_set1_ps(p[j]);
  int64_t c = 0;
  for (; c + 16 <= C; c += 16) {
    V16f o = v16_mul_ps(v16_loadu_ps(acc + c), cv);
    for (int64_t j = 0; j < n; ++j) o = v16_fmadd_ps(pv[j], v16_loadu_ps(rows + j * W + c), o);
    v16_storeu_ps(acc + c, o);
  }
  for (; c < C; ++c) {
    float o = acc[c] * corr;
    for (int64_t j = 0; j < n; ++j) o += p[j] * rows[j * W + c];
    acc[c] = o;
  }
}

inline void tile_accumulate(float* acc, float corr, const float* p, const float* rows, int64_t W, int64_t nj,
                            int64_t C) {
  if (nj == kTile) return tile_accumulate_n<kTile>(acc, corr, p, rows, W, nj, C);
  tile_accumulate_n<0>(acc, corr, p, rows, W, nj, C);
}

// The absorbed attention's two small products per (query, head), on AVX512_BF16 with bf16 pairs (dpbf16ps: exact
// products, float32 sums) where the shapes allow, else in float32 with on-the-fly conversion.
// qh[c] = sc * sum_n q[n] W_uk[n, c] for c < C (W_uk [N, C] row-major: a head's first N rows of kv_b).
inline void absorb_query(const bf16_t* q, const KvRows& wk, int64_t N, int64_t C, float sc, float* qh,
                         float* wrow, bf16_t* tmp) {
#if defined(__AVX512BF16__)
  if (N % 2 == 0 && C % 32 == 0) {
    // unpacklo/hi interleave rows n and n+1 within 128-bit lanes: lo lane j holds c = 8 (j / 4) + j % 4 of the
    // 32-wide chunk, hi lane j holds 4 more; idx puts them back in c order.
    alignas(64) int32_t i0[16], i1[16];
    for (int p = 0; p < 16; ++p) {
      const int k0 = p / 8, k1 = 2 + p / 8, m = p % 8;
      i0[p] = m < 4 ? 4 * k0 + m : 16 + 4 * k0 + m - 4;
      i1[p] = m < 4 ? 4 * k1 + m : 16 + 4 * k1 + m - 4;
    }
    const __m512i idx0 = _mm512_load_si512(i0), idx1 = _mm512_load_si512(i1);
    const __m512 scv = _mm512_set1_ps(sc);
    for (int64_t c0 = 0; c0 < C; c0 += 128) {
      const int nu = static_cast<int>(std::min<int64_t>(4, (C - c0) / 32));
      __m512 lo[4], hi[4];
      for (int u = 0; u < 4; ++u) lo[u] = hi[u] = _mm512_setzero_ps();
      for (int64_t n = 0; n < N; n += 2) {
        int32_t pr;
        std::memcpy(&pr, q + n, 4);
        const __m512bh qp = (__m512bh)_mm512_set1_epi32(pr);
        for (int u = 0; u < nu; ++u) {
          const __m512i a = wk.bf32(n, c0 + 32 * u), b = wk.bf32(n + 1, c0 + 32 * u);
          lo[u] = _mm512_dpbf16_ps(lo[u], (__m512bh)_mm512_unpacklo_epi16(a, b), qp);
          hi[u] = _mm512_dpbf16_ps(hi[u], (__m512bh)_mm512_unpackhi_epi16(a, b), qp);
        }
      }
      for (int u = 0; u < nu; ++u) {
        _mm512_storeu_ps(qh + c0 + 32 * u, _mm512_mul_ps(scv, _mm512_permutex2var_ps(lo[u], idx0, hi[u])));
        _mm512_storeu_ps(qh + c0 + 32 * u + 16, _mm512_mul_ps(scv, _mm512_permutex2var_ps(lo[u], idx1, hi[u])));
      }
    }
    return;
  }
#endif
  for (int64_t c = 0; c < C; ++c) qh[c] = 0.f;
  for (int64_t n = 0; n < N; ++n) {
    wk.row_f32(n, wrow, tmp);
    axpy_f32(sc * bf2f(q[n]), wrow, qh, C);
  }
}

// orow[v] = bf16(sum_c a[c] W_uv[v, c]) for v < V (W_uv [V, C]: a head's last V rows of kv_b); a is scaled in place.
inline void absorb_output(float* a, float inv, const KvRows& wv, int64_t V, int64_t C, bf16_t* orow, float* wrow,
                          bf16_t* tmp) {
  for (int64_t c = 0; c < C; ++c) a[c] *= inv;
#if defined(__AVX512BF16__)
  if (C % 32 == 0 && C <= 2048) {
    alignas(64) bf16_t ab[2048];
    for (int64_t c = 0; c < C; c += 32)
      _mm512_store_si512(ab + c, (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(a + c + 16), _mm512_loadu_ps(a + c)));
    int64_t v = 0;
    for (; v + 4 <= V; v += 4) {
      __m512 acc[4];
      for (int i = 0; i < 4; ++i) acc[i] = _mm512_setzero_ps();
      for (int64_t c = 0; c < C; c += 32) {
        const __m512bh x = (__m512bh)_mm512_load_si512(ab + c);
        for (int i = 0; i < 4; ++i)
          acc[i] = _mm512_dpbf16_ps(acc[i], (__m512bh)wv.bf32(v + i, c), x);
      }
      for (int i = 0; i < 4; ++i) orow[v + i] = f2bf(_mm512_reduce_add_ps(acc[i]));
    }
    for (; v < V; ++v) {
      __m512 acc = _mm512_setzero_ps();
      for (int64_t c = 0; c < C; c += 32)
        acc = _mm512_dpbf16_ps(acc, (__m512bh)wv.bf32(v, c), (__m512bh)_mm512_load_si512(ab + c));
      orow[v] = f2bf(_mm512_reduce_add_ps(acc));
    }
    return;
  }
#endif
  for (int64_t v = 0; v < V; ++v) {
    wv.row_f32(v, wrow, tmp);
    orow[v] = f2bf(dot_f32(a, wrow, C));
  }
}

void mla_decode(const at::Tensor& q, const at::Tensor& kv, const at::Tensor& tok, const at::Tensor& seq,
                const at::Tensor& len, const at::Tensor& slots, const at::Tensor& kv_b, int64_t v_dim, double scale,
                at::Tensor out, const c10::optional<at::Tensor>& kv_b_scales) {
  check_bf16(q, "mla_decode: q", 3);
  check_bf16(kv, "mla_decode: kv", 2);
  check_bf16(out, "mla_decode: out", 3);
  check_index(tok, "mla_decode: tok", 1);
  check_index(seq, "mla_decode: seq", 1);
  check_index(len, "mla_decode: len", 1);
  check_index(slots, "mla_decode: slots", 2);
  TORCH_CHECK(q.is_contiguous() && kv.is_contiguous() && out.is_contiguous(),
              "mla_decode: q, kv and out must be contiguous");
  const KvB wsrc = kv_b_view(kv_b, kv_b_scales);
  const int64_t T = q.size(0), H = q.size(1), C = wsrc.C, W = kv.size(1), R = W - C, N = q.size(2) - R;
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
  const int64_t splits = std::min<int64_t>(H, std::max<int64_t>(1, (threads + G - 1) / G));
  const int64_t hb = (H + splits - 1) / splits, nhb = (H + hb - 1) / hb;
  const float sc = static_cast<float>(scale);
  // A quantised kv_b: with one or two query rows (decode at batch 1, its verification) each (query, head) reads its
  // head's codes and widens them in registers; with more, every head is widened to bf16 once into a table first
  // (the same values), which the rows then share.
  const int64_t HW = (N + V) * C;  // one head's rows of kv_b
  const bf16_t* wp = wsrc.bf;
  at::Tensor wide;
  if (wsrc.bf == nullptr && Q > 2) {
    wide = at::empty({H * HW}, q.options());
    bf16_t* wd = bf_mut(wide);
    at::parallel_for(0, H, 1, [&](int64_t a, int64_t b) {
      kv_b_rows_bf16(wsrc, a * (N + V), (b - a) * (N + V), wd + a * HW);
    });
    wp = wd;
  }
  at::parallel_for(0, G * nhb, 1, [&](int64_t a, int64_t b) {
    std::vector<float> qc, acc, m, l, rows(kTile * W), wrow(std::max(C, N + R)), s(16);
    std::vector<bf16_t> tmp(C);
    // kv_b's rows: the bf16 weight (or its widened table), else the codes read in registers
    const KvRows all = wp != nullptr ? KvRows{wp, nullptr, 0, C} : KvRows{nullptr, &wsrc, 0, C};
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
      // q_c = scale * q_nope W_uk, then scale * q_pe: one W-wide float32 query per (query, head).
      for (int64_t qi = 0; qi < nq; ++qi)
        for (int64_t h = h0; h < h1; ++h) {
          float* qh = qc.data() + (qi * nh + h - h0) * W;
          const bf16_t* qrow = qp + (tk[q0 + qi] * H + h) * (N + R);
          absorb_query(qrow, all.at(h * (N + V)), N, C, sc, qh, wrow.data(), tmp.data());
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
            const M16 live = static_cast<M16>((1u << nj) - 1);
            const V16f p =
                v16_maskz_mov_ps(live, exp16(v16_sub_ps(v16_maskz_loadu_ps(live, sh), v16_set1_ps(mx))));
            v16_storeu_ps(sh, p);  // the tile's probabilities
            l[k] = l[k] * corr + v16_reduce_add_ps(p);
            m[k] = mx;
            tile_accumulate(acc.data() + k * C, corr, sh, rows.data(), W, nj, C);
          }
        }
      }
      // o = (acc / l) W_uv^T per (query, head), rounded once to bf16.
      for (int64_t qi = 0; qi < nq; ++qi)
        for (int64_t h = h0; h < h1; ++h) {
          const int64_t k = qi * nh + h - h0;
          absorb_output(acc.data() + k * C, 1.f / l[k], all.at(h * (N + V) + N), V, C,
                        op + (tk[q0 + qi] * H + h) * V, wrow.data(), tmp.data());
        }
    }
  });
}

}  // namespace
