"""The step-makespan simulator of bench/project_rollout.py (rounds, async, over-sampling, carry-over)."""

import pytest

from bench.project_rollout import (
    TPOT_MS,
    async_makespan,
    async_step,
    carry_over_makespan,
    rounds_makespan,
    step_seconds,
)


def test_step_model_interpolates_the_published_points():
    for batch, ms in TPOT_MS:
        assert step_seconds(batch) == pytest.approx(ms / 1000)
    assert step_seconds(10) == pytest.approx((6.59 + (10.94 - 6.59) * 6 / 12) / 1000)
    assert step_seconds(128) > step_seconds(64)  # linear past the last point


def test_without_customer_latency_async_equals_rounds():
    sessions = [[(5, 0.0), (3, 0.0)], [(5, 0.0), (3, 0.0)]]
    expected = 8 * step_seconds(2)
    assert rounds_makespan(sessions, 256) == pytest.approx(expected)
    assert async_makespan(sessions, [0, 0], None, 256) == pytest.approx(expected)


def test_a_slow_customer_holds_every_round_but_only_its_own_session_under_async():
    slow, fast = [(4, 1.0), (4, 1.0)], [(4, 0.0)] * 4
    rounds = rounds_makespan([slow, fast], 256)
    # rounds: turn 1 (4 steps of 2) + 1 s + turn 2 (4 steps of 2) + 1 s + turns 3 and 4 (4 steps of 1 each)
    assert rounds == pytest.approx(8 * step_seconds(2) + 2.0 + 8 * step_seconds(1))
    asynchronous = async_makespan([slow, fast], [0, 1], None, 256)
    assert asynchronous < rounds
    # the fast session finishes all its turns while the slow one waits for its first answer
    assert async_makespan([slow, fast], [0, 1], 1, 256) == pytest.approx(
        4 * step_seconds(2) + 12 * step_seconds(1)
    )


def test_max_num_seqs_queues_the_rest():
    sessions = [[(2, 0.0)]] * 3
    assert async_makespan(sessions, [0, 1, 2], None, 2) == pytest.approx(
        2 * step_seconds(2) + 2 * step_seconds(1)
    )
    assert rounds_makespan(sessions, 2) == pytest.approx(2 * step_seconds(2) + 2 * step_seconds(1))


def test_a_carried_session_goes_on_from_its_turn_and_the_step_waits_for_answering_customers():
    # Session 0 carried at its last turn: one 4-token turn left; session 1 starts fresh.
    clock, turn, complete = async_step([[(4, 0.0)] * 2, [(4, 0.0)] * 3], [0, 1], [1, 0], 1, 256, carry=True)
    assert clock == pytest.approx(4 * step_seconds(2)) and turn == [2, 1] and complete == [0]
    # Session 1's customer answers 5 s after its turn: aborting ends the step at once, carrying waits.
    sessions, groups = [[(2, 0.0)], [(1, 5.0), (1, 0.0)]], [0, 1]
    aborted = async_step(sessions, groups, [0, 0], 1, 256, carry=False)[0]
    carried = async_step(sessions, groups, [0, 0], 1, 256, carry=True)[0]
    assert aborted == pytest.approx(step_seconds(2) + step_seconds(1))
    assert carried == pytest.approx(step_seconds(2) + 5.0)
    # A carried group that had already completed is complete before anything decodes.
    assert async_step(sessions, groups, [1, 0], 1, 256, carry=True)[:3:2] == (0.0, [0])


def test_carry_over_trains_the_surplus_group_of_the_last_step_first():
    """Identical sessions (2 turns of 3 tokens, customers answer at once), 1 group needed, 1 extra: both
    groups complete together; the surplus one is carried complete, so every other step takes no time."""

    def draw(count):
        return [[(3, 0.0), (3, 0.0)] for _ in range(count)]

    assert carry_over_makespan(draw, 1, 1, 1, 9, 256) == pytest.approx(6 * step_seconds(2) / 2)
