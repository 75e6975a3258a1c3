"""The competitors' core computations: Pick-and-Learn weights, Confident Learning maps and SLSR targets, JoCoR's
joint loss and small-loss selection, superpixel averaging and refinement."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from ignite.engine import Engine

from scripts.competitors import TwinInferer, split_logits
from scripts.confident_learning import (
    SLSRLoss,
    confident_thresholds,
    find_label_issues,
    slsr_targets,
    soft_segmentation_loss,
    split_volumes,
)
from scripts.jocor import (
    ForgetRateSchedule,
    JoCoRLoss,
    class_balanced_weights,
    forget_ramp,
    joint_pixel_loss,
    small_loss_mask,
)
from scripts.losses import IGNORE_INDEX, SegmentationLoss
from scripts.pick_and_learn import PickAndLearnLoss, PickAndLearnPrepareBatch, QualityNet, quality_weights
from scripts.superpixel import (
    SuperpixelJoCoRLoss,
    SuperpixelRefinement,
    refine_labels,
    segment_count,
    slic_segments,
    superpixel_mean,
)

# ---------------------------------------------------------------- Pick-and-Learn


@pytest.mark.parametrize("batch", [1, 3, 16])
def test_quality_weights_sum_to_one_per_batch(batch):
    torch.manual_seed(batch)
    scores = 5 * torch.randn(batch)
    w = quality_weights(scores, scale=2.0)
    assert w.shape == (batch,)
    assert torch.all(w > 0)
    assert float(w.sum()) == pytest.approx(1.0, abs=1e-6)
    # tanh bounds how much one sample can outweigh another
    assert float(w.max() / w.min()) <= math.exp(4.0) + 1e-3
    # a higher score never gets a smaller weight
    order = torch.argsort(scores)
    assert torch.all(torch.diff(w[order]) >= -1e-7)


def test_pick_and_learn_loss_is_the_weighted_sum_and_trains_the_quality_net():
    torch.manual_seed(0)
    qnet = QualityNet(in_channels=1, num_classes=4, features=(4, 8))
    base = SegmentationLoss("dicece")
    loss = PickAndLearnLoss(base, qnet)
    image = torch.randn(5, 1, 16, 16)
    label = torch.randint(0, 4, (5, 1, 16, 16)).float()
    logits = torch.randn(5, 4, 16, 16, requires_grad=True)
    out = loss(logits, torch.cat([label, image], 1))
    assert out.shape == (5,)
    w = loss.last_weights
    assert float(w.sum()) == pytest.approx(1.0, abs=1e-6)
    expected = (w * base(logits, label)).sum()
    assert float(out.detach().mean()) == pytest.approx(float(expected.detach()), rel=1e-5)
    out.mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in qnet.parameters() if p.requires_grad)
    assert qnet.head.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="PickAndLearnPrepareBatch"):
        loss(logits, label)


def test_quality_net_binary_and_prepare_batch():
    qnet = QualityNet(in_channels=1, num_classes=2, features=(4,))
    assert qnet(torch.randn(3, 1, 8, 8), torch.randint(0, 2, (3, 1, 8, 8)).float()).shape == (3,)
    batch = {"image": torch.randn(2, 1, 8, 8), "label": torch.randint(0, 4, (2, 1, 8, 8)).float()}
    image, target = PickAndLearnPrepareBatch()(batch)
    assert torch.equal(target[:, :1], batch["label"]) and torch.equal(target[:, 1:], batch["image"])
    assert torch.equal(image, batch["image"])


# ---------------------------------------------------------------- Confident Learning


def _cl_case():
    """Labels: left half class 1, right half class 0. Probabilities: confident agreement everywhere except a
    block labelled 0 where the prediction is confidently class 1 (a missing-label error), and a block labelled 0
    where class 1 leads only weakly (below the class-1 threshold)."""
    labels = torch.zeros(1, 8, 8, dtype=torch.long)
    labels[:, :, :4] = 1
    probs = torch.zeros(1, 2, 8, 8)
    probs[:, 1] = labels.float() * 0.9 + (1 - labels.float()) * 0.1
    probs[:, 1, 0:2, 4:6] = 0.95  # confidently class 1, labelled 0
    probs[:, 1, 6:8, 6:8] = 0.55  # class 1 leads, but below its threshold
    probs[:, 0] = 1 - probs[:, 1]
    return probs, labels


def test_confident_thresholds_are_per_class_means():
    probs, labels = _cl_case()
    t = confident_thresholds(probs, labels)
    for k in range(2):
        assert float(t[k]) == pytest.approx(float(probs[:, k][labels == k].mean()), abs=1e-6)
    # a class no pixel carries can never be a confident class
    t3 = confident_thresholds(torch.softmax(torch.randn(1, 3, 4, 4), 1), torch.zeros(1, 4, 4, dtype=torch.long))
    assert float(t3[1]) > 1 and float(t3[2]) > 1


def test_confident_learning_flags_disagreeing_confident_pixels():
    probs, labels = _cl_case()
    t = confident_thresholds(probs, labels)
    assert float(t[1]) > 0.55  # the weak block stays below the class-1 threshold
    issues, corrected = find_label_issues(probs, labels)
    expected = torch.zeros(1, 8, 8, dtype=torch.bool)
    expected[:, 0:2, 4:6] = True
    assert torch.equal(issues, expected)
    assert torch.all(corrected[issues] == 1)
    assert torch.equal(corrected[~issues], labels[~issues])


def test_slsr_targets_and_loss():
    label = torch.tensor([[[0, 1], [2, 0]]])
    corrected = torch.tensor([[[0, 2], [2, 3]]])
    soft = slsr_targets(label, corrected, num_classes=4, epsilon=0.8)
    assert torch.allclose(soft.sum(1), torch.ones(1, 2, 2))
    assert torch.allclose(soft[0, :, 0, 1], torch.tensor([0.0, 0.2, 0.8, 0.0]))
    assert torch.allclose(soft[0, :, 1, 1], torch.tensor([0.2, 0.0, 0.0, 0.8]))
    assert torch.equal(soft[0, :, 0, 0], torch.tensor([1.0, 0, 0, 0]))

    torch.manual_seed(0)
    logits = torch.randn(2, 4, 12, 12)
    given = torch.randint(0, 4, (2, 1, 12, 12)).float()
    fixed = torch.randint(0, 4, (2, 1, 12, 12)).float()
    for kind in ("dice", "dicece"):
        # on hard targets the soft loss is the bundle's SegmentationLoss
        hard = soft_segmentation_loss(logits, F.one_hot(given[:, 0].long(), 4).movedim(-1, 1).float(), kind)
        assert torch.allclose(hard, SegmentationLoss(kind)(logits, given), atol=1e-4)
        target = torch.cat([given, fixed], 1)
        assert torch.allclose(SLSRLoss(4, kind, epsilon=0.0)(logits, target), SegmentationLoss(kind)(logits, given),
                              atol=1e-4)
        assert torch.allclose(SLSRLoss(4, kind, epsilon=1.0)(logits, target), SegmentationLoss(kind)(logits, fixed),
                              atol=1e-4)


def test_split_volumes_keeps_volumes_whole():
    class DS:
        volume_info = [{"first_id": 0, "n_slices": 3}, {"first_id": 3, "n_slices": 4}, {"first_id": 7, "n_slices": 2},
                       {"first_id": 9, "n_slices": 3}]
        data = list(range(12))

    a, b = split_volumes(DS(), seed=1)
    assert sorted(a + b) == list(range(12)) and not set(a) & set(b)
    for v in DS.volume_info:
        ids = set(range(v["first_id"], v["first_id"] + v["n_slices"]))
        assert ids <= set(a) or ids <= set(b)


# ---------------------------------------------------------------- JoCoR


@pytest.mark.parametrize("rates", [0.0, 0.2, (0.1, 0.4), (0.5, 0.0), 1.0])
def test_small_loss_mask_keeps_the_requested_fraction(rates):
    torch.manual_seed(1)
    scores = torch.rand(3, 10, 10)
    label = (torch.rand(3, 10, 10) > 0.7).long()
    mask = small_loss_mask(scores, label, rates)
    bg, fg = (rates, rates) if isinstance(rates, float) else rates
    for group, rate in ((label == 0, bg), (label > 0, fg)):
        n = int(group.sum())
        assert int((mask & group).sum()) == round((1 - rate) * n)
        kept, dropped = scores[mask & group], scores[~mask & group]
        if kept.numel() and dropped.numel():
            assert kept.max() <= dropped.min()  # the smallest losses are the ones kept


def test_small_loss_mask_respects_valid_and_rejects_bad_rates():
    scores = torch.rand(1, 4, 4)
    label = torch.zeros(1, 4, 4, dtype=torch.long)
    valid = torch.ones(1, 4, 4, dtype=torch.bool)
    valid[0, 0] = False
    mask = small_loss_mask(scores, label, 0.5, valid)
    assert not mask[0, 0].any() and int(mask.sum()) == 6
    with pytest.raises(ValueError):
        small_loss_mask(scores, label, 1.5)


def test_joint_pixel_loss():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5, 5)
    target = torch.randint(0, 3, (2, 5, 5))
    same = joint_pixel_loss(logits, logits, target, co_lambda=0.65)
    ce = F.cross_entropy(logits, target, reduction="none")
    assert torch.allclose(same, 0.35 * 2 * ce, atol=1e-6)  # identical networks: no disagreement term
    other = torch.randn(2, 3, 5, 5)
    only_kl = joint_pixel_loss(logits, other, target, co_lambda=1.0)
    p, q = torch.softmax(logits, 1), torch.softmax(other, 1)
    kl = (p * (p.log() - q.log())).sum(1) + (q * (q.log() - p.log())).sum(1)
    assert torch.allclose(only_kl, kl, atol=1e-5) and torch.all(only_kl >= 0)
    ignored = target.clone()
    ignored[0] = IGNORE_INDEX
    assert torch.allclose(joint_pixel_loss(logits, other, ignored, 0.0)[0], torch.zeros(5, 5))
    # a one-channel sigmoid output is read as two classes
    binary = joint_pixel_loss(torch.randn(1, 1, 4, 4), torch.randn(1, 1, 4, 4), torch.randint(0, 2, (1, 4, 4)))
    assert binary.shape == (1, 4, 4) and torch.isfinite(binary).all()


def test_jocor_loss_averages_the_selected_pixels():
    torch.manual_seed(0)
    loss = JoCoRLoss(co_lambda=0.5)
    loss.forget_rate = (0.25, 0.25)
    l1, l2 = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    target = torch.randint(0, 4, (2, 1, 8, 8)).float()
    out = loss(torch.cat([l1, l2], 1), target)
    pixel = joint_pixel_loss(l1, l2, target[:, 0].long(), 0.5)
    mask = loss.last_mask
    assert float(out.mean()) == pytest.approx(float(pixel[mask].mean()), rel=1e-5)
    assert loss.counts[:, 0].sum() == 2 * 8 * 8


def test_forget_schedule_ramps_and_estimates():
    assert [forget_ramp(e, 4) for e in (1, 3, 5, 9)] == [0.0, 0.5, 1.0, 1.0]
    loss = JoCoRLoss()
    engine = Engine(lambda e, b: None)
    fixed = ForgetRateSchedule(loss, forget_rate=[0.1, 0.4], num_gradual=2)
    engine.state.epoch = 2
    fixed(engine)
    assert loss.forget_rate == pytest.approx((0.05, 0.2))
    auto = ForgetRateSchedule(loss, forget_rate="auto", num_gradual=1, max_forget_rate=0.3)
    assert auto.estimate == (0.0, 0.0)  # nothing measured yet
    loss.counts = torch.tensor([[100.0, 5.0], [50.0, 40.0]], dtype=torch.float64)
    auto._estimate(engine)
    assert auto.estimate == pytest.approx((0.05, 0.3))  # the foreground's 80% is capped
    engine.state.epoch = 3
    auto(engine)
    assert loss.forget_rate == pytest.approx((0.05, 0.3)) and loss.counts.sum() == 0
    # a later epoch with more background and less foreground disagreement: the estimate only goes down
    loss.counts = torch.tensor([[100.0, 9.0], [50.0, 10.0]], dtype=torch.float64)
    auto._estimate(engine)
    assert auto.estimate == pytest.approx((0.05, 0.2))
    restored = ForgetRateSchedule(JoCoRLoss(), "auto")
    restored.loss.load_state_dict(loss.state_dict())  # the estimate travels with the loss's state
    assert restored.estimate == auto.estimate
    with pytest.raises(ValueError):
        ForgetRateSchedule(loss, forget_rate="oracle")


def test_twin_inferer_runs_both_networks():
    a, b = torch.nn.Conv2d(1, 3, 1), torch.nn.Conv2d(1, 3, 1)
    b.eval()
    x = torch.randn(2, 1, 4, 4)
    out = TwinInferer(b)(x, a)
    assert b.training  # follows the trainer network
    o1, o2 = split_logits(out)
    assert torch.allclose(o1, a(x)) and torch.allclose(o2, b(x))


# ---------------------------------------------------------------- superpixels


def _two_region_image(seed=0):
    rng = np.random.default_rng(seed)
    img = rng.normal(0.0, 0.02, size=(32, 32))
    img[:, 16:] += 1.0
    return torch.as_tensor(img, dtype=torch.float32)


def test_slic_follows_an_intensity_edge():
    img = _two_region_image()
    seg = slic_segments(img, n_segments=16)
    assert seg.shape == (32, 32) and seg.dtype == torch.int64 and seg.min() == 0
    left = set(seg[:, :16].unique().tolist())
    right = set(seg[:, 16:].unique().tolist())
    assert not left & right  # no superpixel straddles the edge
    assert segment_count((96, 96), 80) == 115


def test_superpixel_mean_is_constant_on_each_superpixel():
    torch.manual_seed(0)
    seg = torch.stack([slic_segments(_two_region_image(s), n_segments=12) for s in range(2)])
    values = torch.rand(2, 32, 32)
    mean = superpixel_mean(values, seg)
    for b in range(2):
        for s in seg[b].unique():
            region = seg[b] == s
            assert torch.allclose(mean[b][region], values[b][region].mean().expand(int(region.sum())), atol=1e-6)
    chans = superpixel_mean(torch.rand(2, 3, 32, 32), seg)
    assert chans.shape == (2, 3, 32, 32)


def test_refinement_respects_superpixel_boundaries():
    torch.manual_seed(0)
    seg = torch.stack([slic_segments(_two_region_image(s), n_segments=20) for s in range(2)])
    label = torch.zeros(2, 32, 32, dtype=torch.long)
    label[:, 8:24, 12:20] = 1  # a label that cuts across superpixels
    probs = torch.softmax(3 * torch.randn(2, 3, 32, 32), 1)
    probs[:, :, :, 16:] = torch.tensor([0.05, 0.05, 0.9])[None, :, None, None]  # right half: confidently class 2
    refined = refine_labels(label, probs, seg, conf_thres=0.6)
    mean = superpixel_mean(probs, seg)
    for b in range(2):
        for s in seg[b].unique():
            region = seg[b] == s
            if mean[b, :, region].max(0).values[0] >= 0.6:
                # a confident superpixel is relabelled as a whole, to one class
                assert refined[b][region].unique().numel() == 1
            else:
                assert torch.equal(refined[b][region], label[b][region])
        changed = refined[b] != label[b]
        # whatever changed is a union of whole superpixels
        for s in seg[b][changed].unique():
            assert torch.equal(refined[b][seg[b] == s], refined[b][seg[b] == s][0].expand(int((seg[b] == s).sum())))
    assert torch.all(refined[:, :, 16:] == 2)


def test_refinement_budget_keeps_a_structure_the_networks_have_not_learned():
    # a 4-pixel-wide structure of class 1 whose every superpixel the networks call background, confidently
    seg = torch.arange(32)[None, :, None].expand(2, 32, 32) // 2 * 16 + torch.arange(32)[None, None, :] // 2
    label = torch.zeros(2, 32, 32, dtype=torch.long)
    label[:, 8:24, 14:18] = 1
    probs = torch.zeros(2, 2, 32, 32)
    probs[:, 0], probs[:, 1] = 0.9, 0.1
    probs[:, 0, 8:16, 14:18], probs[:, 1, 8:16, 14:18] = 0.6, 0.4  # the upper half of it gets some support
    unbounded = refine_labels(label, probs, seg, conf_thres=0.5)
    assert not (unbounded == 1).any()  # every pixel of the structure is relabelled: it is gone
    budgeted = refine_labels(label, probs, seg, conf_thres=0.5, change_rates=(0.0, 0.25))
    changed = budgeted != label
    n_fg = int((label == 1).sum())
    assert int(changed.sum()) == n_fg // 4  # at most the foreground rate of the structure's pixels change
    assert not changed[:, 8:16].any()  # the least supported pixels (the lower half) go first
    assert torch.equal(budgeted[label == 0], label[label == 0])  # a background rate of 0 changes no background


def test_refinement_waits_for_the_loss_gap_to_stop_growing():
    loss = SuperpixelJoCoRLoss()
    store = type("Store", (), {"rounds": []})()
    refinement = SuperpixelRefinement([], None, store, start_epoch=2, patience=2, loss=loss)
    due = []
    # per epoch: summed joint loss and count of the selected pixels, then of the dropped ones
    for epoch, (sel, drop) in enumerate([(1.0, 2.0), (0.5, 2.0), (0.4, 1.8), (0.4, 1.7), (0.3, 1.0)], start=1):
        loss.gap_sums.copy_(torch.tensor([sel * 10, 10, drop * 5, 5], dtype=torch.float64))
        loss.track_loss_gap()
        due.append(refinement.due(epoch))
    # gaps 1.0, 1.5, 1.4, 1.3, 0.7: the largest after epoch 2, two epochs without a new one after epoch 4
    assert due == [False, False, False, True, True]
    assert loss.gap_sums.sum() == 0  # each read starts a new sum
    store.rounds.append({"epoch": 4, "refined_slices": 3})
    assert not refinement.due(5) and not refinement.due(9)  # the original refines once
    refinement.interval = 2
    assert [refinement.due(e) for e in (5, 6, 7, 8)] == [False, True, False, True]
    # the trigger is part of the loss's state, so a resumed run waits as long as the interrupted one
    assert {"gap_sums", "gap_trigger"} <= set(loss.state_dict())
    with pytest.raises(ValueError, match="SuperpixelJoCoRLoss"):
        SuperpixelRefinement([], None, store, start_epoch=2, patience=2)


def test_superpixel_selection_keeps_or_drops_whole_superpixels():
    torch.manual_seed(0)
    seg = slic_segments(_two_region_image(), n_segments=20)[None]
    loss = SuperpixelJoCoRLoss(co_lambda=0.5)
    loss.forget_rate = (0.3, 0.3)
    logits = torch.randn(1, 8, 32, 32)
    label = torch.zeros(1, 1, 32, 32)  # one group, so only the superpixel means decide
    target = torch.cat([label, label, seg[:, None].float()], 1)
    loss(logits, target)
    mask = loss.last_mask[0]
    whole = [bool(mask[seg[0] == s].all()) or not bool(mask[seg[0] == s].any()) for s in seg[0].unique()]
    assert sum(whole) >= len(whole) - 1  # only the superpixel at the cut may be split
    assert int(mask.sum()) == round(0.7 * 32 * 32)


def test_jocor_with_the_baseline_loss_supervises_only_the_selected_pixels():
    torch.manual_seed(0)
    seg = SegmentationLoss("dicece")
    loss = JoCoRLoss(co_lambda=0.4, supervised_loss=seg)
    l1 = torch.randn(2, 4, 8, 8, requires_grad=True)
    l2 = torch.randn(2, 4, 8, 8)
    target = torch.randint(0, 4, (2, 1, 8, 8)).float()
    # nothing forgotten: the Baseline's loss of each network plus the mean agreement term
    out = loss(torch.cat([l1, l2], 1), target)
    kl = joint_pixel_loss(l1, l2, torch.full((2, 8, 8), IGNORE_INDEX), 1.0)
    expected = 0.6 * (seg(l1, target) + seg(l2, target)) + 0.4 * kl.flatten(1).mean(1)
    assert torch.allclose(out, expected, atol=1e-5)
    # with pixels forgotten, those pixels get no gradient at all, the kept ones do
    loss.forget_rate = (0.5, 0.5)
    out = loss(torch.cat([l1, l2], 1), target)
    (grad,) = torch.autograd.grad(out.sum(), l1)
    dropped = ~loss.last_mask
    assert dropped.any() and grad.abs().sum(1)[dropped].max() == 0
    assert grad.abs().sum(1)[loss.last_mask].min() > 0


def test_class_balanced_joint_loss_is_the_mean_of_the_class_means():
    label = torch.zeros(1, 10, 10, dtype=torch.long)
    label[0, :2, :5] = 1  # 10 foreground pixels among 100
    mask = torch.ones_like(label, dtype=torch.bool)
    mask[0, 9, :] = False  # 10 background pixels dropped
    w = class_balanced_weights(label, mask)
    assert torch.isclose(w.sum(), torch.tensor(1.0)) and w[~mask].sum() == 0
    assert torch.isclose(w[label == 1].sum(), torch.tensor(0.5)) and torch.isclose(w[mask & (label == 0)].sum(),
                                                                                     torch.tensor(0.5))
    # through the loss: both networks confidently predict background everywhere, so only the foreground errs
    logits = torch.zeros(1, 4, 10, 10)
    logits[:, 0] = logits[:, 2] = 4.0
    pixel = joint_pixel_loss(logits[:, :2], logits[:, 2:], label, 0.65)
    balanced_mean = (pixel[label == 1].mean() + pixel[label == 0].mean()) / 2
    for balanced, expected in ((False, pixel.mean()), (True, balanced_mean)):
        loss = JoCoRLoss(co_lambda=0.65, class_balanced=balanced)
        assert torch.isclose(loss(logits, label[:, None].float()).mean(), expected, atol=1e-6)
    # 10 of the 90 selected pixels carry half of the balanced loss: the missed foreground dominates it
    assert JoCoRLoss(class_balanced=True)(logits, label[:, None].float()).mean() > 4 * pixel.mean()


def test_per_class_selection_keeps_the_hardest_class():
    # foreground: six pixels of class 1 with small losses, three of class 2 with the largest
    label = torch.tensor([[[0, 0, 1, 1, 1, 1, 1, 1, 2, 2, 2]]])
    scores = torch.tensor([[[0.1, 0.2, 0.1, 0.1, 0.2, 0.2, 0.3, 0.3, 0.9, 0.8, 0.7]]])
    shared = small_loss_mask(scores, label, (0.0, 1 / 3))
    assert not shared[label == 2].any()  # one foreground group: the hard class is forgotten whole
    per_class = small_loss_mask(scores, label, (0.0, 1 / 3), per_class=True)
    assert int(per_class[label == 2].sum()) == 2 and int(per_class[label == 1].sum()) == 4
    assert per_class[label == 0].all()
    # the loss passes the option through
    loss = JoCoRLoss(per_class=True)
    loss.forget_rate = (0.0, 1 / 3)
    logits = torch.zeros(1, 6, 1, 11)
    loss(logits, label[:, None].float())
    assert loss.last_mask.shape == (1, 1, 11) and int(loss.last_mask.sum()) == 2 + 4 + 2
