// HIAN and GRPO advantages on CUDA: a stable CUB radix sort of (bucket, member) pairs makes every statistic
// bucket a contiguous segment in member order; one warp reduces one segment with a fixed shuffle tree, and
// the batch-wide sum is one block over segments in a fixed order. No float atomics anywhere, so results are
// bit-identical run to run. Temporaries come from the stream-ordered allocator; nothing synchronises the host.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cub/device/device_radix_sort.cuh>
#include <cub/device/device_run_length_encode.cuh>
#include <cub/device/device_scan.cuh>

#include "duca_kernels.h"
#include "status.hpp"

namespace duca {
namespace {

constexpr int kWarp = 32;
constexpr int kThreads = 256;

void check_cuda(cudaError_t error, const char* what) {
  if (error != cudaSuccess) fail(DUCA_CUDA_ERROR, what, ": ", cudaGetErrorString(error));
}

// Device memory from the stream-ordered pool, freed (stream-ordered) when it leaves scope.
class DeviceBuffer {
 public:
  DeviceBuffer(size_t bytes, cudaStream_t stream) : stream_(stream) {
    if (bytes) check_cuda(cudaMallocAsync(&data_, bytes, stream), "cudaMallocAsync");
  }
  ~DeviceBuffer() {
    if (data_) cudaFreeAsync(data_, stream_);
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  template <class T>
  T* as() const {
    return static_cast<T*>(data_);
  }

 private:
  void* data_ = nullptr;
  cudaStream_t stream_;
};

unsigned blocks_for(int64_t n, int per_block = kThreads) {
  const int64_t blocks = (n + per_block - 1) / per_block;
  return static_cast<unsigned>(blocks < 65535 * 16 ? (blocks > 0 ? blocks : 1) : 65535 * 16);
}

// values[i] = sum_k w_k r[i, k] in float64; bucket[i] = major * minors + minor; member[i] = i.
template <class T>
__global__ void combine_kernel(const T* __restrict__ rewards, int64_t rows, int64_t cols, int64_t stride_row,
                               int64_t stride_col, const double* __restrict__ weights,
                               const int64_t* __restrict__ major_ids, const int64_t* __restrict__ via,
                               const int64_t* __restrict__ minor_ids, int64_t minors, double* __restrict__ values,
                               int64_t* __restrict__ bucket, int64_t* __restrict__ member) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < rows;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    double sum = 0.0;
    for (int64_t k = 0; k < cols; ++k) {
      sum += (weights ? weights[k] : 1.0) * static_cast<double>(rewards[i * stride_row + k * stride_col]);
    }
    values[i] = sum;
    const int64_t major = major_ids[via ? via[i] : i];
    bucket[i] = major * minors + (minor_ids ? minor_ids[i] : 0);
    member[i] = i;
  }
}

__device__ double warp_sum(double x) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) x += __shfl_down_sync(0xffffffffu, x, offset);
  return __shfl_sync(0xffffffffu, x, 0);
}

// One warp per segment: lane-strided partial sums combined by a fixed shuffle tree (deterministic).
// Writes the centred value of every member (or 0) and the segment's sum of squares and member count.
__global__ void segment_kernel(const double* __restrict__ values, const int64_t* __restrict__ member,
                               const int64_t* __restrict__ offsets, const int64_t* __restrict__ lengths,
                               const int64_t* __restrict__ num_segments, bool omit_nan, int scale, double eps,
                               double* __restrict__ advantages, double* __restrict__ segment_m2,
                               int64_t* __restrict__ segment_count) {
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / kWarp);
  for (int64_t s = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) / kWarp; s < *num_segments;
       s += warps) {
    const int64_t begin = offsets[s], end = begin + lengths[s];
    double sum = 0.0, count = 0.0;
    for (int64_t j = begin + lane; j < end; j += kWarp) {
      const double x = values[member[j]];
      if (omit_nan && isnan(x)) continue;
      sum += x;
      count += 1.0;
    }
    sum = warp_sum(sum);
    count = warp_sum(count);
    const bool has_stats = count >= 2.0;
    const double mean = has_stats ? sum / count : 0.0;
    double m2 = 0.0;
    for (int64_t j = begin + lane; j < end; j += kWarp) {
      const double x = values[member[j]];
      const bool valid = has_stats && !(omit_nan && isnan(x));
      const double centered = valid ? x - mean : 0.0;
      advantages[member[j]] = centered;
      m2 += centered * centered;
    }
    m2 = warp_sum(m2);
    if (scale == DUCA_SCALE_GROUP && has_stats) {
      const double denominator = sqrt(m2 / (count - 1.0)) + eps;
      for (int64_t j = begin + lane; j < end; j += kWarp) advantages[member[j]] /= denominator;
    }
    if (lane == 0) {
      segment_m2[s] = has_stats ? m2 : 0.0;
      segment_count[s] = has_stats ? static_cast<int64_t>(count) : 0;
    }
  }
}

