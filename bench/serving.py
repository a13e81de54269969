"""Benchmark: serving replicas (monolith_tf.serving) taking sparse deltas.

Builds a two-table ranking model (HashEmbedding "user" and "item", dim 16, a
small MLP), fills the trainer's tables directly with `table.apply_delta`
(--user_rows / --item_rows), exports version 1 (native, and portable for the
latency row), starts serving replicas in their own processes on 127.0.0.1 and
measures, with the stock gRPC client (`PredictionServiceStub`):

  1. Predict latency p50/p99 at batch 1 and batch --large_batch (one client,
     sequential requests), native and portable exports;
  2. throughput (requests/s, examples/s) with --clients concurrent clients,
     as threads of this process and as separate processes (--client_mode),
     with the CPU each side used, to tell whether the client's GIL limits it;
  3. for each --delta_rows N: a trainer step changes N existing user rows
     (`table.apply_gradients`, the table half of a training step), the
     trainer's `DeltaExporter.publish()` writes the delta, and a probe request
     polls every replica (every --probe_interval s) until it returns the new
     prediction for a probe key that the step changed. Reported apart: the
     trainer's export_delta and file write, the replica's poll wait, read +
     verify (`deltas.read`) and apply (`DeltaApplier._apply`), timed inside the
     replica process;
  4. Predict latency (one client process hammering batch-1 requests) in idle
     windows and while the replica applies an --apply_rows delta, and failed
     requests (there must be none).

Replicas poll the delta directory in the background every
--delta_poll_seconds (they run in their own processes, so poll_now() is not
available to the trainer; the poll wait is reported separately). Everything
is bounded (request counts, --phase_timeout on every wait) and every replica
and client process is stopped at the end.

  .venv/bin/python bench/serving.py --quick     # smoke run, ~2 minutes
  .venv/bin/python bench/serving.py             # full run: 1.1M user rows, 10k/100k/1M-row deltas
"""

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

from absl import app
from absl import flags

# Run as `python bench/serving.py` from a source checkout.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FLAGS = flags.FLAGS
flags.DEFINE_bool("quick", False, "Smoke run: 60k user rows, 1k/10k/50k-row deltas, 300 requests, 4 clients, "
                  "1 repeat.")
flags.DEFINE_integer("requests", 2000, "Requests per batch-1 latency row; batch --large_batch rows send a quarter. "
                     "Also the total requests of one throughput run (split among the clients).")
flags.DEFINE_integer("clients", 8, "Concurrent clients in the throughput runs.")
flags.DEFINE_enum("client_mode", "both", ["threads", "processes", "both"],
                  "Throughput clients as threads of this process, separate processes, or both.")
flags.DEFINE_list("delta_rows", ["10000", "100000", "1000000"], "Delta sizes (rows) for the time-to-serve runs.")
flags.DEFINE_integer("delta_repeats", 3, "Deltas per size in the time-to-serve runs.")
flags.DEFINE_integer("apply_rows", 0, "Rows of each delta applied under load (0: the largest --delta_rows).")
flags.DEFINE_integer("apply_repeats", 5, "Deltas applied while a client hammers Predict.")
PHASES = ("latency", "throughput", "deltas", "under_load")
flags.DEFINE_multi_enum("phases", list(PHASES), PHASES,
                        "Parts to run (repeat the flag): latency (1), throughput (2), deltas (3, time-to-serve), "
                        "under_load (4, Predict latency while a delta is applied). The warm-up delta always runs.")
flags.DEFINE_float("idle_seconds", 4.0, "Idle window measured before each delta applied under load.")
flags.DEFINE_integer("user_rows", 1_100_000, "Rows in the user table.")
flags.DEFINE_integer("item_rows", 100_000, "Rows in the item table.")
flags.DEFINE_integer("dim", 16, "Embedding width.")
flags.DEFINE_integer("large_batch", 256, "The large batch size.")
flags.DEFINE_integer("replicas", 1, "Native replicas taking the deltas (each in its own process).")
flags.DEFINE_bool("portable", True, "Also export and serve a portable version for the latency rows.")
flags.DEFINE_float("delta_poll_seconds", 0.05, "The replicas' delta poll interval.")
flags.DEFINE_float("probe_interval", 0.01, "Seconds between probe requests while waiting for a delta.")
flags.DEFINE_float("phase_timeout", 300.0, "Upper bound (seconds) on any single wait.")
flags.DEFINE_integer("grpc_max_threads", 16, "gRPC worker threads per replica.")
flags.DEFINE_integer("seed", 0, "Seed of keys, values, gradients and requests.")
flags.DEFINE_string("out_png", "docs/serving.png", "Where to write the plot ('' = none).")
flags.DEFINE_string("out_json", "", "Optional path for the raw results as JSON.")
flags.DEFINE_string("workdir", "", "Where exports and deltas go (default: a temporary directory, removed at the end).")
# Internal: the parent runs this file again as a replica or a client.
flags.DEFINE_enum("worker", "", ["", "replica", "client"], "Internal.")
flags.DEFINE_string("worker_base", "", "Internal: replica model_base_path.")
flags.DEFINE_string("worker_delta_dir", "", "Internal: replica delta_dir ('' = none).")
flags.DEFINE_string("worker_events", "", "Internal: replica event log (JSON lines).")
flags.DEFINE_string("worker_ready", "", "Internal: file written when the worker is ready.")
flags.DEFINE_integer("worker_port", 0, "Internal: client target port.")
flags.DEFINE_string("worker_inputs", "", "Internal: client request inputs (.npz with user, item).")
flags.DEFINE_enum("worker_mode", "fixed", ["fixed", "hammer"], "Internal: client mode.")
flags.DEFINE_integer("worker_count", 0, "Internal: requests of a fixed client.")
flags.DEFINE_string("worker_go", "", "Internal: a fixed client starts when this file exists.")
flags.DEFINE_string("worker_stop", "", "Internal: a hammer client stops when this file exists.")
flags.DEFINE_string("worker_result", "", "Internal: client result (.npz).")

MODEL_NAME = "ranker"
RPC_TIMEOUT = 30.0


