// Row kernels of the fused policy loss on CUDA, matching the CPU ones (policy_cpu.cpp) and the Triton
// logits kernels: one block per row with a fixed shared-memory reduction tree (online max / exp-sum), an
// element-wise d-logits kernel, and the per-token head with per-block float64 partial sums combined by one
// block in a fixed order. No atomics: results are bit-identical run to run.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "duca_kernels.h"
#include "policy_math.hpp"
#include "status.hpp"

namespace duca {
namespace {

constexpr int kRowThreads = 256;
constexpr int kHeadThreads = 128;
constexpr int kMaxHeadBlocks = 1024;

void check_launch(const char* what) {
  const cudaError_t error = cudaGetLastError();
  if (error != cudaSuccess) fail(DUCA_CUDA_ERROR, what, ": ", cudaGetErrorString(error));
}

unsigned row_blocks(int64_t rows) { return static_cast<unsigned>(rows < 65535 * 32 ? rows : 65535 * 32); }

// Accumulation type: fp32 logits keep fp32 running sums (like the Triton kernels), fp64 keep fp64.
template <class T>
__global__ void logits_stats_kernel(const T* __restrict__ logits, int64_t num_tokens, int64_t vocab_size,
                                    int64_t stride_n, int64_t stride_v, const int64_t* __restrict__ target,
                                    T inv_temperature, T* __restrict__ lse_out, T* __restrict__ logprob_out,
                                    T* __restrict__ entropy_out) {
  __shared__ T shared_max[kRowThreads], shared_sum[kRowThreads], shared_weighted[kRowThreads];
  for (int64_t row = blockIdx.x; row < num_tokens; row += gridDim.x) {
    const T* z_row = logits + row * stride_n;
    T running_max = -INFINITY, sum_exp = 0, weighted = 0;
    for (int64_t j = threadIdx.x; j < vocab_size; j += blockDim.x) {
      const T z = z_row[j * stride_v] * inv_temperature;
      if (z > running_max) {
        const T rescale = exp(running_max - z);
        sum_exp *= rescale;
        weighted *= rescale;
        running_max = z;
      }
      const T e = exp(z - running_max);
      sum_exp += e;
      weighted += e * z;
    }
    shared_max[threadIdx.x] = running_max;
    shared_sum[threadIdx.x] = sum_exp;
    shared_weighted[threadIdx.x] = weighted;
    __syncthreads();
    for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
      if (threadIdx.x < stride) {
        const T m_a = shared_max[threadIdx.x], m_b = shared_max[threadIdx.x + stride];
        const T m = m_a > m_b ? m_a : m_b;
        // Empty partials carry -inf maxima and zero sums; they must not produce NaN.
        const T scale_a = m_a == -INFINITY ? T(0) : exp(m_a - m);
        const T scale_b = m_b == -INFINITY ? T(0) : exp(m_b - m);
        shared_sum[threadIdx.x] = shared_sum[threadIdx.x] * scale_a + shared_sum[threadIdx.x + stride] * scale_b;
        shared_weighted[threadIdx.x] =
            shared_weighted[threadIdx.x] * scale_a + shared_weighted[threadIdx.x + stride] * scale_b;
        shared_max[threadIdx.x] = m;
      }
      __syncthreads();
    }
    if (threadIdx.x == 0) {
      const T lse = shared_max[0] + log(shared_sum[0]);
      lse_out[row] = lse;
      logprob_out[row] = z_row[target[row] * stride_v] * inv_temperature - lse;
      entropy_out[row] = lse - shared_weighted[0] / shared_sum[0];
    }
    __syncthreads();
  }
}

template <class T>
__global__ void logits_grad_kernel(T* __restrict__ logits, int64_t num_tokens, int64_t vocab_size, int64_t stride_n,
                                   int64_t stride_v, const int64_t* __restrict__ target, const T* __restrict__ lse,
                                   const T* __restrict__ entropy, const T* __restrict__ grad_logp,
                                   const T* __restrict__ grad_entropy, T inv_temperature) {
  for (int64_t row = blockIdx.x; row < num_tokens; row += gridDim.x) {
    T* z_row = logits + row * stride_n;
    const int64_t row_target = target[row];
    const T row_lse = lse[row], row_entropy = entropy[row], row_grad = grad_logp[row];
    const T* row_grad_entropy = grad_entropy ? grad_entropy + row : nullptr;
    for (int64_t j = threadIdx.x; j < vocab_size; j += blockDim.x) {
      T& z = z_row[j * stride_v];
      z = logit_grad(z * inv_temperature, j == row_target, row_lse, row_entropy, row_grad, row_grad_entropy,
                     inv_temperature);
    }
  }
}

// Each block writes kNumPolicySums partial sums of its grid-strided tokens (fixed tree over its threads).
template <class T>
__global__ void policy_head_kernel(int64_t num_tokens, PolicyTokenInputs<T> inputs, duca_policy_options options,
                                   T* __restrict__ grad_logprobs, T* __restrict__ grad_entropy,
                                   double* __restrict__ partial) {
  __shared__ double shared[kNumPolicySums][kHeadThreads];
  double sums[kNumPolicySums] = {};
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < num_tokens;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    policy_token(i, inputs, options, grad_logprobs, grad_entropy, sums);
  }
  for (int k = 0; k < kNumPolicySums; ++k) shared[k][threadIdx.x] = sums[k];
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) {
      for (int k = 0; k < kNumPolicySums; ++k) shared[k][threadIdx.x] += shared[k][threadIdx.x + stride];
    }
    __syncthreads();
  }
  if (threadIdx.x < kNumPolicySums) partial[blockIdx.x * kNumPolicySums + threadIdx.x] = shared[threadIdx.x][0];
}

