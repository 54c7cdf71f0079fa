"""Why HIAN: a big sparse session reward drowns small turn rewards unless each horizon is normalized alone.

One rollout group of 4 sales sessions with 3 agent turns each. Turn rewards (compliance, no
repetition) are small and dense; the session reward (deal value on conversion) is large and sparse.
GRPO-style merging sums everything into one session score; HIAN normalizes each horizon in its group
and then fuses them.
"""

import torch

from duca_fast import ops

# Session 1 and 3 convert (deal value 1000). Session 1 breaks a rule on turn 2 (turn reward -0.05);
# session 2 is the only one with clean turns throughout but does not convert.
turn_rewards = torch.tensor(
    [
        [0.02, 0.01, 0.02],  # session 0: fine, no sale
        [0.02, -0.05, 0.01],  # session 1: sale, but a compliance violation on turn 1
        [0.03, 0.03, 0.03],  # session 2: exemplary turns, no sale
        [0.01, 0.02, 0.02],  # session 3: sale
    ]
).flatten()
turn_session = torch.arange(4).repeat_interleave(3)
turn_index = torch.arange(3).repeat(4)
session_rewards = torch.tensor([0.0, 1000.0, 0.0, 1000.0])
session_group = torch.zeros(4, dtype=torch.long)

hian = ops.hian_advantages(turn_rewards, turn_session, session_rewards, session_group)
hian_positional = ops.hian_advantages(
    turn_rewards, turn_session, session_rewards, session_group, turn_scope="group_turn", turn_index=turn_index
)
merged = session_rewards + torch.zeros(4).index_add_(0, turn_session, turn_rewards)
grpo = ops.grpo_advantages(merged, session_group)[turn_session]

print(__doc__)
print(f"{'session':>7} {'turn':>4} {'turn r':>7} {'sess r':>7} | {'GRPO A':>8} {'HIAN A':>8} {'HIAN pos':>8}")
for t in range(turn_rewards.numel()):
    s = int(turn_session[t])
    print(
        f"{s:>7} {int(turn_index[t]):>4} {turn_rewards[t]:>7.2f} {session_rewards[s]:>7.0f} | "
        f"{grpo[t]:>8.3f} {hian[t]:>8.3f} {hian_positional[t]:>8.3f}"
    )
violation = 4
print(
    f"\nThe violating turn (session 1, turn 1) gets GRPO advantage {grpo[violation]:.3f}, the same as the "
    f"session's clean turns: the violation is invisible.\nUnder HIAN it gets {hian[violation]:.3f}, "
    f"below session 1's other turns ({hian[3]:.3f}, {hian[5]:.3f}): the turn signal survives."
)
