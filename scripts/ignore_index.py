"""The label value of pixels that carry no supervision.

A module of its own because the data code, the label math (noise, repair, targets) and the losses all need it,
and none of them should import another for a constant."""

__all__ = ["IGNORE_INDEX"]

IGNORE_INDEX = 255  # fits the uint8 pseudo-label store; no data set here has that many classes
