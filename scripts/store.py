"""The pseudo-label store: Y', the Clean/Noisy verdicts and their history, as checkpointable training state."""

from __future__ import annotations

import torch

from scripts.filtering import CLEANSE, KEEP_MANUAL

__all__ = ["PseudoLabelStore"]


class PseudoLabelStore:
    """Per-sample training state of self-cleansing, indexed by the stable sample id.

    Holds the pseudo-labels Y' as one (N, H, W) uint8 tensor in shared memory (so data loader workers read the
    current labels without copies), whether each sample has a pseudo-label yet, the latest verdicts (clean
    posteriors of the manual and of the pseudo-label) and, per cleansing round, the action taken for every sample.
    ``state_dict``/``load_state_dict`` make it an ordinary object for Ignite's ``Checkpoint``.

    Args:
        init: how Y' starts: ``"zeros"`` (the paper: all-background images, marked as having no pseudo-label yet)
            or ``"manual"`` (a copy of the manual labels, marked as having one).
        source: a file holding the store of an earlier run on the same training data (a state checkpoint of the
            bundle, where it is the ``"store"`` entry, or a saved :meth:`state_dict`); Y', verdicts and history
            start from it instead of from ``init``, so a new network can be trained on labels an earlier run
            cleansed.
    """

    def __init__(self, init: str = "zeros", source: str | None = None) -> None:
        if init not in ("zeros", "manual"):
            raise ValueError(f"unknown pseudo-label init '{init}': use 'zeros' or 'manual'")
        self.init, self.source = init, source or None
        self.labels = torch.zeros(0, 0, 0, dtype=torch.uint8)
        self.has_pseudo = torch.zeros(0, dtype=torch.bool)
        self.manual_clean_prob = torch.zeros(0)
        self.pseudo_clean_prob = torch.zeros(0)
        self.actions = torch.zeros(0, 0, dtype=torch.uint8)  # (rounds, N)
        self.rounds: list[dict] = []

    def __len__(self) -> int:
        return self.labels.shape[0]

    @property
    def initialised(self) -> bool:
        return len(self) > 0

    def initialise(self, manual_labels: torch.Tensor) -> None:
        """Size the store from the manual labels (N, H, W) and fill Y' as ``init`` says."""
        n = manual_labels.shape[0]
        if self.init == "manual":
            labels = manual_labels.to(torch.uint8).clone()
        else:
            labels = torch.zeros(manual_labels.shape, dtype=torch.uint8)
        self.labels = labels.share_memory_()
        self.has_pseudo = torch.full((n,), self.init == "manual", dtype=torch.bool)
        self.manual_clean_prob = torch.ones(n)
        self.pseudo_clean_prob = torch.ones(n)
        self.actions = torch.zeros(0, n, dtype=torch.uint8)
        self.rounds = []

    def ensure(self, manual_labels: torch.Tensor) -> None:
        """Initialise from ``manual_labels`` unless a checkpoint (or an earlier handler) already filled the store."""
        if self.initialised:
            return
        if self.source is None:
            self.initialise(manual_labels)
            return
        state = _read_store(self.source)
        if tuple(state["labels"].shape) != tuple(manual_labels.shape):
            raise ValueError(f"{self.source}: its pseudo-labels have shape {tuple(state['labels'].shape)}, the "
                             f"training data {tuple(manual_labels.shape)}; it was made on other data")
        self.load_state_dict(state)

    def get(self, index: int) -> torch.Tensor:
        return self.labels[index]

    def record_round(self, actions: torch.Tensor, new_labels: torch.Tensor, manual_clean_prob: torch.Tensor,
                     pseudo_clean_prob: torch.Tensor, summary: dict) -> None:
        """Write one round's outcome: the new Y' (in place, so workers see it), verdicts and history."""
        if new_labels.shape != self.labels.shape:
            raise ValueError(f"new pseudo-labels have shape {tuple(new_labels.shape)}, store has "
                             f"{tuple(self.labels.shape)}")
        self.labels.copy_(new_labels.to(torch.uint8))
        self.has_pseudo[:] = True
        self.manual_clean_prob = manual_clean_prob.float().cpu().clone()
        self.pseudo_clean_prob = pseudo_clean_prob.float().cpu().clone()
        self.actions = torch.cat([self.actions, actions.to(torch.uint8).cpu()[None]], 0)
        self.rounds.append(dict(summary))

    def record_refinement(self, refined: torch.Tensor, changed: torch.Tensor, summary: dict) -> None:
        """Record labels a competitor refined outside the cleansing round (Confident Learning, Superpixel-guided):
        Y' becomes ``refined``, the (N,) ``changed`` slices count as cleansed, the others as keeping their manual
        label, and no verdict posterior exists (all 1)."""
        changed = torch.as_tensor(changed, dtype=torch.bool).cpu()
        if changed.shape != (refined.shape[0],):
            raise ValueError(f"changed must flag each of the {refined.shape[0]} slices, got shape "
                             f"{tuple(changed.shape)}")
        actions = torch.full(changed.shape, KEEP_MANUAL, dtype=torch.uint8)
        actions[changed] = CLEANSE
        ones = torch.ones(len(changed))
        self.record_round(actions, refined, ones, ones, summary)

    def broadcast(self, src: int = 0) -> None:
        """Make this process's store a copy of rank ``src``'s: pseudo-labels, verdicts and history. A no-op unless
        ``torch.distributed`` runs with more than one process; every process of the group must call it."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return
        state = [self.state_dict() if dist.get_rank() == src else None]
        dist.broadcast_object_list(state, src=src)
        if dist.get_rank() != src:
            self.load_state_dict(state[0])

    def state_dict(self) -> dict:
        return {
            "init": self.init,
            "labels": self.labels.clone(),
            "has_pseudo": self.has_pseudo.clone(),
            "manual_clean_prob": self.manual_clean_prob.clone(),
            "pseudo_clean_prob": self.pseudo_clean_prob.clone(),
            "actions": self.actions.clone(),
            "rounds": [dict(r) for r in self.rounds],
        }

    def load_state_dict(self, state: dict) -> None:
        if self.initialised and tuple(state["labels"].shape) != tuple(self.labels.shape):
            raise ValueError(
                f"checkpointed pseudo-labels have shape {tuple(state['labels'].shape)}, but this data set gives "
                f"{tuple(self.labels.shape)}: was the checkpoint made on other data?"
            )
        self.init = state["init"]
        if self.initialised:
            self.labels.copy_(state["labels"])
        else:
            self.labels = state["labels"].clone().share_memory_()
        self.has_pseudo = state["has_pseudo"].clone()
        self.manual_clean_prob = state["manual_clean_prob"].clone()
        self.pseudo_clean_prob = state["pseudo_clean_prob"].clone()
        self.actions = state["actions"].clone()
        self.rounds = [dict(r) for r in state["rounds"]]


def _read_store(path: str) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise FileNotFoundError(f"pseudo-label source {path} does not exist") from None
    except Exception as err:
        raise ValueError(f"cannot read pseudo-label source {path}: {err}") from err
    if isinstance(state, dict) and "store" in state:
        state = state["store"]
    if not isinstance(state, dict) or "labels" not in state:
        raise ValueError(f"{path} holds no pseudo-label store (neither a bundle state checkpoint nor a store)")
    return state
