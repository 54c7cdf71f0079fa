"""`duca-fast`: train, eval, compare, bench.

    duca-fast train   [--config FILE] [--resume [--force] | --overwrite] [key=value ...]
    duca-fast eval    [--config FILE] [--checkpoint DIR|latest|none] [--sessions N] [--seed S] [key=value ...]
    duca-fast compare [--config FILE] --algos duca,grpo --seeds 10|21,22 [--tune] [--tradeoff] [--out DIR] ...
    duca-fast bench   [--only advantages,policy_loss,rollout,train] [--out DIR]

Overrides use the config's dotted keys (``optim.lr=1e-4 rollout.group_size=8``); see
``duca_fast/train/config.py`` for every key and its meaning. Options and overrides may come in any order.
Exit codes: 0 done, 1 the run failed (non-finite gradient, sessions failing), 2 bad config, arguments
or run directory, 3 a distributed collective failed, 130 interrupted (Ctrl-C; resume with --resume).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

BENCHES = ("advantages", "policy_loss", "rollout", "train")


TRUST_HELP = (
    "load a checkpoint whose trainer state is a pickle (duca_fast 0.1): only for runs you wrote yourself, "
    "since unpickling can run code hidden in the file"
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="duca-fast", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a policy (the run directory is run_dir)")
    train.add_argument("--config", help="YAML config (configs/demo.yaml, configs/acts.yaml, ...)")
    train.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in run_dir")
    train.add_argument(
        "--overwrite", action="store_true", help="delete the run in run_dir and start a new one there"
    )
    train.add_argument(
        "--force",
        action="store_true",
        help="with --resume: accept overrides that change what the run is (algorithm, group size, model)",
    )
    train.add_argument("--trust-checkpoint", action="store_true", help=TRUST_HELP)
    train.add_argument(
        "--verbose", action="store_true", help="also print the engines' log lines (always in logs/engine.log)"
    )
    train.add_argument("overrides", nargs="*", help="key=value config overrides")

    evaluate = commands.add_parser("eval", help="run sessions with a checkpoint and print the metrics table")
    evaluate.add_argument("--config", help="YAML config of the run")
    evaluate.add_argument(
        "--checkpoint",
        default="latest",
        help="checkpoint dir, 'latest' (of run_dir) or 'none' (the initial policy, before any training)",
    )
    evaluate.add_argument("--sessions", type=int, help="sessions to run (default: eval_sessions)")
    evaluate.add_argument("--seed", type=int, help="seed of the held-out customers (default: eval_seed)")
    evaluate.add_argument(
        "--sampled",
        action="store_true",
        help="sample at the rollout temperature (request seeds from --seed) instead of greedy decoding",
    )
    evaluate.add_argument("--trust-checkpoint", action="store_true", help=TRUST_HELP)
    evaluate.add_argument("--out", help="also write the metrics as JSON here")
    evaluate.add_argument("overrides", nargs="*", help="key=value config overrides")

    compare = commands.add_parser(
        "compare", help="a study: algorithms x seeds on one budget, CIs, permutation tests, plots"
    )
    compare.add_argument("--config", help="YAML config shared by all runs")
    compare.add_argument("--algos", default="duca,grpo,gdpo", help="comma-separated algorithms")
    compare.add_argument("--seeds", default="10", help="a count (seeds 0..N-1) or a list such as 21,22,23")
    compare.add_argument("--baseline", default="grpo", help="algorithm the paired tests compare against")
    compare.add_argument("--out", default="runs/compare", help="output directory")
    compare.add_argument(
        "--sessions", type=int, help="evaluation sessions per eval seed (default: eval_sessions)"
    )
    compare.add_argument("--eval-seeds", default="0,1,2", help="held-out customer seeds (a count or a list)")
    compare.add_argument(
        "--tune", action="store_true", help="lr x entropy sweep per algorithm, then its best"
    )
    compare.add_argument("--tune-lrs", default="2.5e-3,5e-3,1e-2", help="learning rates of --tune")
    compare.add_argument("--tune-entropy", default="0,0.01", help="entropy coefficients of --tune")
    compare.add_argument("--tune-seeds", type=int, default=2, help="seeds per --tune setting")
    compare.add_argument(
        "--tradeoff", nargs="?", const="1:0.25,1:1,0.25:1", help="turn_weight:session_weight pairs to sweep"
    )
    compare.add_argument("--workers", type=int, default=2, help="runs trained in parallel processes")
    compare.add_argument("overrides", nargs="*", help="key=value config overrides")

    bench = commands.add_parser("bench", help="run the benchmark suite (results in --out)")
    bench.add_argument("--only", default=",".join(BENCHES), help=f"comma-separated subset of {BENCHES}")
    bench.add_argument(
        "--out",
        default="runs/bench",
        help="results folder (CSV and Markdown); the committed bench/results/ only when named here",
    )
    return parser


def _parse(argv: list[str] | None) -> argparse.Namespace:
    """Options and ``key=value`` overrides in any order (argparse's intermixed parsing, per command)."""
    parser = _parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    if not argv or argv[0] not in commands.choices:
        return parser.parse_args(argv)  # help, or the "invalid choice" error
    args = commands.choices[argv[0]].parse_intermixed_args(argv[1:])
    args.command = argv[0]
    return args


def _resolve_checkpoint(spec: str, run_dir: str) -> Path | None:
    from duca_fast.train.checkpoint import CheckpointError, latest_checkpoint

    if spec == "none":
        return None
    if spec == "latest":
        found = latest_checkpoint(run_dir)
        if found is None:
            raise CheckpointError(
                f"no complete checkpoint under {Path(run_dir) / 'checkpoints'}; pass --checkpoint"
            )
        return found
    path = Path(spec)
    if not path.is_dir():
        raise CheckpointError(f"--checkpoint {spec!r} is not a directory")
    return path


def _print_table(metrics: dict[str, float]) -> None:
    width = max(len(k) for k in metrics)
    print(f"| {'metric'.ljust(width)} | value |\n|{'-' * (width + 2)}|-------|")
    for key, value in metrics.items():
        print(f"| {key.ljust(width)} | {value:.4g} |")


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    from duca_fast.train.checkpoint import CheckpointError
    from duca_fast.train.config import ALGORITHMS, ConfigError, load_config
    from duca_fast.train.distributed import DistributedError
    from duca_fast.train.loop import (
        NonFiniteGradientError,
        RolloutFailureError,
        TrainingInterrupted,
        evaluate,
        train,
    )
    from duca_fast.train.records import strict_json
    from duca_fast.train.rundir import RunDirError

    try:
        if args.command == "bench":
            return _bench(args.only, Path(args.out))
        if args.command == "compare":
            algos = [a.strip() for a in args.algos.split(",") if a.strip()]
            unknown = [a for a in algos if a not in ALGORITHMS]
            if unknown or not algos:
                known = ", ".join(ALGORITHMS)
                raise ConfigError(f"--algos: unknown algorithms {unknown}; choose from {known}")
        if args.command == "eval" and args.sessions is not None and args.sessions < 1:
            raise ConfigError(f"--sessions must be >= 1, got {args.sessions}")
        if args.command == "train" and args.force and not args.resume:
            raise ConfigError("--force only applies with --resume")
        overrides = list(args.overrides)
        if args.command == "train" and args.verbose:
            overrides.append("verbose=true")
        config = load_config(args.config, overrides)
        if args.command == "train":
            run_dir = train(
                config,
                resume=args.resume,
                overwrite=args.overwrite,
                force=args.force,
                trust_checkpoint=args.trust_checkpoint,
            )
            print(f"run directory: {run_dir}")
        elif args.command == "eval":
            checkpoint = _resolve_checkpoint(args.checkpoint, config.run_dir)
            seed = config.eval_seed if args.seed is None else args.seed
            sessions = args.sessions or config.eval_sessions
            metrics = evaluate(
                config,
                checkpoint,
                sessions,
                seed,
                sampled=args.sampled,
                trust_checkpoint=args.trust_checkpoint,
            )
            _print_table(metrics)
            if args.out:
                Path(args.out).write_text(strict_json(metrics))
        elif args.command == "compare":
            from duca_fast.train.compare import compare, evaluate_policy, parse_seeds, parse_weights

            try:
                seeds, eval_seeds = parse_seeds(args.seeds), parse_seeds(args.eval_seeds)
                tradeoff = parse_weights(args.tradeoff) if args.tradeoff else None
                lrs = [float(x) for x in args.tune_lrs.split(",")]
                entropy = [float(x) for x in args.tune_entropy.split(",")]
            except ValueError as error:
                raise ConfigError(str(error)) from None
            table = compare(
                config,
                [a.strip() for a in args.algos.split(",") if a.strip()],
                seeds,
                Path(args.out),
                train,
                evaluate_policy,
                args.sessions or config.eval_sessions,
                eval_seeds=eval_seeds,
                baseline=args.baseline,
                tune=args.tune,
                tune_lrs=lrs,
                tune_entropy=entropy,
                tune_seeds=args.tune_seeds,
                tradeoff=tradeoff,
                workers=args.workers,
                command="duca-fast " + " ".join(sys.argv[1:] if argv is None else argv),
            )
            print(table)
    except (ConfigError, CheckpointError, RunDirError) as error:
        print(f"duca-fast {args.command}: error: {error}", file=sys.stderr)
        return 2
    except (NonFiniteGradientError, RolloutFailureError) as error:
        print(f"duca-fast {args.command}: error: {error}", file=sys.stderr)
        return 1
    except TrainingInterrupted as stop:
        print(f"duca-fast {args.command}: {stop}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        hint = "; resume with --resume (from the last checkpoint)" if args.command == "train" else ""
        print(f"duca-fast {args.command}: interrupted{hint}", file=sys.stderr)
        return 130
    except DistributedError as error:
        print(f"duca-fast {args.command}: error: {error}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        # Interpreter teardown with a broken process group can abort (SIGABRT) and bury the message.
        os._exit(3)
    return 0


def _bench(only: str, out: Path) -> int:
    chosen = [b.strip() for b in only.split(",") if b.strip()]
    unknown = sorted(set(chosen) - set(BENCHES))
    if unknown:
        print(f"duca-fast bench: error: unknown benchmarks {unknown}; choose from {BENCHES}", file=sys.stderr)
        return 2
    root = Path(__file__).resolve().parent.parent / "bench"
    if not root.is_dir():
        print(
            "duca-fast bench: error: bench/ is not next to the package (run from a source checkout)",
            file=sys.stderr,
        )
        return 2
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "DUCA_FAST_BENCH_RESULTS": str(out.resolve())}
    status = 0
    for name in chosen:
        print(f"== bench_{name}.py -> {out}", flush=True)
        command = [sys.executable, str(root / f"bench_{name}.py")]
        status |= subprocess.run(command, check=False, env=env).returncode
    return status


if __name__ == "__main__":
    sys.exit(main())
