"""A reward that differs between completions (the tiny random policy solves nothing, so the
task's checker would give every row the same reward and every baseline would agree)."""


def reward(prompt: str, completion: str) -> float:
    return sum(ord(c) for c in completion) % 7 / 7.0


def coarse(prompt: str, completion: str) -> float:
    """0 or 1: a pair of completions ties about half the time."""
    return float(sum(ord(c) for c in completion) % 2)
