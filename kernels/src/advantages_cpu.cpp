// HIAN and GRPO advantages on the CPU: float64 two-pass statistics over segments of a counting sort.
//
// Determinism: members are sorted stably into segments (one per statistic bucket); each segment is reduced by
// one thread in input order and the batch-wide sum runs over segments in a fixed order, so the thread count
// never changes a bit of the result.
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

// Members grouped by statistic bucket: bucket b holds order[offsets[b] .. offsets[b + 1]) in input order.
struct Segments {
  std::vector<int64_t> offsets;
  std::vector<int64_t> order;
};

// Buckets of the keys (major[i], minor[i]) with major, minor >= 0. A dense table is used only when the key
// range is O(n); otherwise a sort remaps sparse or huge ids, so no allocation ever scales with an id value.
template <class MajorOf, class MinorOf>
Segments bucket_members(int64_t n, MajorOf major_of, MinorOf minor_of) {
  Segments segments;
  segments.order.resize(static_cast<size_t>(n));
  int64_t major_max = -1, minor_max = -1;
#pragma omp parallel for schedule(static) reduction(max : major_max, minor_max) if (n >= kParallelMin)
  for (int64_t i = 0; i < n; ++i) {
    major_max = std::max(major_max, major_of(i));
    minor_max = std::max(minor_max, minor_of(i));
  }
  const int64_t dense_limit = 4 * n + 1024;
  const int64_t majors = major_max + 1, minors = minor_max + 1;
  const bool dense = n == 0 || (majors <= dense_limit && minors <= dense_limit / std::max<int64_t>(majors, 1));
  if (dense) {
    const int64_t num_keys = n == 0 ? 0 : majors * minors;
    std::vector<int64_t> key(static_cast<size_t>(n));
    segments.offsets.assign(static_cast<size_t>(num_keys + 1), 0);
    for (int64_t i = 0; i < n; ++i) {
      key[i] = major_of(i) * minors + minor_of(i);
      ++segments.offsets[key[i] + 1];
    }
    std::partial_sum(segments.offsets.begin(), segments.offsets.end(), segments.offsets.begin());
    std::vector<int64_t> cursor(segments.offsets.begin(), segments.offsets.end() - 1);
    for (int64_t i = 0; i < n; ++i) segments.order[cursor[key[i]]++] = i;
    return segments;
  }
  std::iota(segments.order.begin(), segments.order.end(), int64_t{0});
  std::sort(segments.order.begin(), segments.order.end(), [&](int64_t a, int64_t b) {
    const int64_t ma = major_of(a), mb = major_of(b);
    if (ma != mb) return ma < mb;
    const int64_t na = minor_of(a), nb = minor_of(b);
    return na != nb ? na < nb : a < b;
  });
  segments.offsets.push_back(0);
  for (int64_t j = 1; j < n; ++j) {
    const int64_t a = segments.order[j - 1], b = segments.order[j];
    if (major_of(a) != major_of(b) || minor_of(a) != minor_of(b)) segments.offsets.push_back(j);
  }
  segments.offsets.push_back(n);
  return segments;
}