// Batch scale: one block sums the segments' squares in a fixed order, then every advantage is divided.
__global__ void batch_denominator_kernel(const double* __restrict__ segment_m2,
                                         const int64_t* __restrict__ segment_count,
                                         const int64_t* __restrict__ num_segments, double eps,
                                         double* __restrict__ denominator) {
  __shared__ double m2_part[kThreads];
  __shared__ int64_t count_part[kThreads];
  double m2 = 0.0;
  int64_t count = 0;
  for (int64_t s = threadIdx.x; s < *num_segments; s += blockDim.x) {
    m2 += segment_m2[s];
    count += segment_count[s];
  }
  m2_part[threadIdx.x] = m2;
  count_part[threadIdx.x] = count;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) {
      m2_part[threadIdx.x] += m2_part[threadIdx.x + stride];
      count_part[threadIdx.x] += count_part[threadIdx.x + stride];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    const int64_t dof = count_part[0] - 1 > 1 ? count_part[0] - 1 : 1;
    *denominator = sqrt(m2_part[0] / static_cast<double>(dof)) + eps;
  }
}

__global__ void divide_kernel(double* __restrict__ advantages, int64_t n, const double* __restrict__ denominator) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    advantages[i] /= *denominator;
  }
}

template <class Out>
__global__ void fuse_kernel(const double* __restrict__ turn_adv, const double* __restrict__ session_adv,
                            const int64_t* __restrict__ turn_session, int64_t num_turns, double turn_weight,
                            double session_weight, Out* __restrict__ out) {
  for (int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; t < num_turns;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[t] = static_cast<Out>(turn_weight * turn_adv[t] + session_weight * session_adv[turn_session[t]]);
  }
}

template <class Out>
__global__ void broadcast_kernel(const Out* __restrict__ per_turn, const int64_t* __restrict__ token_turn,
                                 int64_t num_tokens, Out* __restrict__ out) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < num_tokens;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t t = token_turn[i];
    out[i] = t >= 0 ? per_turn[t] : Out(0);
  }
}

template <class Out>
__global__ void cast_kernel(const double* __restrict__ in, int64_t n, Out* __restrict__ out) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[i] = static_cast<Out>(in[i]);
  }
}

// Where a horizon's bucket comes from: major_ids[via[i]] (or major_ids[i]) times minors plus minor_ids[i].
struct BucketSource {
  const int64_t* major_ids;
  const int64_t* via;
  const int64_t* minor_ids;
  int64_t minors;
};