// One thread per sum adds the blocks' partials in block order.
__global__ void policy_sums_kernel(const double* __restrict__ partial, int num_blocks, double* __restrict__ sums) {
  if (threadIdx.x >= kNumPolicySums) return;
  double total = 0.0;
  for (int b = 0; b < num_blocks; ++b) total += partial[b * kNumPolicySums + threadIdx.x];
  sums[threadIdx.x] = total;
}

void check_rows(const void* logits, int32_t dtype, int64_t num_tokens, int64_t vocab_size, const int64_t* target,
                double temperature) {
  if (dtype != DUCA_FLOAT32 && dtype != DUCA_FLOAT64) {
    fail(DUCA_INVALID_ARGUMENT, "dtype must be DUCA_FLOAT32 or DUCA_FLOAT64, got ", dtype);
  }
  if (num_tokens < 0) fail(DUCA_INVALID_ARGUMENT, "num_tokens must be >= 0, got ", num_tokens);
  if (vocab_size < 1) fail(DUCA_INVALID_ARGUMENT, "vocab_size must be >= 1, got ", vocab_size);
  if (!(temperature > 0) || !std::isfinite(temperature)) {
    fail(DUCA_INVALID_ARGUMENT, "temperature must be a finite number > 0, got ", temperature);
  }
  if (num_tokens > 0 && (logits == nullptr || target == nullptr)) {
    fail(DUCA_INVALID_ARGUMENT, "logits and target must not be NULL");
  }
}

template <class T>
void stats_cuda(const void* logits, int64_t n, int64_t v, int64_t stride_n, int64_t stride_v, const int64_t* target,
                double temperature, void* lse, void* logprobs, void* entropy, cudaStream_t stream) {
  logits_stats_kernel<T><<<row_blocks(n), kRowThreads, 0, stream>>>(
      static_cast<const T*>(logits), n, v, stride_n, stride_v, target, static_cast<T>(1.0 / temperature),
      static_cast<T*>(lse), static_cast<T*>(logprobs), static_cast<T*>(entropy));
  check_launch("logits_stats_kernel launch");
}

template <class T>
void grad_cuda(void* logits, int64_t n, int64_t v, int64_t stride_n, int64_t stride_v, const int64_t* target,
               const void* lse, const void* entropy, const void* grad_logp, const void* grad_entropy,
               double temperature, cudaStream_t stream) {
  logits_grad_kernel<T><<<row_blocks(n), kRowThreads, 0, stream>>>(
      static_cast<T*>(logits), n, v, stride_n, stride_v, target, static_cast<const T*>(lse),
      static_cast<const T*>(entropy), static_cast<const T*>(grad_logp), static_cast<const T*>(grad_entropy),
      static_cast<T>(1.0 / temperature));
  check_launch("logits_grad_kernel launch");
}

