// HIAN and GRPO advantages on the CPU: float64 two-pass statistics (mean, then centred squares) per bucket.
//
// Determinism: every bucket's sums are accumulated in member order and the batch-wide sum in bucket order;
// only member-wise work (checks, combining components, writing advantages) is split across threads, so the
// thread count never changes a bit of the result.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "duca_kernels.h"
#include "status.hpp"

namespace duca {
namespace {

constexpr int64_t kNoBound = std::numeric_limits<int64_t>::max();
// Below this many items a loop runs on the calling thread: waking a team costs more than the work, and on a
// busy machine waiting for it can cost milliseconds.
constexpr int64_t kParallelMin = 16384;

// Smallest index whose id lies outside [lo, hi), or -1; a min-reduction, so the answer does not depend on
// the thread count.
int64_t first_outside(const int64_t* ids, int64_t n, int64_t lo, int64_t hi) {
  int64_t first = n;
#pragma omp parallel for schedule(static) reduction(min : first) if (n >= kParallelMin)
  for (int64_t i = 0; i < n; ++i) {
    if ((ids[i] < lo || ids[i] >= hi) && i < first) first = i;
  }
  return first == n ? -1 : first;
}

void check_ids(const char* name, const int64_t* ids, int64_t n, int64_t lo, int64_t hi, const char* bound) {
  if (n > 0 && ids == nullptr) fail(DUCA_INVALID_ARGUMENT, name, " is NULL but has ", n, " entries");
  const int64_t bad = first_outside(ids, n, lo, hi);
  if (bad < 0) return;
  if (hi == kNoBound) {
    fail(DUCA_INVALID_ARGUMENT, name, "[", bad, "] = ", ids[bad], " is negative (ids must be >= ", lo, ")");
  }
  fail(DUCA_INVALID_ARGUMENT, name, "[", bad, "] = ", ids[bad], " is outside [", lo, ", ", hi, ") (", bound,
       ")");
}

void check_options(const duca_advantage_options* options) {
  if (options == nullptr) fail(DUCA_INVALID_ARGUMENT, "options is NULL");
  if (!std::isfinite(options->turn_weight)) fail(DUCA_INVALID_ARGUMENT, "turn_weight must be finite");
  if (!std::isfinite(options->session_weight)) fail(DUCA_INVALID_ARGUMENT, "session_weight must be finite");
  if (!(options->eps > 0) || !std::isfinite(options->eps)) {
    fail(DUCA_INVALID_ARGUMENT, "eps must be a finite number > 0, got ", options->eps);
  }
  if (options->turn_scope != DUCA_TURN_SCOPE_GROUP && options->turn_scope != DUCA_TURN_SCOPE_GROUP_TURN) {
    fail(DUCA_INVALID_ARGUMENT, "turn_scope must be DUCA_TURN_SCOPE_GROUP or _GROUP_TURN, got ",
         options->turn_scope);
  }
  if (options->scale != DUCA_SCALE_GROUP && options->scale != DUCA_SCALE_BATCH &&
      options->scale != DUCA_SCALE_NONE) {
    fail(DUCA_INVALID_ARGUMENT, "scale must be DUCA_SCALE_GROUP, _BATCH or _NONE, got ", options->scale);
  }
  if (options->nan_policy != DUCA_NAN_RAISE && options->nan_policy != DUCA_NAN_OMIT) {
    fail(DUCA_INVALID_ARGUMENT, "nan_policy must be DUCA_NAN_RAISE or DUCA_NAN_OMIT, got ",
         options->nan_policy);
  }
}

void check_out_dtype(int32_t out_dtype) {
  if (out_dtype != DUCA_FLOAT32 && out_dtype != DUCA_FLOAT64) {
    fail(DUCA_INVALID_ARGUMENT, "out_dtype must be DUCA_FLOAT32 or DUCA_FLOAT64, got ", out_dtype);
  }
}

void check_rewards_layout(const char* name, const duca_rewards* rewards) {
  if (rewards == nullptr) fail(DUCA_INVALID_ARGUMENT, name, " is NULL");
  if (rewards->rows < 0) fail(DUCA_INVALID_ARGUMENT, name, " has a negative row count ", rewards->rows);
  if (rewards->cols < 1) fail(DUCA_INVALID_ARGUMENT, name, " must have >= 1 column, got ", rewards->cols);
  if (rewards->dtype != DUCA_FLOAT32 && rewards->dtype != DUCA_FLOAT64) {
    fail(DUCA_INVALID_ARGUMENT, name, ".dtype must be DUCA_FLOAT32 or DUCA_FLOAT64, got ", rewards->dtype);
  }
  if (rewards->rows > 0 && rewards->data == nullptr) {
    fail(DUCA_INVALID_ARGUMENT, name, " data is NULL but has ", rewards->rows, " rows");
  }
  if (rewards->weights != nullptr) {
    for (int64_t k = 0; k < rewards->cols; ++k) {
      if (!std::isfinite(rewards->weights[k])) {
        fail(DUCA_INVALID_ARGUMENT, name, " component weight ", k, " is not finite (", rewards->weights[k],
             ")");
      }
    }
  }
}

// Row sums sum_k w_k x[i, k] in float64 (NaN when a component is NaN, which "omit" then leaves out).
template <class T>
std::vector<double> combine_rows(const char* name, const duca_rewards& rewards, bool omit_nan) {
  const T* data = static_cast<const T*>(rewards.data);
  const int64_t rows = rewards.rows, cols = rewards.cols;
  std::vector<double> combined(static_cast<size_t>(rows));
  int64_t first_bad = rows * cols;
#pragma omp parallel for schedule(static) reduction(min : first_bad) if (rows >= kParallelMin)
  for (int64_t i = 0; i < rows; ++i) {
    if (cols == 1 && rewards.weights == nullptr) {  // the common case, without the component loop
      const double x = static_cast<double>(data[i * rewards.stride_row]);
      if ((omit_nan ? std::isinf(x) : !std::isfinite(x)) && i < first_bad) first_bad = i;
      combined[static_cast<size_t>(i)] = x;
      continue;
    }
    double sum = 0.0;
    for (int64_t k = 0; k < cols; ++k) {
      const double x = static_cast<double>(data[i * rewards.stride_row + k * rewards.stride_col]);
      const bool bad = omit_nan ? std::isinf(x) : !std::isfinite(x);
      if (bad && i * cols + k < first_bad) first_bad = i * cols + k;
      sum += (rewards.weights ? rewards.weights[k] : 1.0) * x;
    }
    combined[static_cast<size_t>(i)] = sum;
  }
  if (first_bad < rows * cols) {
    if (omit_nan) {
      fail(DUCA_NONFINITE_VALUE, name, " has an infinite value at flat index ", first_bad, " (row ",
           first_bad / cols, ")");
    }
    fail(DUCA_NONFINITE_VALUE, name, " has a non-finite value at flat index ", first_bad, " (row ",
         first_bad / cols, "); use nan_policy omit to leave NaN rewards out");
  }
  return combined;
}

std::vector<double> combine_rows(const char* name, const duca_rewards& rewards, bool omit_nan) {
  return rewards.dtype == DUCA_FLOAT32 ? combine_rows<float>(name, rewards, omit_nan)
                                       : combine_rows<double>(name, rewards, omit_nan);
}

// Statistic bucket of every member. Dense ids index a table directly (bucket = major * minors + minor); only
// when the id range is not O(n) are the buckets renumbered through a sort, so no allocation ever scales with
// an id value.
struct Buckets {
  int64_t count = 0;
  int64_t minors = 1;
  std::vector<int64_t> remapped;  // bucket of member i when the ids are sparse, else empty
};

template <class MajorOf, class MinorOf>
Buckets make_buckets(int64_t n, MajorOf major_of, MinorOf minor_of) {
  Buckets buckets;
  int64_t major_max = -1, minor_max = -1;
#pragma omp parallel for schedule(static) reduction(max : major_max, minor_max) if (n >= kParallelMin)
  for (int64_t i = 0; i < n; ++i) {
    major_max = std::max(major_max, major_of(i));
    minor_max = std::max(minor_max, minor_of(i));
  }
  if (n == 0) return buckets;
  const int64_t dense_limit = 4 * n + 1024;
  const int64_t majors = major_max + 1, minors = minor_max + 1;
  if (majors <= dense_limit && minors <= dense_limit / majors) {
    buckets.minors = minors;
    buckets.count = majors * minors;
    return buckets;
  }
  std::vector<int64_t> order(static_cast<size_t>(n));
  std::iota(order.begin(), order.end(), int64_t{0});
  auto key_less = [&](int64_t a, int64_t b) {
    const int64_t ma = major_of(a), mb = major_of(b);
    return ma != mb ? ma < mb : minor_of(a) < minor_of(b);
  };
  std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
    return key_less(a, b) || (!key_less(b, a) && a < b);
  });
  buckets.remapped.resize(static_cast<size_t>(n));
  for (int64_t j = 0; j < n; ++j) {
    if (j > 0 && key_less(order[j - 1], order[j])) ++buckets.count;
    buckets.remapped[order[j]] = buckets.count;
  }
  ++buckets.count;
  return buckets;
}

