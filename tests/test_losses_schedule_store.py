import pytest
import torch
import torch.nn.functional as F

from scripts.engine import HybridPrepareBatch
from scripts.ignore_index import IGNORE_INDEX
from scripts.losses import HybridLoss, SegmentationLoss, class_bits, classes_from_bits
from scripts.metrics import cleansing_quality, label_dice, pooled_dice, supervised_fraction, wrong_fraction
from scripts.schedule import by_schedule, hybrid_weights
from scripts.store import PseudoLabelStore


def _target(b=3, h=16, w=16, classes=4, seed=0):
    """Label maps with every class present, so the Dice terms are all defined."""
    g = torch.Generator().manual_seed(seed)
    t = torch.zeros(b, 1, h, w)
    for i in range(b):
        for c in range(1, classes):
            r, col = torch.randint(0, h - 5, (2,), generator=g).tolist()
            t[i, 0, r : r + 5, col : col + 5] = c
    return t


def _perfect_logits(target, classes):
    if classes == 1:
        return (target * 2 - 1) * 20.0
    return F.one_hot(target[:, 0].long(), classes).permute(0, 3, 1, 2).float() * 20.0


# ---------------------------------------------------------------- SegmentationLoss


@pytest.mark.parametrize("kind", ["dice", "dicece"])
@pytest.mark.parametrize("classes", [1, 4])
def test_loss_is_per_sample_and_zero_when_perfect(kind, classes):
    target = _target(classes=2 if classes == 1 else classes)
    loss = SegmentationLoss(kind)(_perfect_logits(target, classes), target)
    assert loss.shape == (3,)
    assert torch.all(loss < 1e-3)


@pytest.mark.parametrize("classes", [1, 4])
def test_loss_does_not_mix_samples(classes):
    target = _target(classes=2 if classes == 1 else classes)
    logits = _perfect_logits(target, classes)
    logits[1] = -logits[1]  # only sample 1 is wrong
    fn = SegmentationLoss("dice")
    loss = fn(logits, target)
    assert loss[0] < 1e-3 and loss[2] < 1e-3 and loss[1] > 0.5
    alone = torch.stack([fn(logits[i : i + 1], target[i : i + 1])[0] for i in range(3)])
    torch.testing.assert_close(loss, alone)


@pytest.mark.parametrize("classes", [1, 4])
def test_dicece_exceeds_dice_when_wrong(classes):
    target = _target(classes=2 if classes == 1 else classes)
    wrong = -_perfect_logits(target, classes)
    dice = SegmentationLoss("dice")(wrong, target)
    dicece = SegmentationLoss("dicece")(wrong, target)
    assert torch.all(dicece > dice + 1.0)


def test_dice_ignores_background_in_multiclass():
    # all-background target and prediction: nothing to segment, so nothing to pay
    target = torch.zeros(2, 1, 8, 8)
    fn = SegmentationLoss("dice")
    assert torch.all(fn(_perfect_logits(target, 4), target) < 0.05)
    # predicting class 1 everywhere costs that class fully: one third of the foreground mean
    torch.testing.assert_close(fn(_perfect_logits(target + 1, 4), target), torch.full((2,), 1 / 3), atol=0.02, rtol=0)


def test_ce_weight_scales_ce_term():
    target = _target()
    logits = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    dice = SegmentationLoss("dice")(logits, target)
    ce1 = SegmentationLoss("dicece", ce_weight=1.0)(logits, target) - dice
    ce2 = SegmentationLoss("dicece", ce_weight=2.0)(logits, target) - dice
    torch.testing.assert_close(ce2, 2 * ce1)
    ce = F.cross_entropy(logits, target[:, 0].long(), reduction="none").flatten(1).mean(1)
    torch.testing.assert_close(ce1, ce)


def test_unknown_loss_kind():
    with pytest.raises(ValueError, match="focal"):
        SegmentationLoss("focal")


# ---------------------------------------------------------------- HybridLoss


