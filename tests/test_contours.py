import pytest
import torch

from scripts.contours import contour_length, contour_offset


def disc(radius: float, size: int = 64, centre=(32.0, 32.0)) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                            indexing="ij")
    return ((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius ** 2)


def test_contour_length_counts_the_edge_pixels_of_a_mask_and_not_the_image_border():
    square = torch.zeros(1, 12, 12, dtype=torch.bool)
    square[0, 3:9, 3:9] = True  # 6 x 6
    assert contour_length(square).tolist() == [20.0]  # 4 * 6 - 4
    assert abs(float(contour_length(disc(12.0)[None])[0]) - 2 * 3.14159 * 12) < 0.2 * 2 * 3.14159 * 12
    full = torch.ones(1, 5, 5, dtype=torch.bool)
    assert contour_length(full).tolist() == [0.0]
    assert contour_length(torch.zeros(2, 5, 5, dtype=torch.bool)).tolist() == [0.0, 0.0]


@pytest.mark.parametrize("shift", [2, 3, 5])
def test_a_contour_drawn_too_wide_or_too_tight_reads_its_displacement_in_pixels(shift):
    prediction = disc(12.0).long()[None]
    for drawn in (disc(12.0 + shift), disc(12.0 - shift)):
        offset = float(contour_offset(prediction, drawn.long()[None], num_classes=2)[0])
        assert abs(offset - shift) < 0.3 * shift, offset


def test_errors_on_both_sides_of_a_correct_contour_cancel():
    """A prediction shifted sideways disagrees with the label on as many pixels as a 3-pixel erosion would, but on
    both sides: its Dice is as poor, its offset near zero."""
    label = disc(12.0).long()[None]
    shifted = disc(12.0, centre=(32.0, 35.0)).long()[None]
    eroded = disc(9.0).long()[None]
    disagreement = lambda a, b: int((a != b).sum())  # noqa: E731
    assert disagreement(shifted, label) >= 0.6 * disagreement(eroded, label)
    assert float(contour_offset(shifted, label, 2)[0]) < 0.2
    assert float(contour_offset(eroded, label, 2)[0]) > 2.0
    assert float(contour_offset(label, label, 2)[0]) == 0.0


def test_the_offset_is_the_mean_over_the_foreground_classes_and_an_absent_class_adds_zero():
    label = torch.zeros(1, 64, 64, dtype=torch.long)
    label[disc(14.0)[None]] = 1
    label[disc(6.0)[None]] = 2
    prediction = label.clone()
    prediction[(disc(14.0) & ~disc(11.0))[None]] = 0  # class 1 drawn 3 px wider than predicted
    one = float(contour_offset(prediction, label, 3)[0])
    both = float(contour_offset(prediction, label, 4)[0])  # class 3 absent from both
    assert 1.0 < one < 2.0  # (about 3 + 0) / 2
    assert both == pytest.approx(one * 2 / 3)
    # a class missing from the prediction altogether still reads a finite displacement
    missed = torch.zeros_like(label)
    assert float(contour_offset(missed, label, 3)[0]) > 2.0


def test_contour_offset_refuses_shapes_that_disagree_and_a_class_count_without_foreground():
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        contour_offset(torch.zeros(2, 8, 8), torch.zeros(2, 8, 9), 2)
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        contour_offset(torch.zeros(8, 8), torch.zeros(8, 8), 2)
    with pytest.raises(ValueError, match="num_classes"):
        contour_offset(torch.zeros(1, 8, 8), torch.zeros(1, 8, 8), 1)


def test_contour_offset_is_the_same_in_chunks():
    labels = torch.stack([disc(8.0 + i % 5).long() for i in range(7)])
    preds = torch.stack([disc(9.0).long() for _ in range(7)])
    assert torch.equal(contour_offset(preds, labels, 2, chunk=3), contour_offset(preds, labels, 2))