// Per-bucket mean and scale denominator of one horizon, in float64. Both passes run in member order on one
// thread (a bucket's sum never depends on the thread count); the member-wise passes around them are parallel.
struct HorizonStats {
  std::vector<int64_t> count;
  std::vector<double> mean;
  std::vector<double> denominator;
};

template <class BucketOf>
HorizonStats horizon_stats(const std::vector<double>& values, BucketOf bucket_of, int64_t num_buckets,
                           const duca_advantage_options& options) {
  const bool omit = options.nan_policy == DUCA_NAN_OMIT;
  const int64_t n = static_cast<int64_t>(values.size());
  HorizonStats stats;
  stats.count.assign(static_cast<size_t>(num_buckets), 0);
  stats.mean.assign(static_cast<size_t>(num_buckets), 0.0);
  stats.denominator.assign(static_cast<size_t>(num_buckets), 0.0);
  // Packed batches hold a bucket's members next to each other: a run of one bucket is summed in registers
  // (starting from the table's value, so the addition order is exactly the member order).
  int64_t run_bucket = -1, run_count = 0;
  double run_sum = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const double x = values[i];
    if (omit && std::isnan(x)) continue;
    const int64_t b = bucket_of(i);
    if (b != run_bucket) {
      if (run_bucket >= 0) {
        stats.mean[run_bucket] = run_sum;
        stats.count[run_bucket] = run_count;
      }
      run_bucket = b;
      run_sum = stats.mean[b];
      run_count = stats.count[b];
    }
    run_sum += x;
    ++run_count;
  }
  if (run_bucket >= 0) {
    stats.mean[run_bucket] = run_sum;
    stats.count[run_bucket] = run_count;
  }
  for (int64_t b = 0; b < num_buckets; ++b) {
    if (stats.count[b] >= 2) stats.mean[b] /= static_cast<double>(stats.count[b]);
  }
  if (options.scale == DUCA_SCALE_NONE) {
    std::fill(stats.denominator.begin(), stats.denominator.end(), 1.0);
    return stats;
  }
  std::vector<double>& m2 = stats.denominator;  // sums of centred squares, turned into denominators below
  run_bucket = -1;
  double run_m2 = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const double x = values[i];
    if (omit && std::isnan(x)) continue;
    const int64_t b = bucket_of(i);
    if (b != run_bucket) {
      if (run_bucket >= 0) m2[run_bucket] = run_m2;
      run_bucket = b;
      run_m2 = m2[b];
    }
    const double centered = x - stats.mean[b];
    run_m2 += centered * centered;
  }
  if (run_bucket >= 0) m2[run_bucket] = run_m2;
  if (options.scale == DUCA_SCALE_GROUP) {
    for (int64_t b = 0; b < num_buckets; ++b) {
      if (stats.count[b] >= 2) m2[b] = std::sqrt(m2[b] / static_cast<double>(stats.count[b] - 1)) + options.eps;
    }
    return stats;
  }
  // Batch scale: one std over the centred values of every bucket with >= 2 members, summed in bucket order.
  double total_m2 = 0.0;
  int64_t total_count = 0;
  for (int64_t b = 0; b < num_buckets; ++b) {
    if (stats.count[b] < 2) continue;
    total_m2 += m2[b];
    total_count += stats.count[b];
  }
  const double denominator =
      std::sqrt(total_m2 / static_cast<double>(std::max<int64_t>(total_count - 1, 1))) + options.eps;
  std::fill(m2.begin(), m2.end(), denominator);
  return stats;
}