// Grouped normalization of `values` over `segments` into `advantages` (float64).
void normalize_horizon(const std::vector<double>& values, const Segments& segments,
                       const duca_advantage_options& options, std::vector<double>& advantages) {
  const int64_t num_segments = static_cast<int64_t>(segments.offsets.size()) - 1;
  const bool omit = options.nan_policy == DUCA_NAN_OMIT;
  advantages.assign(values.size(), 0.0);
  std::vector<double> segment_m2(static_cast<size_t>(std::max<int64_t>(num_segments, 0)), 0.0);
  std::vector<int64_t> segment_count(segment_m2.size(), 0);
#pragma omp parallel for schedule(static) if (num_segments >= kParallelMin)
  for (int64_t s = 0; s < num_segments; ++s) {
    const int64_t begin = segments.offsets[s], end = segments.offsets[s + 1];
    const int64_t* members = segments.order.data();
    int64_t count = 0;
    double sum = 0.0;
    for (int64_t j = begin; j < end; ++j) {
      const double x = values[members[j]];
      if (omit && std::isnan(x)) continue;
      sum += x;
      ++count;
    }
    if (count < 2) continue;  // fewer than 2 members: advantage 0 (already written)
    const double mean = sum / static_cast<double>(count);
    double m2 = 0.0;
    for (int64_t j = begin; j < end; ++j) {
      const double x = values[members[j]];
      if (omit && std::isnan(x)) continue;
      const double centered = x - mean;
      advantages[members[j]] = centered;
      m2 += centered * centered;
    }
    segment_m2[s] = m2;
    segment_count[s] = count;
    if (options.scale == DUCA_SCALE_GROUP) {
      const double denominator = std::sqrt(m2 / static_cast<double>(count - 1)) + options.eps;
      for (int64_t j = begin; j < end; ++j) advantages[members[j]] /= denominator;
    }
  }
  if (options.scale != DUCA_SCALE_BATCH) return;
  // Fixed segment order: the batch statistic is the same whatever the thread count.
  double total_m2 = 0.0;
  int64_t total_count = 0;
  for (int64_t s = 0; s < num_segments; ++s) {
    total_m2 += segment_m2[s];
    total_count += segment_count[s];
  }
  const double denominator =
      std::sqrt(total_m2 / static_cast<double>(std::max<int64_t>(total_count - 1, 1))) + options.eps;
  const int64_t n = static_cast<int64_t>(advantages.size());
#pragma omp parallel for schedule(static) if (n >= kParallelMin)
  for (int64_t i = 0; i < n; ++i) advantages[i] /= denominator;
}

template <class Out>
void write_fused(const std::vector<double>& turn_adv, const std::vector<double>& session_adv,
                 const int64_t* turn_session, const int64_t* token_turn, int64_t num_tokens,
                 const duca_advantage_options& options, Out* out) {
  const int64_t num_turns = static_cast<int64_t>(turn_adv.size());
  auto fused = [&](int64_t t) {
    return static_cast<Out>(options.turn_weight * turn_adv[t] +
                            options.session_weight * session_adv[turn_session[t]]);
  };
  if (token_turn == nullptr) {
#pragma omp parallel for schedule(static) if (num_turns >= kParallelMin)
    for (int64_t t = 0; t < num_turns; ++t) out[t] = fused(t);
    return;
  }
  std::vector<Out> per_turn(static_cast<size_t>(num_turns));
#pragma omp parallel for schedule(static) if (num_turns >= kParallelMin)
  for (int64_t t = 0; t < num_turns; ++t) per_turn[t] = fused(t);
#pragma omp parallel for schedule(static) if (num_tokens >= kParallelMin)
  for (int64_t i = 0; i < num_tokens; ++i) out[i] = token_turn[i] >= 0 ? per_turn[token_turn[i]] : Out(0);
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

  std::vector<double> session_adv, turn_adv;
  const Segments session_segments =
      bucket_members(num_sessions, [&](int64_t s) { return session_group[s]; }, [](int64_t) { return int64_t{0}; });
  normalize_horizon(session_values, session_segments, *options, session_adv);
  auto group_of_turn = [&](int64_t t) { return session_group[turn_session[t]]; };
  const Segments turn_segments =
      group_turn ? bucket_members(num_turns, group_of_turn, [&](int64_t t) { return turn_index[t]; })
                 : bucket_members(num_turns, group_of_turn, [](int64_t) { return int64_t{0}; });
  normalize_horizon(turn_values, turn_segments, *options, turn_adv);

  if (out_dtype == DUCA_FLOAT32) {
    write_fused(turn_adv, session_adv, turn_session, token_turn, num_tokens, *options, static_cast<float*>(out));
  } else {
    write_fused(turn_adv, session_adv, turn_session, token_turn, num_tokens, *options, static_cast<double*>(out));
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
  const Segments segments = bucket_members(n, [&](int64_t i) { return group[i]; }, [](int64_t) { return int64_t{0}; });
  std::vector<double> advantages;
  normalize_horizon(values, segments, *options, advantages);
  if (out_dtype == DUCA_FLOAT32) {
    std::transform(advantages.begin(), advantages.end(), static_cast<float*>(out),
                   [](double a) { return static_cast<float>(a); });
  } else {
    std::copy(advantages.begin(), advantages.end(), static_cast<double*>(out));
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
