#pragma once
// Running (count, mean, M2) statistics and the merge of two partial results (Chan et al.).
// Merging partial results is what lets every backend split a channel's reduction across threads,
// blocks or cache-sized chunks without ever forming E[x^2] - E[x]^2.
#include "host_device.h"

namespace custom_bn {

template <typename acc_t>
struct WelfordStats {
  acc_t mean = acc_t(0);
  acc_t m2 = acc_t(0);  // sum of squared deviations from mean
  acc_t count = acc_t(0);
};

template <typename acc_t>
CBN_HOST_DEVICE CBN_INLINE void welford_push(WelfordStats<acc_t>& s, acc_t x) {
  s.count += acc_t(1);
  const acc_t delta = x - s.mean;
  s.mean += delta / s.count;
  s.m2 += delta * (x - s.mean);
}

template <typename acc_t>
CBN_HOST_DEVICE CBN_INLINE WelfordStats<acc_t> welford_merge(const WelfordStats<acc_t>& a,
                                                             const WelfordStats<acc_t>& b) {
  if (b.count == acc_t(0)) return a;
  if (a.count == acc_t(0)) return b;
  WelfordStats<acc_t> r;
  r.count = a.count + b.count;
  const acc_t delta = b.mean - a.mean;
  const acc_t b_share = b.count / r.count;
  // delta - delta is 0 unless delta is Inf or NaN (a partial mean of Inf): then the weighted
  // sum keeps Inf + finite = Inf and Inf - Inf = NaN, as a plain sum over the data would.
  r.mean = delta - delta == acc_t(0) ? a.mean + delta * b_share
                                     : a.mean * (acc_t(1) - b_share) + b.mean * b_share;
  r.m2 = a.m2 + b.m2 + delta * delta * a.count * b_share;
  return r;
}

}  // namespace custom_bn
