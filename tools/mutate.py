"""Mutation check of the tests: plant bugs in the advantage and loss math, one at a time, in a copy.

Each mutant is one textual edit of one file of ``duca_fast`` (the ops, and the rollout driver). The
package and the tests are copied into a temporary directory, the edit is applied there (the working
tree is never touched), and the test files that cover that file run against the copy with ``-x``. A
mutant is caught when the tests fail. The last line reads ``caught N of M planted bugs``; the exit
status is 1 if any survived.

Usage: ``python -m tools.mutate [--only NAME ...] [--list]`` (``make mutate``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from duca_fast import native

ROOT = Path(__file__).resolve().parent.parent
LOSS_TESTS = (
    "tests/ops/test_loss_math.py",
    "tests/test_policy_loss.py",
    "tests/ops/test_upstream_gradients.py",
)
ADVANTAGE_TESTS = ("tests/test_advantages.py", "tests/ops/test_validation.py")


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]


PL = "duca_fast/ops/policy_loss/"
ADV = "duca_fast/ops/advantages/"
OBJ = PL + "objectives/"
CORRECTION_TESTS = ("tests/integrations/test_verl_rollout_correction.py", "tests/ops/test_objectives.py")
OBJECTIVE_TESTS = ("tests/ops/test_objectives.py", "tests/integrations/test_verl_objectives.py", *LOSS_TESTS)
MUTANTS = [
    Mutant(
        "GSPO: sequence log-ratio summed instead of averaged",
        OBJ + "gspo.py",
        "seq_log_ratio = sequence_sums(log_ratio, batch.seq_ids, active) / lengths",
        "seq_log_ratio = sequence_sums(log_ratio, batch.seq_ids, active)",
        OBJECTIVE_TESTS,
    ),
    Mutant(
        "GeoMean: cross-token gradient without the sequence's aggregation weight",
        OBJ + "geo_mean.py",
        "sequence_weight = sequence_sums(batch.weights, seq, active)",
        "sequence_weight = batch.weights",
        OBJECTIVE_TESTS,
    ),
    Mutant(
        "CISPO: the importance weight not clipped",
        OBJ + "cispo.py",
        "        weight = ratio.clamp(low, high)\n",
        "        weight = ratio\n",
        OBJECTIVE_TESTS,
    ),
    Mutant(
        "SAPO: tau_pos and tau_neg swapped",
        OBJ + "sapo.py",
        "torch.where(batch.advantages > 0, self.tau_pos, self.tau_neg)",
        "torch.where(batch.advantages > 0, self.tau_neg, self.tau_pos)",
        OBJECTIVE_TESTS,
    ),
    Mutant(
        "GPG: gradient sign flipped",
        OBJ + "gpg.py",
        "batch.weights * -batch.advantages, {}",
        "batch.weights * batch.advantages, {}",
        OBJECTIVE_TESTS,
    ),
    Mutant(
        "DRO: penalty gradient without beta",
        OBJ + "dro.py",
        "-(batch.advantages - self.beta * log_ratio)",
        "-(batch.advantages - log_ratio)",
        OBJECTIVE_TESTS,
    ),
    Mutant(
        "DPPO: the KL trust region tests the wrong direction for positive advantages",
        OBJ + "dppo.py",
        "up = (kl <= self.clip_high) | (prob <= old_prob)",
        "up = (kl <= self.clip_high) | (prob >= old_prob)",
        OBJECTIVE_TESTS,
    ),
    Mutant(
        "DGPO: the decay power n ignored below the range",
        OBJ + "dgpo.py",
        "(self.n + 1) * log_ratio - self.n * math.log(low)",
        "2 * log_ratio - math.log(low)",
        OBJECTIVE_TESTS,
    ),
    Mutant(
        "MASPO: the gate's width ignores the token's probability mass",
        OBJ + "maspo.py",
        "mass = (self.sigma_base / torch.exp(old_logprobs) ** self.alpha).clamp(",
        "mass = (self.sigma_base / torch.exp(old_logprobs) ** 0.0).clamp(",
        OBJECTIVE_TESTS,
    ),
    Mutant(
        "rollout correction: token weights from behavior - old instead of old - behavior",
        PL + "correction.py",
        "raw = torch.exp(log_ratio.clamp(-SAFETY_BOUND, SAFETY_BOUND))",
        "raw = torch.exp((-log_ratio).clamp(-SAFETY_BOUND, SAFETY_BOUND))",
        CORRECTION_TESTS,
    ),
    Mutant(
        "rollout correction: sequence weights from the token's own log-ratio",
        PL + "correction.py",
        'sums = _per_sequence(log_ratio, seq, size, "sum")[seq] if size else log_ratio',
        "sums = log_ratio",
        CORRECTION_TESTS,
    ),
    Mutant(
        "rollout correction: IcePop clamps instead of zeroing outside the bounds",
        PL + "correction.py",
        "weights = torch.where((raw >= lower) & (raw <= upper), raw, zero)",
        "weights = raw.clamp(lower, upper)",
        CORRECTION_TESTS,
    ),
    Mutant(
        "rollout correction: rejected tokens stay in the loss",
        PL + "head.py",
        "        active = keep  # rejected tokens leave the loss and its normalizer\n",
        "        active = active\n",
        CORRECTION_TESTS,
    ),
    Mutant(
        "rollout correction: batch normalization skipped",
        PL + "correction.py",
        "weights = torch.where(mean > 1e-8, weights / mean, weights)",
        "weights = weights",
        CORRECTION_TESTS,
    ),
    Mutant(
        "PPOClip: delta cap not applied to the gradient",
        OBJ + "ppo_clip.py",
        "torch.ones_like(live) if self.delta is None else ratio <= self.delta,",
        "torch.ones_like(live),",
        OBJECTIVE_TESTS,
    ),
    Mutant(
        "seq_mean_token_sum drops the division by the number of sequences",
        PL + "head.py",
        "        else:\n            weights = weights / num_nonempty\n",
        "        else:\n            weights = weights\n",
        LOSS_TESTS,
    ),
    Mutant(
        "seq_mean_token_mean: off-by-one sequence id in the per-sequence count",
        PL + "head.py",
        "counts[seq].clamp_min(1.0)",
        "counts[(seq - 1).clamp_min(0)].clamp_min(1.0)",
        LOSS_TESTS,
    ),
    Mutant(
        "token_mean divides by all tokens, masked ones included",
        PL + "head.py",
        "weights = weights / weights.sum().clamp_min(1.0)",
        "weights = weights / max(num_tokens, 1)",
        LOSS_TESTS,
    ),
    Mutant(
        "clip bounds swapped (clip_low above, clip_high below)",
        OBJ + "ppo_clip.py",
        "        low, high = 1.0 - self.clip_low, 1.0 + self.clip_high\n        first =",
        "        low, high = 1.0 - self.clip_high, 1.0 + self.clip_low\n        first =",
        LOSS_TESTS,
    ),
    Mutant(
        "approx_kl sign flipped",
        PL + "head.py",
        'metrics["approx_kl"] = masked_mean(',
        'metrics["approx_kl"] = -masked_mean(',
        LOSS_TESTS,
    ),
    Mutant(
        "k3 KL gradient sign flipped",
        PL + "head.py",
        "1.0 - torch.where(live, exp_neg, torch.zeros_like(exp_neg))",
        "torch.where(live, exp_neg, torch.zeros_like(exp_neg)) - 1.0",
        LOSS_TESTS,
    ),
    Mutant(
        "dual clip also caps positive advantages",
        OBJ + "ppo_clip.py",
        "dual = (advantages < 0) & (loss > cap)",
        "dual = loss > cap",
        LOSS_TESTS,
    ),
    Mutant(
        "TIS weight clamped from below instead of above",
        PL + "head.py",
        "pg_weights = weights * raw_weight.clamp(max=options.tis_cap)",
        "pg_weights = weights * raw_weight.clamp(min=options.tis_cap)",
        LOSS_TESTS,
    ),
    Mutant(
        "entropy bonus gradient with the wrong sign",
        PL + "head.py",
        "grad_entropy = -options.entropy_coef * weights",
        "grad_entropy = options.entropy_coef * weights",
        LOSS_TESTS,
    ),
    Mutant(
        "mask ignored in the behavior_logprob_gap metric",
        PL + "head.py",
        "masked_mean((logprobs - inputs.behavior_logprobs).abs(), active)",
        "(logprobs - inputs.behavior_logprobs).abs().mean()",
        LOSS_TESTS,
    ),
    Mutant(
        "temperature multiplies the logits instead of dividing",
        PL + "torch_path.py",
        "        logits.div_(temperature)\n",
        "        logits.mul_(temperature)\n",
        LOSS_TESTS,
    ),
    Mutant(
        "d-logits miss the 1/temperature factor",
        PL + "torch_path.py",
        "        grad.div_(temperature)\n",
        "        grad.mul_(1.0)\n",
        LOSS_TESTS,
    ),
    Mutant(
        "Triton d-logits kernel: wrong sign of the entropy term",
        PL + "triton_path.py",
        "(z_safe - lse[:, None] + entropy[:, None])",
        "(z_safe - lse[:, None] - entropy[:, None])",
        LOSS_TESTS,
    ),
    Mutant(
        "Triton vocabulary-split combine forgets to rescale the partial sums",
        PL + "triton_path.py",
        "total = (sum_exp * rescale).sum(0)",
        "total = sum_exp.sum(0)",
        LOSS_TESTS,
    ),
    Mutant(
        "biased (n) instead of unbiased (n-1) group std",
        ADV + "torch_path.py",
        "(counts - ddof).clamp_min(1.0)",
        "counts.clamp_min(1.0)",
        ADVANTAGE_TESTS,
    ),
    Mutant(
        "groups of one member normalized instead of 0",
        ADV + "torch_path.py",
        "has_stats = member_counts >= 2 if valid is None",
        "has_stats = member_counts >= 1 if valid is None",
        ADVANTAGE_TESTS,
    ),
    Mutant(
        "batch scale with a biased std",
        ADV + "torch_path.py",
        "squared.sum() / (num_members - ddof).clamp_min(1)",
        "squared.sum() / num_members.clamp_min(1)",
        ADVANTAGE_TESTS,
    ),
    Mutant(
        "turn horizon fused with the session weight",
        ADV + "torch_path.py",
        "fused = options.turn_weight * turn_advantages",
        "fused = options.session_weight * turn_advantages",
        ADVANTAGE_TESTS,
    ),
    Mutant(
        "native backend gets the turn weight for the session horizon too",
        ADV + "custom_ops.py",
        "        options.turn_weight,\n        options.session_weight,\n",
        "        options.turn_weight,\n        options.turn_weight,\n",
        ADVANTAGE_TESTS,
    ),
    Mutant(
        "token_weights of policy_loss_from_logprobs ignored",
        PL + "head.py",
        "        weights = weights * cast(token_weights)\n",
        "        weights = weights * 1.0\n",
        LOSS_TESTS,
    ),
    Mutant(
        "fused_policy_loss backward ignores the upstream gradient",
        PL + "custom_ops.py",
        "torch.mul(saved, grad_loss.to(saved.dtype),",
        "torch.mul(saved, torch.ones_like(grad_loss).to(saved.dtype),",
        LOSS_TESTS,
    ),
    Mutant(
        "policy_loss_from_logits backward ignores the upstream gradient",
        PL + "custom_ops.py",
        "    scale = grad_loss.to(lse.dtype)\n",
        "    scale = torch.ones_like(grad_loss).to(lse.dtype)\n",
        LOSS_TESTS,
    ),
    Mutant(
        "policy_loss_from_logprobs backward ignores the upstream gradient",
        PL + "custom_ops.py",
        "(grad_logprobs * grad_loss.to(grad_logprobs.dtype))",
        "(grad_logprobs * torch.ones_like(grad_loss).to(grad_logprobs.dtype))",
        LOSS_TESTS,
    ),
    Mutant(
        "token_logprobs backward ignores the upstream gradient of the log-probs",
        PL + "custom_ops.py",
        "    if grad_logprobs is None:\n        grad_logprobs = torch.zeros_like(lse)\n",
        "    grad_logprobs = torch.ones_like(lse)\n",
        LOSS_TESTS,
    ),
    Mutant(
        "ratio_mean counts masked tokens",
        PL + "head.py",
        'metrics["ratio_mean"] = masked_mean(ratio, active)',
        'metrics["ratio_mean"] = ratio.sum() / max(ratio.numel(), 1)',  # no NaN on an empty batch
        LOSS_TESTS,
    ),
    Mutant(
        "behavior log-probs rotated by one position within each agent turn",
        "duca_fast/rollout/driver.py",
        "logprobs=completion.logprobs)",
        "logprobs=list(completion.logprobs[1:]) + list(completion.logprobs[:1]))",
        ("tests/rollout/test_rollout_driver.py",),
    ),
    Mutant(
        "async driver: a request's seed from its slot in the rollout instead of its session spec",
        "duca_fast/rollout/driver.py",
        "return (self.config.seed * 1_000_003 + state.spec.seed * 1009 + turn) % 2**31",
        "return (self.config.seed * 1_000_003 + state.index * 1009 + turn) % 2**31",
        ("tests/rollout/test_rollout_driver.py", "tests/rollout/test_async_driver.py"),
    ),
    Mutant(
        "over-sampling: waits for one group more than asked",
        "duca_fast/rollout/driver.py",
        "if needed is not None and len(complete) >= needed:",
        "if needed is not None and len(complete) > needed:",
        ("tests/rollout/test_async_driver.py",),
    ),
    Mutant(
        "async driver: requests in flight at the end are not aborted in the engine",
        "duca_fast/rollout/driver.py",
        "            engine.abort(list(self.waiting))",
        "            engine.abort([])",
        ("tests/rollout/test_async_driver.py",),
    ),
    Mutant(
        "GOPO: ranks divided by G instead of G - 1",
        ADV + "gopo.py",
        "spread = 2.0 - 4.0 * rank.double() / (size - 1).clamp_min(1)",
        "spread = 2.0 - 4.0 * rank.double() / size",
        ("tests/ops/test_gopo.py",),
    ),
    Mutant(
        "optimal token baseline: sum p^2 subtracted from the path weight",
        ADV + "optimal_baseline.py",
        "weight = 1 - 2 * torch.exp(old_logprobs.to(dtype)) + sum_p2.to(dtype)",
        "weight = 1 - 2 * torch.exp(old_logprobs.to(dtype)) - sum_p2.to(dtype)",
        ("tests/integrations/test_verl_optimal_baseline.py",),
    ),
    Mutant(
        "DynaMO: the damping's sigmoid centred at 0.5 instead of 0.99",
        ADV + "dynamo.py",
        "decay = lambda_min + (1 - lambda_min) / (1 + torch.exp(50 * (x - 0.99)))",
        "decay = lambda_min + (1 - lambda_min) / (1 + torch.exp(50 * (x - 0.5)))",
        ("tests/ops/test_dynamo.py",),
    ),
    Mutant(
        "token advantages: token_turn -1 takes the last turn's advantage instead of 0",
        ADV + "torch_path.py",
        "torch.where(has_loss, fused[problem.token_turn.long().clamp_min(0)], fused.new_zeros(()))",
        "fused[problem.token_turn.long()]",
        ADVANTAGE_TESTS,
    ),
    Mutant(
        "token advantages broadcast from the next turn (off by one)",
        ADV + "torch_path.py",
        "fused[problem.token_turn.long().clamp_min(0)]",
        "fused[(problem.token_turn.long() + 1).clamp(0, fused.shape[0] - 1)]",
        ADVANTAGE_TESTS,
    ),
    Mutant(
        "top-entropy mask keeps the low-entropy tokens instead",
        PL + "head.py",
        "kept = active & (entropy.float() >= threshold)",
        "kept = active & (entropy.float() <= threshold)",
        ("tests/ops/test_objectives.py",),
    ),
    Mutant(
        "off-policy mask drops positive advantages instead of negative ones",
        PL + "head.py",
        "dropped = active & drifted & (inputs.advantages < 0)",
        "dropped = active & drifted & (inputs.advantages > 0)",
        ("tests/ops/test_objectives.py",),
    ),
    Mutant(
        "chunk driver hands the head the previous chunk's statistics in a backward",
        PL + "chunks.py",
        "lse, entropy = saved[0][rows], saved[1][rows]",
        "lse, entropy = saved[0][rows].roll(1), saved[1][rows]",
        LOSS_TESTS,
    ),
    Mutant(
        "ProxMO: PSC success and failure weights swapped",
        ADV + "proxmo.py",
        "return torch.where(scores > options.success_threshold, success, failure)",
        "return torch.where(scores > options.success_threshold, failure, success)",
        ("tests/ops/test_proxmo.py",),
    ),
    Mutant(
        "ProxMO torch path: returns not discounted (gamma ignored)",
        ADV + "proxmo.py",
        "torch.tensor(gamma, dtype=torch.float64) ** distance.clamp_min(0)",
        "torch.tensor(1.0, dtype=torch.float64) ** distance.clamp_min(0)",
        ("tests/ops/test_proxmo.py",),
    ),
    Mutant(
        "ProxMO Triton: the turn itself left out of its proximity softmax",
        ADV + "proxmo_triton.py",
        "other_live = inside & (tl.load(valid_ptr + other, mask=inside, other=0) != 0)",
        "other_live = inside & (other != turns) & (tl.load(valid_ptr + other, mask=inside, other=0) != 0)",
        ("tests/ops/test_proxmo.py",),
    ),
    Mutant(
        "Dual-Track: the population std divides by n - 1 (torch path)",
        ADV + "torch_path.py",
        'ddof = 1.0 if options.std == "unbiased" else 0.0',
        "ddof = 1.0",
        ("tests/ops/test_dual_track.py",),
    ),
    Mutant(
        "Dual-Track: the clamp ignored in the Triton kernel",
        ADV + "triton_path.py",
        "advantage = tl.minimum(tl.maximum(advantage, -clip), clip)",
        "advantage = advantage + 0.0 * clip",
        ("tests/test_advantages.py",),
    ),
    Mutant(
        "dual_track estimator takes the clamp of algo.advantage instead of algo.dual_track_clip",
        "duca_fast/train/algorithms.py",
        "clip=inputs.algo.dual_track_clip)",
        "clip=inputs.algo.advantage.clip)",
        ("tests/train/test_algorithms.py::test_dual_track_is_duca_with_population_std_and_a_clamp",),
    ),
    Mutant(
        "otb estimator: the session reward not added on the session's last token",
        "duca_fast/train/algorithms.py",
        "torch.where(last_of_session, session_reward, 0.0)",
        "torch.where(~last_of_session, session_reward, 0.0)",
        (
            "tests/train/test_algorithms.py::test_proxmo_and_otb_need_their_inputs_and_match_the_ops",
            "tests/train/test_algorithms.py::test_otb_per_agent_token_matches_the_loop_reference",
        ),
    ),
    Mutant(
        "otb Triton path: masked tokens' path weights enter the bucket sums",
        ADV + "optimal_baseline_triton.py",
        """weight = tl.load(path_ptr + other, mask=inside, other=0.0) * tl.load(
            loss_ptr + other, mask=inside, other=0.0
        )""",
        "weight = tl.load(path_ptr + other, mask=inside, other=0.0)",
        ("tests/ops/test_otb_reference.py",),
    ),
    Mutant(
        "otb on the text task: each agent token's log-prob and sum p^2 taken one row late",
        "duca_fast/train/tasks/sales.py",
        '"agent_token_logprobs": torch.roll(logprobs, 1)[agent],',
        '"agent_token_logprobs": logprobs[agent],',
        ("tests/train/test_trainer.py::test_otb_gives_every_agent_token_its_own_advantage_on_the_text_task",),
    ),
    Mutant(
        "verl duca_tir_otb counts positions over every token (the single-turn form)",
        "duca_fast/integrations/verl_estimators.py",
        'TIR_OTB_NAME, "loss_tokens",',
        'TIR_OTB_NAME, "all",',
        ("tests/integrations/test_verl_estimators.py",),
    ),
    Mutant(
        "DynaMO priority: biased variance (G^2 instead of G (G - 1))",
        "duca_fast/rollout/allocation.py",
        "variance = successes * (trials - successes) / (trials * (trials - 1))",
        "variance = successes * (trials - successes) / (trials * trials)",
        ("tests/rollout/test_allocation.py::test_by_hand_and_priority",),
    ),
    Mutant(
        "carry-over: an aborted turn's opening tokens kept when its session is suspended",
        "duca_fast/rollout/driver.py",
        "state.take_back(length)  # the turn is sampled again, with the weights of its next rollout",
        "pass",
        (
            "tests/rollout/test_async_driver.py::test_carry_over_suspends_the_unfinished_group_and_the_next_rollout_finishes_it",
        ),
    ),
    Mutant(
        "carry-over: a replayed customer's answers not compared with the recorded ones",
        "duca_fast/rollout/driver.py",
        "if result.done or result.customer_message != answer:",
        "if result.done:",
        (
            "tests/rollout/test_async_driver.py::test_carried_sessions_read_back_from_records_replay_and_go_on_alike",
        ),
    ),
    Mutant(
        "carry-over: the step draws new scenarios for the carried groups too",
        "duca_fast/train/loop.py",
        "picked = self.cursor.take(wanted - task.carried_groups())",
        "picked = self.cursor.take(wanted)",
        (
            "tests/train/test_trainer.py::test_carry_over_finishes_the_left_groups_next_step_and_resumes_exactly",
        ),
    ),
    Mutant(
        "reward judge: a session source scored on every turn",
        "duca_fast/env/sales.py",
        'chosen = [s for s in self.reward_sources if s.horizon == "turn" or ends]',
        "chosen = list(self.reward_sources)",
        (
            "tests/env/test_reward_sources.py::test_judge_scores_turns_and_sessions_with_its_rubric_and_retries",
        ),
    ),
]


def apply(mutant: Mutant, root: Path) -> None:
    path = root / mutant.path
    text = path.read_text()
    count = text.count(mutant.old)
    if count != 1:
        raise SystemExit(f"mutant {mutant.name!r}: expected the text once in {mutant.path}, found {count}")
    path.write_text(text.replace(mutant.old, mutant.new))


def run_mutant(mutant: Mutant, timeout: float) -> tuple[bool, float, str]:
    """``(caught, seconds, last line of pytest)`` for one mutant run in a fresh copy."""
    with tempfile.TemporaryDirectory(prefix="duca-mutant-") as tmp:
        copy = Path(tmp)
        shutil.copytree(ROOT / "duca_fast", copy / "duca_fast", ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copytree(ROOT / "tests", copy / "tests", ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copytree(ROOT / "configs", copy / "configs")  # the trainer tests' configs/*.yaml
        for name in ("pyproject.toml",):
            shutil.copy(ROOT / name, copy / name)
        apply(mutant, copy)
        env = dict(os.environ, PYTHONPATH=str(copy), PYTHONDONTWRITEBYTECODE="1")
        # The copy has no build/: point it at this checkout's native library (built in main()).
        env.setdefault(native.LIBRARY_ENV, str(native.library_path()))
        # Triton caches interpreted kernels by source; a fresh cache keeps the planted kernel bug live.
        env["TRITON_CACHE_DIR"] = str(copy / ".triton")
        command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *mutant.tests]
        started = time.perf_counter()
        try:
            result = subprocess.run(
                command, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout
            )
        except subprocess.TimeoutExpired:
            return (
                False,
                time.perf_counter() - started,
                f"timed out after {timeout:.0f} s (not counted as caught)",
            )
        lines = [line for line in result.stdout.splitlines() if line.strip()]
        return result.returncode != 0, time.perf_counter() - started, lines[-1] if lines else ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="run the mutants whose name contains one of these words")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per mutant")
    args = parser.parse_args()
    mutants = [m for m in MUTANTS if not args.only or any(word in m.name for word in args.only)]
    if args.list:
        for mutant in mutants:
            print(f"{mutant.path}: {mutant.name}")
        return 0
    if not native.available():
        native.build_library()
    caught = 0
    for mutant in mutants:
        was_caught, seconds, last = run_mutant(mutant, args.timeout)
        caught += was_caught
        print(
            f"{'caught  ' if was_caught else 'SURVIVED'} {seconds:6.1f} s  {mutant.name}  [{last}]",
            flush=True,
        )
    print(f"caught {caught} of {len(mutants)} planted bugs")
    return 0 if caught == len(mutants) else 1


if __name__ == "__main__":
    sys.exit(main())