@pytest.mark.parametrize("classes", [1, 4])
def test_hybrid_loss_weights(classes):
    n = 2 if classes == 1 else classes
    manual, pseudo = _target(classes=n, seed=0), _target(classes=n, seed=1)
    logits = torch.randn(3, classes, 16, 16, generator=torch.Generator().manual_seed(2), requires_grad=True)
    base = SegmentationLoss("dicece")
    hybrid = HybridLoss(base)
    on_manual, on_pseudo = base(logits, manual), base(logits, pseudo)
    assert not torch.allclose(on_manual, on_pseudo)

    # a one-channel target is the plain loss whatever the weights
    hybrid.lambda1, hybrid.lambda2 = 0.0, 1.0
    torch.testing.assert_close(hybrid(logits, manual), on_manual)

    both = torch.cat([manual, pseudo], 1)
    for lam1, lam2 in [(1.0, 0.0), (0.0, 1.0), (0.3, 0.7), (0.2, 1.0)]:
        hybrid.lambda1, hybrid.lambda2 = lam1, lam2
        out = hybrid(logits, both)
        assert out.shape == (3,)
        torch.testing.assert_close(out, lam1 * on_manual + lam2 * on_pseudo)
    out.mean().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_hybrid_loss_can_leave_empty_manual_labels_out():
    """With ``ignore_empty_manual`` a sample whose manual label is all background adds nothing to the manual term
    (and no gradient), labelled samples keep their loss, the pseudo term is untouched, and a one-channel target
    (the Baseline) is the plain loss."""
    manual = _target(classes=4, seed=0)
    manual[1] = 0  # a missed slice
    pseudo = _target(classes=4, seed=1)
    logits = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(2), requires_grad=True)
    base = SegmentationLoss("dicece")
    hybrid = HybridLoss(base, ignore_empty_manual=True)
    on_manual, on_pseudo = base(logits, manual), base(logits, pseudo)
    assert on_manual[1] > 0
    both = torch.cat([manual, pseudo], 1)
    out = hybrid(logits, both)
    torch.testing.assert_close(out, on_manual * torch.tensor([1.0, 0.0, 1.0]))
    out[1].backward()
    assert logits.grad.abs().sum() == 0
    hybrid.lambda1, hybrid.lambda2 = 0.5, 0.5
    torch.testing.assert_close(hybrid(logits, both), 0.5 * on_manual * torch.tensor([1.0, 0.0, 1.0]) + 0.5 * on_pseudo)
    torch.testing.assert_close(hybrid(logits, manual), on_manual)


def test_hybrid_loss_reads_emptiness_from_the_slice_classes():
    """A background patch of a labelled slice keeps its manual term when the slice's classes say it is labelled;
    a patch of a missed slice loses it; without the third channel both are judged by the patch itself."""
    manual = torch.zeros(2, 1, 16, 16)  # two background patches: one of a labelled slice, one of a missed slice
    pseudo = _target(classes=4, seed=1)
    bits = torch.tensor([0b111, 0.0]).reshape(2, 1, 1, 1).expand_as(manual)
    logits = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    base = SegmentationLoss("dicece")
    hybrid = HybridLoss(base, ignore_empty_manual=True)
    on_manual = base(logits, manual)
    assert (on_manual > 0).all()
    torch.testing.assert_close(hybrid(logits, torch.cat([manual, pseudo[:2], bits], 1)),
                               on_manual * torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(hybrid(logits, torch.cat([manual, pseudo[:2]], 1)), torch.zeros(2))


@pytest.mark.parametrize("kind", ["dice", "dicece"])
def test_absent_agreement_scores_an_agreed_empty_label_as_a_match(kind):
    """An empty label the network agrees with costs about 1 in plain soft Dice but 0 with ``absent_agreement``;
    an empty label the network contradicts, and a drawn class it misses, keep their Dice term."""
    target = torch.zeros(3, 1, 16, 16)
    target[2, 0, 4:8, 4:8] = 2  # sample 2 draws class 2, which the network misses
    logits = torch.zeros(3, 4, 16, 16)
    logits[:, 0] = 5.0  # confident background everywhere ...
    logits[1, 1, 2:6, 2:6] = 10.0  # ... except a class-1 blob in sample 1, whose label is empty
    plain, agreed = SegmentationLoss(kind), SegmentationLoss(kind, absent_agreement=True)
    assert plain(logits, target)[0] > 0.9 and agreed(logits, target)[0] < 0.05
    dice_plain = SegmentationLoss("dice")(logits, target)
    dice_agreed = SegmentationLoss("dice", absent_agreement=True)(logits, target)
    # sample 1: only class 1 is contested, so one of three class terms remains
    torch.testing.assert_close(dice_agreed[1], dice_plain[1] / 3, atol=0.01, rtol=0)
    torch.testing.assert_close(dice_agreed[2], dice_plain[2] / 3, atol=0.01, rtol=0)
    binary = torch.full((2, 1, 8, 8), -5.0)
    binary[1, 0, :2, :2] = 5.0
    got = SegmentationLoss("dice", absent_agreement=True)(binary, torch.zeros(2, 1, 8, 8))
    assert got[0] == 0 and got[1] > 0.9


@pytest.mark.parametrize("kind", ["dice", "dicece"])
def test_absent_unknown_takes_the_slice_classes(kind):
    """With the slice's classes, a class the slice holds but the patch does not is absent from the patch (the
    plain loss), and only a class missing from the whole slice is unknown."""
    target = _target(classes=4, seed=3)
    target[0][target[0] == 2] = 0  # sample 0's patch lacks class 2
    logits = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(4))
    loss = SegmentationLoss(kind)
    every_class = torch.ones(3, 4, dtype=torch.bool)
    torch.testing.assert_close(loss(logits, target, absent_unknown=True, present=every_class), loss(logits, target))
    from_patch = loss(logits, target, absent_unknown=True)
    assert from_patch[0] < loss(logits, target)[0]  # class 2 unknown: its Dice term and its CE constraint go
    without_2 = every_class.clone()
    without_2[0, 2] = False
    torch.testing.assert_close(loss(logits, target, absent_unknown=True, present=without_2), from_patch)


