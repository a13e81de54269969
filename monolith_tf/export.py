"""SavedModel export for TF Serving and for our serving replicas.

`save(model, base_dir)` writes the next numbered version `base_dir/<N>/`, as TF
Serving expects, atomically (written under a dot-name, then renamed). Besides
the `serving_default` signature (the model's id features in, predictions out)
the SavedModel carries what a replica needs to take sparse deltas in place:

- `monolith_tables[<table name>]`: `apply_delta(keys, values, deleted_keys)`,
  `keys()` and `size()` for each embedding table;
- `assign_dense(*weights)`: overwrite the dense weights, in the order listed in
  the metadata;
- `assets.extra/monolith.json`: model name, tables (name, dim, the table
  version at export), dense weight names/shapes, inputs, outputs, mode.

Native mode keeps the tables as our `Monolith>` resources (needs
tensorflow_model_server with //:ops_lib linked in, or our Python replica).
Portable mode turns each table into a stock `tf.lookup` MutableHashTable
holding the same rows, so an unmodified TensorFlow Serving can load it.
Exporting reads the trainer's tables and never changes them.
"""

import json
import os
import re
import shutil
import time

import keras
import tensorflow as tf

from monolith_tf.layers import dense_weights, embedding_layers

__all__ = ["save", "next_version", "METADATA_FILE", "SAVE_OPTIONS"]

METADATA_FILE = os.path.join("assets.extra", "monolith.json")
SAVE_OPTIONS = tf.saved_model.SaveOptions(namespace_whitelist=["Monolith"])
_VERSION = re.compile(r"^\d+$")


def next_version(base_dir):
    """One more than the largest numbered version under base_dir (1 if none)."""
    if not os.path.isdir(base_dir):
        return 1
    versions = [int(n) for n in os.listdir(base_dir) if _VERSION.match(n)]
    return max(versions, default=0) + 1


class _TableEndpoint(tf.Module):
    """Delta endpoints of one table, identical for native and portable exports."""

    def __init__(self, name, dim, table):
        super().__init__(name=None)
        self.table = table
        portable = isinstance(table, tf.lookup.experimental.MutableHashTable)
        ids = tf.TensorSpec([None], tf.int64)

        @tf.function(input_signature=[ids, tf.TensorSpec([None, dim], tf.float32), ids])
        def apply_delta(keys, values, deleted_keys):
            if portable:
                removed = table.remove(deleted_keys)
                with tf.control_dependencies([removed]):
                    inserted = table.insert(keys, values)
                with tf.control_dependencies([inserted]):
                    return tf.identity(table.size())
            with tf.control_dependencies([table.apply_delta(keys, values, deleted_keys)]):
                return tf.identity(table.size())

        @tf.function(input_signature=[])
        def keys():
            return table.export()[0] if portable else table.export()["keys"]

        @tf.function(input_signature=[])
        def size():
            return table.size()

        self.apply_delta, self.keys, self.size = apply_delta, keys, size


def _shaped_lookup(stock_table, dim):
    """A stock table's lookup with the static shape ids.shape + [dim] that
    downstream Keras layers need (MutableHashTable.lookup loses the rank)."""
    def lookup(ids):
        rows = tf.reshape(stock_table.lookup(ids), tf.concat([tf.shape(ids), [dim]], 0))
        rows.set_shape(ids.shape.concatenate([dim]))
        return rows
    return lookup


def _input_specs(model, input_signature):
    if input_signature is not None:
        return input_signature
    if not getattr(model, "inputs", None):
        raise ValueError("monolith_tf.export: the model has no symbolic inputs (subclassed model?); "
                         "pass input_signature={name: tf.TensorSpec(...)}")
    return {t.name: tf.TensorSpec(t.shape, t.dtype, name=t.name) for t in model.inputs}


def _serving_function(model, specs):
    structure = getattr(model, "input", None) if hasattr(model, "inputs") and model.inputs else None

    def serve(**features):
        if structure is None:
            inputs = features
        else:
            inputs = tf.nest.map_structure(lambda t: features[t.name], structure)
        outputs = model(inputs, training=False)
        if isinstance(outputs, dict):
            return outputs
        if isinstance(outputs, (list, tuple)):
            return {f"output_{i}": o for i, o in enumerate(outputs)}
        return {"predictions": outputs}

    return tf.function(serve, input_signature=None).get_concrete_function(**specs)


def save(model, base_dir, *, portable=False, version=None, model_name=None, input_signature=None):
    """Exports `model` as version `version` (default: the next one) under base_dir.

    Returns the version directory. `input_signature` ({name: TensorSpec}) is
    needed only for models without symbolic inputs.
    """
    version = next_version(base_dir) if version is None else int(version)
    final = os.path.join(base_dir, str(version))
    if os.path.exists(final):
        raise FileExistsError(f"monolith_tf.export: {final} already exists")
    specs = _input_specs(model, input_signature)
    layers = embedding_layers(model)
    names = [layer.table.name for layer in layers]
    if len(set(names)) != len(names):
        raise ValueError(f"monolith_tf.export: table names must be unique to take deltas, got {names}")

    root = tf.Module()
    tables, table_meta = {}, []
    for layer in layers:
        table = layer.table
        table_meta.append({"name": table.name, "dim": table.dim,
                           "version": int(table.stats()["version"]), "layer": layer.name})
        if portable:
            stock = tf.lookup.experimental.MutableHashTable(tf.int64, tf.float32, tf.zeros([table.dim]),
                                                            name=f"{table.name}_portable")
            rows = table.export()
            stock.insert(rows["keys"], rows["values"])
            tables[table.name] = _TableEndpoint(table.name, table.dim, stock)
        else:
            tables[table.name] = _TableEndpoint(table.name, table.dim, table)
    root.monolith_tables = tables

    dense = dense_weights(model)
    root.dense_variables = [v.value if isinstance(v, keras.Variable) else v for _, v in dense]
    dense_specs = [tf.TensorSpec(v.shape, v.dtype) for v in root.dense_variables]

    @tf.function(input_signature=dense_specs)
    def assign_dense(*values):
        for variable, value in zip(root.dense_variables, values):
            variable.assign(value)
        return tf.constant(len(values), tf.int64)

    root.assign_dense = assign_dense
    if not portable:
        root.model = model  # tracks the HashTables (restored from variables)
    try:
        if portable:
            for layer in layers:
                layer._serving_lookup = _shaped_lookup(tables[layer.table.name].table, layer.table.dim)
        serve = _serving_function(model, specs)
    finally:
        for layer in layers:
            layer._serving_lookup = None

    metadata = {
        "format": "monolith_tf.export", "format_version": 1, "mode": "portable" if portable else "native",
        "model_name": model_name or model.name, "version": version, "created_at": time.time(), "tables": table_meta,
        "dense": [{"name": name, "shape": list(v.shape), "dtype": tf.as_dtype(v.dtype).name} for name, v in dense],
        "inputs": {name: {"dtype": spec.dtype.name, "shape": spec.shape.as_list() if spec.shape.rank is not None
                          else None} for name, spec in specs.items()},
        "outputs": sorted(serve.structured_outputs),
    }
    os.makedirs(base_dir, exist_ok=True)
    tmp = os.path.join(base_dir, f".tmp-{version}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tf.saved_model.save(root, tmp, signatures={"serving_default": serve}, options=SAVE_OPTIONS)
        os.makedirs(os.path.join(tmp, "assets.extra"), exist_ok=True)
        with open(os.path.join(tmp, METADATA_FILE), "w") as f:
            json.dump(metadata, f, indent=2, sort_keys=True)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final
