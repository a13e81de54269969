"""Rating datasets for examples, tests and benchmarks.

`movielens` reads the GroupLens MovieLens files a user has downloaded; `synthetic` generates
MovieLens-shaped data of any size from a seed. Both return the same dict of pandas frames.
Only numpy and pandas are needed: nothing here touches TensorFlow or the compiled ops.
"""

from monolith_tf.datasets import movielens, synthetic

__all__ = ["movielens", "synthetic"]