@pytest.mark.parametrize("kind", ["dice", "dicece"])
def test_absent_unknown_changes_nothing_when_every_class_is_drawn(kind):
    target = _target(classes=4, seed=3)
    target[0, 0, :2] = 255  # ignored pixels take the same path in both
    logits = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(4))
    loss = SegmentationLoss(kind)
    torch.testing.assert_close(loss(logits, target, absent_unknown=True), loss(logits, target))


@pytest.mark.parametrize("kind", ["dice", "dicece"])
def test_absent_unknown_never_pushes_a_missing_class_down(kind):
    """A slice whose Myo (2) was wiped out: the plain loss teaches background where the Myo is, the option lets the
    network keep it (no positive gradient on the class-2 logit at a background pixel) and still teaches the drawn
    classes (a pixel drawn as RV or LV is still not Myo)."""
    target = _target(b=1, classes=4, seed=5)
    target[target == 2] = 0
    logits = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(6))
    loss = SegmentationLoss(kind)
    plain, unknown = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    loss(plain, target).sum().backward()
    loss(unknown, target, absent_unknown=True).sum().backward()
    background = target[:, 0] == 0
    if kind == "dicece":
        assert plain.grad[:, 2][background].max() > 0, "the plain loss should push the missing class down"
    assert unknown.grad[:, 2][background].max() <= 1e-9
    drawn = target[:, 0] == 3
    assert (unknown.grad[:, 3][drawn] < 0).all(), "a drawn class must still be pulled up where it is drawn"


@pytest.mark.parametrize("channels", [1, 4])
def test_absent_unknown_empty_target_costs_nothing(channels):
    target = torch.zeros(2, 1, 8, 8)
    target[1, 0, 2:5, 2:5] = 1
    logits = torch.randn(2, channels, 8, 8, generator=torch.Generator().manual_seed(7), requires_grad=True)
    loss = SegmentationLoss("dicece")
    out = loss(logits, target, absent_unknown=True)
    assert abs(float(out[0])) < 1e-6 and out[1] > 0
    out[0].backward()
    assert logits.grad.abs().max() < 1e-6


def test_hybrid_loss_absent_unknown_applies_to_the_manual_term_only():
    manual = _target(classes=4, seed=0)
    manual[manual == 1] = 0
    pseudo = _target(classes=4, seed=1)
    pseudo[pseudo == 1] = 0
    logits = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    base = SegmentationLoss("dicece")
    hybrid = HybridLoss(base, absent_unknown_manual=True)
    hybrid.lambda1, hybrid.lambda2 = 0.5, 0.5
    expected = 0.5 * base(logits, manual, absent_unknown=True) + 0.5 * base(logits, pseudo)
    torch.testing.assert_close(hybrid(logits, torch.cat([manual, pseudo], 1)), expected)
    assert not torch.allclose(expected, 0.5 * base(logits, manual) + 0.5 * base(logits, pseudo))
    with pytest.raises(TypeError, match="needs a SegmentationLoss"):
        HybridLoss(torch.nn.MSELoss(), absent_unknown_manual=True)


