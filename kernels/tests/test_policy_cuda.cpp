// CUDA row kernels of the policy loss against the CPU ones on random float32 logits (needs a GPU; exit
// code 77 = skipped without one): statistics, head and d-logits within fp32 tolerance, bit-identical reruns.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "duca_kernels.h"

namespace {

int failures = 0;

template <class T>
T* to_device(const std::vector<T>& host) {
  T* device = nullptr;
  cudaMalloc(&device, host.size() * sizeof(T) + 1);
  cudaMemcpy(device, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice);
  return device;
}

template <class T>
std::vector<T> to_host(const T* device, size_t n) {
  std::vector<T> host(n);
  cudaMemcpy(host.data(), device, n * sizeof(T), cudaMemcpyDeviceToHost);
  return host;
}

void check_close(const std::vector<float>& got, const std::vector<float>& want, const char* what) {
  int reported = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    if (!(std::fabs(got[i] - want[i]) <= 1e-5f + 1e-4f * std::fabs(want[i]))) {
      if (reported++ < 5) std::fprintf(stderr, "%s[%zu]: cuda %.9g cpu %.9g\n", what, i, got[i], want[i]);
      ++failures;
    }
  }
}

}  // namespace

int main() {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("no CUDA device: skipped\n");
    return 77;
  }
  const int64_t n = 300, v = 5003;  // v not a multiple of the block
  std::mt19937 rng(3);
  std::normal_distribution<float> normal(0.0f, 3.0f);
  std::vector<float> logits(n * v), advantages(n), old(n), ref(n), behavior(n), weights(n);
  std::vector<int64_t> target(n);
  std::vector<uint8_t> active(n);
  for (float& z : logits) z = normal(rng);
  for (int64_t i = 0; i < n; ++i) {
    target[i] = static_cast<int64_t>(rng() % v);
    advantages[i] = normal(rng) / 3.0f;
    active[i] = rng() % 5 != 0;
    weights[i] = active[i] ? 1.0f / n : 0.0f;
  }
  const double temperature = 0.8;
  std::vector<float> lse(n), logp(n), entropy(n);
  duca_logits_stats(logits.data(), DUCA_FLOAT32, n, v, v, 1, target.data(), temperature, lse.data(), logp.data(),
                    entropy.data(), nullptr, 0);
  for (int64_t i = 0; i < n; ++i) {
    old[i] = logp[i] + normal(rng) / 20.0f;
    ref[i] = logp[i] + normal(rng) / 20.0f;
    behavior[i] = old[i] + normal(rng) / 10.0f;
  }
  const duca_policy_options options{0.2, 0.28, 3.0, 0.05, DUCA_KL_K3, 0.01, 2.0, 20.0};
  const duca_policy_inputs host_inputs{logp.data(), entropy.data(), advantages.data(), old.data(),  ref.data(),
                                       behavior.data(), weights.data(), active.data()};
  std::vector<float> grad_logp(n), grad_entropy(n);
  duca_policy_sums sums;
  duca_policy_head(n, DUCA_FLOAT32, &host_inputs, &options, grad_logp.data(), grad_entropy.data(), &sums, nullptr, 0);
  std::vector<float> grad = logits;
  duca_logits_grad_inplace(grad.data(), DUCA_FLOAT32, n, v, v, 1, target.data(), lse.data(), entropy.data(),
                           grad_logp.data(), grad_entropy.data(), temperature, nullptr, 0);

  float *d_logits = to_device(logits), *d_lse = to_device(lse), *d_logp = to_device(logp),
        *d_entropy = to_device(entropy);
  int64_t* d_target = to_device(target);
  char message[256];
  std::vector<std::vector<float>> runs;
  for (int run = 0; run < 2; ++run) {
    if (duca_logits_stats_cuda(d_logits, DUCA_FLOAT32, n, v, v, 1, d_target, temperature, d_lse, d_logp, d_entropy,
                               nullptr, message, sizeof message) != DUCA_OK) {
      std::fprintf(stderr, "stats: %s\n", message);
      return 1;
    }
    runs.push_back(to_host(d_entropy, n));
  }
  check_close(to_host(d_lse, n), lse, "lse");
  check_close(to_host(d_logp, n), logp, "logprobs");
  check_close(runs[0], entropy, "entropy");
  if (runs[0] != runs[1]) ++failures;

  // Head and gradient on the CPU statistics, so that only the kernel under test differs.
  float *d_cpu_logp = to_device(logp), *d_cpu_entropy = to_device(entropy), *d_cpu_lse = to_device(lse);
  const duca_policy_inputs device_inputs{d_cpu_logp, d_cpu_entropy, to_device(advantages), to_device(old),
                                         to_device(ref), to_device(behavior), to_device(weights), to_device(active)};
  float *d_grad_logp = to_device(grad_logp), *d_grad_entropy = to_device(grad_entropy);
  duca_policy_sums* d_sums = nullptr;
  cudaMalloc(&d_sums, sizeof(duca_policy_sums));
  if (duca_policy_head_cuda(n, DUCA_FLOAT32, &device_inputs, &options, d_grad_logp, d_grad_entropy, d_sums, nullptr,
                            message, sizeof message) != DUCA_OK) {
    std::fprintf(stderr, "head: %s\n", message);
    return 1;
  }
  duca_policy_sums device_sums;
  cudaMemcpy(&device_sums, d_sums, sizeof device_sums, cudaMemcpyDeviceToHost);
  const double* got = &device_sums.loss;
  const double* want = &sums.loss;
  for (int k = 0; k < 12; ++k) {
    if (!(std::fabs(got[k] - want[k]) <= 1e-6 + 1e-5 * std::fabs(want[k]))) {
      std::fprintf(stderr, "sum %d: cuda %.12g cpu %.12g\n", k, got[k], want[k]);
      ++failures;
    }
  }
  check_close(to_host(d_grad_logp, n), grad_logp, "grad_logprobs");
  if (duca_logits_grad_inplace_cuda(d_logits, DUCA_FLOAT32, n, v, v, 1, d_target, d_cpu_lse, d_cpu_entropy,
                                    d_grad_logp, d_grad_entropy, temperature, nullptr, message,
                                    sizeof message) != DUCA_OK) {
    std::fprintf(stderr, "grad: %s\n", message);
    return 1;
  }
  check_close(to_host(d_logits, logits.size()), grad, "d_logits");
  if (failures) std::fprintf(stderr, "%d mismatches\n", failures);
  return failures ? 1 : 0;
}
