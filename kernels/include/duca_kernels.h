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

/* ---- Row kernels of the fused policy loss --------------------------------------------------------------------
 * The memory-bound work between the lm_head GEMMs, per token (row) of a [N, V] logits chunk z = logits / T:
 *   duca_logits_stats: lse = logsumexp(z), logprob = z[target] - lse, entropy = lse - sum softmax(z) z;
 *   duca_policy_head: the PPO objective per token (clips, dual clip, TIS, KL, entropy) with d loss / d logp,
 *     d loss / d H and float64 sums for the loss and metrics;
 *   duca_logits_grad_inplace: overwrites the logits with d loss / d logits =
 *     (g_logp (onehot - p) - g_H p (z - lse + H)) / T.
 * dtype (DUCA_FLOAT32 / DUCA_FLOAT64) is that of the logits and of every per-token float array. */
typedef enum duca_kl_type { DUCA_KL_K1 = 0, DUCA_KL_K2 = 1, DUCA_KL_K3 = 2 } duca_kl_type;

typedef struct duca_policy_options {
  double clip_low;        /* ratio clipped below 1 - clip_low, in [0, 1) */
  double clip_high;       /* ratio clipped above 1 + clip_high, >= 0 */
  double dual_clip;       /* > 1: for A < 0 the loss is capped at -dual_clip * A; 0 = off */
  double kl_coef;         /* weight of the KL to ref_logprobs */
  int32_t kl_type;        /* duca_kl_type, with d = logp - ref: k1 d, k2 d^2/2, k3 exp(-d) + d - 1 */
  double entropy_coef;    /* weight of the entropy bonus (subtracted) */
  double tis_cap;         /* > 0: truncated importance weight min(exp(old - behavior), cap); 0 = off */
  double log_ratio_limit; /* log-ratios are clamped to +-limit before exp (duca_fast uses 20) */
} duca_policy_options;

/* Per-token inputs, [N] each, contiguous, of the call's dtype (active: 0/1 bytes). */
typedef struct duca_policy_inputs {
  const void* logprobs;
  const void* entropy;
  const void* advantages;
  const void* old_logprobs;      /* NULL: on-policy, old = logprobs (detached) */
  const void* ref_logprobs;      /* NULL: no KL */
  const void* behavior_logprobs; /* NULL: no TIS and no behaviour gap */
  const void* token_weights;     /* aggregation weight of each token (0 when masked) */
  const uint8_t* active;
} duca_policy_inputs;

/* Sums over active tokens (float64); means are sum / active. loss and pg_loss are weighted by token_weights. */
typedef struct duca_policy_sums {
  double loss;
  double pg_loss;
  double active;
  double clipped_low;
  double clipped_high;
  double dual_clipped;
  double tis_capped;
  double approx_kl;
  double ratio;
  double entropy;
  double kl_ref;
  double behavior_gap;
} duca_policy_sums;

DUCA_API duca_status duca_logits_stats(const void* logits, int32_t dtype, int64_t num_tokens, int64_t vocab_size,
                                       int64_t stride_n, int64_t stride_v, const int64_t* target,
                                       double temperature, void* lse, void* logprobs, void* entropy,
                                       char* message, size_t message_size);

/* grad_entropy may be NULL (no entropy term): then it is skipped. */
DUCA_API duca_status duca_policy_head(int64_t num_tokens, int32_t dtype, const duca_policy_inputs* inputs,
                                      const duca_policy_options* options, void* grad_logprobs,
                                      void* grad_entropy, duca_policy_sums* sums, char* message,
                                      size_t message_size);

DUCA_API duca_status duca_logits_grad_inplace(void* logits, int32_t dtype, int64_t num_tokens, int64_t vocab_size,
                                              int64_t stride_n, int64_t stride_v, const int64_t* target,
                                              const void* lse, const void* entropy, const void* grad_logprobs,
                                              const void* grad_entropy, double temperature, char* message,
                                              size_t message_size);

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

/* Row kernels on device pointers (same arguments; `sums` is device memory; target ids are not checked). One
 * block per row with a fixed reduction tree; the head's sums are per-block partials combined by one block in a
 * fixed order. */
DUCA_API duca_status duca_logits_stats_cuda(const void* logits, int32_t dtype, int64_t num_tokens,
                                            int64_t vocab_size, int64_t stride_n, int64_t stride_v,
                                            const int64_t* target, double temperature, void* lse, void* logprobs,
                                            void* entropy, duca_cuda_stream stream, char* message,
                                            size_t message_size);

DUCA_API duca_status duca_policy_head_cuda(int64_t num_tokens, int32_t dtype, const duca_policy_inputs* inputs,
                                           const duca_policy_options* options, void* grad_logprobs,
                                           void* grad_entropy, duca_policy_sums* sums, duca_cuda_stream stream,
                                           char* message, size_t message_size);

DUCA_API duca_status duca_logits_grad_inplace_cuda(void* logits, int32_t dtype, int64_t num_tokens,
                                                   int64_t vocab_size, int64_t stride_n, int64_t stride_v,
                                                   const int64_t* target, const void* lse, const void* entropy,
                                                   const void* grad_logprobs, const void* grad_entropy,
                                                   double temperature, duca_cuda_stream stream, char* message,
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
