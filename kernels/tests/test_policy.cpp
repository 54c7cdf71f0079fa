// C API tests of the CPU row kernels of the policy loss on cases computed by hand.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <vector>

#include "duca_kernels.h"

namespace {

int failures = 0;

void check_near(double got, double want, const char* what) {
  if (!(std::fabs(got - want) <= 1e-12 * (1.0 + std::fabs(want)))) {
    std::fprintf(stderr, "%s: got %.17g, want %.17g\n", what, got, want);
    ++failures;
  }
}

duca_policy_options plain_ppo() { return duca_policy_options{0.2, 0.2, 0.0, 0.0, DUCA_KL_K3, 0.0, 0.0, 20.0}; }

void test_two_token_chain() {
  // Row 0: logits (0, 0) -> lse log 2, logprob -log 2, entropy log 2. Row 1: (ln 3, 0), target 1 -> p = (3/4, 1/4).
  std::vector<double> logits = {0.0, 0.0, std::log(3.0), 0.0};
  const std::vector<int64_t> target = {0, 1};
  std::vector<double> lse(2), logp(2), entropy(2);
  char message[256];
  if (duca_logits_stats(logits.data(), DUCA_FLOAT64, 2, 2, 2, 1, target.data(), 1.0, lse.data(), logp.data(),
                        entropy.data(), message, sizeof message) != DUCA_OK) {
    std::fprintf(stderr, "stats failed: %s\n", message);
    ++failures;
    return;
  }
  check_near(lse[0], std::log(2.0), "lse[0]");
  check_near(logp[0], -std::log(2.0), "logp[0]");
  check_near(entropy[0], std::log(2.0), "entropy[0]");
  check_near(lse[1], std::log(4.0), "lse[1]");
  check_near(logp[1], std::log(0.25), "logp[1]");
  check_near(entropy[1], -(0.75 * std::log(0.75) + 0.25 * std::log(0.25)), "entropy[1]");

  // On-policy: ratio 1, loss per token -A; weights 1/2 each (token mean); token 1 is masked out.
  const std::vector<double> advantages = {2.0, -1.0}, weights = {0.5, 0.0};
  const std::vector<uint8_t> active = {1, 0};
  const duca_policy_inputs inputs{logp.data(), entropy.data(), advantages.data(), nullptr, nullptr, nullptr,
                                  weights.data(), active.data()};
  const duca_policy_options options = plain_ppo();
  std::vector<double> grad_logp(2);
  duca_policy_sums sums;
  if (duca_policy_head(2, DUCA_FLOAT64, &inputs, &options, grad_logp.data(), nullptr, &sums, message,
                       sizeof message) != DUCA_OK) {
    std::fprintf(stderr, "head failed: %s\n", message);
    ++failures;
    return;
  }
  check_near(sums.loss, -1.0, "loss");
  check_near(sums.active, 1.0, "active");
  check_near(sums.ratio, 1.0, "ratio sum");
  check_near(grad_logp[0], -1.0, "grad_logp[0]");
  check_near(grad_logp[1], 0.0, "grad_logp[1] (masked)");

  // d loss / d z = g (onehot - p): row 0 = -1 * ((1, 0) - (1/2, 1/2)); row 1 gets nothing.
  if (duca_logits_grad_inplace(logits.data(), DUCA_FLOAT64, 2, 2, 2, 1, target.data(), lse.data(),
                               entropy.data(), grad_logp.data(), nullptr, 1.0, message, sizeof message) != DUCA_OK) {
    std::fprintf(stderr, "grad failed: %s\n", message);
    ++failures;
    return;
  }
  check_near(logits[0], -0.5, "dz[0, 0]");
  check_near(logits[1], 0.5, "dz[0, 1]");
  check_near(logits[2], 0.0, "dz[1, 0]");
  check_near(logits[3], 0.0, "dz[1, 1]");
}

void test_clip_and_dual_clip() {
  // ratio e^0.5 ~ 1.65 > 1.2 with A > 0: clipped (no gradient); ratio e^-1 ~ 0.37 with A < 0: the clip
  // loss is 0.8 * 1 = 0.8, the unclipped 0.37 -> clipped; dual clip 3 caps A = -1 at 3 (no effect here).
  const std::vector<double> logp = {0.0, 0.0}, old = {-0.5, 1.0}, advantages = {1.0, -1.0}, weights = {1.0, 1.0},
                            entropy = {0.0, 0.0};
  const std::vector<uint8_t> active = {1, 1};
  const duca_policy_inputs inputs{logp.data(), entropy.data(), advantages.data(), old.data(), nullptr, nullptr,
                                  weights.data(), active.data()};
  duca_policy_options options = plain_ppo();
  options.dual_clip = 3.0;
  std::vector<double> grad_logp(2);
  duca_policy_sums sums;
  if (duca_policy_head(2, DUCA_FLOAT64, &inputs, &options, grad_logp.data(), nullptr, &sums, nullptr, 0) != DUCA_OK) {
    ++failures;
    return;
  }
  check_near(sums.clipped_high, 1.0, "clipped_high");
  check_near(sums.clipped_low, 1.0, "clipped_low");
  check_near(sums.loss, -1.2 + 0.8, "clipped loss");
  check_near(grad_logp[0], 0.0, "no gradient through a clip");
  check_near(sums.dual_clipped, 0.0, "dual clip inactive");
}

void test_bad_arguments() {
  std::vector<float> logits(6, 0.0f), out(2);
  const std::vector<int64_t> bad_target = {0, 3};
  char message[256];
  if (duca_logits_stats(logits.data(), DUCA_FLOAT32, 2, 3, 3, 1, bad_target.data(), 1.0, out.data(), out.data(),
                        out.data(), message, sizeof message) != DUCA_INVALID_ARGUMENT ||
      std::strstr(message, "target[1] = 3") == nullptr) {
    std::fprintf(stderr, "bad target not reported: %s\n", message);
    ++failures;
  }
  duca_policy_options options = plain_ppo();
  options.clip_low = 1.5;
  duca_policy_sums sums;
  const duca_policy_inputs none{};
  if (duca_policy_head(0, DUCA_FLOAT32, &none, &options, nullptr, nullptr, &sums, message, sizeof message) !=
          DUCA_INVALID_ARGUMENT ||
      std::strstr(message, "clip_low") == nullptr) {
    std::fprintf(stderr, "bad clip_low not reported: %s\n", message);
    ++failures;
  }
}

}  // namespace

int main() {
  test_two_token_chain();
  test_clip_and_dual_clip();
  test_bad_arguments();
  if (failures) std::fprintf(stderr, "%d check(s) failed\n", failures);
  return failures == 0 ? 0 : 1;
}
