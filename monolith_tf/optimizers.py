"""Fused sparse optimizers that run inside a HashTable.

These are configurations, not Keras optimizers: the update itself runs in C++
on each touched row (ops/core/optimizers.cc), with the same meaning and math as
the Keras 3 optimizer of the same name. Each knows the op attributes it maps to
and how its per-row slots are laid out in a table export.
"""

import math

__all__ = ["SGD", "Adagrad", "Ftrl", "Adam", "get", "serialize"]


def _require(ok, message):
    if not ok:
        raise ValueError(message)


class _Optimizer:
    """Common config plumbing; subclasses set `kind` and their hyperparameters."""

    kind = None

    def __init__(self, learning_rate):
        _require(isinstance(learning_rate, (int, float)) and math.isfinite(learning_rate) and learning_rate > 0,
                 f"{type(self).__name__}: learning_rate must be a finite number > 0, got {learning_rate!r}")
        self.learning_rate = float(learning_rate)

    def get_config(self):
        return dict(vars(self))

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def op_attrs(self):
        """Attributes of the Monolith>HashTableCreate op."""
        attrs = {"optimizer": self.kind}
        attrs.update(self.get_config())
        return attrs

    def slot_layout(self, dim):
        """[(slot name, width)] in the order slots are stored after a row's values."""
        return []

    def __eq__(self, other):
        return type(self) is type(other) and self.get_config() == other.get_config()

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


class SGD(_Optimizer):
    """w -= learning_rate * g."""

    kind = "sgd"

    def __init__(self, learning_rate=0.01):
        super().__init__(learning_rate)


class Adagrad(_Optimizer):
    """Keras Adagrad: accum += g^2; w -= lr * g / sqrt(accum + epsilon)."""

    kind = "adagrad"

    def __init__(self, learning_rate=0.001, initial_accumulator_value=0.1, epsilon=1e-7):
        super().__init__(learning_rate)
        _require(initial_accumulator_value >= 0, "Adagrad: initial_accumulator_value must be >= 0")
        _require(epsilon >= 0, "Adagrad: epsilon must be >= 0")
        self.initial_accumulator_value = float(initial_accumulator_value)
        self.epsilon = float(epsilon)

    def slot_layout(self, dim):
        return [("accumulator", dim)]


class Ftrl(_Optimizer):
    """Keras Ftrl (without l2 shrinkage), per row."""

    kind = "ftrl"

    def __init__(self, learning_rate=0.001, learning_rate_power=-0.5, initial_accumulator_value=0.1,
                 l1_regularization_strength=0.0, l2_regularization_strength=0.0, beta=0.0):
        super().__init__(learning_rate)
        _require(learning_rate_power <= 0, "Ftrl: learning_rate_power must be <= 0")
        _require(initial_accumulator_value > 0, "Ftrl: initial_accumulator_value must be > 0")
        _require(l1_regularization_strength >= 0, "Ftrl: l1_regularization_strength must be >= 0")
        _require(l2_regularization_strength >= 0, "Ftrl: l2_regularization_strength must be >= 0")
        _require(beta >= 0, "Ftrl: beta must be >= 0")
        self.learning_rate_power = float(learning_rate_power)
        self.initial_accumulator_value = float(initial_accumulator_value)
        self.l1_regularization_strength = float(l1_regularization_strength)
        self.l2_regularization_strength = float(l2_regularization_strength)
        self.beta = float(beta)

    def slot_layout(self, dim):
        return [("accumulator", dim), ("linear", dim)]


class Adam(_Optimizer):
    """Keras Adam with a per-row step count (bias correction per row)."""

    kind = "adam"

    def __init__(self, learning_rate=0.001, beta_1=0.9, beta_2=0.999, epsilon=1e-7):
        super().__init__(learning_rate)
        _require(0 <= beta_1 < 1, "Adam: beta_1 must be in [0, 1)")
        _require(0 <= beta_2 < 1, "Adam: beta_2 must be in [0, 1)")
        _require(epsilon >= 0, "Adam: epsilon must be >= 0")
        self.beta_1 = float(beta_1)
        self.beta_2 = float(beta_2)
        self.epsilon = float(epsilon)

    def slot_layout(self, dim):
        return [("m", dim), ("v", dim), ("step", 1)]


_BY_NAME = {cls.kind: cls for cls in (SGD, Adagrad, Ftrl, Adam)}


def get(identifier):
    """An optimizer from an instance, a name ("adagrad"), or a serialized dict."""
    if identifier is None:
        return Adagrad(learning_rate=0.05)
    if isinstance(identifier, _Optimizer):
        return identifier
    if isinstance(identifier, str):
        cls = _BY_NAME.get(identifier.lower())
        if cls is None:
            raise ValueError(f"unknown optimizer {identifier!r}; expected one of {sorted(_BY_NAME)}")
        return cls()
    if isinstance(identifier, dict) and "class_name" in identifier:
        cls = _BY_NAME.get(str(identifier["class_name"]).lower())
        if cls is None:
            raise ValueError(f"unknown optimizer {identifier['class_name']!r}; expected one of {sorted(_BY_NAME)}")
        return cls.from_config(identifier.get("config", {}))
    raise ValueError(
        f"optimizer must be a monolith_tf.optimizers instance, a name or a serialized dict, got {identifier!r} "
        "(Keras optimizers train dense weights; tables use their own fused optimizer)")


def serialize(optimizer):
    return {"class_name": optimizer.kind, "config": optimizer.get_config()}
