"""The exact-resume check the training tests share: one run trained whole, the same run stopped
and resumed, compared step by step."""

from __future__ import annotations

from unmask.train.trainer import train


def whole_and_resumed(cfg):
    """Train `cfg("a")` to its end, and `cfg("b", stop_at=4)` then `cfg("b", resume="auto")`;
    assert the interrupted run's losses equal the whole run's bit for bit (8 steps: 1-4 before the
    stop, 5-8 after the resume). Returns (whole, first, rest) for checks of their own."""
    whole = train(cfg("a"))
    first = train(cfg("b", stop_at=4))
    rest = train(cfg("b", resume="auto"))
    assert first.losses == {s: whole.losses[s] for s in range(1, 5)}
    assert rest.losses == {s: whole.losses[s] for s in range(5, 9)}  # bit-exact, not approx
    return whole, first, rest
