"""Filter-only comparison on one noise draw: which training slices does each approach call noisy?

The bundle's label filter (GMM-1 on the per-sample losses, as recorded in the last round of a finished
self-cleansing cell of the benchmark) against cleanlab's slice scores (:func:`slice_quality_scores`: the softmin
over a slice's pixels of the out-of-sample probability of the labelled class, the probabilities coming from two
teachers trained on half of the volumes each, as for Confident Learning). Both are scored against the simulated
noise of the same cell (a slice is truly noisy when its manual label differs from the clean one anywhere):

* at the share of slices the GMM flagged, cleanlab flags its lowest-scored slices of the same number; precision and
  recall of both;
* the average precision of each ranking (GMM: 1 − clean posterior; cleanlab: 1 − score), which needs no cut.

    python -m scripts.filter_compare --cell runs/bench_wv2/acdc-a70b10-dicece-self_cleansing-s0 \\
        --data acdc --profile cpu --out docs/results/filter_compare.csv
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import torch
from sklearn.metrics import average_precision_score

from scripts.bench_common import parse_bundle
from scripts.checkpointing import latest_checkpoint
from scripts.confident_learning import ConfidentLearningPhase, slice_quality_scores
from scripts.filtering import KEEP_MANUAL, filter_precision_recall
from scripts.metrics import noisy_slices
from scripts.registry import PROFILES
from scripts.store import PseudoLabelStore

__all__ = ["flag_lowest", "compare_rankings"]


def flag_lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """(N,) bool: the ``k`` slices with the lowest scores (ties broken by index)."""
    flags = torch.zeros(scores.shape[0], dtype=torch.bool)
    if k > 0:
        flags[torch.argsort(scores, stable=True)[:k]] = True
    return flags


def compare_rankings(true_noisy: torch.Tensor, gmm_noisy: torch.Tensor, gmm_clean_prob: torch.Tensor,
                     cleanlab_scores: torch.Tensor) -> list[dict]:
    """One row per approach: flagged count, precision, recall at the GMM's share, and average precision."""
    true_noisy = true_noisy.bool()
    k = int(gmm_noisy.sum())
    rows = []
    for name, flags, noisiness in (("gmm1_filter", gmm_noisy.bool(), 1 - gmm_clean_prob.double()),
                                   ("cleanlab_slice_score", flag_lowest(cleanlab_scores, k),
                                    1 - cleanlab_scores.double())):
        precision, recall = filter_precision_recall(flags, true_noisy)
        ap = float(average_precision_score(true_noisy.numpy(), noisiness.numpy())) if true_noisy.any() else float("nan")
        rows.append({"approach": name, "slices": int(true_noisy.numel()), "truly_noisy": int(true_noisy.sum()),
                     "flagged": int(flags.sum()), "precision": round(precision, 4), "recall": round(recall, 4),
                     "average_precision": round(ap, 4)})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cell", required=True, help="a finished self-cleansing cell folder of the benchmark")
    parser.add_argument("--data", default="acdc", choices=sorted({d for d, _ in PROFILES}))
    parser.add_argument("--profile", default="cpu", choices=sorted({p for _, p in PROFILES}))
    parser.add_argument("--teacher_epochs", type=int, default=None,
                        help="epochs per teacher (default: the run's epochs, as Confident Learning's config)")
    parser.add_argument("--out", default=None, help="CSV to write the rows to")
    args = parser.parse_args(argv)

    cell = Path(args.cell)
    overrides_file = cell / "overrides.json"
    if not overrides_file.is_file():
        raise FileNotFoundError(f"{overrides_file} not found: --cell must be a benchmark cell folder")
    overrides = {k: v for k, v in json.loads(overrides_file.read_text()).items() if not k.startswith("_")}
    if not overrides.get("label_noise"):
        raise ValueError(f"{cell} was trained on clean labels: there is no noise to find")
    bundle = parse_bundle(["configs/train.json", *PROFILES[(args.data, args.profile)]], overrides)
    dataset = bundle.get_parsed_content("train#dataset")
    manual, clean = dataset.labels(), dataset.clean_labels()
    true_noisy = noisy_slices(manual, clean)

    checkpoint = latest_checkpoint(str(cell), "state_checkpoint")
    if checkpoint is None:
        raise FileNotFoundError(f"{cell}: no state_checkpoint_*.pt (is it a finished self-cleansing cell?)")
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)["store"]
    if len(state["manual_clean_prob"]) != len(manual) or state["actions"].shape[0] == 0:
        raise ValueError(f"{cell}: its store does not match the rebuilt training data or holds no round")
    gmm_noisy = state["actions"][-1] != KEEP_MANUAL

    seed = int(overrides.get("seed", 0))
    torch.manual_seed(seed)
    network = bundle.get_parsed_content("network_def")
    epochs = args.teacher_epochs or int(bundle.get_parsed_content("epochs"))
    phase = ConfidentLearningPhase(network, dataset, PseudoLabelStore(), bundle.get_parsed_content("train_loss"),
                                   teacher_epochs=epochs, seed=seed)
    scores = slice_quality_scores(phase.out_of_sample_probabilities(len(manual)).float(), manual)

    rows = compare_rankings(true_noisy, gmm_noisy, state["manual_clean_prob"], scores)
    for row in rows:
        row.update(cell=str(cell), teacher_epochs=epochs)
        print(", ".join(f"{k} {v}" for k, v in row.items()))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