// Normalizes one horizon into `advantages` ([rows] float64, device).
void normalize_horizon(const duca_rewards& rewards, const BucketSource& source, const duca_advantage_options& options,
                       double* advantages, cudaStream_t stream) {
  const int64_t n = rewards.rows;
  if (n == 0) return;
  DeviceBuffer values(n * sizeof(double), stream), keys(n * sizeof(int64_t), stream),
      sorted_keys(n * sizeof(int64_t), stream), members(n * sizeof(int64_t), stream),
      sorted_members(n * sizeof(int64_t), stream), unique(n * sizeof(int64_t), stream),
      lengths(n * sizeof(int64_t), stream), offsets(n * sizeof(int64_t), stream),
      num_segments(sizeof(int64_t), stream), segment_m2(n * sizeof(double), stream),
      segment_count(n * sizeof(int64_t), stream), denominator(sizeof(double), stream);
  if (rewards.dtype == DUCA_FLOAT32) {
    combine_kernel<<<blocks_for(n), kThreads, 0, stream>>>(
        static_cast<const float*>(rewards.data), n, rewards.cols, rewards.stride_row, rewards.stride_col,
        rewards.weights, source.major_ids, source.via, source.minor_ids, source.minors, values.as<double>(),
        keys.as<int64_t>(), members.as<int64_t>());
  } else {
    combine_kernel<<<blocks_for(n), kThreads, 0, stream>>>(
        static_cast<const double*>(rewards.data), n, rewards.cols, rewards.stride_row, rewards.stride_col,
        rewards.weights, source.major_ids, source.via, source.minor_ids, source.minors, values.as<double>(),
        keys.as<int64_t>(), members.as<int64_t>());
  }
  check_cuda(cudaGetLastError(), "combine_kernel launch");

  // Radix sort is stable: members of a bucket stay in member order, which fixes the summation order.
  size_t sort_bytes = 0, encode_bytes = 0, scan_bytes = 0;
  check_cuda(cub::DeviceRadixSort::SortPairs(nullptr, sort_bytes, keys.as<int64_t>(), sorted_keys.as<int64_t>(),
                                             members.as<int64_t>(), sorted_members.as<int64_t>(), n, 0, 64, stream),
             "radix sort size");
  check_cuda(cub::DeviceRunLengthEncode::Encode(nullptr, encode_bytes, sorted_keys.as<int64_t>(), unique.as<int64_t>(),
                                                lengths.as<int64_t>(), num_segments.as<int64_t>(), n, stream),
             "run-length encode size");
  check_cuda(cub::DeviceScan::ExclusiveSum(nullptr, scan_bytes, lengths.as<int64_t>(), offsets.as<int64_t>(), n,
                                           stream),
             "scan size");
  // Never zero bytes: a NULL scratch pointer would turn the calls below into size queries.
  const size_t scratch_bytes = std::max<size_t>({sort_bytes, encode_bytes, scan_bytes, 1});
  DeviceBuffer scratch(scratch_bytes, stream);
  check_cuda(cub::DeviceRadixSort::SortPairs(scratch.as<void>(), sort_bytes, keys.as<int64_t>(),
                                             sorted_keys.as<int64_t>(), members.as<int64_t>(),
                                             sorted_members.as<int64_t>(), n, 0, 64, stream),
             "radix sort");
  check_cuda(cudaMemsetAsync(lengths.as<int64_t>(), 0, n * sizeof(int64_t), stream), "memset");
  check_cuda(cub::DeviceRunLengthEncode::Encode(scratch.as<void>(), encode_bytes, sorted_keys.as<int64_t>(),
                                                unique.as<int64_t>(), lengths.as<int64_t>(),
                                                num_segments.as<int64_t>(), n, stream),
             "run-length encode");
  check_cuda(cub::DeviceScan::ExclusiveSum(scratch.as<void>(), scan_bytes, lengths.as<int64_t>(),
                                           offsets.as<int64_t>(), n, stream),
             "scan");
  segment_kernel<<<blocks_for(n * kWarp), kThreads, 0, stream>>>(
      values.as<double>(), sorted_members.as<int64_t>(), offsets.as<int64_t>(), lengths.as<int64_t>(),
      num_segments.as<int64_t>(), options.nan_policy == DUCA_NAN_OMIT, options.scale, options.eps, advantages,
      segment_m2.as<double>(), segment_count.as<int64_t>());
  check_cuda(cudaGetLastError(), "segment_kernel launch");
  if (options.scale == DUCA_SCALE_BATCH) {
    batch_denominator_kernel<<<1, kThreads, 0, stream>>>(segment_m2.as<double>(), segment_count.as<int64_t>(),
                                                          num_segments.as<int64_t>(), options.eps,
                                                          denominator.as<double>());
    divide_kernel<<<blocks_for(n), kThreads, 0, stream>>>(advantages, n, denominator.as<double>());
    check_cuda(cudaGetLastError(), "batch scale launch");
  }
}

