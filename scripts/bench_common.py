"""Shared pieces of the benchmark modules: building the bundle's objects from its configs, timing, reporting."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import torch
from monai.bundle import ConfigParser

__all__ = ["parse_bundle", "best_of", "ratio_line"]


def parse_bundle(config_files: Sequence[str], overrides: dict | None = None) -> ConfigParser:
    """A ConfigParser over the merged bundle configs with overrides applied, as ``monai.bundle run`` would build."""
    parser = ConfigParser()
    parser.read_config(list(config_files))
    parser.read_meta("configs/metadata.json")
    for key, value in (overrides or {}).items():
        parser[key] = value
    return parser


def best_of(fn: Callable[[], float], repeats: int) -> list[float]:
    """Run a measurement ``repeats`` times; each call returns its own rate (items per second)."""
    return [fn() for _ in range(repeats)]


def ratio_line(name: str, ours: list[float], bare: list[float], unit: str) -> str:
    """Print both sides and return the final ``name <ratio>`` line (medians, measured interleaved)."""
    m_ours, m_bare = statistics.median(ours), statistics.median(bare)
    print(f"{'run':<8}{'bundle ' + unit:>22}{'bare ' + unit:>22}")
    for i, (a, b) in enumerate(zip(ours, bare)):
        print(f"{i:<8}{a:>22.2f}{b:>22.2f}")
    print(f"{'median':<8}{m_ours:>22.2f}{m_bare:>22.2f}   (torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads)")
    return f"{name} {m_ours / m_bare:.3f}"


def now() -> float:
    return time.perf_counter()
