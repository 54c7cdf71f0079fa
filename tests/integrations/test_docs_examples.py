"""The runnable examples of docs/integrations.md, executed as printed."""

import contextlib
import io
import re
from pathlib import Path

import torch

from tests.integrations.test_trl_adapter import hand_turn_advantages

DOC = Path(__file__).resolve().parents[2] / "docs" / "integrations.md"


def example(name: str) -> str:
    match = re.search(rf"<!-- runnable: {name} -->\n```python\n(.*?)```", DOC.read_text(), re.DOTALL)
    assert match, f"no runnable {name} example in {DOC}"
    return match.group(1)


def run(code: str) -> tuple[dict, str]:
    namespace: dict = {"__name__": "__docs__"}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, str(DOC), "exec"), namespace)
    return namespace, printed.getvalue()


def test_trl_example_trains_and_logs_duca_metrics(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace, printed = run(example("trl"))
    history = namespace["trainer"].state.log_history
    assert namespace["trainer"].state.global_step == 2
    for key in ("duca/turn_reward/mean", "duca/session_advantage/std", "duca/advantage/max"):
        assert key in history[0] and key in history[1], key
    assert "turn_quality/turns_per_completion" in history[0]
    assert "duca/turn_reward/mean" in printed


def test_verl_example_gives_hand_computed_advantages():
    namespace, _ = run(example("verl"))
    advantages = namespace["data"].batch["advantages"]
    (first, second) = hand_turn_advantages([[0.2, 0.5], [0.4, -0.1]], [1.0, 0.0], group_size=2)
    expected = torch.zeros(2, 8)
    expected[0, 0:2], expected[0, 4:7] = first[0], first[1]
    expected[1, 0:3], expected[1, 5:7] = second[0], second[1]
    torch.testing.assert_close(advantages, expected, rtol=1e-5, atol=1e-6)
