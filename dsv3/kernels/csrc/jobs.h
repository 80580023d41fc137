// The job split of the layer products: a product (packed matrix x input rows) cut into jobs of row blocks and token
// chunks, run across threads; quantised matrices read their inputs quantised once per call (qpacked.h).
#pragma once

#include "qpacked.h"

namespace {

struct Job {  // row blocks [rb0, rb1) of one packed matrix against n input rows
  Packed m;
  int64_t rb0, rb1;
  const bf16_t* const* x;
  int64_t n;
  Out y;
  const QRow* qx = nullptr;  // the same rows quantised (quantised matrices)
};

struct Jobs {  // one call's jobs, and the quantised input rows they share
  std::vector<Job> list;
  QActs acts;
};

void run_jobs(const Jobs& jobs) {
  const std::vector<Job>& js = jobs.list;
  at::parallel_for(0, static_cast<int64_t>(js.size()), 1, [&](int64_t a, int64_t b) {
    for (int64_t j = a; j < b; ++j) {
      const Job& jb = js[j];
      if (jb.m.kind != kQNone) qmatvec_blocks(jb.m, jb.rb0, jb.rb1, jb.qx, jb.n, jb.y);
      else matvec_blocks(jb.m, jb.rb0, jb.rb1, jb.x, jb.n, jb.y);
    }
  });
}

// Bytes of one 16-row block of m.
inline int64_t block_bytes(const Packed& m) {
  if (m.kind == kQInt8) return kRows * (m.D + 2 * m.D / m.G);
  if (m.kind == kQInt4) return kRows * (m.D / 2 + 2 * m.D / m.G);
  if (m.kind == kQInt8X) return kRows * (m.D + 4 * m.D / 16 + 4 * m.D / 32);
  if (m.kind == kQInt6X) return kRows * (3 * m.D / 4 + 4 * m.D / 16 + 4 * m.D / 32);
  if (m.kind == kQInt6) return kRows * (3 * m.D / 4 + 4 * m.D / 16);
  if (m.kind == kQInt4K) return kRows * (m.D / 2 + 4 * m.D / 256 + 2 * m.D / 32);
  if (m.kind == kQInt5K) return kRows * (5 * m.D / 8 + 4 * m.D / 256 + 2 * m.D / 32);
  if (m.kind == kQInt6K) return kRows * (3 * m.D / 4 + 2 * m.D / 256 + m.D / 16);
  if (m.kind == kQInt4M) return kRows * (m.D / 2 + 8 * m.D / 32);
  return m.pairs() * 2 * kRows * 2;
}

// Jobs for out[t, r] = m[r, :] . x[t]. Each job streams a useful amount of weights (32 KiB for a few input rows,
// 128 KiB for more) over at most 48 input rows; a large product is cut into at least 4 jobs per thread so the
// threads finish together.
void add_jobs(Jobs& jobs, const Packed& m, const bf16_t* const* x, int64_t n, const Out& y) {
  const int64_t tchunk = n <= 8 * kTokens ? n : 8 * kTokens;
  const int64_t tjobs = (n + tchunk - 1) / tchunk;
  int64_t chunk = std::max<int64_t>(1, (n <= 4 ? (32 << 10) : (128 << 10)) / block_bytes(m));
  const int64_t min_jobs = 4 * at::get_num_threads();
  if (m.blocks() * tjobs < min_jobs * chunk)
    chunk = std::max<int64_t>(1, (m.blocks() * tjobs + min_jobs - 1) / min_jobs);
  chunk = std::min(m.blocks(), (chunk + 3) / 4 * 4);  // whole 4-block tiles: enough accumulation chains
  const QRow* qx = m.kind != kQNone ? jobs.acts.rows(x, n, m.D, kQActGroup, kActBits[m.kind]) : nullptr;
  for (int64_t t0 = 0; t0 < n; t0 += tchunk)
    for (int64_t rb = 0; rb < m.blocks(); rb += chunk)
      jobs.list.push_back({m, rb, std::min(m.blocks(), rb + chunk), x + t0, std::min(tchunk, n - t0), y.at(t0),
                           qx ? qx + t0 : nullptr});
}

}  // namespace