void check_layout(const char* name, const duca_rewards* rewards) {
  if (rewards == nullptr) fail(DUCA_INVALID_ARGUMENT, name, " is NULL");
  if (rewards->rows < 0 || rewards->cols < 1) {
    fail(DUCA_INVALID_ARGUMENT, name, " must be [rows >= 0, cols >= 1], got [", rewards->rows, ", ", rewards->cols,
         "]");
  }
  if (rewards->dtype != DUCA_FLOAT32 && rewards->dtype != DUCA_FLOAT64) {
    fail(DUCA_INVALID_ARGUMENT, name, ".dtype must be DUCA_FLOAT32 or DUCA_FLOAT64, got ", rewards->dtype);
  }
  if (rewards->rows > 0 && rewards->data == nullptr) fail(DUCA_INVALID_ARGUMENT, name, " data is NULL");
}

void check_cuda_options(const duca_advantage_options* options, int32_t out_dtype) {
  if (options == nullptr) fail(DUCA_INVALID_ARGUMENT, "options is NULL");
  if (!(options->eps > 0) || !std::isfinite(options->eps)) {
    fail(DUCA_INVALID_ARGUMENT, "eps must be a finite number > 0, got ", options->eps);
  }
  if (!std::isfinite(options->turn_weight) || !std::isfinite(options->session_weight)) {
    fail(DUCA_INVALID_ARGUMENT, "turn_weight and session_weight must be finite");
  }
  if (options->scale < DUCA_SCALE_GROUP || options->scale > DUCA_SCALE_NONE) {
    fail(DUCA_INVALID_ARGUMENT, "scale must be DUCA_SCALE_GROUP, _BATCH or _NONE, got ", options->scale);
  }
  if (options->nan_policy != DUCA_NAN_RAISE && options->nan_policy != DUCA_NAN_OMIT) {
    fail(DUCA_INVALID_ARGUMENT, "nan_policy must be DUCA_NAN_RAISE or DUCA_NAN_OMIT, got ", options->nan_policy);
  }
  if (out_dtype != DUCA_FLOAT32 && out_dtype != DUCA_FLOAT64) {
    fail(DUCA_INVALID_ARGUMENT, "out_dtype must be DUCA_FLOAT32 or DUCA_FLOAT64, got ", out_dtype);
  }
}

template <class Out>
void fuse_into(const double* turn_adv, const double* session_adv, const int64_t* turn_session, int64_t num_turns,
               const int64_t* token_turn, int64_t num_tokens, const duca_advantage_options& options, Out* out,
               cudaStream_t stream) {
  DeviceBuffer per_turn(token_turn ? num_turns * sizeof(Out) : 0, stream);
  Out* fused = token_turn ? per_turn.as<Out>() : out;
  if (num_turns) {
    fuse_kernel<<<blocks_for(num_turns), kThreads, 0, stream>>>(turn_adv, session_adv, turn_session, num_turns,
                                                               options.turn_weight, options.session_weight, fused);
  }
  if (token_turn && num_tokens) {
    broadcast_kernel<<<blocks_for(num_tokens), kThreads, 0, stream>>>(fused, token_turn, num_tokens, out);
  }
  check_cuda(cudaGetLastError(), "fuse launch");
}

