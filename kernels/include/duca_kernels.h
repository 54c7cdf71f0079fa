/* duca_kernels: the advantage ops of duca_fast behind a C ABI (no torch, no Python).
 *
 * Conventions
 * - Every entry point returns a duca_status; on failure it writes a NUL-terminated message that names the
 *   offending argument (and index) into `message` (capacity `message_size` bytes; NULL/0 = no message).
 * - Ids are int64. Reward matrices are float32 or float64 with explicit row/column strides in elements.
 * - Statistics are float64, two-pass (mean, then centred squares) per bucket, summed in member order, so the
 *   results are bit-identical whatever the OpenMP thread count.
 * - A statistic over fewer than 2 members gives advantage 0 to those members; std is unbiased (n - 1).
 * - Group ids are never used to size an allocation beyond O(rows): sparse or huge ids are remapped.
 */
#ifndef DUCA_KERNELS_H
#define DUCA_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#if defined(_WIN32)
#define DUCA_API __declspec(dllexport)
#else
#define DUCA_API __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

#define DUCA_KERNELS_ABI_VERSION 1

typedef enum duca_status {
  DUCA_OK = 0,
  DUCA_INVALID_ARGUMENT = 1, /* bad size, pointer, option or out-of-range id */
  DUCA_NONFINITE_VALUE = 2,  /* NaN/inf where the nan policy forbids it */
  DUCA_OUT_OF_MEMORY = 3,
  DUCA_CUDA_ERROR = 4,
  DUCA_INTERNAL_ERROR = 5
} duca_status;

typedef enum duca_dtype { DUCA_FLOAT32 = 0, DUCA_FLOAT64 = 1 } duca_dtype;
typedef enum duca_turn_scope { DUCA_TURN_SCOPE_GROUP = 0, DUCA_TURN_SCOPE_GROUP_TURN = 1 } duca_turn_scope;
typedef enum duca_scale { DUCA_SCALE_GROUP = 0, DUCA_SCALE_BATCH = 1, DUCA_SCALE_NONE = 2 } duca_scale;
typedef enum duca_nan_policy { DUCA_NAN_RAISE = 0, DUCA_NAN_OMIT = 1 } duca_nan_policy;

/* A [rows, cols] reward matrix; a horizon's reward of row i is sum_k weights[k] * data[i, k] in float64. */
typedef struct duca_rewards {
  const void* data;       /* float32 or float64 (dtype); may be NULL when rows == 0 */
  int32_t dtype;          /* duca_dtype */
  int64_t rows;
  int64_t cols;           /* >= 1 */
  int64_t stride_row;     /* in elements */
  int64_t stride_col;     /* in elements */
  const double* weights;  /* [cols] component weights, NULL = all 1 */
} duca_rewards;

typedef struct duca_advantage_options {
  double turn_weight;     /* weight of the turn horizon in the fused advantage */
  double session_weight;  /* weight of the session horizon */
  double eps;             /* > 0, added to the std */
  int32_t turn_scope;     /* duca_turn_scope */
  int32_t scale;          /* duca_scale */
  int32_t nan_policy;     /* duca_nan_policy */
} duca_advantage_options;

/* Default options: weights 1, eps 1e-6, scope group, scale group, nan raise. */
DUCA_API duca_advantage_options duca_default_advantage_options(void);

/* Fused dual-horizon (HIAN) advantages.
 *   turn_rewards [T, Kt], turn_session [T] in [0, S), session_rewards [S, Ks], session_group [S] in
 *   [0, num_groups) (num_groups < 0: any id >= 0), turn_index [T] >= 0 (needed for group_turn, else may be
 *   NULL), token_turn [num_tokens] in [-1, T) or NULL.
 * Output `out` (out_dtype) holds [T] per-turn advantages, or [num_tokens] per-token ones when token_turn is
 * given (-1 tokens get 0). */
DUCA_API duca_status duca_hian_advantages(const duca_rewards* turn_rewards, const int64_t* turn_session,
                                          const duca_rewards* session_rewards, const int64_t* session_group,
                                          int64_t num_groups, const int64_t* turn_index,
                                          const int64_t* token_turn, int64_t num_tokens,
                                          const duca_advantage_options* options, void* out, int32_t out_dtype,
                                          char* message, size_t message_size);

/* One-horizon GRPO advantages: rewards [S, K] normalized within `group` [S]; out [S] (out_dtype).
 * Uses options->scale, eps and nan_policy; the weights and turn_scope are ignored. */
DUCA_API duca_status duca_grpo_advantages(const duca_rewards* rewards, const int64_t* group, int64_t num_groups,
                                          const duca_advantage_options* options, void* out, int32_t out_dtype,
                                          char* message, size_t message_size);

/* ---- CUDA entry points (present when duca_has_cuda() returns 1) --------------------------------------------
 * Every data pointer, including duca_rewards.data and .weights, is device memory; work is queued on `stream`
 * (a cudaStream_t; NULL = the legacy default stream) and nothing synchronises with the host. Only sizes and
 * options are checked: ids must already be in range and rewards finite unless nan_policy is omit (validate
 * on the caller's side, as the Python ops do). Statistics are deterministic: a stable radix sort puts each
 * bucket's members in member order and warp/block reductions use fixed trees, no float atomics. */
typedef struct CUstream_st* duca_cuda_stream;

/* As duca_hian_advantages; num_groups >= 0 and, for group_turn, num_turn_positions >= 1 bound the ids. */
DUCA_API duca_status duca_hian_advantages_cuda(const duca_rewards* turn_rewards, const int64_t* turn_session,
                                               const duca_rewards* session_rewards, const int64_t* session_group,
                                               int64_t num_groups, const int64_t* turn_index,
                                               int64_t num_turn_positions, const int64_t* token_turn,
                                               int64_t num_tokens, const duca_advantage_options* options, void* out,
                                               int32_t out_dtype, duca_cuda_stream stream, char* message,
                                               size_t message_size);

DUCA_API duca_status duca_grpo_advantages_cuda(const duca_rewards* rewards, const int64_t* group,
                                               int64_t num_groups, const duca_advantage_options* options, void* out,
                                               int32_t out_dtype, duca_cuda_stream stream, char* message,
                                               size_t message_size);

/* Number of OpenMP threads the CPU kernels use (1 when built without OpenMP). */
DUCA_API int duca_cpu_threads(void);

/* 1 when this build contains the CUDA kernels. */
DUCA_API int duca_has_cuda(void);

DUCA_API int duca_abi_version(void);

#ifdef __cplusplus
}
#endif

#endif /* DUCA_KERNELS_H */
