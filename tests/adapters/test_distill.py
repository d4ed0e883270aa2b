"""Soft-label distillation in base training (TrainRecipe.distill_alpha, a teacher's logits)."""

from __future__ import annotations

import pytest
import torch

from nightowl.adapters.train import TrainRecipe, _checked_teacher, soft_label_loss


def test_the_soft_label_loss_is_zero_at_the_teacher_and_pulls_towards_it():
    teacher = torch.tensor([[2.0, -1.0, 0.5], [0.0, 3.0, -2.0]])
    assert soft_label_loss(teacher.clone(), teacher, 2.0).item() == pytest.approx(0.0, abs=1e-6)
    student = torch.zeros(2, 3, requires_grad=True)
    loss = soft_label_loss(student, teacher, 2.0)
    loss.backward()
    assert loss.item() > 0
    # gradient descent raises each row's logit where the teacher is most sure
    step = -student.grad
    assert step[0].argmax().item() == 0 and step[1].argmax().item() == 1


def test_the_temperature_squared_keeps_the_gradient_scale():
    teacher = torch.tensor([[1.0, -1.0]])
    grads = []
    for t in (1.0, 4.0):
        s = torch.tensor([[-1.0, 1.0]], requires_grad=True)
        soft_label_loss(s, teacher, t).backward()
        grads.append(s.grad.abs().sum().item())
    # without the t^2 factor the gradient at t = 4 would be ~16x smaller; with it, the same order
    assert 0.2 < grads[1] / grads[0] < 1.5


def test_a_recipe_with_distillation_needs_one_teacher_row_per_example():
    with pytest.raises(ValueError, match="distill_alpha"):
        TrainRecipe(distill_alpha=1.5)
    with pytest.raises(ValueError, match="distill_temperature"):
        TrainRecipe(distill_temperature=0.0)
    taught = TrainRecipe(distill_alpha=0.5)
    with pytest.raises(ValueError, match="needs teacher_logits"):
        _checked_teacher(taught, None, 4, 3)
    with pytest.raises(ValueError, match=r"\[4, 3\]"):
        _checked_teacher(taught, torch.zeros(3, 3), 4, 3)
    assert _checked_teacher(taught, torch.zeros(4, 3), 4, 3).shape == (4, 3)
    assert _checked_teacher(TrainRecipe(), torch.zeros(1, 1), 4, 3) is None  # no distillation: teacher unused
