// Row kernels of the fused policy loss on the CPU (C++17, OpenMP over rows / fixed token blocks).
//
// Each row is handled by one thread and the head's sums are taken over fixed blocks of tokens, then over the
// blocks in order, so no result depends on the thread count.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "duca_kernels.h"
#include "policy_math.hpp"
#include "status.hpp"

namespace duca {
namespace {

constexpr int64_t kHeadBlock = 4096;  // tokens per partial sum: fixed, independent of the thread count

void check_dtype(int32_t dtype) {
  if (dtype != DUCA_FLOAT32 && dtype != DUCA_FLOAT64) {
    fail(DUCA_INVALID_ARGUMENT, "dtype must be DUCA_FLOAT32 or DUCA_FLOAT64, got ", dtype);
  }
}

void check_rows(const void* logits, int64_t num_tokens, int64_t vocab_size, const int64_t* target,
                double temperature) {
  if (num_tokens < 0) fail(DUCA_INVALID_ARGUMENT, "num_tokens must be >= 0, got ", num_tokens);
  if (vocab_size < 1) fail(DUCA_INVALID_ARGUMENT, "vocab_size must be >= 1, got ", vocab_size);
  if (!(temperature > 0) || !std::isfinite(temperature)) {
    fail(DUCA_INVALID_ARGUMENT, "temperature must be a finite number > 0, got ", temperature);
  }
  if (num_tokens > 0 && (logits == nullptr || target == nullptr)) {
    fail(DUCA_INVALID_ARGUMENT, "logits and target must not be NULL");
  }
  for (int64_t i = 0; i < num_tokens; ++i) {
    if (target[i] < 0 || target[i] >= vocab_size) {
      fail(DUCA_INVALID_ARGUMENT, "target[", i, "] = ", target[i], " is outside [0, ", vocab_size,
           ") (vocab_size)");
    }
  }
}

// Two passes per row in float64: the maximum, then exp-sums (also of exp * z for the entropy).
template <class T>
void logits_stats(const T* logits, int64_t n, int64_t v, int64_t stride_n, int64_t stride_v, const int64_t* target,
                  double temperature, T* lse_out, T* logprob_out, T* entropy_out) {
  const double inv_temperature = 1.0 / temperature;
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const T* row = logits + i * stride_n;
    double row_max = -std::numeric_limits<double>::infinity();
    for (int64_t j = 0; j < v; ++j) row_max = std::max(row_max, static_cast<double>(row[j * stride_v]) * inv_temperature);
    double sum_exp = 0.0, weighted = 0.0;
    for (int64_t j = 0; j < v; ++j) {
      const double z = static_cast<double>(row[j * stride_v]) * inv_temperature;
      const double e = std::exp(z - row_max);
      sum_exp += e;
      weighted += e * z;
    }
    const double lse = row_max + std::log(sum_exp);
    lse_out[i] = static_cast<T>(lse);
    logprob_out[i] = static_cast<T>(static_cast<double>(row[target[i] * stride_v]) * inv_temperature - lse);
    entropy_out[i] = static_cast<T>(lse - weighted / sum_exp);
  }
}

template <class T>
void logits_grad(T* logits, int64_t n, int64_t v, int64_t stride_n, int64_t stride_v, const int64_t* target,
                 const T* lse, const T* entropy, const T* grad_logp, const T* grad_entropy, double temperature) {
  const T inv_temperature = static_cast<T>(1.0 / temperature);
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    T* row = logits + i * stride_n;
    const T* row_grad_entropy = grad_entropy ? grad_entropy + i : nullptr;
    for (int64_t j = 0; j < v; ++j) {
      T& z = row[j * stride_v];
      z = logit_grad(z * inv_temperature, j == target[i], lse[i], entropy[i], grad_logp[i], row_grad_entropy,
                     inv_temperature);
    }
  }
}

template <class T>
void policy_head(int64_t n, const duca_policy_inputs& raw, const duca_policy_options& options, T* grad_logprobs,
                 T* grad_entropy, duca_policy_sums* out_sums) {
  const PolicyTokenInputs<T> in{static_cast<const T*>(raw.logprobs),         static_cast<const T*>(raw.entropy),
                                static_cast<const T*>(raw.advantages),       static_cast<const T*>(raw.old_logprobs),
                                static_cast<const T*>(raw.ref_logprobs),     static_cast<const T*>(raw.behavior_logprobs),
                                static_cast<const T*>(raw.token_weights),    raw.active};
  const int64_t num_blocks = (n + kHeadBlock - 1) / kHeadBlock;
  std::vector<PolicySums> partial(static_cast<size_t>(num_blocks), PolicySums{});
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < num_blocks; ++b) {
    const int64_t end = std::min(n, (b + 1) * kHeadBlock);
    for (int64_t i = b * kHeadBlock; i < end; ++i) {
      policy_token(i, in, options, grad_logprobs, grad_entropy, partial[b].value);
    }
  }
  PolicySums total{};
  for (const PolicySums& block : partial) {
    for (int k = 0; k < kNumPolicySums; ++k) total.value[k] += block.value[k];
  }
  double* fields = &out_sums->loss;
  for (int k = 0; k < kNumPolicySums; ++k) fields[k] = total.value[k];
}

}  // namespace

