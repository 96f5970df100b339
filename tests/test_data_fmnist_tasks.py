"""The CNN benchmark's Fashion-MNIST tasks: which images go where, seeded, and rotated."""

import numpy as np
import pytest

from agent.data.fmnist_tasks import NEW_CLASSES, load_fmnist_task, rotate_rows, split_rows


@pytest.fixture(scope="module")
def rot(data_dir):
    return load_fmnist_task(data_dir, "fmnist-rot75", seed=3, n_pretrain=2000)


def test_the_split_is_one_seeded_permutation_of_the_train_images():
    tuned, rest = split_rows(60000, seed=3)
    assert len(tuned) == 1024 and len(rest) == 58976
    assert not set(tuned) & set(rest) and len(set(tuned) | set(rest)) == 60000
    np.testing.assert_array_equal(tuned, np.random.default_rng(3).permutation(60000)[:1024])
    assert not np.array_equal(split_rows(60000, seed=4)[0], tuned)


def test_rotation_task_fine_tunes_and_tests_on_rotated_images_only(data_dir, rot):
    from agent.data import load_fashion_mnist

    train, test = load_fashion_mnist(data_dir)
    tuned, rest = split_rows(len(train), seed=3)
    np.testing.assert_array_equal(rot.finetune.X, rotate_rows(train.X[tuned], 75.0))
    np.testing.assert_array_equal(rot.pretrain.X, train.X[rest[:2000]])  # upright
    assert len(rot.test) == 10000 and rot.n_pretrain_classes == 10
    np.testing.assert_array_equal(rot.test.X[:5], rotate_rows(test.X[:5], 75.0))


def test_unseen_classes_are_missing_from_pre_training_only(data_dir):
    task = load_fmnist_task(data_dir, "fmnist-unseen", seed=0, n_pretrain=3000)
    assert task.n_pretrain_classes == 8 and task.pretrain.n_classes == 8
    assert not np.isin(task.pretrain.y, NEW_CLASSES).any()
    assert np.isin(task.finetune.y, NEW_CLASSES).sum() > 100  # about a fifth of 1,024
    assert set(np.unique(task.test.y)) == set(range(10))


def test_unknown_tasks_are_refused(data_dir):
    with pytest.raises(ValueError, match="fmnist-rot75 or fmnist-unseen"):
        load_fmnist_task(data_dir, "mnist")