def test_hybrid_loss_defaults_to_manual_only():
    hybrid = HybridLoss()
    assert (hybrid.lambda1, hybrid.lambda2) == (1.0, 0.0)
    assert isinstance(hybrid.loss, SegmentationLoss)


# ---------------------------------------------------------------- hybrid_weights (Eq. 8)


@pytest.mark.parametrize(
    "epoch, expected",
    [(0, (1.0, 0.0)), (3, (1.0, 0.0)), (4, (1.0, 0.0)), (6, (0.5, 0.5)), (7, (0.25, 0.75)), (8, (0.0, 1.0)),
     (19, (0.0, 1.0))],
)
def test_hybrid_weights_boundaries(epoch, expected):
    # E1 = 4, E2 = 8, 20 epochs: before E1 manual only, linear cross-fade, from E2 pseudo only
    lam1, lam2 = hybrid_weights(epoch, 4, 8)
    assert lam1 == pytest.approx(expected[0]) and lam2 == pytest.approx(expected[1])


def test_hybrid_weights_floor():
    assert hybrid_weights(0, 4, 8, lambda1_floor=0.2) == (1.0, 0.0)
    assert hybrid_weights(6, 4, 8, lambda1_floor=0.2) == pytest.approx((0.5, 0.5))
    assert hybrid_weights(7, 4, 8, lambda1_floor=0.3) == pytest.approx((0.3, 0.75))
    assert hybrid_weights(8, 4, 8, lambda1_floor=0.2) == pytest.approx((0.2, 1.0))
    assert hybrid_weights(100, 4, 8, lambda1_floor=0.2) == pytest.approx((0.2, 1.0))


def test_hybrid_weights_step_when_e1_equals_e2():
    assert hybrid_weights(4, 5, 5) == (1.0, 0.0)
    assert hybrid_weights(5, 5, 5) == (0.0, 1.0)


@pytest.mark.parametrize("args", [(0, 8, 4, 0.0), (0, 4, 8, -0.1), (0, 4, 8, 1.5)])
def test_hybrid_weights_rejects_bad_arguments(args):
    with pytest.raises(ValueError):
        hybrid_weights(*args)


# ---------------------------------------------------------------- PseudoLabelStore


def _manual(n=5, h=8, w=8):
    labels = torch.zeros(n, h, w, dtype=torch.uint8)
    for i in range(n):
        labels[i, i : i + 3, 2:5] = 1 + i % 3
    return labels


def test_store_init_zeros():
    store = PseudoLabelStore("zeros")
    assert not store.initialised and len(store) == 0
    store.initialise(_manual())
    assert store.initialised and len(store) == 5
    assert store.labels.shape == (5, 8, 8) and store.labels.dtype == torch.uint8
    assert not store.labels.any() and not store.has_pseudo.any()
    assert store.labels.is_shared()
    assert store.actions.shape == (0, 5) and store.rounds == []


def test_store_init_manual_copies():
    manual = _manual()
    store = PseudoLabelStore("manual")
    store.initialise(manual)
    assert torch.equal(store.labels, manual) and store.has_pseudo.all()
    manual.zero_()
    assert store.labels.any(), "the store must not alias the data set's labels"
    assert torch.equal(store.get(1), _manual()[1])


def test_store_ensure_keeps_a_restored_store():
    manual = torch.randint(0, 4, (3, 8, 8))
    store = PseudoLabelStore(init="zeros")
    store.ensure(manual)
    assert store.labels.shape == (3, 8, 8) and not store.has_pseudo.any()
    store.labels[1] = 2  # a round (or a checkpoint) wrote Y'
    store.has_pseudo[1] = True
    store.ensure(torch.zeros_like(manual))
    assert (store.labels[1] == 2).all() and store.has_pseudo[1]


def test_store_unknown_init():
    with pytest.raises(ValueError, match="random"):
        PseudoLabelStore("random")


def _round(store, seed):
    g = torch.Generator().manual_seed(seed)
    n = len(store)
    new = torch.randint(0, 4, store.labels.shape, generator=g, dtype=torch.uint8)
    actions = torch.randint(0, 3, (n,), generator=g)
    store.record_round(actions, new, torch.rand(n, generator=g), torch.rand(n, generator=g),
                       {"epoch": seed, "cleansed": int((actions == 2).sum())})
    return new, actions


