"""monolith-serve: a serving replica speaking TensorFlow Serving's API.

    python -m monolith_tf.serving --model_base_path=/models/ranker \
        --model_name=ranker --delta_dir=/deltas/ranker --port=8500 --rest_api_port=8501

Serves the newest numbered SavedModel version under the base path (exports of
`monolith_tf.export`, or any SavedModel), swaps in newer versions without
failing requests, and applies the trainer's sparse/dense delta files in place.
Stock TF Serving clients (gRPC PredictionService/ModelService, REST) work
unchanged. See docs/serving.md.

Python API: `ServingReplica(model_base_path, model_name, delta_dir=None,
port=0, rest_api_port=None, poll_seconds=1.0)`, with start()/stop()/
status()/poll_now() and context-manager support.
"""

from monolith_tf.serving.errors import ServingError
from monolith_tf.serving.server import Ports, ServingReplica, wait_until

__all__ = ["ServingReplica", "Ports", "ServingError", "wait_until"]