// Advantage of a member with value x in bucket b: 0 when NaN (omitted) or when its bucket has < 2 members.
inline double advantage(const HorizonStats& stats, int64_t b, double x) {
  if (stats.count[b] < 2 || std::isnan(x)) return 0.0;
  return (x - stats.mean[b]) / stats.denominator[b];
}

// Normalizes one horizon and hands each member's advantage to emit(i, advantage), in parallel over members.
template <class MajorOf, class MinorOf, class Emit>
void normalize(const std::vector<double>& values, MajorOf major_of, MinorOf minor_of,
               const duca_advantage_options& options, Emit emit) {
  const int64_t n = static_cast<int64_t>(values.size());
  const Buckets buckets = make_buckets(n, major_of, minor_of);
  auto bucket_of = [&](int64_t i) {
    return buckets.remapped.empty() ? major_of(i) * buckets.minors + minor_of(i) : buckets.remapped[i];
  };
  const HorizonStats stats = horizon_stats(values, bucket_of, buckets.count, options);
#pragma omp parallel for schedule(static) if (n >= kParallelMin)
  for (int64_t i = 0; i < n; ++i) emit(i, advantage(stats, bucket_of(i), values[i]));
}

struct NoMinor {
  int64_t operator()(int64_t) const { return 0; }
};

