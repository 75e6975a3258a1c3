"""An exponential moving average of the network's weights (a "mean teacher") for the cleansing rounds.

The network that judges and repairs labels in a round is, by default, the one being trained: its prediction at the
end of an epoch carries the noise of the last few batches. The average of its recent weights predicts more stably
(Tarvainen and Valpola, NeurIPS 2017), so the agreement test and the filter's losses see fewer one-epoch errors.
The average never trains; it only follows.
"""

from __future__ import annotations

import copy

import torch
from ignite.engine import Engine, Events

from scripts.network import unwrap

__all__ = ["ema_update", "MeanTeacher"]


@torch.no_grad()
def ema_update(teacher: torch.nn.Module, student: torch.nn.Module, decay: float) -> None:
    """``teacher ← decay · teacher + (1 − decay) · student`` for parameters; buffers (batch-norm statistics, counters)
    are copied, as the teacher's own statistics would describe weights it never had."""
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay must lie in [0, 1], got {decay}")
    t_params, s_params = list(teacher.parameters()), list(student.parameters())
    if len(t_params) != len(s_params):
        raise ValueError("teacher and student have different parameter lists")
    torch._foreach_lerp_(t_params, [p.detach() for p in s_params], 1.0 - decay)
    for t, s in zip(teacher.buffers(), student.buffers()):
        t.copy_(s)


class MeanTeacher:
    """Keep ``teacher``, an exponential moving average of ``network``, updated after every training iteration.

    Args:
        network: the trained network (a ``DistributedDataParallel`` wrapper is looked through).
        decay: weight of the old average per iteration; the average spans about ``1 / (1 - decay)`` iterations.

    ``teacher`` is what :class:`scripts.handlers.SelfCleansing` takes as ``network`` in the configs that use it; its
    weights belong in the checkpoint (``state_dict``), so a resumed run continues the same average.
    """

    def __init__(self, network: torch.nn.Module, decay: float = 0.99) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must lie in [0, 1], got {decay}")
        self.student = unwrap(network)
        self.teacher = copy.deepcopy(self.student)
        self.teacher.requires_grad_(False)
        self.decay = float(decay)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        ema_update(self.teacher, self.student, self.decay)

    def state_dict(self) -> dict:
        return self.teacher.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.teacher.load_state_dict(state)
