"""Reward rules for the round tests: cheap, deterministic, and with spread on random models."""


def length_reward(prompt, response: str) -> float:
    return len(response) / 10.0


def raising_rule(prompt, response: str) -> float:
    raise RuntimeError("broken rule")


def nan_rule(prompt, response: str) -> float:
    return float("nan")
