"""Adapters' overhead: TRL ``GRPOTrainer`` vs ``DucaGRPOTrainer`` step time, and verl's ``grpo`` / ``vanilla``
vs the adapter's ``duca_hian`` / ``duca_fused`` in verl's own ``compute_advantage`` and ``ppo_loss``.

TRL: the same tiny random Llama (SmolLM2 tokenizer, hidden 64, one layer), prompts, reward function and seed
for both trainers; DucaGRPOTrainer adds a turn reward function. Wall time per optimizer step from a
callback, median over the measured steps (the first is a warm-up). verl: the two functions on a
[rows, length] batch of random log-probs, median over repeats. Run with one thread (the script sets it).

Usage: OMP_NUM_THREADS=1 python bench/bench_integrations.py [--steps 8] [--rounds 2] [--repeats 20]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import run_identity, time_call, write_results  # noqa: E402


def trl_step_times(trainer_name: str, steps: int, tmp: Path) -> tuple[list[float], list[float], list[float]]:
    """Per-step wall times, per-batch generate+score times and per-batch time spent outside TRL's own
    ``_generate_and_score_completions`` (the adapter's work) of one trainer; warm-up step dropped."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from duca_fast.integrations.trl import DucaGRPOTrainer
    from duca_fast.rollout.models import build_tiny_model_dir, load_default_tokenizer

    tokenizer = load_default_tokenizer()
    model_dir = build_tiny_model_dir(tmp / "tiny", tokenizer=tokenizer, hidden_size=64, num_layers=1)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    step_times: list[float] = []
    score_times: list[float] = []
    trl_times: list[float] = []

    class StepClock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            step_times.append(time.perf_counter() - self.started)

    def session_reward(completions, **kwargs):
        return [float(len(c) % 3) for c in completions]

    def turn_reward(completions, turn_spans, **kwargs):
        return [[0.1 * (end - start) for start, end in spans] for spans in turn_spans]

    class TimedTRL(GRPOTrainer):
        def _generate_and_score_completions(self, inputs):
            started = time.perf_counter()
            output = super()._generate_and_score_completions(inputs)
            trl_times.append(time.perf_counter() - started)
            return output

    duca = trainer_name == "DucaGRPOTrainer"
    # MRO Timed -> DucaGRPOTrainer -> TimedTRL -> GRPOTrainer: TimedTRL clocks TRL's part alone.
    bases = (DucaGRPOTrainer, TimedTRL) if duca else (TimedTRL,)

    class Timed(*bases):
        def _generate_and_score_completions(self, inputs):
            started = time.perf_counter()
            output = super()._generate_and_score_completions(inputs)
            score_times.append(time.perf_counter() - started)
            return output

    extra = {"turn_reward_func": turn_reward} if duca else {}
    args = GRPOConfig(
        output_dir=str(tmp / "out"),
        use_cpu=True,
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=16,
        max_steps=steps,
        learning_rate=1e-4,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        seed=0,
        disable_tqdm=True,
        log_level="error",
    )
    trainer = Timed(
        model=model,
        reward_funcs=session_reward,
        args=args,
        train_dataset=Dataset.from_dict({"prompt": ["Hello, I want a laptop.", "Is it on sale?"] * 16}),
        processing_class=tokenizer,
        callbacks=[StepClock()],
        **extra,
    )
    trainer.train()
    adapter_times = [total - trl for total, trl in zip(score_times, trl_times)]
    return step_times[1:], score_times[1:], adapter_times[1:]


def verl_rows(rows: int, length: int, repeats: int) -> list[dict[str, object]]:
    import numpy as np
    from tensordict import TensorDict
    from verl import DataProto
    from verl.trainer.config import AlgoConfig
    from verl.trainer.ppo.ray_trainer import compute_advantage
    from verl.utils import tensordict_utils as tu
    from verl.workers.config import FSDPActorConfig
    from verl.workers.utils.losses import ppo_loss

    import duca_fast.integrations.verl  # noqa: F401  (registers duca_hian and duca_fused)

    generator = torch.Generator().manual_seed(0)
    mask = (torch.rand(rows, length, generator=generator) > 0.2).long()
    rewards = torch.randn(rows, length, generator=generator) * mask
    uids = np.array([f"g{i // 8}" for i in range(rows)], dtype=object)
    old = -torch.rand(rows, length, generator=generator) * 3
    log_prob = (old + 0.3 * torch.randn(rows, length, generator=generator)).requires_grad_()
    advantages = torch.randn(rows, length, generator=generator)
    prompt = torch.zeros(rows, 1, dtype=torch.long)
    result = []
    for estimator in ("grpo", "duca_hian"):

        def advantage_step(estimator=estimator):
            data = DataProto.from_dict(
                tensors={"token_level_rewards": rewards, "response_mask": mask}, non_tensors={"uid": uids}
            )
            compute_advantage(data, adv_estimator=estimator, config=AlgoConfig(adv_estimator=estimator))

        seconds = time_call(advantage_step, device="cpu", repeats=repeats)
        result.append({"stack": "verl", "what": f"compute_advantage {estimator}", "median_s": seconds})
    for mode in ("vanilla", "duca_fused"):
        config = FSDPActorConfig(
            strategy="fsdp",
            ppo_mini_batch_size=2,
            use_dynamic_bsz=True,
            ppo_max_token_len_per_gpu=64,
            rollout_n=1,
            policy_loss={"loss_mode": mode},
        )

        def loss_step(config=config):
            data = TensorDict(
                {
                    "prompts": prompt,
                    "responses": torch.zeros(rows, length, dtype=torch.long),
                    "attention_mask": torch.ones(rows, length + 1, dtype=torch.long),
                    "response_mask": mask,
                    "advantages": advantages,
                    "old_log_probs": old,
                },
                batch_size=[rows],
            )
            tu.assign_non_tensor(data, dp_size=1, batch_num_tokens=int(mask.sum()), global_batch_size=rows)
            flat = torch.cat([torch.cat([log_prob[r], log_prob.new_zeros(1)]) for r in range(rows)])
            log_prob.grad = None
            loss, _ = ppo_loss(config, {"log_probs": flat}, data)
            loss.backward()

        seconds = time_call(loss_step, device="cpu", repeats=repeats)
        result.append({"stack": "verl", "what": f"ppo_loss+backward {mode}", "median_s": seconds})
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--steps", type=int, default=8, help="TRL optimizer steps per trainer (first dropped)"
    )
    parser.add_argument("--rounds", type=int, default=2, help="alternating runs of each TRL trainer")
    parser.add_argument("--repeats", type=int, default=20, help="verl timing repeats")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--length", type=int, default=256)
    args = parser.parse_args()
    if args.steps < 6:
        parser.error("--steps must be >= 6 (a median over at least 5 measured steps)")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)

    names = ("GRPOTrainer", "DucaGRPOTrainer")
    measured: dict[str, tuple[list[float], list[float], list[float]]] = {n: ([], [], []) for n in names}
    for _ in range(args.rounds):  # alternate the trainers so drift of a shared machine hits both
        for name in names:
            with tempfile.TemporaryDirectory() as tmp:
                for collected, new in zip(measured[name], trl_step_times(name, args.steps, Path(tmp))):
                    collected.extend(new)
    rows = []
    for name in names:
        steps, scores, adapter = measured[name]
        rows.append(
            {
                "stack": "trl",
                "what": name,
                "median_s": statistics.median(steps),
                "measured": len(steps),
                "score_median_s": statistics.median(scores),
                "adapter_median_s": statistics.median(adapter),
            }
        )
    for row in verl_rows(args.rows, args.length, args.repeats):
        rows.append({**row, "measured": args.repeats, "score_median_s": "", "adapter_median_s": ""})
    notes = (
        "TRL: one optimizer step of a tiny random Llama (SmolLM2 tokenizer, hidden 64, 1 layer), "
        "8 completions "
        "(2 prompts x 4) of <= 16 tokens, single-turn; `median_s` per step, `score_median_s` of "
        "`_generate_and_score_completions` (generation, rewards, advantages), `adapter_median_s` of the "
        "DucaGRPOTrainer work around TRL's (turn function, HIAN, logging); "
        f"{args.rounds} alternating runs per trainer. verl: on "
        f"{args.rows} x {args.length} random log-probs. One thread; the machine was shared with other jobs."
    )
    print(write_results("integrations_cpu", rows, run_identity("cpu"), notes=notes).read_text())


if __name__ == "__main__":
    main()