# -- small helpers -------------------------------------------------------------

def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def wait_for(cond, timeout, what, interval=0.02):
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def write_json_atomic(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def proc_cpu_seconds(pid):
    """utime + stime of a live process (None once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_rss_bytes(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def machine_busy_seconds():
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return (fields[0] + fields[1] + fields[2] + sum(fields[5:8])) / os.sysconf("SC_CLK_TCK")


def self_cpu_seconds():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def percentiles(latencies_s):
    import numpy as np
    a = np.asarray(latencies_s, dtype=np.float64) * 1e3
    if a.size == 0:
        return {"n": 0}
    return {"n": int(a.size), "mean": float(a.mean()), "p50": float(np.percentile(a, 50)),
            "p90": float(np.percentile(a, 90)), "p99": float(np.percentile(a, 99)),
            "p999": float(np.percentile(a, 99.9)), "max": float(a.max())}


def predict_request(users, items):
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2
    request = predict_pb2.PredictRequest()
    request.model_spec.name = MODEL_NAME
    request.inputs["user"].CopyFrom(tf.make_tensor_proto(users))
    request.inputs["item"].CopyFrom(tf.make_tensor_proto(items))
    return request


# -- workers (separate processes) -----------------------------------------------

def replica_worker():
    """One ServingReplica; logs when it reads and applies each delta file."""
    import logging
    from monolith_tf import deltas
    from monolith_tf.serving import ServingReplica
    from monolith_tf.serving import delta_applier

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    events = open(FLAGS.worker_events, "a", buffering=1)
    lock = threading.Lock()

    def emit(**kw):
        with lock:
            events.write(json.dumps(kw) + "\n")

    # Timing wrappers, in this process only: deltas.read (read + checksums +
    # decode) and DeltaApplier._apply (the table writes).
    read = deltas.read

    def timed_read(path, **kwargs):
        t0 = time.monotonic()
        c0 = time.thread_time()
        try:
            return read(path, **kwargs)
        finally:
            emit(event="read", name=os.path.basename(path), t0=t0, t1=time.monotonic(),
                 cpu=time.thread_time() - c0)

    deltas.read = timed_read
    apply = delta_applier.DeltaApplier._apply

    def timed_apply(self, model, st, seq, delta, plan):
        t0 = time.monotonic()
        apply(self, model, st, seq, delta, plan)
        emit(event="apply", seq=int(seq), rows=int(delta.num_rows), t0=t0, t1=time.monotonic())

    delta_applier.DeltaApplier._apply = timed_apply

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    replica = ServingReplica(FLAGS.worker_base, MODEL_NAME, delta_dir=FLAGS.worker_delta_dir or None, port=0,
                             poll_seconds=30.0, delta_poll_seconds=FLAGS.delta_poll_seconds,
                             max_workers=FLAGS.grpc_max_threads)
    try:
        t0 = time.monotonic()
        ports = replica.start()
        write_json_atomic(FLAGS.worker_ready, {"port": ports.grpc, "pid": os.getpid(),
                                               "start_seconds": time.monotonic() - t0,
                                               "status": replica.status()})
        while not stop.wait(0.2):
            pass
    finally:
        replica.stop()
        events.close()


def client_worker():
    """A stock-stub client: `fixed` sends --worker_count requests once the go
    file appears; `hammer` sends requests back to back until the stop file
    appears. Records each request's start, end and status."""
    import grpc
    import numpy as np
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    inputs = np.load(FLAGS.worker_inputs)
    request = predict_request(inputs["user"], inputs["item"])
    channel = grpc.insecure_channel(f"127.0.0.1:{FLAGS.worker_port}")
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    starts, ends, codes = [], [], []
    try:
        for _ in range(20):
            stub.Predict(request, timeout=RPC_TIMEOUT)
        write_json_atomic(FLAGS.worker_ready, {"pid": os.getpid()})
        deadline = time.monotonic() + FLAGS.phase_timeout
        if FLAGS.worker_mode == "fixed":
            while not os.path.exists(FLAGS.worker_go):
                if time.monotonic() > deadline:
                    return
                time.sleep(0.001)
        cpu0 = time.process_time()
        n = 0
        while time.monotonic() < deadline:
            if FLAGS.worker_mode == "fixed":
                if n >= FLAGS.worker_count:
                    break
            elif n % 16 == 0 and os.path.exists(FLAGS.worker_stop):
                break
            t0 = time.monotonic()
            try:
                stub.Predict(request, timeout=RPC_TIMEOUT)
                code = 0
            except grpc.RpcError as e:
                code = e.code().value[0] if e.code() is not None else -1
            starts.append(t0)
            ends.append(time.monotonic())
            codes.append(code)
            n += 1
        cpu = time.process_time() - cpu0
    finally:
        channel.close()
    np.savez(FLAGS.worker_result, start=np.asarray(starts), end=np.asarray(ends), code=np.asarray(codes),
             cpu=np.asarray(cpu))


# -- the parent ------------------------------------------------------------------

class Workers:
    """The subprocesses this run started; all stopped by stop_all()."""

    def __init__(self, workdir):
        self.workdir = workdir
        self.procs = []
        self.last_cpu = {}
        self._n = 0

    def spawn(self, label, args):
        self._n += 1
        log_path = os.path.join(self.workdir, f"{label}-{self._n}.log")
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
        cmd = [sys.executable, os.path.abspath(__file__), f"--delta_poll_seconds={FLAGS.delta_poll_seconds}",
               f"--phase_timeout={FLAGS.phase_timeout}", f"--grpc_max_threads={FLAGS.grpc_max_threads}"] + args
        with open(log_path, "w") as logf:
            proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env)
        proc.log_path = log_path
        proc.label = label
        self.procs.append(proc)
        return proc

    def tail(self, proc, n=30):
        try:
            with open(proc.log_path) as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""

    def wait_ready(self, proc, ready_path, timeout):
        def ready():
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.label} (pid {proc.pid}) exited with {proc.returncode}:\n{self.tail(proc)}")
            return read_json(ready_path)
        return wait_for(ready, timeout, f"{proc.label} to start", interval=0.1)

    def sample_cpu(self):
        for p in self.procs:
            c = proc_cpu_seconds(p.pid) if p.poll() is None else None
            if c is not None:
                self.last_cpu[p.pid] = c

    def total_cpu(self):
        self.sample_cpu()
        return sum(self.last_cpu.values())

    def stop(self, proc, timeout=60):
        if proc.poll() is None:
            self.sample_cpu()
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)

    def stop_all(self):
        for p in self.procs:
            try:
                self.stop(p)
            except Exception as e:  # keep stopping the others
                log(f"stopping {p.label} (pid {p.pid}) failed: {e}")


