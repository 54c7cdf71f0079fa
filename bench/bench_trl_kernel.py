"""TRL's GRPO loss step, TRL's own head and loss vs ``DucaGRPOTrainer(use_duca_kernel=True)``.

One micro-batch through ``trainer._compute_loss`` and ``loss.backward()`` (the backbone's forward and
backward included, as in a training step), on SmolLM2-135M-Instruct (fp32, V=49152, from the local
GGUF package). The same batch for both: random prompt and completion tokens, one advantage per
completion (so both compute the same loss; TRL's default loss_type "dapo"), on-policy. Each variant
runs in a fresh process: peak RSS above the level before the step (the first step, before any reuse
of freed pages) and the median time of the following steps. ``--agent-share`` < 1 marks the rest of
each completion as tool results (``tool_mask`` 0), as in multi-turn dialogue.

TRL 1.16's ``use_liger_kernel=True`` no longer swaps the loss (it keeps TRL's fused LM head and applies
Liger's layer kernels only, which need a GPU), so it has no row here.

Usage: python bench/bench_trl_kernel.py [--rows 8] [--prompt 64] [--completion 256] [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_policy_loss import RssPeak  # noqa: E402
from bench.common import add_variant_arguments, rows_per_variant, run_identity, time_call, write_results  # noqa: E402

VARIANTS = ("trl", "duca_kernel")


def build_trainer(variant: str, model_dir: Path, tmp: Path):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from duca_fast.integrations.trl import DucaGRPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    args = GRPOConfig(
        output_dir=str(tmp / "out"),
        use_cpu=True,
        bf16=False,
        per_device_train_batch_size=4,
        num_generations=4,
        report_to="none",
        save_strategy="no",
    )
    common = dict(
        model=model,
        reward_funcs=lambda completions, **kwargs: [0.0] * len(completions),
        args=args,
        train_dataset=Dataset.from_dict({"prompt": ["hi"] * 4}),
        processing_class=tokenizer,
    )
    if variant == "trl":
        return GRPOTrainer(**common)
    return DucaGRPOTrainer(**common, turn_reward_func=lambda **kwargs: [], use_duca_kernel=True)


def make_batch(rows: int, prompt: int, completion: int, agent_share: float, vocab: int) -> dict:
    generator = torch.Generator().manual_seed(0)
    batch = {
        "prompt_ids": torch.randint(0, vocab, (rows, prompt), generator=generator),
        "prompt_mask": torch.ones(rows, prompt, dtype=torch.long),
        "completion_ids": torch.randint(0, vocab, (rows, completion), generator=generator),
        "completion_mask": torch.ones(rows, completion, dtype=torch.long),
        "advantages": torch.randn(rows, generator=generator),
        "num_items_in_batch": torch.tensor(float(rows * completion)),
    }
    if agent_share < 1.0:
        # Alternating 64-token turns: the agent's, then tool results, in the given proportion.
        agent = max(1, round(64 * agent_share / (1 - agent_share)))
        position = torch.arange(completion) % (agent + 64)
        batch["tool_mask"] = (position < agent).long().expand(rows, completion).clone()
    return batch


def measure(args) -> dict[str, object]:
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = build_trainer(args.variant, Path(args.model_dir), Path(tmp))
        trainer.model.train()
        trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop, which is not run here
        vocab = trainer.model.config.vocab_size
        batch = make_batch(args.rows, args.prompt, args.completion, args.agent_share, vocab)

        def step():
            trainer.model.zero_grad(set_to_none=True)
            loss = trainer._compute_loss(trainer.model, batch)
            loss.backward()
            return float(loss)

        with RssPeak() as meter:
            loss = step()
        seconds = time_call(step, device="cpu", repeats=args.repeats, warmup=0)
    return {
        "variant": args.variant,
        "loss": loss,
        "step_s": seconds,
        "peak_MiB": (meter.peak - meter.start) / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--completion", type=int, default=256)
    parser.add_argument(
        "--agent-share", type=float, default=1.0, help="share of completion tokens in the loss"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--name", default="trl_kernel_cpu")
    add_variant_arguments(parser, VARIANTS)
    args = parser.parse_args()
    rows = rows_per_variant(
        __file__, args, VARIANTS, measure, ("rows", "prompt", "completion", "agent_share", "repeats")
    )
    if rows is None:
        return
    base = rows[0]
    for row in rows:
        row["step_vs_trl"] = row["step_s"] / base["step_s"]
        row["peak_vs_trl"] = row["peak_MiB"] / base["peak_MiB"]
    tokens = args.rows * args.completion
    notes = (
        f"SmolLM2-135M-Instruct fp32 (H=576, V=49152), {args.rows} completions x {args.completion} tokens "
        f"after {args.prompt} prompt tokens ({tokens} completion tokens, {args.agent_share:.0%} in the "
        f"loss), loss_type dapo, one advantage per completion, on-policy; _compute_loss + backward, median "
        f"of {args.repeats} after the measured first step; peak RSS of the first step, fresh process per "
        "variant."
    )
    path = write_results(args.name, rows, run_identity("cpu"), notes)
    print(path.read_text())


if __name__ == "__main__":
    main()