def test_store_record_round_in_place():
    store = PseudoLabelStore("zeros")
    store.initialise(_manual())
    ptr = store.labels.data_ptr()
    new1, act1 = _round(store, 1)
    new2, act2 = _round(store, 2)
    # written in place: data loader workers hold the shared buffer, not the attribute
    assert store.labels.data_ptr() == ptr and store.labels.is_shared()
    assert torch.equal(store.labels, new2) and store.has_pseudo.all()
    assert torch.equal(store.actions, torch.stack([act1, act2]).to(torch.uint8))
    assert [r["epoch"] for r in store.rounds] == [1, 2]
    with pytest.raises(ValueError, match="shape"):
        store.record_round(act1, new1[:, :4], torch.ones(5), torch.ones(5), {})


def test_store_checkpoint_round_trip(tmp_path):
    store = PseudoLabelStore("zeros")
    store.initialise(_manual())
    _round(store, 1)
    _round(store, 2)
    torch.save(store.state_dict(), tmp_path / "store.pt")
    state = torch.load(tmp_path / "store.pt")

    fresh = PseudoLabelStore("manual")
    fresh.load_state_dict(state)
    assert fresh.init == "zeros" and fresh.initialised
    for key in ("labels", "has_pseudo", "manual_clean_prob", "pseudo_clean_prob", "actions"):
        assert torch.equal(getattr(fresh, key), getattr(store, key)), key
    assert fresh.rounds == store.rounds
    assert fresh.labels.is_shared()

    # a store already sized by its data set keeps its shared buffer when resuming
    sized = PseudoLabelStore("zeros")
    sized.initialise(_manual())
    ptr = sized.labels.data_ptr()
    sized.load_state_dict(state)
    assert sized.labels.data_ptr() == ptr and torch.equal(sized.labels, store.labels)

    # loading must copy: later rounds may not write through into the checkpointed state
    _round(fresh, 3)
    assert torch.equal(state["labels"], store.labels)


def test_store_rejects_checkpoint_of_other_data():
    store = PseudoLabelStore("zeros")
    store.initialise(_manual())
    other = PseudoLabelStore("zeros")
    other.initialise(_manual(n=6))
    with pytest.raises(ValueError, match="other data"):
        other.load_state_dict(store.state_dict())


