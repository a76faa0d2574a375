"""What the network predicts (official ``gdf.EpsilonTarget``, ``X0Target``, ``VTarget``).

Each target gives the training target and the two inversions the sampler needs:
predicted x0 and predicted ε from the noised input x_t = a·x0 + b·ε and the prediction.
"""

from __future__ import annotations

from typing import Callable, NamedTuple


class Target(NamedTuple):
    name: str
    target: Callable  # (x0, epsilon, a, b) -> training target
    to_x0: Callable  # (noised, pred, a, b) -> predicted x0
    to_epsilon: Callable  # (noised, pred, a, b) -> predicted epsilon


EPSILON = Target(
    "epsilon",
    target=lambda x0, epsilon, a, b: epsilon,
    to_x0=lambda noised, pred, a, b: (noised - pred * b) / a,
    to_epsilon=lambda noised, pred, a, b: pred,
)

X0 = Target(
    "x0",
    target=lambda x0, epsilon, a, b: x0,
    to_x0=lambda noised, pred, a, b: pred,
    to_epsilon=lambda noised, pred, a, b: (noised - pred * a) / b,
)


def _v_to_x0(noised, pred, a, b):
    # Divide by a² + b² (1 for VP) as the official code does, so non-VP scalers stay right.
    squared_sum = a**2 + b**2
    return a / squared_sum * noised - b / squared_sum * pred


def _v_to_epsilon(noised, pred, a, b):
    squared_sum = a**2 + b**2
    return b / squared_sum * noised + a / squared_sum * pred


V = Target("v", target=lambda x0, epsilon, a, b: a * epsilon - b * x0, to_x0=_v_to_x0,
           to_epsilon=_v_to_epsilon)

TARGETS = {t.name: t for t in (EPSILON, X0, V)}


def get_target(name: str) -> Target:
    if name not in TARGETS:
        raise ValueError(f"unknown diffusion target {name!r}; choose one of {sorted(TARGETS)}")
    return TARGETS[name]