void check_policy_options(const duca_policy_options* options) {
  if (options == nullptr) fail(DUCA_INVALID_ARGUMENT, "options is NULL");
  if (!(options->clip_low >= 0 && options->clip_low < 1)) {
    fail(DUCA_INVALID_ARGUMENT, "clip_low must be in [0, 1), got ", options->clip_low);
  }
  if (!(options->clip_high >= 0) || !std::isfinite(options->clip_high)) {
    fail(DUCA_INVALID_ARGUMENT, "clip_high must be a finite number >= 0, got ", options->clip_high);
  }
  if (!(options->dual_clip == 0 || (options->dual_clip > 1 && std::isfinite(options->dual_clip)))) {
    fail(DUCA_INVALID_ARGUMENT, "dual_clip must be 0 (off) or a finite number > 1, got ", options->dual_clip);
  }
  if (!(options->tis_cap >= 0) || !std::isfinite(options->tis_cap)) {
    fail(DUCA_INVALID_ARGUMENT, "tis_cap must be 0 (off) or a finite number > 0, got ", options->tis_cap);
  }
  if (!std::isfinite(options->kl_coef) || !std::isfinite(options->entropy_coef)) {
    fail(DUCA_INVALID_ARGUMENT, "kl_coef and entropy_coef must be finite");
  }
  if (options->kl_type < DUCA_KL_K1 || options->kl_type > DUCA_KL_K3) {
    fail(DUCA_INVALID_ARGUMENT, "kl_type must be DUCA_KL_K1, _K2 or _K3, got ", options->kl_type);
  }
  if (!(options->log_ratio_limit > 0)) {
    fail(DUCA_INVALID_ARGUMENT, "log_ratio_limit must be > 0, got ", options->log_ratio_limit);
  }
}

void check_policy_inputs(int64_t n, const duca_policy_inputs* inputs, const void* grad_logprobs,
                         const duca_policy_sums* sums) {
  if (n < 0) fail(DUCA_INVALID_ARGUMENT, "num_tokens must be >= 0, got ", n);
  if (inputs == nullptr || sums == nullptr) fail(DUCA_INVALID_ARGUMENT, "inputs and sums must not be NULL");
  if (n == 0) return;
  const std::pair<const char*, const void*> required[] = {
      {"logprobs", inputs->logprobs},           {"entropy", inputs->entropy},
      {"advantages", inputs->advantages},       {"token_weights", inputs->token_weights},
      {"active", inputs->active},               {"grad_logprobs", grad_logprobs}};
  for (const auto& [name, pointer] : required) {
    if (pointer == nullptr) fail(DUCA_INVALID_ARGUMENT, name, " is NULL but num_tokens is ", n);
  }
}

}  // namespace duca

extern "C" {

duca_status duca_logits_stats(const void* logits, int32_t dtype, int64_t num_tokens, int64_t vocab_size,
                              int64_t stride_n, int64_t stride_v, const int64_t* target, double temperature,
                              void* lse, void* logprobs, void* entropy, char* message, size_t message_size) {
  return duca::guarded(message, message_size, [&] {
    duca::check_dtype(dtype);
    duca::check_rows(logits, num_tokens, vocab_size, target, temperature);
    if (dtype == DUCA_FLOAT32) {
      duca::logits_stats(static_cast<const float*>(logits), num_tokens, vocab_size, stride_n, stride_v, target,
                         temperature, static_cast<float*>(lse), static_cast<float*>(logprobs),
                         static_cast<float*>(entropy));
    } else {
      duca::logits_stats(static_cast<const double*>(logits), num_tokens, vocab_size, stride_n, stride_v, target,
                         temperature, static_cast<double*>(lse), static_cast<double*>(logprobs),
                         static_cast<double*>(entropy));
    }
  });
}

duca_status duca_policy_head(int64_t num_tokens, int32_t dtype, const duca_policy_inputs* inputs,
                             const duca_policy_options* options, void* grad_logprobs, void* grad_entropy,
                             duca_policy_sums* sums, char* message, size_t message_size) {
  return duca::guarded(message, message_size, [&] {
    duca::check_dtype(dtype);
    duca::check_policy_options(options);
    duca::check_policy_inputs(num_tokens, inputs, grad_logprobs, sums);
    if (dtype == DUCA_FLOAT32) {
      duca::policy_head(num_tokens, *inputs, *options, static_cast<float*>(grad_logprobs),
                        static_cast<float*>(grad_entropy), sums);
    } else {
      duca::policy_head(num_tokens, *inputs, *options, static_cast<double*>(grad_logprobs),
                        static_cast<double*>(grad_entropy), sums);
    }
  });
}

duca_status duca_logits_grad_inplace(void* logits, int32_t dtype, int64_t num_tokens, int64_t vocab_size,
                                     int64_t stride_n, int64_t stride_v, const int64_t* target, const void* lse,
                                     const void* entropy, const void* grad_logprobs, const void* grad_entropy,
                                     double temperature, char* message, size_t message_size) {
  return duca::guarded(message, message_size, [&] {
    duca::check_dtype(dtype);
    duca::check_rows(logits, num_tokens, vocab_size, target, temperature);
    if (num_tokens > 0 && (lse == nullptr || entropy == nullptr || grad_logprobs == nullptr)) {
      duca::fail(DUCA_INVALID_ARGUMENT, "lse, entropy and grad_logprobs must not be NULL");
    }
    if (dtype == DUCA_FLOAT32) {
      duca::logits_grad(static_cast<float*>(logits), num_tokens, vocab_size, stride_n, stride_v, target,
                        static_cast<const float*>(lse), static_cast<const float*>(entropy),
                        static_cast<const float*>(grad_logprobs), static_cast<const float*>(grad_entropy),
                        temperature);
    } else {
      duca::logits_grad(static_cast<double*>(logits), num_tokens, vocab_size, stride_n, stride_v, target,
                        static_cast<const double*>(lse), static_cast<const double*>(entropy),
                        static_cast<const double*>(grad_logprobs), static_cast<const double*>(grad_entropy),
                        temperature);
    }
  });
}

}  // extern "C"
