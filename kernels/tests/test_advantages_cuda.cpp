// CUDA advantages against the CPU library on random packed batches (needs a GPU; exit code 77 = skipped
// without one): equal to 1e-12 relative, and bit-identical between two runs.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "duca_kernels.h"

namespace {

template <class T>
T* to_device(const std::vector<T>& host) {
  T* device = nullptr;
  cudaMalloc(&device, host.size() * sizeof(T) + 1);
  cudaMemcpy(device, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice);
  return device;
}

int compare(int scope, int scale, int nan_policy) {
  std::mt19937_64 rng(1234 + scope * 7 + scale * 3 + nan_policy);
  std::normal_distribution<double> normal(0.0, 1.0);
  const int64_t sessions = 5000, groups = 700;
  std::vector<int64_t> session_group(sessions), turn_session, turn_index;
  for (int64_t s = 0; s < sessions; ++s) {
    session_group[s] = static_cast<int64_t>(rng() % groups);
    const int turns = static_cast<int>(rng() % 5);
    for (int i = 0; i < turns; ++i) {
      turn_session.push_back(s);
      turn_index.push_back(i);
    }
  }
  const int64_t num_turns = static_cast<int64_t>(turn_session.size());
  std::vector<double> turn_rewards(num_turns * 2), session_rewards(sessions);
  for (double& r : turn_rewards) r = (nan_policy && rng() % 10 == 0) ? NAN : normal(rng) * 1e3;
  for (double& r : session_rewards) r = std::round(normal(rng));
  const std::vector<double> weights = {1.0, 0.25};
  std::vector<int64_t> token_turn;
  for (int64_t t = 0; t < num_turns; ++t) {
    token_turn.insert(token_turn.end(), {t, t, -1});
  }
  duca_advantage_options options = duca_default_advantage_options();
  options.turn_scope = scope;
  options.scale = scale;
  options.nan_policy = nan_policy;
  options.session_weight = 0.5;

  const duca_rewards host_turns{turn_rewards.data(), DUCA_FLOAT64, num_turns, 2, 2, 1, weights.data()};
  const duca_rewards host_sessions{session_rewards.data(), DUCA_FLOAT64, sessions, 1, 1, 1, nullptr};
  std::vector<double> want(token_turn.size());
  char message[256];
  if (duca_hian_advantages(&host_turns, turn_session.data(), &host_sessions, session_group.data(), groups,
                           turn_index.data(), token_turn.data(), static_cast<int64_t>(token_turn.size()), &options,
                           want.data(), DUCA_FLOAT64, message, sizeof message) != DUCA_OK) {
    std::fprintf(stderr, "CPU failed: %s\n", message);
    return 1;
  }
  const duca_rewards device_turns{to_device(turn_rewards), DUCA_FLOAT64, num_turns, 2, 2, 1, to_device(weights)};
  const duca_rewards device_sessions{to_device(session_rewards), DUCA_FLOAT64, sessions, 1, 1, 1, nullptr};
  int64_t *d_turn_session = to_device(turn_session), *d_group = to_device(session_group),
          *d_index = to_device(turn_index), *d_tokens = to_device(token_turn);
  double* d_out = to_device(want);
  std::vector<double> got(want.size()), again(want.size());
  for (std::vector<double>* result : {&got, &again}) {
    if (duca_hian_advantages_cuda(&device_turns, d_turn_session, &device_sessions, d_group, groups, d_index, 4,
                                  d_tokens, static_cast<int64_t>(token_turn.size()), &options, d_out,
                                  DUCA_FLOAT64, nullptr, message, sizeof message) != DUCA_OK) {
      std::fprintf(stderr, "CUDA failed: %s\n", message);
      return 1;
    }
    cudaMemcpy(result->data(), d_out, want.size() * sizeof(double), cudaMemcpyDeviceToHost);
  }
  int failures = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    if (!(std::fabs(got[i] - want[i]) <= 1e-12 * (1.0 + std::fabs(want[i]))) || got[i] != again[i]) {
      if (failures++ < 5) {
        std::fprintf(stderr, "scope %d scale %d nan %d [%zu]: cuda %.17g (again %.17g) cpu %.17g\n", scope, scale,
                     nan_policy, i, got[i], again[i], want[i]);
      }
    }
  }
  return failures ? 1 : 0;
}

}  // namespace

int main() {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("no CUDA device: skipped\n");
    return 77;
  }
  int failures = 0;
  for (int scope : {DUCA_TURN_SCOPE_GROUP, DUCA_TURN_SCOPE_GROUP_TURN})
    for (int scale : {DUCA_SCALE_GROUP, DUCA_SCALE_BATCH, DUCA_SCALE_NONE})
      for (int nan_policy : {DUCA_NAN_RAISE, DUCA_NAN_OMIT}) failures += compare(scope, scale, nan_policy);
  return failures ? 1 : 0;
}
