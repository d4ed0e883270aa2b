"""The decision offset's search (adapters.personal.search_decision_offset) on known cases."""

import pytest
import torch

from nightowl.adapters.personal import search_decision_offset

# Binary margins (label 1 minus label 0) the base gives ten posts; the user calls the top seven
# label 1, two of them (-0.8, -0.6) below the base's threshold.
MARGINS = [-3.0, -2.5, -2.0, -0.8, -0.6, 0.5, 1.0, 2.0, 3.0, 4.0]
GOLD = [0, 0, 0, 1, 1, 1, 1, 1, 1, 1]
LOGITS = torch.tensor([[0.0, m] for m in MARGINS])


@pytest.mark.parametrize("metric", ["macro_f1", "accuracy"])
def test_the_nearest_offset_that_answers_every_label_right(metric):
    # any offset in (0.8, 2.0] makes all ten right; the search keeps the one nearest the start
    assert search_decision_offset(LOGITS, GOLD, [0.0, 0.0], metric, penalty=0.0) == pytest.approx([0.0, 0.9])
    assert search_decision_offset(LOGITS, GOLD, [0.0, 0.5], metric, penalty=0.0) == pytest.approx([0.0, 0.9])
    assert search_decision_offset(LOGITS, GOLD, [0.0, 1.5], metric, penalty=0.0) == pytest.approx([0.0, 1.5])


def test_the_penalty_keeps_a_few_labels_near_the_prior():
    # two more posts right are worth 2 examples' metric at most: a pull of 3 per unit outweighs a
    # move of 0.9, a pull of 1 does not
    assert search_decision_offset(LOGITS, GOLD, [0.0, 0.0], "accuracy", penalty=3.0) == pytest.approx([0.0, 0.0])
    assert search_decision_offset(LOGITS, GOLD, [0.0, 0.0], "accuracy", penalty=1.0) == pytest.approx([0.0, 0.9])


def test_three_labels_label_zero_stays_at_its_start():
    """A coordinate search: each label in turn, label 0 fixed (only differences matter). It
    climbs (here from 2 of 4 right to 3), it does not promise the best of all offsets."""
    logits = torch.tensor([[1.0, 0.0, 0.2], [1.0, 0.6, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    gold = torch.tensor([2, 1, 1, 2])
    start = [0.3, 0.0, 0.0]
    offset = search_decision_offset(logits, gold.tolist(), start, "accuracy", penalty=0.0)
    assert offset[0] == pytest.approx(0.3)
    right = {name: int((logits + torch.tensor(o)).argmax(-1).eq(gold).sum()) for name, o in (("start", start), ("found", offset))}
    assert right == {"start": 2, "found": 3}