def build_model(dim):
    import keras
    from monolith_tf.layers import HashEmbedding
    user = keras.Input((), dtype="int64", name="user")
    item = keras.Input((), dtype="int64", name="item")
    x = keras.layers.Concatenate()([HashEmbedding(dim, name="user_emb")(user),
                                    HashEmbedding(dim, name="item_emb")(item)])
    x = keras.layers.Dense(64, activation="relu")(x)
    x = keras.layers.Dense(32, activation="relu")(x)
    return keras.Model([user, item], keras.layers.Dense(1, name="score")(x), name=MODEL_NAME)


def unique_keys(rng, n):
    import numpy as np
    keys = np.unique(rng.integers(1, 2**62, size=int(n * 1.01) + 16, dtype=np.int64))
    return rng.permutation(keys)[:n]


def fill_table(table, keys, rng, chunk=262_144):
    import numpy as np
    import tensorflow as tf
    empty = tf.zeros([0], tf.int64)
    for lo in range(0, len(keys), chunk):
        k = keys[lo:lo + chunk]
        v = rng.uniform(-0.05, 0.05, (len(k), table.dim)).astype(np.float32)
        table.apply_delta(tf.constant(k), tf.constant(v), empty)


class Trainer:
    """The trainer side: the model, its tables, and a DeltaExporter."""

    def __init__(self, workdir, rng):
        import numpy as np
        from monolith_tf import deltas
        from monolith_tf.callbacks import DeltaExporter

        self.rng = rng
        self.model = build_model(FLAGS.dim)
        layers = {l.name: l for l in self.model.layers}
        self.user_table = layers["user_emb"].table
        self.item_table = layers["item_emb"].table
        t0 = time.monotonic()
        self.user_keys = unique_keys(rng, FLAGS.user_rows)
        self.item_keys = unique_keys(rng, FLAGS.item_rows)
        fill_table(self.user_table, self.user_keys, rng)
        fill_table(self.item_table, self.item_keys, rng)
        self.fill_seconds = time.monotonic() - t0
        self.probe_user, self.probe_item = int(self.user_keys[0]), int(self.item_keys[0])
        self.others = self.user_keys[1:]
        self.delta_dir = os.path.join(workdir, "deltas")
        self.exporter = DeltaExporter(self.delta_dir, every_n_steps=1)
        self.exporter.set_model(self.model)
        # Time the file write inside publish() (this process only).
        self.write_seconds = []
        write = deltas.write

        def timed_write(delta_dir, delta):
            t = time.monotonic()
            try:
                return write(delta_dir, delta)
            finally:
                self.write_seconds.append(time.monotonic() - t)

        deltas.write = timed_write
        self._np = np
        self.probe_steps = 0  # steps that moved the probe row (see step_and_publish)

    def probe_value(self):
        import tensorflow as tf
        out = self.model({"user": tf.constant([self.probe_user], tf.int64),
                          "item": tf.constant([self.probe_item], tf.int64)}, training=False)
        return float(out.numpy().reshape(-1)[0])

    def step_and_publish(self, n, check_probe=True):
        """Changes n user rows (the probe's among them) with one fused Adagrad
        step, then publishes. Returns timings and the written sequence."""
        np = self._np
        ids = np.concatenate([[self.probe_user], self.rng.choice(self.others, n - 1, replace=False)]).astype(np.int64)
        grads = self.rng.standard_normal((n, FLAGS.dim)).astype(np.float32)
        # A large gradient on the probe row, growing 1.5x per step: Adagrad
        # divides by the root of the sum of all squared gradients so far, and a
        # geometric series keeps that sum within 1.8x of the newest square, so
        # each step moves the probe row by about 0.75x the learning rate
        # however many steps it has taken (a constant size would shrink the
        # move as 1/sqrt(steps)), and the probe's prediction changes visibly.
        # 1.5^80 x 1000 squared is still a finite float32.
        grads[0] *= 1000.0 * 1.5 ** min(self.probe_steps, 80)
        self.probe_steps += 1
        before = self.probe_value()
        t_step0 = time.monotonic()
        updated = int(self.user_table.apply_gradients(ids, grads).numpy())
        t_step = time.monotonic()
        n_writes = len(self.write_seconds)
        paths = self.exporter.publish()
        t_published = time.monotonic()
        if len(paths) != 1:
            raise RuntimeError(f"expected one sparse delta, publish() wrote {paths}")
        write_s = sum(self.write_seconds[n_writes:])
        expected = self.probe_value()
        # The probe waits for |prediction - expected| <= change / 10, so any
        # change well above float32 rounding (~1e-8 here) is detectable.
        if check_probe and abs(expected - before) < 1e-5:
            raise RuntimeError(f"the step barely changed the probe prediction ({before} -> {expected})")
        return {"rows": n, "updated": updated, "t_step": t_step, "step_seconds": t_step - t_step0,
                "publish_seconds": t_published - t_step, "write_seconds": write_s,
                "export_delta_seconds": t_published - t_step - write_s, "t_published": t_published,
                "path": paths[0], "seq": int(os.path.basename(paths[0]).split(".")[0]),
                "file_bytes": os.path.getsize(paths[0]), "expected": expected, "before": before}