template <class Out>
void hian_into(const std::vector<double>& turn_values, const int64_t* turn_session,
               const std::vector<double>& session_values, const int64_t* session_group, const int64_t* turn_index,
               const int64_t* token_turn, int64_t num_tokens, const duca_advantage_options& options, Out* out) {
  std::vector<double> session_adv(session_values.size());
  normalize(session_values, [&](int64_t s) { return session_group[s]; }, NoMinor{}, options,
            [&](int64_t s, double a) { session_adv[s] = a; });
  // Per-turn results go straight to `out` unless they are broadcast to tokens afterwards.
  std::vector<Out> per_turn(token_turn != nullptr ? turn_values.size() : 0);
  Out* fused = token_turn != nullptr ? per_turn.data() : out;
  auto emit = [&](int64_t t, double a) {
    fused[t] = static_cast<Out>(options.turn_weight * a + options.session_weight * session_adv[turn_session[t]]);
  };
  auto group_of_turn = [&](int64_t t) { return session_group[turn_session[t]]; };
  if (options.turn_scope == DUCA_TURN_SCOPE_GROUP_TURN) {
    normalize(turn_values, group_of_turn, [&](int64_t t) { return turn_index[t]; }, options, emit);
  } else {
    normalize(turn_values, group_of_turn, NoMinor{}, options, emit);
  }
  if (token_turn == nullptr) return;
#pragma omp parallel for schedule(static) if (num_tokens >= kParallelMin)
  for (int64_t i = 0; i < num_tokens; ++i) out[i] = token_turn[i] >= 0 ? fused[token_turn[i]] : Out(0);
}

