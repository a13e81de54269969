"""Each fused optimizer against Keras' optimizer of the same name applied to a
dense tf.Variable holding the same rows, for several steps."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import monolith_tf as mtf
from monolith_tf import optimizers

PAIRS = [
    ("sgd", lambda: optimizers.SGD(0.1), lambda: keras.optimizers.SGD(0.1)),
    ("adagrad", lambda: optimizers.Adagrad(0.05), lambda: keras.optimizers.Adagrad(0.05)),
    ("adagrad_custom", lambda: optimizers.Adagrad(0.2, initial_accumulator_value=0.5, epsilon=1e-3),
     lambda: keras.optimizers.Adagrad(0.2, initial_accumulator_value=0.5, epsilon=1e-3)),
    ("ftrl", lambda: optimizers.Ftrl(0.1), lambda: keras.optimizers.Ftrl(0.1)),
    ("ftrl_regularized", lambda: optimizers.Ftrl(0.1, learning_rate_power=-0.7, initial_accumulator_value=0.2,
                                                 l1_regularization_strength=0.01, l2_regularization_strength=0.02,
                                                 beta=0.5),
     lambda: keras.optimizers.Ftrl(0.1, learning_rate_power=-0.7, initial_accumulator_value=0.2,
                                   l1_regularization_strength=0.01, l2_regularization_strength=0.02, beta=0.5)),
    ("adam", lambda: optimizers.Adam(0.01), lambda: keras.optimizers.Adam(0.01)),
    ("adam_custom", lambda: optimizers.Adam(0.03, beta_1=0.8, beta_2=0.99, epsilon=1e-5),
     lambda: keras.optimizers.Adam(0.03, beta_1=0.8, beta_2=0.99, epsilon=1e-5)),
]


@pytest.mark.parametrize("name,ours,theirs", PAIRS, ids=[p[0] for p in PAIRS])
def test_matches_keras_on_dense_rows(name, ours, theirs):
    dim, num_rows, steps = 8, 64, 12
    rng = np.random.default_rng(0)
    keys = rng.integers(-10**12, 10**12, size=num_rows)
    table = mtf.HashTable(dim, optimizer=ours(), seed=11)
    initial = table.lookup(keys, train=True, timestamp=0).numpy()
    dense = tf.Variable(initial)
    keras_opt = theirs()
    for step in range(steps):
        # Every row is touched at every step (as Keras updates a dense variable),
        # with repeated ids whose gradients the table must sum first.
        order = rng.permutation(np.concatenate([np.arange(num_rows), rng.integers(0, num_rows, 32)]))
        grads = rng.standard_normal((len(order), dim)).astype(np.float32)
        table.apply_gradients(keys[order], grads)
        summed = tf.math.unsorted_segment_sum(grads, order, num_rows)
        keras_opt.apply_gradients([(summed, dense)])
        np.testing.assert_allclose(table.lookup(keys).numpy(), dense.numpy(), rtol=1e-5, atol=1e-5,
                                   err_msg=f"{name} diverged from Keras at step {step}")


def test_adagrad_slots_hold_the_accumulator():
    table = mtf.HashTable(2, optimizer=optimizers.Adagrad(0.1, initial_accumulator_value=0.1), initializer="zeros")
    table.lookup([1], train=True, timestamp=0)
    table.apply_gradients([1, 1], [[1.0, 2.0], [1.0, 0.0]])
    export = table.export()
    (name, col, width), = table.slot_layout()
    assert name == "accumulator"
    np.testing.assert_allclose(export["slots"].numpy()[0, col:col + width], [0.1 + 4.0, 0.1 + 4.0])


def test_adam_keeps_a_step_count_per_row():
    table = mtf.HashTable(2, optimizer=optimizers.Adam(0.01))
    table.lookup([1, 2], train=True, timestamp=0)
    for _ in range(3):
        table.apply_gradients([1], [[1.0, 1.0]])
    table.apply_gradients([2], [[1.0, 1.0]])
    export = table.export()
    step_col = [col for name, col, _ in table.slot_layout() if name == "step"][0]
    steps = dict(zip(export["keys"].numpy(), export["slots"].numpy()[:, step_col]))
    assert steps == {1: 3.0, 2: 1.0}
