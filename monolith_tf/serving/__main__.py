"""`python -m monolith_tf.serving`: the monolith-serve command line.

Flags mirror tensorflow_model_server's where they exist (--port,
--rest_api_port, --model_name, --model_base_path,
--file_system_poll_wait_seconds); --delta_dir and --delta_poll_wait_seconds
are ours. Runs until SIGINT/SIGTERM.

The flags are defined only when this runs as the program (`define_flags`),
so importing the module never adds flags to absl's global FLAGS (other
command lines in the package define --model_name and --delta_dir too).
"""

import logging
import signal
import sys
import threading

from absl import app, flags

from monolith_tf.serving.server import ServingReplica


def define_flags(flag_values):
    """Defines monolith-serve's flags on `flag_values` (an absl FlagValues)."""
    fv = {"flag_values": flag_values}
    flags.DEFINE_integer("port", 8500, "Port to listen on for gRPC (0: any free port, printed at start).",
                         lower_bound=0, upper_bound=65535, **fv)
    flags.DEFINE_integer("rest_api_port", 0, "Port to listen on for the HTTP/REST API (0: no REST API).",
                         lower_bound=0, upper_bound=65535, **fv)
    flags.DEFINE_string("host", "127.0.0.1", "Address to bind; 0.0.0.0 (or ::) to serve beyond this machine.", **fv)
    flags.DEFINE_string("model_name", "default", "Name of the model, as requests' model_spec.name must say.", **fv)
    flags.DEFINE_string("model_base_path", None, "Folder of numbered SavedModel versions (monolith_tf.export). "
                        "Required.", **fv)
    flags.DEFINE_float("file_system_poll_wait_seconds", 1.0,
                       "Seconds between polls of the base path for a new version; <= 0: only at start.", **fv)
    flags.DEFINE_string("delta_dir", None, "The trainer's delta directory (monolith_tf.deltas); unset: no deltas.",
                        **fv)
    flags.DEFINE_float("delta_poll_wait_seconds", None,
                       "Seconds between polls of --delta_dir (default: --file_system_poll_wait_seconds); "
                       "<= 0: only at start and when a version loads.", **fv)
    flags.DEFINE_integer("grpc_max_threads", 16, "gRPC worker threads.", **fv)
    flags.DEFINE_bool("check_delta_model_name", True,
                      "Reject delta files whose model_name differs from the export metadata's model_name.", **fv)


def replica_from_flags(flag_values):
    """The ServingReplica the (parsed) flags describe, not started."""
    if not flag_values.model_base_path:
        raise app.UsageError("--model_base_path is required")
    return ServingReplica(
        flag_values.model_base_path, flag_values.model_name, delta_dir=flag_values.delta_dir, port=flag_values.port,
        rest_api_port=flag_values.rest_api_port or None, poll_seconds=flag_values.file_system_poll_wait_seconds,
        delta_poll_seconds=flag_values.delta_poll_wait_seconds, host=flag_values.host,
        max_workers=flag_values.grpc_max_threads, check_delta_model_name=flag_values.check_delta_model_name)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.getLogger("monolith_tf.serving").setLevel(logging.INFO)
    replica = replica_from_flags(flags.FLAGS)
    stopping = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopping.set())
    try:
        ports = replica.start()
    except OSError as e:  # a port in use or not ours to bind: one line, no traceback
        message = e.strerror or str(e)
        print(message if message.startswith("monolith-serve") else f"monolith-serve: {message}", file=sys.stderr,
              flush=True)
        return 1
    status = replica.status()
    print(f"monolith-serve: model {replica.model_name} version {status['version']} on {replica.host}: "
          f"gRPC port {ports.grpc}" + (f", REST port {ports.rest}" if ports.rest else ""), flush=True)
    try:
        while not stopping.wait(1.0):
            pass
    finally:
        replica.stop()
        print("monolith-serve: stopped", flush=True)
    return 0


def run():
    define_flags(flags.FLAGS)
    app.run(main)


if __name__ == "__main__":
    sys.exit(run())