template <class T>
void head_cuda(int64_t n, const duca_policy_inputs& raw, const duca_policy_options& options, void* grad_logprobs,
               void* grad_entropy, duca_policy_sums* sums, cudaStream_t stream) {
  const PolicyTokenInputs<T> inputs{static_cast<const T*>(raw.logprobs),     static_cast<const T*>(raw.entropy),
                                    static_cast<const T*>(raw.advantages),   static_cast<const T*>(raw.old_logprobs),
                                    static_cast<const T*>(raw.ref_logprobs), static_cast<const T*>(raw.behavior_logprobs),
                                    static_cast<const T*>(raw.token_weights), raw.active};
  // The block count depends on n only, so the partial-sum layout (and every bit of the sums) is fixed.
  const int64_t wanted = (n + kHeadThreads - 1) / kHeadThreads;
  const int blocks = static_cast<int>(wanted < 1 ? 1 : (wanted > kMaxHeadBlocks ? kMaxHeadBlocks : wanted));
  double* partial = nullptr;
  if (cudaMallocAsync(reinterpret_cast<void**>(&partial), sizeof(double) * kNumPolicySums * blocks, stream) !=
      cudaSuccess) {
    fail(DUCA_CUDA_ERROR, "cudaMallocAsync of the head's partial sums failed");
  }
  policy_head_kernel<T><<<blocks, kHeadThreads, 0, stream>>>(n, inputs, options, static_cast<T*>(grad_logprobs),
                                                            static_cast<T*>(grad_entropy), partial);
  policy_sums_kernel<<<1, 32, 0, stream>>>(partial, blocks, &sums->loss);
  cudaFreeAsync(partial, stream);
  check_launch("policy head launch");
}

}  // namespace
}  // namespace duca

extern "C" {

duca_status duca_logits_stats_cuda(const void* logits, int32_t dtype, int64_t num_tokens, int64_t vocab_size,
                                   int64_t stride_n, int64_t stride_v, const int64_t* target, double temperature,
                                   void* lse, void* logprobs, void* entropy, duca_cuda_stream stream, char* message,
                                   size_t message_size) {
  return duca::guarded(message, message_size, [&] {
    duca::check_rows(logits, dtype, num_tokens, vocab_size, target, temperature);
    if (num_tokens == 0) return;
    auto* cuda_stream = reinterpret_cast<cudaStream_t>(stream);
    if (dtype == DUCA_FLOAT32) {
      duca::stats_cuda<float>(logits, num_tokens, vocab_size, stride_n, stride_v, target, temperature, lse, logprobs,
                              entropy, cuda_stream);
    } else {
      duca::stats_cuda<double>(logits, num_tokens, vocab_size, stride_n, stride_v, target, temperature, lse,
                               logprobs, entropy, cuda_stream);
    }
  });
}

duca_status duca_policy_head_cuda(int64_t num_tokens, int32_t dtype, const duca_policy_inputs* inputs,
                                  const duca_policy_options* options, void* grad_logprobs, void* grad_entropy,
                                  duca_policy_sums* sums, duca_cuda_stream stream, char* message,
                                  size_t message_size) {
  return duca::guarded(message, message_size, [&] {
    if (dtype != DUCA_FLOAT32 && dtype != DUCA_FLOAT64) {
      duca::fail(DUCA_INVALID_ARGUMENT, "dtype must be DUCA_FLOAT32 or DUCA_FLOAT64, got ", dtype);
    }
    duca::check_policy_options(options);
    duca::check_policy_inputs(num_tokens, inputs, grad_logprobs, sums);
    auto* cuda_stream = reinterpret_cast<cudaStream_t>(stream);
    if (dtype == DUCA_FLOAT32) {
      duca::head_cuda<float>(num_tokens, *inputs, *options, grad_logprobs, grad_entropy, sums, cuda_stream);
    } else {
      duca::head_cuda<double>(num_tokens, *inputs, *options, grad_logprobs, grad_entropy, sums, cuda_stream);
    }
  });
}

duca_status duca_logits_grad_inplace_cuda(void* logits, int32_t dtype, int64_t num_tokens, int64_t vocab_size,
                                          int64_t stride_n, int64_t stride_v, const int64_t* target, const void* lse,
                                          const void* entropy, const void* grad_logprobs, const void* grad_entropy,
                                          double temperature, duca_cuda_stream stream, char* message,
                                          size_t message_size) {
  return duca::guarded(message, message_size, [&] {
    duca::check_rows(logits, dtype, num_tokens, vocab_size, target, temperature);
    if (num_tokens > 0 && (lse == nullptr || entropy == nullptr || grad_logprobs == nullptr)) {
      duca::fail(DUCA_INVALID_ARGUMENT, "lse, entropy and grad_logprobs must not be NULL");
    }
    if (num_tokens == 0) return;
    auto* cuda_stream = reinterpret_cast<cudaStream_t>(stream);
    if (dtype == DUCA_FLOAT32) {
      duca::grad_cuda<float>(logits, num_tokens, vocab_size, stride_n, stride_v, target, lse, entropy, grad_logprobs,
                             grad_entropy, temperature, cuda_stream);
    } else {
      duca::grad_cuda<double>(logits, num_tokens, vocab_size, stride_n, stride_v, target, lse, entropy,
                              grad_logprobs, grad_entropy, temperature, cuda_stream);
    }
  });
}

}  // extern "C"