def test_store_starts_from_an_earlier_runs_checkpoint(tmp_path):
    earlier = PseudoLabelStore("zeros")
    earlier.initialise(_manual())
    _round(earlier, 1)
    torch.save({"model": {}, "store": earlier.state_dict()}, tmp_path / "state_checkpoint_3.pt")
    torch.save(earlier.state_dict(), tmp_path / "store.pt")
    for name in ("state_checkpoint_3.pt", "store.pt"):
        store = PseudoLabelStore("zeros", source=str(tmp_path / name))
        store.ensure(_manual())
        assert torch.equal(store.labels, earlier.labels) and store.rounds == earlier.rounds
        assert store.labels.is_shared()
    with pytest.raises(ValueError, match="other data"):
        PseudoLabelStore(source=str(tmp_path / "store.pt")).ensure(_manual(n=6))
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        PseudoLabelStore(source=str(tmp_path / "missing.pt")).ensure(_manual())
    torch.save({"model": {}}, tmp_path / "model.pt")
    with pytest.raises(ValueError, match="no pseudo-label store"):
        PseudoLabelStore(source=str(tmp_path / "model.pt")).ensure(_manual())
    (tmp_path / "corrupt.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="corrupt.pt"):
        PseudoLabelStore(source=str(tmp_path / "corrupt.pt")).ensure(_manual())


# ---------------------------------------------------------------- label_dice


def test_label_dice_crafted():
    a = torch.zeros(4, 4, 4, dtype=torch.uint8)
    b = torch.zeros_like(a)
    # sample 0: class 1 on 3 vs 2 pixels, 2 shared -> 2*2/5; class 2 absent from both, so not averaged in
    a[0, 0, :3] = 1
    b[0, 0, :2] = 1
    # sample 1: class 1 identical, class 2 disjoint -> mean(1, 0)
    a[1, 1, :2] = 1
    b[1, 1, :2] = 1
    a[1, 3, 0] = 2
    b[1, 3, 3] = 2
    # sample 2: empty in both maps -> 1; sample 3: foreground in one map only -> 0
    a[3, 2, 2] = 1
    dice = label_dice(a, b, num_classes=3)
    assert dice.dtype == torch.float64 and dice.shape == (4,)
    torch.testing.assert_close(dice, torch.tensor([0.8, 0.5, 1.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(label_dice(b, a, 3), dice)
    with pytest.raises(ValueError, match="shape"):
        label_dice(a, b[:2], 3)


def test_pooled_dice_and_supervised_fraction_crafted():
    clean = torch.zeros(2, 4, 4, dtype=torch.uint8)
    clean[0, :2, :2] = 1  # 4 pixels of class 1
    clean[1, 0, :2] = 2  # 2 pixels of class 2
    pseudo = clean.clone()
    pseudo[0, 0, 0] = 255  # one class-1 pixel left unsupervised: not counted
    pseudo[1, 0, 1] = 0  # one class-2 pixel missed: 2*1/(1+2)
    pseudo[1, 3, :] = 255
    assert pooled_dice(pseudo, clean, num_classes=3) == pytest.approx((1.0 + 2 / 3) / 2)
    assert supervised_fraction(pseudo) == pytest.approx(1 - 5 / 32)
    # of the 27 supervised pixels one is wrong (the missed class-2 pixel); nothing supervised, nothing wrong
    assert wrong_fraction(pseudo, clean) == pytest.approx(1 / 27)
    assert wrong_fraction(torch.full_like(clean, 255), clean) == 0.0
    with pytest.raises(ValueError, match="shape"):
        wrong_fraction(pseudo, clean[:1])
    # a slice that lost its mask, next to a pseudo-label that is right but for one pixel: per-sample Dice says 0,
    # pooled Dice over the two slices weighs the one pixel
    lost = torch.stack([clean[0], torch.zeros_like(clean[0])])
    truth = torch.stack([clean[0], clean[0]])
    truth[1] = 0
    truth[1, 3, 3] = 1
    assert label_dice(lost, truth, 3)[1] == 0.0
    assert pooled_dice(lost, truth, 3) == pytest.approx(2 * 4 / 9)
    assert pooled_dice(torch.zeros_like(lost), torch.zeros_like(lost), 3) == 1.0
    with pytest.raises(ValueError, match="shape"):
        pooled_dice(lost, truth[:1], 3)


# ---------------------------------------------------------------- HybridPrepareBatch


@pytest.mark.parametrize("kind", ["dice", "dicece"])
def test_dice_classes_leave_out_a_class_without_changing_the_others(kind):
    """A class left out of dice_classes adds 0; the kept classes keep their weight and cross-entropy is untouched:
    the loss is the plain one minus the left-out class's share of the Dice mean, on that sample only."""
    target = _target(b=2, classes=4, seed=7)
    target[0][target[0] == 2] = 0  # Y' of sample 0 lost its Myo
    logits = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(8))
    loss = SegmentationLoss(kind)
    keep = torch.ones(2, 4, dtype=torch.bool)
    keep[0, 2] = False
    dice_only = SegmentationLoss("dice")
    per_class = dice_only.multi_dice(logits, target).flatten(1)  # (B, 3) soft Dice per foreground class
    expected = loss(logits, target) - torch.tensor([per_class[0, 1] / 3, 0.0])
    torch.testing.assert_close(loss(logits, target, dice_classes=keep), expected)
    with pytest.raises(ValueError, match="give one"):
        loss(logits, target, absent_unknown=True, dice_classes=keep)


def test_cleansed_absent_unknown_reads_the_classes_y_prime_states():
    """HybridLoss(cleansed_absent_unknown=True) leaves out the Dice terms of the classes the fourth channel does not
    state, in the pseudo term only; without that channel it refuses with a message naming the fix."""
    manual = _target(b=2, classes=4, seed=9)
    pseudo = manual.clone()
    pseudo[0][pseudo[0] == 1] = IGNORE_INDEX  # slice 0 was cleansed and its RV contested everywhere
    logits = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(10))
    all_bits = (1 << 24) - 1
    known = torch.tensor([class_bits(pseudo[0]), all_bits])
    assert known.tolist()[0] & 1 == 0
    channel = torch.zeros_like(manual)
    target = torch.cat([manual, pseudo, channel + 7, channel + known.view(-1, 1, 1, 1)], 1)
    inner = SegmentationLoss("dice")
    hybrid = HybridLoss(inner, cleansed_absent_unknown=True)
    hybrid.lambda1, hybrid.lambda2 = 0.0, 1.0
    expected = inner(logits, pseudo, dice_classes=classes_from_bits(known, 4))
    torch.testing.assert_close(hybrid(logits, target), expected)
    assert hybrid(logits, target)[0] < inner(logits, pseudo)[0]  # the absent-RV term is gone from slice 0
    torch.testing.assert_close(hybrid(logits, target)[1], inner(logits, pseudo)[1])
    hybrid.lambda1, hybrid.lambda2 = 1.0, 0.0  # the manual term does not read the channel
    torch.testing.assert_close(hybrid(logits, target), inner(logits, manual))
    hybrid.lambda1, hybrid.lambda2 = 0.0, 1.0
    with pytest.raises(ValueError, match="fourth target channel"):
        hybrid(logits, target[:, :3])
    with pytest.raises(TypeError, match="cleansed_absent_unknown needs a SegmentationLoss"):
        HybridLoss(torch.nn.L1Loss(), cleansed_absent_unknown=True)


def test_prepare_batch_stacks_pseudo_as_channel_1():
    image = torch.randn(2, 1, 8, 8)
    label = torch.randint(0, 4, (2, 1, 8, 8)).float()
    pseudo = torch.randint(0, 4, (2, 1, 8, 8)).float()
    x, y = HybridPrepareBatch()({"image": image, "label": label, "pseudo": pseudo}, torch.device("cpu"))
    assert torch.equal(x, image)
    assert y.shape == (2, 2, 8, 8) and y.dtype == label.dtype
    assert torch.equal(y[:, 0:1], label) and torch.equal(y[:, 1:2], pseudo)


def test_prepare_batch_stacks_the_slice_classes_as_channel_2():
    image = torch.randn(3, 1, 8, 8)
    label, pseudo = torch.zeros(3, 1, 8, 8), torch.ones(3, 1, 8, 8)
    batch = {"image": image, "label": label, "pseudo": pseudo, "classes_known": torch.tensor([5, 0, 7])}
    _, y = HybridPrepareBatch(slice_flags=True)(batch, torch.device("cpu"))
    assert y.shape == (3, 3, 8, 8)
    assert torch.equal(y[:, 2].flatten(1).amax(1), torch.tensor([5.0, 0.0, 7.0]))
    assert torch.equal(y[:, 2].flatten(1).amin(1), torch.tensor([5.0, 0.0, 7.0]))
    _, plain = HybridPrepareBatch()(batch, torch.device("cpu"))
    assert plain.shape == (3, 2, 8, 8)
    _, four = HybridPrepareBatch(slice_flags=True)({**batch, "pseudo_known": torch.tensor([1, 2, 3])},
                                                   torch.device("cpu"))
    assert four.shape == (3, 4, 8, 8) and torch.equal(four[:, 3].flatten(1).amin(1), torch.tensor([1.0, 2.0, 3.0]))
    with pytest.raises(KeyError, match="classes_known"):
        HybridPrepareBatch(slice_flags=True)({"image": image, "label": label, "pseudo": pseudo}, torch.device("cpu"))


def test_class_bits_round_trip():
    label = torch.zeros(6, 6, dtype=torch.uint8)
    assert class_bits(label) == 0
    label[0, 0], label[1, 1], label[2, 2] = 1, 3, IGNORE_INDEX
    assert class_bits(label) == 0b101
    present = classes_from_bits(torch.tensor([0.0, 5.0, 2.0]), 4)
    assert present.tolist() == [[True, False, False, False], [True, True, False, True], [True, False, True, False]]
    with pytest.raises(ValueError, match="24"):
        class_bits(torch.full((2, 2), 25, dtype=torch.uint8))


def test_prepare_batch_without_pseudo_is_default():
    image, label = torch.randn(2, 1, 8, 8), torch.randint(0, 4, (2, 1, 8, 8)).float()
    x, y = HybridPrepareBatch()({"image": image, "label": label}, torch.device("cpu"))
    assert torch.equal(x, image) and torch.equal(y, label)


def test_cleansing_quality_reports_all_slices_and_the_noisy_ones():
    clean = torch.zeros(3, 4, 4, dtype=torch.uint8)
    clean[:, 1:3, 1:3] = 1  # 4 pixels of class 1 in every slice
    manual = clean.clone()
    manual[1] = 0  # slice 1 missed: the only noisy slice
    pseudo = clean.clone()
    pseudo[1, 1, 1] = 255  # its pseudo-label leaves one pixel unsupervised and misses another
    pseudo[1, 2, 2] = 0
    prediction = torch.zeros_like(clean)
    report = cleansing_quality(manual, pseudo, prediction, clean, num_classes=2)
    assert report["dice_manual_vs_clean"] == pytest.approx(2 / 3)
    assert report["noisy_dice_manual_vs_clean"] == 0.0
    # slice 1 of the pseudo-labels: 2 of the 3 supervised class-1 pixels found, Dice 2*2/(2+3)
    assert report["dice_pseudo_vs_clean"] == pytest.approx((1 + 0.8 + 1) / 3)
    assert report["noisy_dice_pseudo_vs_clean"] == pytest.approx(0.8)
    assert report["noisy_pooled_dice_pseudo_vs_clean"] == pytest.approx(0.8)
    assert report["pooled_dice_pseudo_vs_clean"] == pytest.approx(2 * 10 / 21)
    assert report["dice_pred_vs_clean"] == 0.0
    assert report["pseudo_supervised"] == pytest.approx(47 / 48)
    assert report["noisy_pseudo_supervised"] == pytest.approx(15 / 16)
    # slice 1: the manual label is wrong on its 4 class-1 pixels of 16; the pseudo-label on 1 of its 15 supervised
    assert report["noisy_manual_wrong"] == pytest.approx(4 / 16)
    assert report["noisy_pseudo_wrong"] == pytest.approx(1 / 15)
    assert "filter_precision" not in report
    # the filter flagged slices 1 and 2: one of the two is truly noisy, and it is the only one
    flagged = cleansing_quality(manual, pseudo, prediction, clean, 2, flagged_noisy=torch.tensor([False, True, True]))
    assert list(flagged)[:2] == ["filter_precision", "filter_recall"]
    assert (flagged["filter_precision"], flagged["filter_recall"]) == (0.5, 1.0)
    without_noise = cleansing_quality(clean, clean, clean, clean, num_classes=2)
    assert without_noise["dice_manual_vs_clean"] == 1.0 and not any(k.startswith("noisy_") for k in without_noise)


def test_cleansed_absent_unknown_auto_follows_the_loss_kind(caplog):
    """'auto' turns the rule on for soft Dice only, says so in the log, and anything but True/False/'auto' fails."""
    with caplog.at_level("INFO", logger="scripts.losses"):
        assert HybridLoss(SegmentationLoss("dice"), cleansed_absent_unknown="auto").cleansed_absent_unknown is True
        assert HybridLoss(SegmentationLoss("dicece"), cleansed_absent_unknown="auto").cleansed_absent_unknown is False
    assert "on for a SegmentationLoss(kind='dice')" in caplog.text
    assert "off for a SegmentationLoss(kind='dicece')" in caplog.text
    with pytest.raises(ValueError, match="'auto'"):
        HybridLoss(SegmentationLoss("dice"), cleansed_absent_unknown="yes")


def test_hybrid_loss_without_the_rule_calls_any_loss_as_before():
    """With cleansed_absent_unknown off, the pseudo term calls the loss with (logits, target) only, so a loss that
    is not a SegmentationLoss still works."""
    manual = _target(b=2, classes=4, seed=11)
    logits = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(12))

    def plain(x, y):
        return (x.softmax(1).argmax(1, keepdim=True) != y).float().flatten(1).mean(1)

    hybrid = HybridLoss(plain, cleansed_absent_unknown="auto")
    hybrid.lambda1, hybrid.lambda2 = 0.0, 1.0
    target = torch.cat([manual, manual, torch.zeros_like(manual), torch.zeros_like(manual)], 1)
    torch.testing.assert_close(hybrid(logits, target), plain(logits, manual))


def test_by_schedule_picks_the_long_choice_from_its_threshold_and_logs_it(caplog):
    short, long = object(), object()
    with caplog.at_level("INFO", logger="scripts.schedule"):
        assert by_schedule(99, short, long, long_from=100, name="rules#x") is short
        assert by_schedule(100, short, long, long_from=100) is long
    assert "rules#x: 99 epochs of rounds, a short schedule" in caplog.text and "a long schedule" in caplog.text
    with pytest.raises(ValueError, match="epochs_after_warmup"):
        by_schedule(-1, short, long)
    with pytest.raises(ValueError, match="long_from"):
        by_schedule(10, short, long, long_from=0)
