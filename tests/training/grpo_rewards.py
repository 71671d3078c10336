"""Reward functions the GRPO tests import by path (``tests.training.grpo_rewards:...``)."""


def fragile(prompts, completions, rows):
    """Scores a completion's length, and raises on one containing 'boom'."""
    if any("boom" in c for c in completions):
        raise ValueError("boom")
    return [float(len(c)) for c in completions]


def not_numbers(prompts, completions, rows):
    return ["high" if i % 2 else 0.5 for i, _ in enumerate(completions)]


def hang(prompts, completions, rows):
    """Writes its process id where the row says, then never returns (a reward past its timeout)."""
    import os
    import time

    with open(rows[0]["pidfile"], "w") as fh:
        fh.write(str(os.getpid()))
    time.sleep(3600)
