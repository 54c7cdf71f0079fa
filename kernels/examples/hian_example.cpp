// HIAN advantages of a small packed batch through the installed C API (built via find_package).
//
// Two rollout groups of two sessions; every agent turn has two reward components (compliance,
// repetition penalty) and each session one (conversion). Tokens of customer turns carry -1 (no loss).
#include <cstdio>
#include <vector>

#include "duca_kernels.h"

int main() {
  // [T = 6, Kt = 2] turn rewards, row-major.
  const std::vector<double> turn_rewards = {1.0, -0.2, 1.0, 0.0, 0.0, -0.5, 1.0, 0.0, 1.0, -0.1, 1.0, 0.0};
  const std::vector<int64_t> turn_session = {0, 0, 1, 2, 2, 3};
  const std::vector<double> turn_weights = {1.0, 0.5};
  const std::vector<double> session_rewards = {1.0, 0.0, 0.0, 0.0};
  const std::vector<int64_t> session_group = {0, 0, 1, 1};
  // Packed tokens: each agent turn has two tokens, a customer reply (-1) follows some of them.
  const std::vector<int64_t> token_turn = {0, 0, -1, 1, 1, 2, 2, -1, 3, 3, 4, 4, -1, 5, 5};

  const duca_rewards turns{turn_rewards.data(), DUCA_FLOAT64, 6, 2, 2, 1, turn_weights.data()};
  const duca_rewards sessions{session_rewards.data(), DUCA_FLOAT64, 4, 1, 1, 1, nullptr};
  duca_advantage_options options = duca_default_advantage_options();
  options.session_weight = 2.0;

  std::vector<float> advantages(token_turn.size());
  char message[256];
  const duca_status status = duca_hian_advantages(
      &turns, turn_session.data(), &sessions, session_group.data(), 2, nullptr, token_turn.data(),
      static_cast<int64_t>(token_turn.size()), &options, advantages.data(), DUCA_FLOAT32, message, sizeof message);
  if (status != DUCA_OK) {
    std::fprintf(stderr, "duca_hian_advantages failed (%d): %s\n", static_cast<int>(status), message);
    return 1;
  }
  std::printf("threads: %d, cuda: %d\ntoken advantages:", duca_cpu_threads(), duca_has_cuda());
  for (float a : advantages) std::printf(" %.4f", a);
  std::printf("\n");
  // Group 1's sessions tie (no session signal); its tokens differ only through the turn horizon.
  return 0;
}
