"""Training-loop overhead: images per second of the bundle's SupervisedTrainer (its data pipeline, handlers and
engine included, validation and checkpoints excluded) over a bare PyTorch loop with the same network, loss,
optimiser, batch size and data already in memory. Both are measured interleaved in one run.

    python -m scripts.bench_train [--epochs 3] [--repeats 3]

Last line: ``trainer_vs_bare <ratio>`` (goal: at least 0.95).
"""

from __future__ import annotations

import argparse
import copy

import torch
from ignite.engine import Events

from scripts.bench_common import now, parse_bundle, ratio_line

# handlers that are not part of the training loop proper: validation and writing checkpoints
EXCLUDED = (
    "ValidationHandler", "CheckpointSaver", "scripts.checkpointing.TrainingState", "scripts.reporting.MetricsHistory",
)


def build(epochs: int):
    parser = parse_bundle(["configs/train.json", "configs/quick.json"],
                          {"epochs": epochs, "self_cleansing": False, "output_dir": "runs/bench_train"})
    parser["train#handlers"] = [h for h in parser["train#handlers"]
                                if not (isinstance(h, dict) and h.get("_target_") in EXCLUDED)]
    return parser


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=3, help="epochs per measurement; the first is not timed")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    parser = build(args.epochs)
    trainer = parser.get_parsed_content("train#trainer")
    network, loss_fn = parser.get_parsed_content("network"), parser.get_parsed_content("loss")
    dataset, batch_size = parser.get_parsed_content("train#dataset"), parser.get_parsed_content("batch_size")
    device = parser.get_parsed_content("device")
    init_state = copy.deepcopy(network.state_dict())

    # the bare loop: the same samples, collated once into batches that stay in memory
    images = torch.stack([s["image"] for s in dataset.data]).to(device)
    labels = torch.stack([s["label"] for s in dataset.data]).float().to(device)
    batches = [(images[i : i + batch_size], labels[i : i + batch_size]) for i in range(0, len(images), batch_size)]
    n_images = len(images)

    marks = {}
    trainer.add_event_handler(Events.EPOCH_COMPLETED(once=1), lambda e: marks.__setitem__("t0", now()))
    trainer.add_event_handler(Events.COMPLETED, lambda e: marks.__setitem__("t1", now()))

    def bundle_rate() -> float:
        network.load_state_dict(init_state)
        trainer.run()  # a finished Ignite engine restarts from epoch 0
        return n_images * (args.epochs - 1) / (marks["t1"] - marks["t0"])

    def bare_rate() -> float:
        network.load_state_dict(init_state)
        optimizer = torch.optim.Adam(network.parameters(), lr=1e-3)
        network.train()
        for epoch in range(args.epochs):
            if epoch == 1:
                t0 = now()
            for x, y in batches:
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn(network(x), y).mean()
                loss.backward()
                optimizer.step()
        return n_images * (args.epochs - 1) / (now() - t0)

    ours, bare = [], []
    for _ in range(args.repeats):
        ours.append(bundle_rate())
        bare.append(bare_rate())
    print(f"{n_images} slices of {tuple(images.shape[2:])}, batch {batch_size}, {args.epochs - 1} timed epochs")
    print(ratio_line("trainer_vs_bare", ours, bare, "img/s"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
