"""Switches given on the command line.

``python -m monai.bundle run`` reads command-line values as Python literals, so ``--key False`` arrives as the
boolean and ``--key false`` as the text ``"false"``, which ``bool()`` would take as on. The bundle's components read
their switches through :func:`as_flag`, which accepts either spelling and refuses anything else by name.
"""

from __future__ import annotations

__all__ = ["as_flag"]

_WORDS = {"true": True, "false": False}


def as_flag(value, name: str) -> bool:
    """``value`` as a boolean: ``True``/``False``, 0/1, or the words true/false in any case; anything else raises
    ``ValueError`` naming the switch."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _WORDS:
        return _WORDS[value.strip().lower()]
    raise ValueError(f"{name} is a switch: give True or False, got {value!r}")
