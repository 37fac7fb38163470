"""Depth pruning: keep the `keep` decoder layers with the highest importance, in their original order.

    kept = select_layers(scores, keep)        # e.g. [0, 1, 3, 5, ...]
    model = drop_layers(model, kept)          # a copy; config.num_hidden_layers follows
"""
from __future__ import annotations

from .subset import keep_layers


def select_layers(scores: list[float], keep: int) -> list[int]:
    """Indices of the `keep` most important layers, ascending. Ties keep the earlier layer."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return sorted(order[:keep])


def drop_layers(model, kept: list[int]):
    """A copy of `model` with only the layers in `kept` (KV-cache indices renumbered)."""
    if kept == list(range(model.config.num_hidden_layers)):
        return model
    return keep_layers(model, kept)
