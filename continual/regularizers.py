"""Avalanche's EWC and LwF, anchored at the user's model as it stood before tonight.

Avalanche's plugins take their anchor at the end of each experience of one strategy object.
A night builds a fresh strategy with one experience (the process may have restarted since the
last night), so left alone both plugins would do nothing. Here the anchor is set up front:
LwF distils from the starting model (the user's active adapter, or the base), and EWC holds each
trainable weight near its starting value in proportion to its Fisher importance on the user's
older examples (the replay selection). Both come on with `UpdateConfig.lwf_alpha` / `ewc_lambda`.
"""

from __future__ import annotations

import torch
from avalanche.training.plugins import EWCPlugin, LwFPlugin
from avalanche.training.utils import copy_params_dict

from nightowl.continual.experiences import IndexedModel


def anchored_lwf(model: IndexedModel, alpha: float, temperature: float = 2.0) -> LwFPlugin:
    """LwF whose teacher is `model` as it is now (call before training)."""
    plugin = LwFPlugin(alpha=alpha, temperature=temperature)
    plugin.lwf.prev_model = model.frozen_copy()
    plugin.lwf.prev_classes_by_task[0] = set(range(len(model.kit.labels)))  # distil over every label
    return plugin


class AnchoredEWC(EWCPlugin):
    """EWC with tonight's starting weights as experience 0 and tonight's training as experience 1."""

    def __init__(self, ewc_lambda: float, model: IndexedModel, older_dataset, device, batch_size: int):
        super().__init__(ewc_lambda, mode="separate")
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        params = [p for p in model.parameters() if p.requires_grad]
        was_training = model.training
        importances = self.compute_importances(
            model, torch.nn.CrossEntropyLoss(), torch.optim.SGD(params, lr=0.0), older_dataset, device, batch_size
        )
        model.zero_grad(set_to_none=True)
        model.train(was_training)
        # Frozen weights cannot move: keeping only trainable ones saves memory and penalty time.
        self.importances[0] = {k: v for k, v in importances.items() if k in trainable}
        self.saved_params[0] = {k: v for k, v in copy_params_dict(model).items() if k in trainable}

    def before_backward(self, strategy, **kwargs):
        clock = strategy.clock
        counter = clock.train_exp_counter
        clock.train_exp_counter = 1  # the penalty covers experience 0, the anchor
        try:
            super().before_backward(strategy, **kwargs)
        finally:
            clock.train_exp_counter = counter

    def after_training_exp(self, strategy, **kwargs):
        pass  # the next night anchors at its own starting model
