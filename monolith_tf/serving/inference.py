"""Runs Predict / Classify / Regress on a loaded model, transport-free.

Inputs arrive as numpy arrays (gRPC: from TensorProtos; REST: from JSON),
are checked against the signature the way TensorFlow Serving checks them
(same messages where TF Serving has one, clearer ones where it would fail
deep inside the graph), run through the signature's function, and come back
as numpy arrays. Errors are `ServingError`s with TF Serving's codes.
"""

import re

import tensorflow as tf

from monolith_tf.serving import errors
from monolith_tf.serving.model_manager import tensor_spec_string

__all__ = ["predict", "classify", "regress", "merge_examples", "CLASSIFY_METHOD", "REGRESS_METHOD"]

PREDICT_METHOD = "tensorflow/serving/predict"
CLASSIFY_METHOD = "tensorflow/serving/classify"
REGRESS_METHOD = "tensorflow/serving/regress"
# Keys of stock classify/regress signatures (tensorflow/python/saved_model/signature_constants.py).
EXAMPLES_INPUT, CLASSES, SCORES, REGRESS_OUTPUTS = "inputs", "classes", "scores", "outputs"
_NODE_SUFFIX = re.compile(r"\s*(\[\[\{\{node [^}]*\}\}\]\]|\[Op:[^\]]*\])")


def _short(message):
    """The informative part of a TF runtime error message."""
    lines = [ln for ln in str(message).splitlines() if ln.strip() and not ln.startswith(
        ("Graph execution error", "Detected at node", "<stack traces unavailable>"))]
    text = " ".join(ln.strip() for ln in lines) or str(message)
    return _NODE_SUFFIX.sub("", text).strip()


def _run(sig, feeds):
    try:
        return sig.fn(**feeds)
    except Exception as e:
        err = errors.from_exception(e)
        raise errors.ServingError(err.code, _short(err.message)) from None


def _check_feeds(sig, arrays):
    """arrays: alias -> (numpy array, tf.DType sent). Returns alias -> tf.Tensor."""
    sent, expected = set(arrays), set(sig.inputs)
    if len(sent) != len(expected):
        # tensorflow_serving/servables/tensorflow/predict_util.cc: VerifyRequestInputsSize
        raise errors.invalid_argument(
            f"input size does not match signature: {len(sent)}!={len(expected)} len({{{','.join(sorted(sent))}}}) "
            f"!= len({{{','.join(sorted(expected))}}}). Sent extra: {{{','.join(sorted(sent - expected))}}}. "
            f"Missing but required: {{{','.join(sorted(expected - sent))}}}.")
    feeds = {}
    for alias in sorted(arrays):
        array, dtype = arrays[alias]
        spec = sig.inputs.get(alias)
        if spec is None:
            raise errors.invalid_argument(
                f"input tensor alias not found in signature: {alias}. Inputs expected to be in the set "
                f"{{{','.join(sorted(expected))}}}.")
        if dtype != spec.dtype:
            raise errors.invalid_argument(
                f"Expects input '{alias}' to be {spec.dtype.name} but {dtype.name} is provided "
                f"(signature '{sig.key}' takes {alias}: {tensor_spec_string(spec)})")
        if not spec.shape.is_compatible_with(array.shape):
            raise errors.invalid_argument(
                f"input '{alias}' has shape [{','.join(map(str, array.shape))}] but signature '{sig.key}' expects "
                f"{tensor_spec_string(spec)}")
        try:
            feeds[alias] = tf.constant(array, dtype=spec.dtype)
        except Exception as e:
            raise errors.invalid_argument(f"tensor parsing error: {alias}: {e}") from None
    return feeds


def predict(model, signature_name, arrays, output_filter=()):
    """Returns (signature key, {alias: numpy array}) for the requested outputs."""
    sig = model.signature(signature_name)
    wanted = list(output_filter)
    seen = set()
    for alias in wanted:
        if alias not in sig.outputs:
            raise errors.invalid_argument(
                f"output tensor alias not found in signature: {alias} Outputs expected to be in the set "
                f"{{{','.join(sorted(sig.outputs))}}}.")
        if alias in seen:
            raise errors.invalid_argument(f"duplicate output tensor alias: {alias}")
        seen.add(alias)
    feeds = _check_feeds(sig, arrays)
    outputs = _run(sig, feeds)
    if not isinstance(outputs, dict):
        outputs = {"output_0": outputs}
    return sig.key, {alias: outputs[alias].numpy() for alias in (wanted or sorted(outputs))}