void hian(const duca_rewards* turn_rewards, const int64_t* turn_session, const duca_rewards* session_rewards,
          const int64_t* session_group, int64_t num_groups, const int64_t* turn_index, const int64_t* token_turn,
          int64_t num_tokens, const duca_advantage_options* options, void* out, int32_t out_dtype) {
  check_options(options);
  check_out_dtype(out_dtype);
  check_rewards_layout("turn_rewards", turn_rewards);
  check_rewards_layout("session_rewards", session_rewards);
  const int64_t num_turns = turn_rewards->rows, num_sessions = session_rewards->rows;
  const bool group_turn = options->turn_scope == DUCA_TURN_SCOPE_GROUP_TURN;
  if (group_turn && turn_index == nullptr && num_turns > 0) {
    fail(DUCA_INVALID_ARGUMENT, "turn_scope group_turn needs turn_index (position of each turn in its session)");
  }
  if (token_turn != nullptr && num_tokens < 0) {
    fail(DUCA_INVALID_ARGUMENT, "num_tokens must be >= 0, got ", num_tokens);
  }
  const int64_t out_rows = token_turn != nullptr ? num_tokens : num_turns;
  if (out_rows > 0 && out == nullptr) fail(DUCA_INVALID_ARGUMENT, "out is NULL but needs ", out_rows, " rows");
  check_ids("turn_session", turn_session, num_turns, 0, num_sessions, "number of sessions");
  check_ids("session_group", session_group, num_sessions, 0, num_groups < 0 ? kNoBound : num_groups,
            "num_groups");
  if (group_turn) check_ids("turn_index", turn_index, num_turns, 0, kNoBound, "");
  if (token_turn != nullptr) {
    check_ids("token_turn", token_turn, num_tokens, -1, num_turns, "-1 = no loss, else a turn");
  }
  const bool omit = options->nan_policy == DUCA_NAN_OMIT;
  const std::vector<double> turn_values = combine_rows("turn_rewards", *turn_rewards, omit);
  const std::vector<double> session_values = combine_rows("session_rewards", *session_rewards, omit);

  if (out_dtype == DUCA_FLOAT32) {
    hian_into(turn_values, turn_session, session_values, session_group, turn_index, token_turn, num_tokens, *options,
              static_cast<float*>(out));
  } else {
    hian_into(turn_values, turn_session, session_values, session_group, turn_index, token_turn, num_tokens, *options,
              static_cast<double*>(out));
  }
}

void grpo(const duca_rewards* rewards, const int64_t* group, int64_t num_groups,
          const duca_advantage_options* options, void* out, int32_t out_dtype) {
  check_options(options);
  check_out_dtype(out_dtype);
  check_rewards_layout("rewards", rewards);
  const int64_t n = rewards->rows;
  if (n > 0 && out == nullptr) fail(DUCA_INVALID_ARGUMENT, "out is NULL but needs ", n, " rows");
  check_ids("group", group, n, 0, num_groups < 0 ? kNoBound : num_groups, "num_groups");
  const std::vector<double> values = combine_rows("rewards", *rewards, options->nan_policy == DUCA_NAN_OMIT);
  auto group_of = [&](int64_t i) { return group[i]; };
  if (out_dtype == DUCA_FLOAT32) {
    float* typed = static_cast<float*>(out);
    normalize(values, group_of, NoMinor{}, *options, [&](int64_t i, double a) { typed[i] = static_cast<float>(a); });
  } else {
    double* typed = static_cast<double*>(out);
    normalize(values, group_of, NoMinor{}, *options, [&](int64_t i, double a) { typed[i] = a; });
  }
}

}  // namespace
}  // namespace duca

extern "C" {

duca_advantage_options duca_default_advantage_options(void) {
  return duca_advantage_options{1.0, 1.0, 1e-6, DUCA_TURN_SCOPE_GROUP, DUCA_SCALE_GROUP, DUCA_NAN_RAISE};
}

duca_status duca_hian_advantages(const duca_rewards* turn_rewards, const int64_t* turn_session,
                                 const duca_rewards* session_rewards, const int64_t* session_group,
                                 int64_t num_groups, const int64_t* turn_index, const int64_t* token_turn,
                                 int64_t num_tokens, const duca_advantage_options* options, void* out,
                                 int32_t out_dtype, char* message, size_t message_size) {
  return duca::guarded(message, message_size, [&] {
    duca::hian(turn_rewards, turn_session, session_rewards, session_group, num_groups, turn_index, token_turn,
               num_tokens, options, out, out_dtype);
  });
}

duca_status duca_grpo_advantages(const duca_rewards* rewards, const int64_t* group, int64_t num_groups,
                                 const duca_advantage_options* options, void* out, int32_t out_dtype,
                                 char* message, size_t message_size) {
  return duca::guarded(message, message_size,
                       [&] { duca::grpo(rewards, group, num_groups, options, out, out_dtype); });
}

int duca_cpu_threads(void) {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

int duca_has_cuda(void) {
#ifdef DUCA_WITH_CUDA
  return 1;
#else
  return 0;
#endif
}

int duca_abi_version(void) { return DUCA_KERNELS_ABI_VERSION; }

}  // extern "C"