class Replica:
    def __init__(self, workers, label, base, delta_dir, workdir):
        self.label = label
        self.events_path = os.path.join(workdir, f"{label}.events")
        ready_path = os.path.join(workdir, f"{label}.ready")
        self.proc = workers.spawn(label, ["--worker=replica", f"--worker_base={base}",
                                          f"--worker_delta_dir={delta_dir or ''}",
                                          f"--worker_events={self.events_path}", f"--worker_ready={ready_path}"])
        self.ready_path = ready_path
        self.workers = workers
        self.info = None
        self.channel = self.stub = None

    def wait_ready(self):
        import grpc
        from tensorflow_serving.apis import prediction_service_pb2_grpc
        self.info = self.workers.wait_ready(self.proc, self.ready_path, FLAGS.phase_timeout)
        self.port = self.info["port"]
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self.stub = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)
        return self

    def events(self):
        out = []
        try:
            with open(self.events_path) as f:
                for line in f:
                    if line.endswith("\n"):
                        out.append(json.loads(line))
        except OSError:
            pass
        return out

    def delta_events(self, seq):
        name = f"{seq:012d}.delta"
        ev = self.events()
        reads = [e for e in ev if e["event"] == "read" and e["name"] == name]
        applies = [e for e in ev if e["event"] == "apply" and e["seq"] == seq]
        return (reads[-1] if reads else None), (applies[-1] if applies else None)

    def close(self):
        if self.channel is not None:
            self.channel.close()
            self.channel = None


class Failures:
    def __init__(self):
        self.count = 0
        self.examples = []

    def add(self, where, err):
        self.count += 1
        if len(self.examples) < 5:
            self.examples.append(f"{where}: {err}")


def sequential_latency(stub, request, n, failures, where, warmup=30):
    import grpc
    for _ in range(warmup):
        stub.Predict(request, timeout=RPC_TIMEOUT)
    lat = []
    deadline = time.monotonic() + FLAGS.phase_timeout
    for _ in range(n):
        if time.monotonic() > deadline:
            break
        t = time.perf_counter()
        try:
            stub.Predict(request, timeout=RPC_TIMEOUT)
        except grpc.RpcError as e:
            failures.add(where, e.code())
            continue
        lat.append(time.perf_counter() - t)
    return lat


