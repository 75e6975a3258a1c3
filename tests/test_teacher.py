import pytest
import torch
from ignite.engine import Engine

from scripts.teacher import MeanTeacher, ema_update


def _net(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.BatchNorm2d(3))


def test_ema_update_is_the_weighted_average_and_copies_buffers():
    teacher, student = _net(0), _net(1)
    student[1].running_mean.fill_(0.5)
    before = [p.clone() for p in teacher.parameters()]
    ema_update(teacher, student, decay=0.9)
    for t, b, s in zip(teacher.parameters(), before, student.parameters()):
        torch.testing.assert_close(t, 0.9 * b + 0.1 * s, rtol=0, atol=1e-6)
    assert torch.equal(teacher[1].running_mean, student[1].running_mean)


@pytest.mark.parametrize("decay", [0.0, 1.0])
def test_ema_update_limits(decay):
    teacher, student = _net(0), _net(1)
    before = [p.clone() for p in teacher.parameters()]
    ema_update(teacher, student, decay)
    expected = before if decay == 1.0 else list(student.parameters())
    assert all(torch.equal(t, e) for t, e in zip(teacher.parameters(), expected))


def test_ema_update_rejects_bad_input():
    with pytest.raises(ValueError, match="decay"):
        ema_update(_net(0), _net(1), 1.5)
    with pytest.raises(ValueError, match="parameter lists"):
        ema_update(_net(0), torch.nn.Linear(2, 2), 0.5)


def test_mean_teacher_follows_every_iteration_and_round_trips():
    student = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        student.weight.fill_(0.0)
    mean = MeanTeacher(student, decay=0.5)
    assert not any(p.requires_grad for p in mean.teacher.parameters())

    def step(engine, batch):
        with torch.no_grad():
            student.weight.add_(1.0)  # the student's weight after iteration i is i

    engine = Engine(step)
    mean.attach(engine)
    engine.run(range(3), max_epochs=1)
    # t1 = 0.5, t2 = 0.5 * 0.5 + 0.5 * 2 = 1.25, t3 = 0.5 * 1.25 + 0.5 * 3 = 2.125
    assert mean.teacher.weight.item() == pytest.approx(2.125)
    assert student.weight.item() == 3.0  # the student is never touched
    other = MeanTeacher(torch.nn.Linear(1, 1, bias=False))
    other.load_state_dict(mean.state_dict())
    assert other.teacher.weight.item() == pytest.approx(2.125)
