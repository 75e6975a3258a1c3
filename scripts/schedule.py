"""The epoch-dependent weights of the hybrid loss (Eq. 8)."""

from __future__ import annotations

__all__ = ["hybrid_weights"]


def hybrid_weights(epoch: int, e1: int, e2: int, lambda1_floor: float = 0.0) -> tuple[float, float]:
    """``(λ1, λ2)`` at 0-based ``epoch``: manual labels only before ``e1``, a linear cross-fade up to ``e2``,
    pseudo-labels only from ``e2`` on.

    ``lambda1_floor`` keeps a share of the manual-label loss after the cross-fade (the paper's schedule is
    ``lambda1_floor=0``); λ1 never drops below it and λ2 is unaffected.
    """
    if e2 < e1:
        raise ValueError(f"E2 ({e2}) must not come before E1 ({e1})")
    if not 0.0 <= lambda1_floor <= 1.0:
        raise ValueError(f"lambda1_floor must be in [0, 1], got {lambda1_floor}")
    if epoch < e1:
        lam2 = 0.0
    elif epoch >= e2:
        lam2 = 1.0
    else:
        lam2 = (epoch - e1) / (e2 - e1)
    return max(1.0 - lam2, lambda1_floor), lam2