# -- Classify / Regress -----------------------------------------------------

def merge_examples(input_proto):
    """Serialized tf.Examples of a tensorflow_serving Input (context merged in)."""
    kind = input_proto.WhichOneof("kind")
    if kind == "example_list":
        examples = list(input_proto.example_list.examples)
        serialized = [e.SerializeToString() for e in examples]
    elif kind == "example_list_with_context":
        context = input_proto.example_list_with_context.context
        serialized = []
        for example in input_proto.example_list_with_context.examples:
            merged = tf.train.Example()
            merged.CopyFrom(context)
            merged.MergeFrom(example)
            serialized.append(merged.SerializeToString())
    else:
        raise errors.invalid_argument("Input is empty.")
    if not serialized:
        raise errors.invalid_argument("Input is empty.")
    return serialized


def _example_signature(model, signature_name, what):
    key = signature_name or "serving_default"
    sig = model.signatures.get(key)
    if sig is None:
        # tensorflow_serving/servables/tensorflow/classifier.cc / regressor.cc
        raise errors.invalid_argument(f"No signature was found with the name: {key}")
    return sig


def _feeds_from_examples(sig, serialized, what):
    """A stock signature (one string input named "inputs", as TF Serving
    requires) takes the serialized Examples; any other gets each input parsed
    from the Example feature of the same name."""
    if set(sig.inputs) == {EXAMPLES_INPUT} and sig.inputs[EXAMPLES_INPUT].dtype == tf.string:
        return {EXAMPLES_INPUT: tf.constant(serialized, tf.string)}
    features = {}
    for alias, spec in sig.inputs.items():
        shape = spec.shape
        if shape.rank is None or shape.rank == 0 or not shape[1:].is_fully_defined():
            raise errors.invalid_argument(
                f"{what} parses each input from the tf.Example feature of the same name, which needs a batched "
                f"input with a fixed per-example shape; signature '{sig.key}' input {alias} is "
                f"{tensor_spec_string(spec)}")
        if spec.dtype.is_integer:
            parse_dtype = tf.int64
        elif spec.dtype.is_floating:
            parse_dtype = tf.float32
        elif spec.dtype == tf.string:
            parse_dtype = tf.string
        else:
            raise errors.invalid_argument(
                f"{what}: signature '{sig.key}' input {alias} has dtype {spec.dtype.name}, which a tf.Example "
                "feature cannot hold")
        features[alias] = (tf.io.FixedLenFeature(shape[1:].as_list(), parse_dtype), spec.dtype)
    try:
        parsed = tf.io.parse_example(tf.constant(serialized, tf.string),
                                     {alias: f for alias, (f, _) in features.items()})
    except Exception as e:
        err = errors.from_exception(e)
        raise errors.ServingError(err.code, _short(err.message)) from None
    return {alias: tf.cast(parsed[alias], dtype) if parsed[alias].dtype != dtype else parsed[alias]
            for alias, (_, dtype) in features.items()}


def _signature_outputs_string(sig):
    return "{" + ", ".join(f"{a}: {tensor_spec_string(s)}" for a, s in sorted(sig.outputs.items())) + "}"