void hian_cuda(const duca_rewards* turn_rewards, const int64_t* turn_session, const duca_rewards* session_rewards,
               const int64_t* session_group, int64_t num_groups, const int64_t* turn_index,
               int64_t num_turn_positions, const int64_t* token_turn, int64_t num_tokens,
               const duca_advantage_options* options, void* out, int32_t out_dtype, cudaStream_t stream) {
  check_cuda_options(options, out_dtype);
  check_layout("turn_rewards", turn_rewards);
  check_layout("session_rewards", session_rewards);
  if (num_groups < 0) fail(DUCA_INVALID_ARGUMENT, "num_groups must be >= 0 on CUDA, got ", num_groups);
  const bool group_turn = options->turn_scope == DUCA_TURN_SCOPE_GROUP_TURN;
  if (options->turn_scope != DUCA_TURN_SCOPE_GROUP && !group_turn) {
    fail(DUCA_INVALID_ARGUMENT, "turn_scope must be DUCA_TURN_SCOPE_GROUP or _GROUP_TURN, got ", options->turn_scope);
  }
  if (group_turn && (turn_index == nullptr || num_turn_positions < 1)) {
    fail(DUCA_INVALID_ARGUMENT, "turn_scope group_turn needs turn_index and num_turn_positions >= 1");
  }
  if (group_turn && num_groups > INT64_MAX / num_turn_positions) {
    fail(DUCA_INVALID_ARGUMENT, "num_groups * num_turn_positions overflows int64");
  }
  if (token_turn != nullptr && num_tokens < 0) fail(DUCA_INVALID_ARGUMENT, "num_tokens must be >= 0");
  const int64_t num_turns = turn_rewards->rows, num_sessions = session_rewards->rows;
  if ((num_turns && turn_session == nullptr) || (num_sessions && session_group == nullptr)) {
    fail(DUCA_INVALID_ARGUMENT, "turn_session and session_group must not be NULL");
  }
  DeviceBuffer turn_adv(num_turns * sizeof(double), stream), session_adv(num_sessions * sizeof(double), stream);
  normalize_horizon(*session_rewards, BucketSource{session_group, nullptr, nullptr, 1}, *options,
                    session_adv.as<double>(), stream);
  const BucketSource turn_source{session_group, turn_session, group_turn ? turn_index : nullptr,
                                 group_turn ? num_turn_positions : 1};
  normalize_horizon(*turn_rewards, turn_source, *options, turn_adv.as<double>(), stream);
  if (out_dtype == DUCA_FLOAT32) {
    fuse_into(turn_adv.as<double>(), session_adv.as<double>(), turn_session, num_turns, token_turn, num_tokens,
              *options, static_cast<float*>(out), stream);
  } else {
    fuse_into(turn_adv.as<double>(), session_adv.as<double>(), turn_session, num_turns, token_turn, num_tokens,
              *options, static_cast<double*>(out), stream);
  }
}

void grpo_cuda(const duca_rewards* rewards, const int64_t* group, int64_t num_groups,
               const duca_advantage_options* options, void* out, int32_t out_dtype, cudaStream_t stream) {
  check_cuda_options(options, out_dtype);
  check_layout("rewards", rewards);
  if (num_groups < 0) fail(DUCA_INVALID_ARGUMENT, "num_groups must be >= 0 on CUDA, got ", num_groups);
  const int64_t n = rewards->rows;
  if (n && group == nullptr) fail(DUCA_INVALID_ARGUMENT, "group must not be NULL");
  DeviceBuffer advantages(n * sizeof(double), stream);
  normalize_horizon(*rewards, BucketSource{group, nullptr, nullptr, 1}, *options, advantages.as<double>(), stream);
  if (n == 0) return;
  if (out_dtype == DUCA_FLOAT32) {
    cast_kernel<<<blocks_for(n), kThreads, 0, stream>>>(advantages.as<double>(), n, static_cast<float*>(out));
  } else {
    cast_kernel<<<blocks_for(n), kThreads, 0, stream>>>(advantages.as<double>(), n, static_cast<double*>(out));
  }
  check_cuda(cudaGetLastError(), "cast launch");
}

}  // namespace
}  // namespace duca

extern "C" {

duca_status duca_hian_advantages_cuda(const duca_rewards* turn_rewards, const int64_t* turn_session,
                                      const duca_rewards* session_rewards, const int64_t* session_group,
                                      int64_t num_groups, const int64_t* turn_index, int64_t num_turn_positions,
                                      const int64_t* token_turn, int64_t num_tokens,
                                      const duca_advantage_options* options, void* out, int32_t out_dtype,
                                      duca_cuda_stream stream, char* message, size_t message_size) {
  return duca::guarded(message, message_size, [&] {
    duca::hian_cuda(turn_rewards, turn_session, session_rewards, session_group, num_groups, turn_index,
                    num_turn_positions, token_turn, num_tokens, options, out, out_dtype,
                    reinterpret_cast<cudaStream_t>(stream));
  });
}

duca_status duca_grpo_advantages_cuda(const duca_rewards* rewards, const int64_t* group, int64_t num_groups,
                                      const duca_advantage_options* options, void* out, int32_t out_dtype,
                                      duca_cuda_stream stream, char* message, size_t message_size) {
  return duca::guarded(message, message_size, [&] {
    duca::grpo_cuda(rewards, group, num_groups, options, out, out_dtype, reinterpret_cast<cudaStream_t>(stream));
  });
}

}  // extern "C"
