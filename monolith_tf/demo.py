"""What `make demo` runs: `monolith-train` on the built-in synthetic data, kept small.

    python -m monolith_tf.demo [extra monolith-train flags]

Trains the Monolith estimator for a few epochs on 100k synthetic MovieLens-shaped ratings
(no download needed), prints test RMSE / MAE / AUC, saves the model under
/tmp/monolith_demo and prints recommendations; about a minute on two cores. Any
`monolith-train` flag given on the command line overrides these defaults (e.g.
`--data=/path/to/ml-100k`).
"""

import sys

from absl import app

from monolith_tf import train

DEFAULT_FLAGS = ("--epochs=8", "--model_dir=/tmp/monolith_demo")


def run():
    train.define_flags()
    # Defaults first, so flags given on the command line win (absl keeps the last value).
    app.run(train.main, argv=[sys.argv[0], *DEFAULT_FLAGS, *sys.argv[1:]])


if __name__ == "__main__":
    run()
