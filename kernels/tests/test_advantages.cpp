// C API tests of the CPU advantage kernels on small cases computed by hand.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "duca_kernels.h"

namespace {

int failures = 0;

#define CHECK(condition)                                                  \
  do {                                                                    \
    if (!(condition)) {                                                   \
      std::fprintf(stderr, "%s:%d: CHECK(%s) failed\n", __FILE__, __LINE__, #condition); \
      ++failures;                                                         \
    }                                                                     \
  } while (0)

void check_near(const std::vector<double>& got, const std::vector<double>& want, const char* what) {
  if (got.size() != want.size()) {
    std::fprintf(stderr, "%s: size %zu != %zu\n", what, got.size(), want.size());
    ++failures;
    return;
  }
  for (size_t i = 0; i < got.size(); ++i) {
    if (std::fabs(got[i] - want[i]) > 1e-12 * (1.0 + std::fabs(want[i]))) {
      std::fprintf(stderr, "%s[%zu]: got %.17g, want %.17g\n", what, i, got[i], want[i]);
      ++failures;
    }
  }
}

duca_rewards column(const std::vector<double>& values) {
  return duca_rewards{values.data(), DUCA_FLOAT64, static_cast<int64_t>(values.size()), 1, 1, 1, nullptr};
}

constexpr double kEps = 1e-6;

void test_grpo_group_scale() {
  const std::vector<double> rewards = {1.0, 2.0, 3.0, 5.0};
  const std::vector<int64_t> group = {0, 0, 0, 1};
  const duca_rewards r = column(rewards);
  const duca_advantage_options options = duca_default_advantage_options();
  std::vector<double> out(4);
  char message[256];
  CHECK(duca_grpo_advantages(&r, group.data(), 2, &options, out.data(), DUCA_FLOAT64, message, sizeof message) ==
        DUCA_OK);
  // group 0: mean 2, unbiased std 1; group 1 has one member -> 0.
  check_near(out, {-1.0 / (1.0 + kEps), 0.0, 1.0 / (1.0 + kEps), 0.0}, "grpo");
}

// Two sessions in group 0 (session rewards 0 and 2) and one lone session in group 1.
struct Batch {
  std::vector<double> turn_rewards = {1.0, 3.0, 5.0, 7.0};
  std::vector<int64_t> turn_session = {0, 0, 1, 2};
  std::vector<int64_t> turn_index = {0, 1, 0, 0};
  std::vector<double> session_rewards = {0.0, 2.0, 9.0};
  std::vector<int64_t> session_group = {0, 0, 1};
};

std::vector<double> run_hian(const Batch& batch, const duca_advantage_options& options,
                             const std::vector<int64_t>* token_turn = nullptr) {
  const duca_rewards turns = column(batch.turn_rewards), sessions = column(batch.session_rewards);
  const size_t rows = token_turn ? token_turn->size() : batch.turn_rewards.size();
  std::vector<double> out(rows, -99.0);
  char message[256];
  const duca_status status = duca_hian_advantages(
      &turns, batch.turn_session.data(), &sessions, batch.session_group.data(), 2, batch.turn_index.data(),
      token_turn ? token_turn->data() : nullptr, token_turn ? static_cast<int64_t>(token_turn->size()) : 0,
      &options, out.data(), DUCA_FLOAT64, message, sizeof message);
  if (status != DUCA_OK) std::fprintf(stderr, "unexpected error: %s\n", message);
  CHECK(status == DUCA_OK);
  return out;
}

void test_hian_group_scope() {
  const Batch batch;
  const duca_advantage_options options = duca_default_advantage_options();
  // Sessions of group 0: mean 1, std sqrt(2); turns of group 0 (1, 3, 5): mean 3, std 2; group 1: lone.
  const double s = 1.0 / (std::sqrt(2.0) + kEps), t = 2.0 / (2.0 + kEps);
  check_near(run_hian(batch, options), {-t - s, 0.0 - s, t + s, 0.0}, "hian group");
}

void test_hian_group_turn_and_weights() {
  const Batch batch;
  duca_advantage_options options = duca_default_advantage_options();
  options.turn_scope = DUCA_TURN_SCOPE_GROUP_TURN;
  options.turn_weight = 0.5;
  options.session_weight = 2.0;
  // Position 0 of group 0: turns 1 and 5 (mean 3, std 2*sqrt(2)); position 1: one turn -> 0.
  const double s = 1.0 / (std::sqrt(2.0) + kEps), t = 2.0 / (2.0 * std::sqrt(2.0) + kEps);
  check_near(run_hian(batch, options), {0.5 * -t - 2 * s, -2 * s, 0.5 * t + 2 * s, 0.0}, "hian group_turn");
}

void test_hian_scale_none_and_batch() {
  const Batch batch;
  duca_advantage_options options = duca_default_advantage_options();
  options.scale = DUCA_SCALE_NONE;
  check_near(run_hian(batch, options), {-2.0 - 1.0, 0.0 - 1.0, 2.0 + 1.0, 0.0}, "hian none");
  options.scale = DUCA_SCALE_BATCH;
  // Centered sessions (-1, 1): std sqrt(2); centered turns (-2, 0, 2): std 2 (only groups with >= 2 members).
  const double s = 1.0 / (std::sqrt(2.0) + kEps), t = 2.0 / (2.0 + kEps);
  check_near(run_hian(batch, options), {-t - s, -s, t + s, 0.0}, "hian batch");
}

void test_nan_omit_and_raise() {
  Batch batch;
  batch.turn_rewards[1] = NAN;
  duca_advantage_options options = duca_default_advantage_options();
  options.nan_policy = DUCA_NAN_OMIT;
  // Turns of group 0 without the NaN: 1 and 5 (mean 3, std 2*sqrt(2)); the NaN turn gets 0 turn advantage.
  const double s = 1.0 / (std::sqrt(2.0) + kEps), t = 2.0 / (2.0 * std::sqrt(2.0) + kEps);
  check_near(run_hian(batch, options), {-t - s, -s, t + s, 0.0}, "hian nan omit");

  options.nan_policy = DUCA_NAN_RAISE;
  const duca_rewards turns = column(batch.turn_rewards), sessions = column(batch.session_rewards);
  std::vector<double> out(4);
  char message[256];
  CHECK(duca_hian_advantages(&turns, batch.turn_session.data(), &sessions, batch.session_group.data(), 2,
                             nullptr, nullptr, 0, &options, out.data(), DUCA_FLOAT64, message,
                             sizeof message) == DUCA_NONFINITE_VALUE);
  CHECK(std::strstr(message, "turn_rewards") != nullptr && std::strstr(message, "index 1") != nullptr);
}

void test_token_broadcast_float32() {
  const Batch batch;
  const duca_advantage_options options = duca_default_advantage_options();
  const std::vector<double> per_turn = run_hian(batch, options);
  const std::vector<int64_t> token_turn = {-1, 0, 0, 2, -1, 3};
  const duca_rewards turns = column(batch.turn_rewards), sessions = column(batch.session_rewards);
  std::vector<float> out(token_turn.size(), -99.0f);
  CHECK(duca_hian_advantages(&turns, batch.turn_session.data(), &sessions, batch.session_group.data(), 2,
                             nullptr, token_turn.data(), 6, &options, out.data(), DUCA_FLOAT32, nullptr,
                             0) == DUCA_OK);
  const std::vector<float> want = {0.0f, float(per_turn[0]), float(per_turn[0]), float(per_turn[2]), 0.0f,
                                   float(per_turn[3])};
  CHECK(out == want);
}

void test_components_strides_and_float32() {
  // Column-major [3, 2] float32 rewards with weights (1, -2): combined = 1 - 2 * 0, 0 - 2 * 1, 6 - 2 * 1.
  const std::vector<float> data = {1.0f, 0.0f, 6.0f, 0.0f, 1.0f, 1.0f};
  const std::vector<double> weights = {1.0, -2.0};
  const duca_rewards r{data.data(), DUCA_FLOAT32, 3, 2, 1, 3, weights.data()};
  const std::vector<int64_t> group = {0, 0, 0};
  const duca_advantage_options options = duca_default_advantage_options();
  std::vector<double> out(3);
  CHECK(duca_grpo_advantages(&r, group.data(), 1, &options, out.data(), DUCA_FLOAT64, nullptr, 0) == DUCA_OK);
  // combined (1, -2, 4): mean 1, std 3.
  check_near(out, {0.0, -3.0 / (3.0 + kEps), 3.0 / (3.0 + kEps)}, "components");
}

void test_sparse_huge_group_ids() {
  const std::vector<double> rewards = {1.0, 2.0, 3.0, 4.0};
  const std::vector<int64_t> group = {int64_t(1) << 60, 7, int64_t(1) << 60, 7};
  const duca_rewards r = column(rewards);
  const duca_advantage_options options = duca_default_advantage_options();
  std::vector<double> out(4);
  CHECK(duca_grpo_advantages(&r, group.data(), -1, &options, out.data(), DUCA_FLOAT64, nullptr, 0) == DUCA_OK);
  const double a = 1.0 / (std::sqrt(2.0) + kEps);
  check_near(out, {-a, -a, a, a}, "sparse ids");
}

void test_bad_arguments_are_named() {
  const Batch batch;
  const duca_rewards turns = column(batch.turn_rewards), sessions = column(batch.session_rewards);
  duca_advantage_options options = duca_default_advantage_options();
  std::vector<double> out(8);
  char message[256];
  const std::vector<int64_t> bad_session = {0, 0, 3, 2};
  CHECK(duca_hian_advantages(&turns, bad_session.data(), &sessions, batch.session_group.data(), 2, nullptr,
                             nullptr, 0, &options, out.data(), DUCA_FLOAT64, message,
                             sizeof message) == DUCA_INVALID_ARGUMENT);
  CHECK(std::string(message).find("turn_session[2] = 3") != std::string::npos);

  CHECK(duca_hian_advantages(&turns, batch.turn_session.data(), &sessions, batch.session_group.data(), 1,
                             nullptr, nullptr, 0, &options, out.data(), DUCA_FLOAT64, message,
                             sizeof message) == DUCA_INVALID_ARGUMENT);
  CHECK(std::string(message).find("session_group[2] = 1") != std::string::npos);

  const std::vector<int64_t> bad_tokens = {0, 4};
  CHECK(duca_hian_advantages(&turns, batch.turn_session.data(), &sessions, batch.session_group.data(), 2,
                             nullptr, bad_tokens.data(), 2, &options, out.data(), DUCA_FLOAT64, message,
                             sizeof message) == DUCA_INVALID_ARGUMENT);
  CHECK(std::string(message).find("token_turn[1] = 4") != std::string::npos);

  options.turn_scope = DUCA_TURN_SCOPE_GROUP_TURN;
  CHECK(duca_hian_advantages(&turns, batch.turn_session.data(), &sessions, batch.session_group.data(), 2,
                             nullptr, nullptr, 0, &options, out.data(), DUCA_FLOAT64, message,
                             sizeof message) == DUCA_INVALID_ARGUMENT);
  CHECK(std::string(message).find("turn_index") != std::string::npos);

  options = duca_default_advantage_options();
  options.eps = 0.0;
  CHECK(duca_hian_advantages(&turns, batch.turn_session.data(), &sessions, batch.session_group.data(), 2,
                             nullptr, nullptr, 0, &options, out.data(), DUCA_FLOAT64, message,
                             sizeof message) == DUCA_INVALID_ARGUMENT);
  CHECK(std::string(message).find("eps") != std::string::npos);

  options = duca_default_advantage_options();
  std::vector<double> infinite = batch.session_rewards;
  infinite[1] = INFINITY;
  const duca_rewards bad_sessions = column(infinite);
  options.nan_policy = DUCA_NAN_OMIT;
  CHECK(duca_hian_advantages(&turns, batch.turn_session.data(), &bad_sessions, batch.session_group.data(), 2,
                             nullptr, nullptr, 0, &options, out.data(), DUCA_FLOAT64, message,
                             sizeof message) == DUCA_NONFINITE_VALUE);
  CHECK(std::string(message).find("session_rewards has an infinite value at flat index 1") != std::string::npos);

  // A short message buffer is truncated, never overrun.
  char tiny[8];
  std::memset(tiny, 'x', sizeof tiny);
  CHECK(duca_hian_advantages(&turns, bad_session.data(), &sessions, batch.session_group.data(), 2, nullptr,
                             nullptr, 0, &options, out.data(), DUCA_FLOAT64, tiny, 5) == DUCA_INVALID_ARGUMENT);
  CHECK(std::strlen(tiny) == 4 && tiny[5] == 'x');
}

void test_empty_batch() {
  const std::vector<double> none;
  const duca_rewards empty = column(none);
  const duca_advantage_options options = duca_default_advantage_options();
  CHECK(duca_hian_advantages(&empty, nullptr, &empty, nullptr, 0, nullptr, nullptr, 0, &options, nullptr,
                             DUCA_FLOAT32, nullptr, 0) == DUCA_OK);
}

}  // namespace

int main() {
  test_grpo_group_scale();
  test_hian_group_scope();
  test_hian_group_turn_and_weights();
  test_hian_scale_none_and_batch();
  test_nan_omit_and_raise();
  test_token_broadcast_float32();
  test_components_strides_and_float32();
  test_sparse_huge_group_ids();
  test_bad_arguments_are_named();
  test_empty_batch();
  CHECK(duca_abi_version() == DUCA_KERNELS_ABI_VERSION);
  if (failures) std::fprintf(stderr, "%d check(s) failed\n", failures);
  return failures == 0 ? 0 : 1;
}