def throughput_threads(port, request, batch, clients, total, failures, replica_pid):
    import grpc
    from tensorflow_serving.apis import prediction_service_pb2_grpc
    per = max(1, total // clients)
    barrier = threading.Barrier(clients + 1)
    results = [None] * clients

    def client(i):
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        lat, bad = [], 0
        try:
            for _ in range(5):
                stub.Predict(request, timeout=RPC_TIMEOUT)
            barrier.wait(timeout=FLAGS.phase_timeout)
            deadline = time.monotonic() + FLAGS.phase_timeout
            for _ in range(per):
                if time.monotonic() > deadline:
                    break
                t = time.perf_counter()
                try:
                    stub.Predict(request, timeout=RPC_TIMEOUT)
                    lat.append(time.perf_counter() - t)
                except grpc.RpcError as e:
                    bad += 1
                    failures.add("throughput/threads", e.code())
            results[i] = (lat, bad, time.monotonic())
        finally:
            channel.close()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    barrier.wait(timeout=FLAGS.phase_timeout)
    t0, c0, s0 = time.monotonic(), self_cpu_seconds(), proc_cpu_seconds(replica_pid)
    for t in threads:
        t.join(timeout=FLAGS.phase_timeout)
    t1 = max(r[2] for r in results if r is not None)
    wall = t1 - t0
    client_cpu = self_cpu_seconds() - c0
    server_cpu = proc_cpu_seconds(replica_pid) - s0
    ok = sum(len(r[0]) for r in results if r is not None)
    lat = [x for r in results if r is not None for x in r[0]]
    return {"mode": "threads", "batch": batch, "clients": clients, "requests": ok, "wall_seconds": wall,
            "rps": ok / wall, "eps": ok * batch / wall, "client_cores": client_cpu / wall,
            "server_cores": server_cpu / wall, "latency": percentiles(lat)}


def throughput_processes(workers, workdir, port, inputs_path, batch, clients, total, failures, replica_pid, tag):
    import numpy as np
    per = max(1, total // clients)
    go = os.path.join(workdir, f"go-{tag}")
    procs = []
    try:
        for i in range(clients):
            ready = os.path.join(workdir, f"client-{tag}-{i}.ready")
            result = os.path.join(workdir, f"client-{tag}-{i}.npz")
            p = workers.spawn(f"client-{tag}-{i}", [
                "--worker=client", f"--worker_port={port}", f"--worker_inputs={inputs_path}", "--worker_mode=fixed",
                f"--worker_count={per}", f"--worker_go={go}", f"--worker_ready={ready}",
                f"--worker_result={result}"])
            procs.append((p, ready, result))
        for p, ready, _ in procs:
            workers.wait_ready(p, ready, FLAGS.phase_timeout)
        s0 = proc_cpu_seconds(replica_pid)
        open(go, "w").close()
        for p, _, _ in procs:
            p.wait(timeout=FLAGS.phase_timeout)
        server_cpu = proc_cpu_seconds(replica_pid) - s0
    finally:
        for p, _, _ in procs:
            workers.stop(p)
    starts, ends, lat, ok, client_cpu = [], [], [], 0, 0.0
    for p, _, result in procs:
        r = np.load(result)
        good = r["code"] == 0
        for c in r["code"][~good]:
            failures.add("throughput/processes", f"grpc code {int(c)}")
        ok += int(good.sum())
        starts.append(r["start"].min())
        ends.append(r["end"].max())
        lat.extend((r["end"] - r["start"])[good])
        client_cpu += float(r["cpu"])
    wall = max(ends) - min(starts)
    return {"mode": "processes", "batch": batch, "clients": clients, "requests": ok, "wall_seconds": wall,
            "rps": ok / wall, "eps": ok * batch / wall, "client_cores": client_cpu / wall,
            "server_cores": server_cpu / wall, "latency": percentiles(lat)}


def wait_served(trainer_result, replicas, probe_request, failures):
    """Probes every replica until it returns the expected prediction and has
    logged the apply; returns per-replica times."""
    import grpc
    import tensorflow as tf
    expected, before = trainer_result["expected"], trainer_result["before"]
    tol = min(1e-5, abs(expected - before) / 10)
    seq = trainer_result["seq"]
    seen = {}
    probes = 0
    deadline = time.monotonic() + FLAGS.phase_timeout
    while len(seen) < len(replicas):
        if time.monotonic() > deadline:
            raise TimeoutError(f"delta {seq} not served within {FLAGS.phase_timeout}s by "
                               f"{[r.label for r in replicas if r.label not in seen]}")
        for r in replicas:
            if r.label in seen:
                continue
            probes += 1
            try:
                response = r.stub.Predict(probe_request, timeout=RPC_TIMEOUT)
            except grpc.RpcError as e:
                failures.add("probe", e.code())
                continue
            got = float(tf.make_ndarray(response.outputs["predictions"]).reshape(-1)[0])
            if abs(got - expected) <= tol:
                seen[r.label] = time.monotonic()
        if len(seen) < len(replicas):
            time.sleep(FLAGS.probe_interval)
    out = []
    for r in replicas:
        read_ev, apply_ev = wait_for(lambda: (lambda e: e if e[1] is not None else None)(r.delta_events(seq)),
                                     FLAGS.phase_timeout, f"{r.label} to log delta {seq}")
        t_step, t_pub = trainer_result["t_step"], trainer_result["t_published"]
        out.append({"replica": r.label, "probe_seconds": seen[r.label] - t_step,
                    "applied_seconds": apply_ev["t1"] - t_step,
                    "served_seconds": max(seen[r.label], apply_ev["t1"]) - t_step,
                    "poll_wait_seconds": (read_ev["t0"] - t_pub) if read_ev else float("nan"),
                    "read_seconds": (read_ev["t1"] - read_ev["t0"]) if read_ev else float("nan"),
                    "read_cpu_seconds": read_ev.get("cpu", float("nan")) if read_ev else float("nan"),
                    "decide_seconds": (apply_ev["t0"] - read_ev["t1"]) if read_ev else float("nan"),
                    "apply_seconds": apply_ev["t1"] - apply_ev["t0"],
                    "apply_rows_per_s": apply_ev["rows"] / max(apply_ev["t1"] - apply_ev["t0"], 1e-9)})
    return out, probes


def machine_info():
    import tensorflow as tf
    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"nproc": os.cpu_count(), "cpu": cpu, "tf": tf.__version__, "python": sys.version.split()[0]}


def median(xs):
    import numpy as np
    return float(np.median(xs)) if len(xs) else float("nan")


def fmt_rows(n):
    return f"{n // 1_000_000}M" if n % 1_000_000 == 0 else f"{n // 1000}k" if n % 1000 == 0 else str(n)


def run(workdir):
    import numpy as np
    import tensorflow as tf

    results = {"machine": machine_info(), "flags": {}}
    load_start = os.getloadavg()
    busy0, own0, t_run0 = machine_busy_seconds(), self_cpu_seconds(), time.monotonic()
    results["load_start"] = load_start
    log(f"load average {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f} on {os.cpu_count()} cores")
    rng = np.random.default_rng(FLAGS.seed)
    failures = Failures()
    workers = Workers(workdir)
    replicas = []
    try:
        # -- model, tables, exports --------------------------------------------------
        from monolith_tf import export
        trainer = Trainer(workdir, rng)
        log(f"filled {FLAGS.user_rows} user + {FLAGS.item_rows} item rows in {trainer.fill_seconds:.2f}s")
        base_native = os.path.join(workdir, "native")
        base_portable = os.path.join(workdir, "portable")
        t = time.monotonic()
        export.save(trainer.model, base_native)
        results["export_native_seconds"] = time.monotonic() - t
        use_portable = FLAGS.portable and "latency" in FLAGS.phases  # only the latency rows use it
        if use_portable:
            t = time.monotonic()
            export.save(trainer.model, base_portable, portable=True)
            results["export_portable_seconds"] = time.monotonic() - t
        log(f"exported version 1 (native {results['export_native_seconds']:.1f}s"
            + (f", portable {results['export_portable_seconds']:.1f}s)" if use_portable else ")"))
        # The exporter's first delta: no delta in the directory yet, so it
        # sends every table in full (replicas skip it as already included).
        t = time.monotonic()
        paths = trainer.exporter.publish()
        results["initial_full_delta"] = {"seconds": time.monotonic() - t, "write_seconds": trainer.write_seconds[-1],
                                         "bytes": os.path.getsize(paths[0]),
                                         "rows": FLAGS.user_rows + FLAGS.item_rows}
        log(f"initial (full) delta: {results['initial_full_delta']}")

        # -- replicas ---------------------------------------------------------------------
        replicas = [Replica(workers, f"native{i}", base_native, trainer.delta_dir, workdir)
                    for i in range(FLAGS.replicas)]
        portable = Replica(workers, "portable", base_portable, None, workdir) if use_portable else None
        for r in replicas + ([portable] if portable else []):
            r.wait_ready()
            log(f"{r.label} serving on 127.0.0.1:{r.port} (started in {r.info['start_seconds']:.1f}s, "
                f"rss {proc_rss_bytes(r.proc.pid) / 2**20:.0f} MiB)")
        results["replica_start_seconds"] = {r.label: r.info["start_seconds"]
                                            for r in replicas + ([portable] if portable else [])}
        results["replica_rss_mib"] = {r.label: proc_rss_bytes(r.proc.pid) / 2**20
                                      for r in replicas + ([portable] if portable else [])}
        main = replicas[0]

        def inputs(batch):
            return (trainer.user_keys[rng.integers(0, len(trainer.user_keys), batch)],
                    trainer.item_keys[rng.integers(0, len(trainer.item_keys), batch)])

        batches = {1: inputs(1), FLAGS.large_batch: inputs(FLAGS.large_batch)}
        requests = {b: predict_request(*uv) for b, uv in batches.items()}
        counts = {1: FLAGS.requests, FLAGS.large_batch: max(50, FLAGS.requests // 4)}
        probe_request = predict_request(np.array([trainer.probe_user], np.int64),
                                        np.array([trainer.probe_item], np.int64))
        # The replica predicts what the trainer does.
        got = tf.make_ndarray(main.stub.Predict(probe_request, timeout=RPC_TIMEOUT).outputs["predictions"])
        if abs(float(got.reshape(-1)[0]) - trainer.probe_value()) > 1e-5:
            raise RuntimeError(f"replica predicts {got} for the probe, the trainer {trainer.probe_value()}")

        # -- 1. latency -----------------------------------------------------------------
        results["latency"] = []
        for r in ([main] + ([portable] if portable else [])) if "latency" in FLAGS.phases else []:
            for b in batches:
                lat = sequential_latency(r.stub, requests[b], counts[b], failures, f"latency/{r.label}")
                row = {"export": "portable" if r is portable else "native", "batch": b, **percentiles(lat)}
                results["latency"].append(row)
                log(f"latency {row['export']} batch {b}: p50 {row['p50']:.2f} ms, p99 {row['p99']:.2f} ms "
                    f"(n={row['n']})")
        if portable:
            workers.stop(portable.proc)
            portable.close()

        # -- 2. throughput ---------------------------------------------------------------
        results["throughput"] = []
        modes = ["threads", "processes"] if FLAGS.client_mode == "both" else [FLAGS.client_mode]
        for b in batches:
            inputs_path = os.path.join(workdir, f"inputs-{b}.npz")
            np.savez(inputs_path, user=batches[b][0], item=batches[b][1])
            total = counts[b]
            for mode in modes if "throughput" in FLAGS.phases else []:
                if mode == "threads":
                    row = throughput_threads(main.port, requests[b], b, FLAGS.clients, total, failures,
                                             main.proc.pid)
                else:
                    row = throughput_processes(workers, workdir, main.port, inputs_path, b, FLAGS.clients, total,
                                               failures, main.proc.pid, f"b{b}")
                results["throughput"].append(row)
                log(f"throughput {mode} batch {b}: {row['rps']:.0f} req/s, {row['eps']:.0f} examples/s "
                    f"(client {row['client_cores']:.2f} cores, server {row['server_cores']:.2f} cores, "
                    f"p99 {row['latency']['p99']:.1f} ms)")

        # -- 3. delta time-to-serve ------------------------------------------------------
        sizes = [int(s) for s in FLAGS.delta_rows]
        if max(sizes) > FLAGS.user_rows:
            raise ValueError(f"--delta_rows {max(sizes)} > --user_rows {FLAGS.user_rows}")
        # A first small delta pays the replicas' one-time costs (the first
        # call of the loaded apply_delta function); reported, not counted.
        tr = trainer.step_and_publish(min(1000, min(sizes)))
        first, _ = wait_served(tr, replicas, probe_request, failures)
        results["first_delta"] = {"rows": tr["rows"], "served_seconds": max(p["served_seconds"] for p in first),
                                  "apply_seconds": max(p["apply_seconds"] for p in first)}
        log(f"first (warm-up) delta: {results['first_delta']}")
        results["deltas"] = []
        for n in sizes if "deltas" in FLAGS.phases else []:
            for rep in range(FLAGS.delta_repeats):
                time.sleep(0.5)
                tr = trainer.step_and_publish(n)
                per_replica, probes = wait_served(tr, replicas, probe_request, failures)
                row = {k: v for k, v in tr.items() if k not in ("path",)}
                row.update({"repeat": rep, "probes": probes, "replicas": per_replica,
                            "served_seconds": max(p["served_seconds"] for p in per_replica),
                            "probe_seconds": max(p["probe_seconds"] for p in per_replica)})
                results["deltas"].append(row)
                p0 = per_replica[0]
                log(f"delta {fmt_rows(n)} #{rep}: served after {row['served_seconds']:.3f}s (probe "
                    f"{row['probe_seconds']:.3f}s): step {tr['step_seconds']:.3f}s, export_delta "
                    f"{tr['export_delta_seconds']:.3f}s, write {tr['write_seconds']:.3f}s "
                    f"({tr['file_bytes'] / 2**20:.1f} MiB), poll wait {p0['poll_wait_seconds']:.3f}s, read+verify "
                    f"{p0['read_seconds']:.3f}s, apply {p0['apply_seconds']:.3f}s "
                    f"({p0['apply_rows_per_s'] / 1e6:.2f} M rows/s)")

        # -- 4. latency while a big delta is applied -----------------------------------
        if "under_load" in FLAGS.phases:
            results["under_load"] = under_load(workers, workdir, trainer, main, sizes, failures)
        # The probe still agrees after all this.
        got = float(tf.make_ndarray(main.stub.Predict(probe_request, timeout=RPC_TIMEOUT)
                                    .outputs["predictions"]).reshape(-1)[0])
        results["final_probe_ok"] = abs(got - trainer.probe_value()) <= 1e-5
        results["replica_rss_mib_end"] = {r.label: proc_rss_bytes(r.proc.pid) / 2**20 for r in replicas}
    finally:
        for r in replicas:
            r.close()
        own_cpu = self_cpu_seconds() - own0 + workers.total_cpu()
        workers.stop_all()
        wall = time.monotonic() - t_run0
        results["wall_seconds"] = wall
        results["other_cores"] = max(0.0, (machine_busy_seconds() - busy0 - own_cpu) / wall)
        results["load_end"] = os.getloadavg()
    results["failed_requests"] = failures.count
    results["failure_examples"] = failures.examples
    return results


def under_load(workers, workdir, trainer, main, sizes, failures):
    """Part 4: a client process hammers batch-1 Predicts at `main` while
    --apply_repeats deltas of --apply_rows rows are published and applied."""
    import numpy as np
    apply_rows = FLAGS.apply_rows or max(sizes)
    inputs_path = os.path.join(workdir, "inputs-1.npz")
    stop_file = os.path.join(workdir, "hammer.stop")
    ready = os.path.join(workdir, "hammer.ready")
    result_path = os.path.join(workdir, "hammer.npz")
    hammer = workers.spawn("hammer", ["--worker=client", f"--worker_port={main.port}",
                                      f"--worker_inputs={inputs_path}", "--worker_mode=hammer",
                                      f"--worker_stop={stop_file}", f"--worker_ready={ready}",
                                      f"--worker_result={result_path}"])
    idle_windows, apply_windows, serve_windows, apply_runs = [], [], [], []
    read_only, apply_only = [], []
    try:
        workers.wait_ready(hammer, ready, FLAGS.phase_timeout)
        time.sleep(1.0)
        for rep in range(FLAGS.apply_repeats):
            w0 = time.monotonic()
            time.sleep(FLAGS.idle_seconds)
            idle_windows.append((w0, time.monotonic()))
            tr = trainer.step_and_publish(apply_rows, check_probe=False)
            read_ev, apply_ev = wait_for(
                lambda: (lambda e: e if e[1] is not None else None)(main.delta_events(tr["seq"])),
                FLAGS.phase_timeout, f"delta {tr['seq']} to be applied", interval=0.05)
            apply_windows.append((read_ev["t0"], apply_ev["t1"]))
            read_only.append((read_ev["t0"], read_ev["t1"]))
            apply_only.append((apply_ev["t0"], apply_ev["t1"]))
            serve_windows.append((tr["t_step"], apply_ev["t1"]))
            apply_runs.append({"read_seconds": read_ev["t1"] - read_ev["t0"],
                               "apply_seconds": apply_ev["t1"] - apply_ev["t0"],
                               "write_seconds": tr["write_seconds"], "seq": tr["seq"]})
            log(f"under load: delta {fmt_rows(apply_rows)} #{rep} read {apply_runs[-1]['read_seconds']:.3f}s, "
                f"applied in {apply_runs[-1]['apply_seconds']:.3f}s")
            time.sleep(1.0)
    finally:
        open(stop_file, "w").close()
        try:
            hammer.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        workers.stop(hammer)
    h = np.load(result_path)
    starts, ends, codes = h["start"], h["end"], h["code"]
    for c in codes[codes != 0]:
        failures.add("hammer", f"grpc code {int(c)}")
    lat = ends - starts

    def select(windows, inside):
        mask = np.zeros(len(starts), bool)
        for a, b in windows:
            mask |= (starts >= a) & (ends <= b) if inside else (ends >= a) & (starts <= b)
        return lat[mask & (codes == 0)]

    return {
        "rows": apply_rows, "runs": apply_runs, "requests": int(len(codes)), "failed": int((codes != 0).sum()),
        "idle": percentiles(select(idle_windows, True)),
        "during_apply": percentiles(select(apply_windows, False)),
        "during_read": percentiles(select(read_only, False)),
        "during_apply_op": percentiles(select(apply_only, False)),
        "during_step_to_served": percentiles(select(serve_windows, False)),
    }


# -- report -----------------------------------------------------------------------

def report(res):
    lines = []
    m = res["machine"]
    lines.append(f"machine: {m['nproc']} cores, {m['cpu']}, TensorFlow {m['tf']}, Python {m['python']}; "
                 f"load average at start {res['load_start'][0]:.2f}/{res['load_start'][1]:.2f}/"
                 f"{res['load_start'][2]:.2f}, at end {res['load_end'][0]:.2f}/{res['load_end'][1]:.2f}/"
                 f"{res['load_end'][2]:.2f}; other processes used {res['other_cores']:.2f} cores on average "
                 f"over the {res['wall_seconds']:.0f}s run")
    lines.append(f"tables: {FLAGS.user_rows} user + {FLAGS.item_rows} item rows, dim {FLAGS.dim}; "
                 f"{FLAGS.replicas} native replica(s); delta poll {FLAGS.delta_poll_seconds}s (background), "
                 f"probe every {FLAGS.probe_interval}s")
    if res["latency"]:
        report_latency(res, lines)
    if res["throughput"]:
        report_throughput(res, lines)
    if res["deltas"]:
        report_deltas(res, lines)
    if "under_load" in res:
        report_under_load(res, lines)
    lines.append("")
    report_targets(res, lines)
    return "\n".join(lines)


def report_latency(res, lines):
    lines.append("")
    lines.append("Predict latency, one client, sequential requests (ms)")
    lines.append("| export | batch | n | p50 | p90 | p99 | max |")
    lines.append("|---|---:|---:|---:|---:|---:|---:|")
    for r in res["latency"]:
        lines.append(f"| {r['export']} | {r['batch']} | {r['n']} | {r['p50']:.2f} | {r['p90']:.2f} | "
                     f"{r['p99']:.2f} | {r['max']:.2f} |")


def report_throughput(res, lines):
    lines.append("")
    lines.append(f"Throughput, {FLAGS.clients} clients, native replica")
    lines.append("| clients as | batch | requests | req/s | examples/s | p50 ms | p99 ms | client cores | "
                 "server cores |")
    lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in res["throughput"]:
        lines.append(f"| {r['mode']} | {r['batch']} | {r['requests']} | {r['rps']:.0f} | {r['eps']:.0f} | "
                     f"{r['latency']['p50']:.2f} | {r['latency']['p99']:.2f} | {r['client_cores']:.2f} | "
                     f"{r['server_cores']:.2f} |")


def report_deltas(res, lines):
    lines.append("")
    lines.append("Delta time-to-serve (seconds; median over repeats, worst in brackets): trainer step end -> "
                 "every replica returns the new value for the probe key and has finished the apply")
    lines.append("| rows | file MiB | step | export_delta | write | poll wait | read+verify | apply | apply rows/s "
                 "| probe sees it | served |")
    lines.append("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n in sorted({d["rows"] for d in res["deltas"]}):
        ds = [d for d in res["deltas"] if d["rows"] == n]
        reps = [p for d in ds for p in d["replicas"]]

        def med(key, src=ds):
            return median([d[key] for d in src])

        lines.append(
            f"| {fmt_rows(n)} | {med('file_bytes') / 2**20:.1f} | {med('step_seconds'):.3f} | "
            f"{med('export_delta_seconds'):.3f} | {med('write_seconds'):.3f} | {med('poll_wait_seconds', reps):.3f} | "
            f"{med('read_seconds', reps):.3f} | {med('apply_seconds', reps):.3f} | "
            f"{med('apply_rows_per_s', reps) / 1e6:.2f} M | {med('probe_seconds'):.3f} | "
            f"{med('served_seconds'):.3f} ({max(d['served_seconds'] for d in ds):.3f}) |")


def report_under_load(res, lines):
    u = res["under_load"]
    lines.append("")
    lines.append(f"Predict latency (batch 1, one client process back to back) idle vs while a "
                 f"{fmt_rows(u['rows'])}-row delta is read+applied ({len(u['runs'])} deltas; {u['requests']} "
                 f"requests, {u['failed']} failed), ms")
    lines.append("| window | n | p50 | p90 | p99 | p99.9 | max |")
    lines.append("|---|---:|---:|---:|---:|---:|---:|")
    for key, label in (("idle", "idle"), ("during_apply", "replica read+verify+apply (the target's window)"),
                       ("during_read", "  of which read+verify (deltas.read)"),
                       ("during_apply_op", "  of which apply (DeltaApplier._apply)"),
                       ("during_step_to_served", "trainer step -> applied")):
        p = u[key]
        if p.get("n"):
            lines.append(f"| {label} | {p['n']} | {p['p50']:.2f} | {p['p90']:.2f} | {p['p99']:.2f} | "
                         f"{p['p999']:.2f} | {p['max']:.2f} |")


def report_targets(res, lines):
    targets = []
    mid = [d for d in res["deltas"] if d["rows"] == 100_000]
    if mid:
        worst = max(d["served_seconds"] for d in mid)
        targets.append(("100k-row delta served <= 2 s after the trainer step (worst of "
                        f"{len(mid)})", f"{worst:.3f} s", worst <= 2.0))
    else:
        targets.append(("100k-row delta served <= 2 s (no 100k run)", "-", None))
    u = res.get("under_load", {"idle": {}, "during_apply": {}})
    idle, during = u["idle"].get("p99"), u["during_apply"].get("p99")
    if idle and during:
        targets.append((f"p99 during a {fmt_rows(u['rows'])}-row apply <= 2x idle p99",
                        f"{during:.2f} ms vs {idle:.2f} ms ({during / idle:.2f}x)", during <= 2 * idle))
    targets.append(("zero failed requests", str(res["failed_requests"]), res["failed_requests"] == 0))
    lines.append("| target | measured | result |")
    lines.append("|---|---|---|")
    for name, value, ok in targets:
        lines.append(f"| {name} | {value} | {'-' if ok is None else 'PASS' if ok else 'MISS'} |")
    res["targets"] = [{"target": n, "measured": v, "pass": ok} for n, v, ok in targets]


def plot(res, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib missing: no plot")
        return
    import numpy as np
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    u = res["under_load"]
    keys = ["p50", "p90", "p99", "p999", "max"]
    x = np.arange(len(keys))
    for i, (k, label) in enumerate((("idle", "idle"), ("during_apply", f"during {fmt_rows(u['rows'])}-row apply"))):
        if u[k].get("n"):
            a.bar(x + (i - 0.5) * 0.4, [u[k][q] for q in keys], 0.4, label=label)
    a.set_xticks(x, ["p50", "p90", "p99", "p99.9", "max"])
    a.set_yscale("log")
    a.set_ylabel("Predict latency, batch 1 (ms)")
    a.set_title("Latency idle vs during a delta apply")
    a.legend()
    sizes = sorted({d["rows"] for d in res["deltas"]})

    def series(key, per_replica=False):
        out = []
        for n in sizes:
            ds = [d for d in res["deltas"] if d["rows"] == n]
            vals = [p[key] for d in ds for p in d["replicas"]] if per_replica else [d[key] for d in ds]
            out.append(median(vals))
        return out

    b.plot(sizes, series("served_seconds"), "o-", label="trainer step -> served")
    b.plot(sizes, series("write_seconds"), "s--", label="trainer: write file")
    b.plot(sizes, series("export_delta_seconds"), "^--", label="trainer: export_delta")
    b.plot(sizes, series("read_seconds", True), "v--", label="replica: read+verify")
    b.plot(sizes, series("apply_seconds", True), "d--", label="replica: apply")
    b.axhline(2.0, color="grey", lw=0.8, ls=":", label="2 s target (100k)")
    b.set_xscale("log")
    b.set_yscale("log")
    b.set_xlabel("delta rows (dim %d)" % FLAGS.dim)
    b.set_ylabel("seconds")
    b.set_title("Delta size vs time to serve (median)")
    b.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    log(f"wrote {path}")


def main(argv):
    del argv
    if FLAGS.worker == "replica":
        return replica_worker()
    if FLAGS.worker == "client":
        return client_worker()
    if FLAGS.quick:
        defaults = {"user_rows": 60_000, "item_rows": 5_000, "delta_rows": ["1000", "10000", "50000"],
                    "requests": 300, "clients": 4, "delta_repeats": 1, "apply_repeats": 1, "idle_seconds": 2.0}
        for name, value in defaults.items():
            if not FLAGS[name].present:
                FLAGS[name].value = value
    workdir = FLAGS.workdir or tempfile.mkdtemp(prefix="monolith-serving-bench-")
    os.makedirs(workdir, exist_ok=True)
    try:
        res = run(workdir)
    finally:
        if not FLAGS.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    res["flags"] = {name: FLAGS[name].value for name in (
        "quick", "requests", "clients", "client_mode", "delta_rows", "delta_repeats", "apply_rows", "apply_repeats",
        "idle_seconds", "user_rows", "item_rows", "dim", "large_batch", "replicas", "portable", "delta_poll_seconds",
        "probe_interval", "seed", "phases")}
    text = report(res)
    print(text)
    if res["failure_examples"]:
        print("failed requests, first few:", res["failure_examples"])
    if FLAGS.out_json:
        with open(FLAGS.out_json, "w") as f:
            json.dump(res, f, indent=1, default=float)
    if FLAGS.out_png and res["deltas"] and "under_load" in res:
        plot(res, FLAGS.out_png)
    return 0


if __name__ == "__main__":
    app.run(main)
