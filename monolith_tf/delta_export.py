"""`monolith-delta-export`: a cron-style job that turns trainer checkpoints
into sparse deltas for serving replicas.

Each run reads the newest checkpoint in --checkpoint_dir (tables only: it needs
no model code), compares every table with what this job last published, and
writes one delta with the rows whose version moved (full values) and the keys
that disappeared (evicted or expired). Its memory of the last run lives in
`<delta_dir>/.delta-export/`: per table, the version and the key set it last
published. Without that memory (first run, or a checkpoint older than the last
run) a table goes out in full. Dense weights are not handled here; the trainer's
DeltaExporter or a new export version carries them.
"""

import json
import os
import sys

import numpy as np
import tensorflow as tf
from absl import app, flags, logging

from monolith_tf import deltas
from monolith_tf._files import atomic_write
from monolith_tf.hash_table import CONFIG_KEY

FLAGS = flags.FLAGS


def _define_flags():
    # Defined when run as the program only, so importing this module next to
    # another absl program (the trainer, the replica) cannot clash.
    flags.DEFINE_string("checkpoint_dir", None, "Directory of the trainer's tf.train.Checkpoint files.")
    flags.DEFINE_string("delta_dir", None, "Directory the replicas poll for deltas.")
    flags.DEFINE_string("model_name", None, "Model name recorded in each delta; replicas check it against "
                        "the export's model_name (the Keras model's name unless export.save was told otherwise).")

_ATTR = "/.ATTRIBUTES/"
_STATE_DIR = ".delta-export"


def checkpoint_tables(checkpoint_path):
    """{table name: {"dim", "keys", "values", "versions", "version"}} from a checkpoint."""
    reader = tf.train.load_checkpoint(checkpoint_path)
    names = reader.get_variable_to_shape_map()
    tables = {}
    for name in names:
        if not name.endswith(_ATTR + CONFIG_KEY):
            continue
        prefix = name[: -len(CONFIG_KEY)]
        raw = reader.get_tensor(name)
        config = json.loads(raw.decode() if isinstance(raw, bytes) else raw.item().decode())
        meta = reader.get_tensor(prefix + "meta")
        tables[config["name"]] = {
            "dim": int(config["dim"]), "keys": reader.get_tensor(prefix + "keys"),
            "values": reader.get_tensor(prefix + "values"), "versions": reader.get_tensor(prefix + "versions"),
            "version": int(meta[5]),
        }
    return tables


def _state_paths(delta_dir, table):
    base = os.path.join(delta_dir, _STATE_DIR)
    return os.path.join(base, f"{table}.json"), os.path.join(base, f"{table}.keys.npy")


def _load_state(delta_dir, table):
    meta_path, keys_path = _state_paths(delta_dir, table)
    try:
        with open(meta_path) as f:
            state = json.load(f)
        keys = np.load(keys_path, allow_pickle=False)
    except (OSError, ValueError):
        return None
    if len(keys) != state.get("num_keys"):
        return None  # torn or foreign state: start over with a full table
    return state["version"], keys


def _save_state(delta_dir, table, version, keys):
    meta_path, keys_path = _state_paths(delta_dir, table)
    atomic_write(keys_path, lambda f: np.save(f, keys, allow_pickle=False))
    atomic_write(meta_path, lambda f: f.write(json.dumps({"version": version, "num_keys": len(keys)}).encode()))


def export_once(checkpoint_dir, delta_dir, model_name):
    """Writes one delta for the newest checkpoint; returns its path, or None
    when nothing changed since the last run."""
    latest = tf.train.latest_checkpoint(checkpoint_dir)
    if latest is None:
        raise FileNotFoundError(f"monolith-delta-export: no checkpoint in {checkpoint_dir}")
    try:
        tables = checkpoint_tables(latest)
    except (tf.errors.OpError, IndexError, KeyError, ValueError, UnicodeDecodeError) as e:
        # TF's checkpoint reader reports a damaged data file as e.g. "IndexError:
        # Read less bytes than requested", naming no file.
        detail = (e.message if isinstance(e, tf.errors.OpError) else str(e)).strip()
        first_line = detail.splitlines()[0] if detail else ""
        raise ValueError(f"monolith-delta-export: cannot read checkpoint {latest} (damaged or not written by "
                         f"monolith_tf?): {type(e).__name__}: {first_line}") from None
    if not tables:
        raise ValueError(f"monolith-delta-export: checkpoint {latest} holds no monolith_tf tables")
    out = []
    for name, t in sorted(tables.items()):
        state = _load_state(delta_dir, name)
        if state is None or state[0] > t["version"]:
            out.append(deltas.TableDelta(name=name, dim=t["dim"], since_version=0, version=t["version"],
                                         keys=t["keys"], values=t["values"], deleted_keys=np.zeros([0], np.int64),
                                         full=True))
            continue
        since, previous_keys = state
        changed = t["versions"] > since
        deleted = np.setdiff1d(previous_keys, t["keys"], assume_unique=True)
        if not changed.any() and len(deleted) == 0:
            continue
        out.append(deltas.TableDelta(name=name, dim=t["dim"], since_version=since, version=t["version"],
                                     keys=t["keys"][changed], values=t["values"][changed], deleted_keys=deleted))
    path = None
    if out:
        path = deltas.write(delta_dir, deltas.Delta(sequence=deltas.next_sequence(delta_dir), model_name=model_name,
                                                    tables=out))
        logging.info("wrote %s: %s", path, ", ".join(
            f"{d.name}: {len(d.keys)} rows, {len(d.deleted_keys)} deleted{' (full)' if d.full else ''}" for d in out))
    for d in out:
        _save_state(delta_dir, d.name, d.version, tables[d.name]["keys"])
    return path


def main(argv):
    del argv
    if not FLAGS.checkpoint_dir or not FLAGS.delta_dir or not FLAGS.model_name:
        print("monolith-delta-export: --checkpoint_dir, --delta_dir and --model_name are required", file=sys.stderr)
        return 2
    try:
        path = export_once(FLAGS.checkpoint_dir, FLAGS.delta_dir, FLAGS.model_name)
    except (FileNotFoundError, ValueError) as e:
        print(e, file=sys.stderr)
        return 1
    print(path or "no changes since the last delta")
    return 0


def run():
    _define_flags()
    app.run(main)


if __name__ == "__main__":
    run()
