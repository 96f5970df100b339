"""How a device compares two adapters on its hold-out: accuracy first, then cross-entropy."""

import numpy as np
import pytest

from agent.trainer import layers
from agent.trainer.evaluation import Measure, measure
from tests.test_trainer_methods import batch, tiny_model


def test_measure_is_the_accuracy_and_mean_cross_entropy_of_the_logits():
    model = tiny_model(np.float32)
    x, labels = batch()
    x = x.astype(np.float32)
    got = measure(model, x, labels)
    logits = model.logits(x).astype(np.float64)
    probs = layers.softmax(logits)
    assert got.accuracy == pytest.approx(float((logits.argmax(1) == labels).mean()))
    expected = -np.log(probs[np.arange(len(labels)), labels]).mean()
    assert got.loss == pytest.approx(expected, rel=1e-6)
    assert got.rows == len(labels)


def test_better_means_more_accurate_or_as_accurate_with_a_lower_loss():
    assert Measure(0.9, 0.9, 10).better_than(Measure(0.8, 0.1, 10))
    assert Measure(0.9, 0.2, 10).better_than(Measure(0.9, 0.3, 10))
    assert not Measure(0.9, 0.3, 10).better_than(Measure(0.9, 0.3, 10))  # a tie keeps what runs
    assert not Measure(0.8, 0.0, 10).better_than(Measure(0.9, 1.0, 10))


def test_measuring_nothing_is_refused():
    model = tiny_model(np.float32)
    with pytest.raises(ValueError, match="no rows"):
        measure(model, np.zeros((0, 7), np.float32), np.zeros(0, np.int64))