def classify(model, signature_name, serialized):
    """Returns (signature key, [[(label, score), ...] per example]).

    A stock classify signature ("classes" and/or "scores" outputs) behaves as
    in TF Serving. Another signature is accepted when it has "scores"/"classes"
    outputs, or exactly one float output of shape [batch] or [batch, K]: each
    example then gets its K scores (one class per column, empty labels).
    """
    sig = _example_signature(model, signature_name, "Classify")
    classes_alias = CLASSES if CLASSES in sig.outputs else None
    scores_alias = SCORES if SCORES in sig.outputs else None
    if classes_alias is None and scores_alias is None:
        floats = [a for a, s in sig.outputs.items() if s.dtype.is_floating]
        if len(sig.outputs) == 1 and floats and sig.outputs[floats[0]].shape.rank in (None, 1, 2):
            scores_alias = floats[0]
        else:
            raise errors.invalid_argument(
                'Expected classification signature outputs to contain at least one of "classes" or "scores", '
                f"or exactly one float output of shape [batch] or [batch, num_classes]. Signature '{sig.key}' "
                f"has outputs {_signature_outputs_string(sig)}")
    feeds = _feeds_from_examples(sig, serialized, "Classify")
    outputs = _run(sig, feeds)
    n = len(serialized)
    classes = scores = None
    if classes_alias is not None:
        classes = outputs[classes_alias].numpy()
        if classes.ndim != 2:
            raise errors.invalid_argument(
                f"Expected Tensor shape: [batch_size num_classes] but got {list(classes.shape)}")
        if classes.dtype.kind not in "OSU":
            raise errors.invalid_argument(f"Expected classes Tensor of DT_STRING. Got: {classes.dtype}")
        if classes.shape[0] != n:
            raise errors.invalid_argument(f"Expected classes output batch size of {n}. Got: {classes.shape[0]}")
    if scores_alias is not None:
        scores = outputs[scores_alias].numpy()
        if scores.ndim == 1 and scores_alias != SCORES:
            scores = scores[:, None]
        if scores.ndim != 2:
            raise errors.invalid_argument(
                f"Expected Tensor shape: [batch_size num_classes] but got {list(scores.shape)}")
        if scores.dtype.kind != "f":
            raise errors.invalid_argument(f"Expected scores Tensor of DT_FLOAT. Got: {scores.dtype}")
        if scores.shape[0] != n:
            raise errors.invalid_argument(f"Expected scores output batch size of {n}. Got: {scores.shape[0]}")
    if classes is not None and scores is not None and classes.shape[1] != scores.shape[1]:
        raise errors.invalid_argument(f"Tensors class and score should match in dim_size(1). Got "
                                      f"{classes.shape[1]} vs. {scores.shape[1]}")
    num_classes = (classes if classes is not None else scores).shape[1]
    result = []
    for i in range(n):
        row = []
        for c in range(num_classes):
            label = classes[i, c] if classes is not None else b""
            label = label.decode("utf-8", "replace") if isinstance(label, bytes) else str(label)
            row.append((label, float(scores[i, c]) if scores is not None else 0.0))
        result.append(row)
    return sig.key, result


def regress(model, signature_name, serialized):
    """Returns (signature key, [one float per example]).

    A stock regress signature ("outputs") behaves as in TF Serving; another
    signature is accepted when it has an "outputs" output or exactly one
    output, float, of shape [batch] or [batch, 1].
    """
    sig = _example_signature(model, signature_name, "Regress")
    if REGRESS_OUTPUTS in sig.outputs:
        alias = REGRESS_OUTPUTS
    elif len(sig.outputs) == 1:
        alias = next(iter(sig.outputs))
    else:
        raise errors.invalid_argument(
            f'Regress needs one float value per example: an output named "outputs" or a single output. '
            f"Signature '{sig.key}' has outputs {_signature_outputs_string(sig)}")
    spec = sig.outputs[alias]
    if not spec.dtype.is_floating:
        raise errors.invalid_argument(f"Expected output Tensor of DT_FLOAT. Got: {spec.dtype.name} "
                                      f"(signature '{sig.key}' output {alias})")
    if spec.shape.rank is not None and (spec.shape.rank not in (1, 2) or
                                        (spec.shape.rank == 2 and spec.shape[1] not in (None, 1))):
        raise errors.invalid_argument(
            f"Expected output Tensor shape to be either [batch_size] or [batch_size, 1] but got "
            f"{tensor_spec_string(spec)} (signature '{sig.key}' output {alias})")
    feeds = _feeds_from_examples(sig, serialized, "Regress")
    outputs = _run(sig, feeds)
    values = outputs[alias].numpy()
    n = len(serialized)
    if values.ndim == 2 and values.shape[1] == 1:
        values = values[:, 0]
    if values.ndim != 1:
        raise errors.invalid_argument(f"Expected output Tensor shape to be either [batch_size] or [batch_size, 1] "
                                      f"but got {list(values.shape)}")
    if values.shape[0] != n:
        raise errors.invalid_argument(f"Input batch size did not match output batch size: {n} vs. {values.shape[0]}")
    return sig.key, [float(v) for v in values]
