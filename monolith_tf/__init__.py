"""monolith_tf: collisionless embedding tables for TensorFlow and Keras.

Layers, from the bottom: the C++ table core (ops/core), TF kernels
(ops/kernels), `HashTable` (a TF resource), then Keras layers, the `Monolith`
estimator, export, serving and online training on top.
"""

from monolith_tf import optimizers
from monolith_tf._ops import ops as _load_ops
from monolith_tf.hash_table import HashTable

__version__ = "0.1.0"
__all__ = ["HashTable", "Monolith", "optimizers", "SAVE_NAMESPACE"]

# Pass to tf.saved_model.SaveOptions(namespace_whitelist=...) when saving
# graphs that contain this package's ops.
SAVE_NAMESPACE = "Monolith"

# Loading the library registers the ops, which SavedModel loading needs even
# before any HashTable is built in this process.
_load_ops()
from monolith_tf.estimator import Monolith  # noqa: E402,F401  (the estimator, on top of everything above)
