"""The CNN FLOPs count: a hand count of one unit, and the relations the benchmark reports."""

from agent.trainer.cnn import arch
from agent.trainer.cnn.flops import frozen_forward, method_flops
from agent.trainer.cnn.methods import CNN_METHODS

B, RANK, EPOCHS = 20, 4, 10


def count(model, method, trainable=1000):
    units = arch.build(model, 10)
    return method_flops(units, 28, CNN_METHODS[method], batch=B, rank=RANK, epochs=EPOCHS,
                        trainable_params=trainable)  # fmt: skip


def test_the_first_conv_is_an_fc_on_patches():
    (conv1,) = arch.build("cnn", 10)[:1]
    rows = B * 28 * 28
    expected = 2 * rows * 9 * 16 + rows * 16  # patches @ W + b
    expected += 3 * rows * 16 + rows * 16  # BN (inference), ReLU
    expected += 3 * rows * 16 / 4  # 2×2 max pooling: 3 comparisons per output
    assert frozen_forward((conv1,), 28, B) == expected


def test_skip2_forward_is_a_tenth_of_the_frozen_forward_plus_the_adapters():
    units = arch.build("cnn", 10)
    skip, skip2 = count("cnn", "skip-lora"), count("cnn", "skip2-lora")
    frozen = frozen_forward(units, 28, B)
    assert skip.forward - skip2.forward == frozen * (1 - 1 / EPOCHS)
    assert skip.backward == skip2.backward < 0.01 * count("cnn", "lora-all").backward


def test_the_trainable_part_shrinks_from_ft_all_to_lora_to_adapters():
    for model in ("cnn", "dwcnn"):
        ft_all, lora, adapter = (
            count(model, m).trainable for m in ("ft-all", "lora-all", "adapter")
        )
        assert adapter < lora < ft_all
        assert count(model, "ft-last").backward < count(model, "lora-all").backward
        assert count(model, "dora").trainable > lora  # the magnitudes and norms cost extra


def test_galore_pays_adams_update_on_top_of_ft_alls_gradients():
    galore, ft_all = count("cnn", "galore"), count("cnn", "ft-all")
    assert galore.backward == ft_all.backward and galore.update > ft_all.update
