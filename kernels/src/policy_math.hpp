// Per-token math of the policy-loss row kernels, shared by the CPU and CUDA sources (host + device).
#pragma once

#include <cmath>
#include <cstdint>

#include "duca_kernels.h"

#if defined(__CUDACC__)
#define DUCA_HOST_DEVICE __host__ __device__ inline
#else
#define DUCA_HOST_DEVICE inline
#endif

namespace duca {

constexpr int kNumPolicySums = 12;  // fields of duca_policy_sums, in order

// Sums as an array so that reductions can loop over them (same order as duca_policy_sums).
struct PolicySums {
  double value[kNumPolicySums];
};
enum PolicySum {
  kLoss, kPgLoss, kActive, kClippedLow, kClippedHigh, kDualClipped, kTisCapped, kApproxKl, kRatio, kEntropy,
  kKlRef, kBehaviorGap
};

template <class T>
struct PolicyTokenInputs {
  const T* logprobs;
  const T* entropy;
  const T* advantages;
  const T* old_logprobs;
  const T* ref_logprobs;
  const T* behavior_logprobs;
  const T* token_weights;
  const uint8_t* active;
};

template <class T>
DUCA_HOST_DEVICE T clamp_value(T x, T lo, T hi) {
  return x < lo ? lo : (x > hi ? hi : x);
}

// The objective of token i (as duca_fast's policy_head, in T arithmetic): writes d loss / d logp and
// d loss / d H (when grad_entropy is not NULL) and adds the token's share of every sum to `sums`.
template <class T>
DUCA_HOST_DEVICE void policy_token(int64_t i, const PolicyTokenInputs<T>& in, const duca_policy_options& options,
                                   T* grad_logprobs, T* grad_entropy, double* sums) {
  using std::exp;
  using std::fabs;
  const T limit = static_cast<T>(options.log_ratio_limit);
  const T advantage = in.advantages[i];
  const T logp = in.logprobs[i];
  const T old = in.old_logprobs ? in.old_logprobs[i] : logp;
  const T log_ratio = logp - old;
  const bool ratio_live = log_ratio >= -limit && log_ratio <= limit;
  const T clamped_log_ratio = clamp_value(log_ratio, -limit, limit);
  const T ratio = exp(clamped_log_ratio);
  const T unclipped = -advantage * ratio;
  const T clipped = -advantage * clamp_value(ratio, static_cast<T>(1.0 - options.clip_low),
                                              static_cast<T>(1.0 + options.clip_high));
  const bool is_clipped = clipped > unclipped;
  T pg_loss = is_clipped ? clipped : unclipped;
  T d_pg = (is_clipped || !ratio_live) ? T(0) : -advantage * ratio;
  bool dual = false;
  if (options.dual_clip > 0) {
    const T cap = static_cast<T>(-options.dual_clip) * advantage;
    dual = advantage < T(0) && pg_loss > cap;
    if (dual) {
      pg_loss = cap;
      d_pg = T(0);
    }
  }
  bool tis_capped = false;
  T behavior_gap = T(0);
  if (in.behavior_logprobs) {
    behavior_gap = fabs(logp - in.behavior_logprobs[i]);
    if (options.tis_cap > 0) {
      const T gap = old - in.behavior_logprobs[i];
      const T raw = exp(gap < limit ? gap : limit);
      const T cap = static_cast<T>(options.tis_cap);
      tis_capped = raw > cap;
      const T weight = tis_capped ? cap : raw;
      pg_loss *= weight;
      d_pg *= weight;
    }
  }
  T per_token = pg_loss;
  T d_logp = d_pg;
  T kl = T(0);
  if (in.ref_logprobs) {
    const T d = logp - in.ref_logprobs[i];
    T d_kl;
    if (options.kl_type == DUCA_KL_K1) {
      kl = d;
      d_kl = T(1);
    } else if (options.kl_type == DUCA_KL_K2) {
      kl = T(0.5) * d * d;
      d_kl = d;
    } else {
      const T exp_neg = exp(-d < limit ? -d : limit);
      kl = exp_neg + d - T(1);
      d_kl = T(1) - (-d <= limit ? exp_neg : T(0));
    }
    if (options.kl_coef != 0) {
      per_token += static_cast<T>(options.kl_coef) * kl;
      d_logp += static_cast<T>(options.kl_coef) * d_kl;
    }
  }
  const T entropy = in.entropy[i];
  if (options.entropy_coef != 0) per_token -= static_cast<T>(options.entropy_coef) * entropy;
  const T weight = in.token_weights[i];
  const bool active = in.active[i] != 0;
  grad_logprobs[i] = active ? weight * d_logp : T(0);
  if (grad_entropy) grad_entropy[i] = static_cast<T>(-options.entropy_coef) * weight;
  if (!active) return;
  sums[kLoss] += static_cast<double>(weight * per_token);
  sums[kPgLoss] += static_cast<double>(weight * pg_loss);
  sums[kActive] += 1.0;
  sums[kClippedLow] += (is_clipped && advantage < T(0)) ? 1.0 : 0.0;
  sums[kClippedHigh] += (is_clipped && advantage > T(0)) ? 1.0 : 0.0;
  sums[kDualClipped] += dual ? 1.0 : 0.0;
  sums[kTisCapped] += tis_capped ? 1.0 : 0.0;
  sums[kApproxKl] += static_cast<double>(ratio - T(1) - clamped_log_ratio);
  sums[kRatio] += static_cast<double>(ratio);
  sums[kEntropy] += static_cast<double>(entropy);
  sums[kKlRef] += static_cast<double>(kl);
  sums[kBehaviorGap] += static_cast<double>(behavior_gap);
}

// d loss / d logits of one element from the row statistics (1/T applied last, as the Triton kernel does).
template <class T>
DUCA_HOST_DEVICE T logit_grad(T z, bool is_target, T lse, T entropy, T grad_logp, const T* grad_entropy_row,
                              T inv_temperature) {
  using std::exp;
  const T prob = exp(z - lse);
  T coefficient = grad_logp;
  if (grad_entropy_row) coefficient += *grad_entropy_row * (z - lse + entropy);
  return (-prob * coefficient + (is_target ? grad_logp : T(0))) * inv_temperature;
}

// Host-side argument checks shared by the CPU and CUDA entry points (policy_cpu.cpp).
void check_policy_options(const duca_policy_options* options);
void check_policy_inputs(int64_t n, const duca_policy_inputs* inputs, const void* grad_logprobs,
                         const duca_policy_sums* sums);

}  // namespace duca
