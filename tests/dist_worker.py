"""One process of the two-process self-cleansing check in ``test_distributed.py`` (not a test module itself).

Started with ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` in the environment, it joins a gloo
group, trains the residual U-Net wrapped in DistributedDataParallel for a few epochs on tiny generated slices with
simulated label noise, runs a cleansing round at the end of every epoch, and writes to ``<out>/rank<r>.pt``:
this rank's pseudo-label store, each round's gathered per-sample losses, the losses this rank's network gives
every sample when computed here without any gathering, and a store that rank 1 changed before
``PseudoLabelStore.broadcast`` made it rank 0's again.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPE = (32, 32)


def volumes(n_volumes: int, n_slices: int) -> list[dict]:
    """Nested class blobs (1, 2, 3) on noise, moving from slice to slice so no two slices are alike."""
    rng = np.random.default_rng(7)
    records = []
    for v in range(n_volumes):
        image = rng.normal(0.0, 0.3, size=(1, *SHAPE, n_slices)).astype(np.float32)
        label = np.zeros((1, *SHAPE, n_slices), dtype=np.uint8)
        for z in range(n_slices):
            r, c = 4 + (v + z) % 5, 5 + (2 * v + z) % 6
            label[0, r : r + 20, c : c + 18, z] = 1
            label[0, r + 3 : r + 17, c + 3 : c + 15, z] = 2
            label[0, r + 6 : r + 14, c + 6 : c + 12, z] = 3
        image += label.astype(np.float32)
        records.append({"image": image, "label": label, "case": f"volume{v}"})
    return records


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank = dist.get_rank()

    from ignite.engine import Events
    from monai.data import DataLoader, DistributedSampler
    from monai.engines import SupervisedTrainer
    from monai.utils import set_determinism

    from scripts.data import SliceDataset
    from scripts.engine import CleansingEvents, HybridPrepareBatch
    from scripts.filtering import LabelFilter
    from scripts.handlers import HybridLossSchedule, SelfCleansing
    from scripts.losses import HybridLoss, SegmentationLoss
    from scripts.network import ResidualUNet, unwrap
    from scripts.slice_pass import SlicePass
    from scripts.sources import GridPrototypes
    from scripts.store import PseudoLabelStore
    from scripts.targets import TargetRules

    # a different seed per rank: DistributedDataParallel must make the start weights equal by itself
    set_determinism(seed=10 + rank)
    # 3 volumes x 5 slices = 15 samples: the ranks' shares of a round are uneven (8 and 7)
    dataset = SliceDataset(volumes(3, 5), label_noise={"alpha": 0.5, "beta": 3, "seed": 0}, num_classes=4)
    net = torch.nn.parallel.DistributedDataParallel(ResidualUNet(spatial_dims=2, in_channels=1, out_channels=4))
    loss = HybridLoss(SegmentationLoss("dicece"))
    store = PseudoLabelStore("zeros")
    cleansing = SelfCleansing(net, dataset, store, num_classes=4, start_epoch=1, interval=1,
                              source=GridPrototypes(grid=8), rules=TargetRules(agreement=True),
                              label_filter=LabelFilter(refresh=True, seed=0), slice_pass=SlicePass(batch_size=4))
    sampler = DistributedSampler(dataset, shuffle=True, even_divisible=True)
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=args.epochs,
        train_data_loader=DataLoader(dataset, batch_size=4, sampler=sampler, num_workers=0),
        network=net,
        optimizer=torch.optim.Adam(net.parameters(), lr=1e-3),
        loss_function=loss,
        prepare_batch=HybridPrepareBatch(),
        train_handlers=[HybridLossSchedule(loss, e1=1, e2=2), cleansing],
        amp=False,
        decollate=False,
    )

    rounds = []

    @trainer.on(CleansingEvents.LOSSES_COLLECTED)
    def keep_losses(engine):
        rnd = engine.state.cleansing
        model = unwrap(net)
        model.eval()
        with torch.no_grad():
            local = []
            for i in range(len(dataset.data)):
                image = dataset.data[i]["image"][None]
                label = dataset.data[i]["label"][None].float()
                local.append(cleansing.label_filter.loss(model.forward_features(image)[0], label))
        model.train()
        rounds.append({"gathered_manual_loss": rnd.manual_loss.clone(), "gathered_pseudo_loss": rnd.pseudo_loss.clone(),
                       "local_manual_loss": torch.cat(local)})

    weights = {}

    @trainer.on(Events.COMPLETED)
    def keep_weights(engine):
        weights.update({k: v.detach().clone() for k, v in unwrap(net).named_parameters()})

    trainer.run()

    # the broadcast itself: rank 1 diverges on purpose, then takes rank 0's copy into its own (shared) tensor
    probe = PseudoLabelStore("zeros")
    probe.initialise(dataset.labels())
    if rank == 1:
        probe.labels.fill_(7)
        probe.has_pseudo[:] = True
        probe.rounds.append({"epoch": 99})
    pointer = probe.labels.data_ptr()
    probe.broadcast(src=0)
    probe_state = {"state": probe.state_dict(), "in_place": probe.labels.data_ptr() == pointer,
                   "shared": probe.labels.is_shared()}

    args.out.mkdir(parents=True, exist_ok=True)
    torch.save({"rank": rank, "world_size": dist.get_world_size(), "store": store.state_dict(), "rounds": rounds,
                "weights": weights, "probe": probe_state}, args.out / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
