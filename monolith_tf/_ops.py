"""The one loader of the compiled op library (``_monolith_ops.so``).

Everything that calls a ``Monolith>`` op gets it from ``ops()`` here. Loading
checks that the library was built against the TensorFlow that is installed,
because a mismatch otherwise shows up as an undefined-symbol error or a crash.
This module must not define table behaviour; it only finds and loads ops.
"""

import os
import threading

import tensorflow as tf

_LIB_NAME = "_monolith_ops.so"
_BUILT_FOR = "_built_for_tensorflow.txt"
_lock = threading.Lock()  # guards _module
_module = None


def library_path():
    """Where the op library is expected: next to this file."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), _LIB_NAME)


def ops():
    """Loads the op library on first use and returns its generated module."""
    global _module
    with _lock:
        if _module is not None:
            return _module
        path = library_path()
        if not os.path.exists(path):
            raise ImportError(
                f"monolith_tf: the op library {path} is missing. Build it with `make so` "
                "(or `pip install .`) from the source checkout.")
        stamp = os.path.join(os.path.dirname(path), _BUILT_FOR)
        if os.path.exists(stamp):
            with open(stamp) as f:
                built_for = f.read().strip()
            if built_for != tf.__version__:
                raise ImportError(
                    f"monolith_tf: {path} was built for TensorFlow {built_for}, but TensorFlow "
                    f"{tf.__version__} is installed. Rebuild with `make clean so`.")
        _module = tf.load_op_library(path)
        return _module
