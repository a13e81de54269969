"""Row initializers understood by the table: names or Keras initializer objects.

The table draws initial values itself (ops/core/initializers.cc) as a pure
function of (seed, key); this module only translates a user's choice into the
op's (kind, a, b) attributes, with Keras' default ranges.
"""

import keras

_DEFAULTS = {
    "zeros": (0.0, 0.0),
    "random_uniform": (-0.05, 0.05),
    "random_normal": (0.0, 0.05),
    "truncated_normal": (0.0, 0.05),
}

_KERAS_CLASSES = {
    keras.initializers.Zeros: ("zeros", None, None),
    keras.initializers.RandomUniform: ("random_uniform", "minval", "maxval"),
    keras.initializers.RandomNormal: ("random_normal", "mean", "stddev"),
    keras.initializers.TruncatedNormal: ("truncated_normal", "mean", "stddev"),
}


def resolve(initializer):
    """Returns (kind, a, b) for a name or a Keras initializer instance."""
    if isinstance(initializer, str):
        kind = initializer.lower()
        if kind not in _DEFAULTS:
            raise ValueError(f"unknown initializer {initializer!r}; expected one of {sorted(_DEFAULTS)} "
                             "or a keras.initializers instance of those kinds")
        return (kind, *_DEFAULTS[kind])
    for cls, (kind, a_name, b_name) in _KERAS_CLASSES.items():
        if type(initializer) is cls:
            if a_name is None:
                return (kind, 0.0, 0.0)
            config = initializer.get_config()
            return (kind, float(config[a_name]), float(config[b_name]))
    raise ValueError(f"unsupported initializer {initializer!r}; expected one of {sorted(_DEFAULTS)} "
                     "or keras.initializers.Zeros/RandomUniform/RandomNormal/TruncatedNormal")


def serialize(initializer):
    """A JSON-friendly form that `resolve` accepts back (via `deserialize`)."""
    kind, a, b = resolve(initializer)
    return {"kind": kind, "a": a, "b": b}


def deserialize(config):
    kind, a, b = config["kind"], config["a"], config["b"]
    if kind == "zeros":
        return keras.initializers.Zeros()
    if kind == "random_uniform":
        return keras.initializers.RandomUniform(minval=a, maxval=b)
    if kind == "random_normal":
        return keras.initializers.RandomNormal(mean=a, stddev=b)
    return keras.initializers.TruncatedNormal(mean=a, stddev=b)
