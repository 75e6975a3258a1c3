"""The epoch-dependent weights of the hybrid loss (Eq. 8), and choices that depend on the length of the schedule."""

from __future__ import annotations

import logging

__all__ = ["hybrid_weights", "by_schedule", "LONG_SCHEDULE"]

logger = logging.getLogger(__name__)

# epochs of cleansing rounds from which a schedule counts as long (see by_schedule)
LONG_SCHEDULE = 100


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


def by_schedule(epochs_after_warmup: int, short, long, long_from: int = LONG_SCHEDULE, name: str = "choice"):
    """``long`` when the cleansing rounds span at least ``long_from`` epochs, else ``short``; the choice is logged
    under ``name`` (the config key it fills).

    Any value or component can be chosen so: a pseudo-label source (``configs/variants/drop_long_schedule.json``),
    a target rule's setting (``train#cleansing#rules#leave_out_separation`` in ``configs/train.json``). Why the
    schedule decides: leaving flagged slices out of the loss costs their share of the data, which a short schedule
    cannot spare, while training them on candidates made from the network's own prediction teaches it its errors
    on them, which a long schedule has time to memorise. On ACDC at α 70%, β 10 (docs/README.md), after 12 epochs
    of rounds (the CPU profile) leaving them out cost 5 points against the prediction's agreement targets; after
    300 (the collapse profile) it gained 2. Any ``long_from`` from 13 to 300 decides those two alike; the default
    is about where the collapse profile's noisy Baseline starts to memorise its labels (its validation Dice peaked
    75 to 175 epochs into training on them, three seeds).

    Args:
        epochs_after_warmup: epochs from the first round to the end of training.
        short, long: the choices for a short and a long schedule.
        long_from: the number of epochs from which the schedule is long.
        name: what is chosen, for the log.
    """
    if epochs_after_warmup < 0 or long_from < 1:
        raise ValueError(f"need epochs_after_warmup >= 0 and long_from >= 1, got {epochs_after_warmup} and "
                         f"{long_from}")
    is_long = epochs_after_warmup >= long_from
    chosen = long if is_long else short
    logger.info(f"{name}: {epochs_after_warmup} epochs of rounds, a {'long' if is_long else 'short'} schedule "
                f"(long from {long_from}): {chosen!r}")
    return chosen
