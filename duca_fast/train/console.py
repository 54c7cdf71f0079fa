"""A quiet console for training: the engines' log lines go to the run directory, the progress bar stays one
line, and the first lines say what the run is about to do.

vLLM logs INFO lines while it loads and after every weight push ("Reloading and processing weights took
...", "Successfully reset prefix cache"); printed, they break the progress bar twice a step. During a
run they go to ``<run_dir>/logs/engine.log`` instead (with ``verbose=true``, ``train --verbose``: to the
console too).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

ENGINE_LOGGERS = ("vllm",)
"""Loggers of the inference engines whose lines leave the console."""
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def route_engine_logs(path: Path, *, console: bool) -> Callable[[], None]:
    """Send the engine loggers to ``path`` (and, with ``console``, to stderr); returns the undo.

    Call it before vLLM is imported: without ``console`` vLLM is then told not to install its own console
    handler (``VLLM_CONFIGURE_LOGGING=0``); one already installed is detached until the undo."""
    if not console:
        os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")
    path.parent.mkdir(parents=True, exist_ok=True)
    file_handler = logging.FileHandler(path, encoding="utf-8")
    file_handler.setFormatter(logging.Formatter(LOG_FORMAT))
    undo: list[Callable[[], None]] = []
    for name in ENGINE_LOGGERS:
        logger = logging.getLogger(name)
        level, propagate = logger.level, logger.propagate
        logger.setLevel(logging.INFO)
        logger.addHandler(file_handler)
        consoles = [
            h for h in logger.handlers if isinstance(h, logging.StreamHandler) and h is not file_handler
        ]
        consoles = [h for h in consoles if not isinstance(h, logging.FileHandler)]
        added = None
        if console and not consoles:
            added = logging.StreamHandler()
            added.setFormatter(logging.Formatter(LOG_FORMAT))
            logger.addHandler(added)
        if not console:
            for handler in consoles:
                logger.removeHandler(handler)
            logger.propagate = False

        def restore(logger=logger, level=level, propagate=propagate, consoles=consoles, added=added):
            logger.removeHandler(file_handler)
            if added is not None:
                logger.removeHandler(added)
            if not console:
                for handler in consoles:
                    logger.addHandler(handler)
            logger.setLevel(level)
            logger.propagate = propagate

        undo.append(restore)

    def undo_all() -> None:
        for restore in undo:
            restore()
        file_handler.close()

    return undo_all


def intro_lines(config, run_dir: Path, resume_step: int | None) -> list[str]:
    """What the run is about to do, before anything slow starts (model conversion, engine start-up)."""
    rollout = config.rollout
    lines = [config.intro] if config.intro else []
    start = "" if not resume_step else f", resuming after step {resume_step}"
    lines.append(
        f"{config.env.name} / {config.algo.name}: {config.steps} steps of {rollout.groups_per_step} groups "
        f"x {rollout.group_size} sessions (up to {config.env.max_turns} agent turns each){start}"
    )
    if config.eval_before_after:
        lines.append(
            f"held-out evaluation before and after: {config.eval_sessions} fixed sessions, greedy, then a "
            "before/after table"
        )
    lines.append(f"run directory {run_dir}; engine logs in {run_dir / 'logs' / 'engine.log'}")
    return lines
