"""Distributed training on localhost and recovery from a killed run, with real
processes; plus the helpers behind them, in-process.

Each multi-process test bounds its own time (every wait has a timeout), kills
whatever it started in a `finally`, and uses only 127.0.0.1 on free ports.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from conftest import REPO
from mtl_zoo import distribute
from mtl_zoo import metrics as metrics_lib
from mtl_zoo._keras import keras
from pipelines import reader
from pipelines import schema as schema_lib
from pipelines.sources import SOURCES

TIMEOUT = 240  # seconds for any one training process, on a loaded 2-core machine
ENV = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
ENV["TF_CPP_MIN_LOG_LEVEL"] = "2"


@pytest.fixture(scope="module")
def two_shards(tmp_path_factory):
  """1,000 training impressions in two shards of 500; 400 for evaluation."""
  out = str(tmp_path_factory.mktemp("dist") / "ads")
  SOURCES["synthetic"].write(out, num_shards=2, seed=1, synthetic_requests=100,
                             synthetic_eval_requests=40, synthetic_users=200,
                             synthetic_items=100)
  return out


def free_ports(n: int) -> list:
  sockets = [socket.socket() for _ in range(n)]
  try:
    for s in sockets:
      s.bind(("127.0.0.1", 0))
    return [s.getsockname()[1] for s in sockets]
  finally:
    for s in sockets:
      s.close()


# The train CLI, dying by SIGKILL (no clean-up, as from the OOM killer) right
# after the backup callback's work at epoch/batch argv[1]: every worker of a
# multi_worker job dies after the same step.
_SELF_KILLING_TRAIN = """
import json, os, signal, sys, time
from absl import app
from mtl_zoo import distribute, train
epoch, batch = json.loads(sys.argv[1])

def die():
  # A moment for this step's last collective messages to reach the other
  # worker: killed mid-send, it would fail that worker with a collective error
  # (seen once in CI) before that worker's own kill at the same point.
  time.sleep(0.5)
  os.kill(os.getpid(), signal.SIGKILL)

class Dying(distribute.Backup):
  def on_train_batch_end(self, index, logs=None):
    super().on_train_batch_end(index, logs)
    if (self._current_epoch, index) == (epoch, batch):
      die()

  def on_epoch_end(self, index, logs=None):
    super().on_epoch_end(index, logs)
    if (index, batch) == (epoch, None):
      die()

distribute.Backup = Dying
app.run(train.main, argv=["mtl_zoo.train", *sys.argv[2:]])
"""


class Processes:
  """The training processes of one test, each logging to its own file."""

  def __init__(self, log_dir):
    self.log_dir, self.procs = log_dir, {}

  def start(self, name: str, *flags: str, cluster: dict = None, task=None, kill_at=None):
    """Starts `python -m mtl_zoo.train <flags>`; with `kill_at` (epoch, batch), 0-based,
    the process SIGKILLs itself right after that batch (batch None: that epoch's
    end), once its backup callback has run, so a test kills at an exact point."""
    env = dict(ENV)
    if cluster:
      env["TF_CONFIG"] = json.dumps({"cluster": cluster,
                                     "task": {"type": task[0], "index": task[1]}})
    log = open(os.path.join(self.log_dir, f"{name}.log"), "w")
    command = ([sys.executable, "-m", "mtl_zoo.train"] if kill_at is None else
               [sys.executable, "-c", _SELF_KILLING_TRAIN, json.dumps(kill_at)])
    self.procs[name] = (subprocess.Popen([*command, *flags], cwd=REPO, env=env, stdout=log,
                                         stderr=subprocess.STDOUT), log)
    return self.procs[name][0]

  def wait(self, name: str, timeout: float = TIMEOUT) -> tuple:
    """(exit code, log text); kills the process if it overruns."""
    proc, log = self.procs[name]
    try:
      code = proc.wait(timeout)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()
      code = None
    log.close()
    with open(log.name) as f:
      return code, f.read()

  def stop(self):
    for proc, log in self.procs.values():
      if proc.poll() is None:
        proc.kill()
        proc.wait()
      log.close()


@pytest.fixture
def processes(tmp_path):
  procs = Processes(str(tmp_path))
  try:
    yield procs
  finally:
    procs.stop()


def full_batch_flags(data_dir: str, model_dir: str) -> list:
  """One step per epoch over all 1,000 examples: the gradient is the same mean
  however the batch is split, so runs are comparable to float precision."""
  return [f"--train_files={data_dir}/train-*", f"--eval_files={data_dir}/eval-*",
          "--epochs=4", "--batch_size=1000", "--learning_rate=0.02",
          f"--model_dir={model_dir}", "--export_dir="]


def load_weights(model_dir) -> list:
  return keras.models.load_model(os.path.join(model_dir, "model.keras")).get_weights()


def eval_metrics(model_dir) -> dict:
  with open(os.path.join(model_dir, "metrics.json")) as f:
    return json.load(f)


def assert_same_run(a_dir, b_dir, atol: float) -> None:
  for wa, wb in zip(load_weights(a_dir), load_weights(b_dir), strict=True):
    np.testing.assert_allclose(wa, wb, rtol=0, atol=atol)
  a, b = eval_metrics(a_dir)["eval"], eval_metrics(b_dir)["eval"]
  for task in a:
    for name in ("auc", "logloss"):
      assert abs(a[task][name] - b[task][name]) <= atol, (task, name, a[task], b[task])


@pytest.fixture(scope="module")
def single_worker_run(two_shards, tmp_path_factory):
  model_dir = str(tmp_path_factory.mktemp("single") / "run")
  result = subprocess.run([sys.executable, "-m", "mtl_zoo.train",
                           *full_batch_flags(two_shards, model_dir)],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=TIMEOUT)
  assert result.returncode == 0, result.stderr[-3000:]
  return model_dir


@pytest.mark.slow
def test_mirrored_over_two_cpu_replicas_matches_no_strategy(two_shards, single_worker_run, processes,
                                                  tmp_path):
  model_dir = str(tmp_path / "mirrored")
  processes.start("mirrored", *full_batch_flags(two_shards, model_dir),
                  "--distribution=mirrored", "--cpu_replicas=2")
  code, log = processes.wait("mirrored")
  assert code == 0, log[-3000:]
  assert "(2 replicas)" in log  # the global batch of 1,000 split in two
  assert eval_metrics(model_dir)["distribution"] == "mirrored"
  assert_same_run(model_dir, single_worker_run, atol=1e-5)


@pytest.mark.slow
def test_two_multi_worker_processes_match_one_worker_with_the_same_global_batch(
    two_shards, single_worker_run, processes, tmp_path):
  model_dir = str(tmp_path / "multi")
  cluster = {"worker": [f"127.0.0.1:{p}" for p in free_ports(2)]}
  for index in (0, 1):
    processes.start(f"worker{index}", *full_batch_flags(two_shards, model_dir),
                    "--distribution=multi_worker", cluster=cluster, task=("worker", index))
  (code0, log0), (code1, log1) = processes.wait("worker0"), processes.wait("worker1")
  assert code0 == 0 and code1 == 0, log0[-3000:] + log1[-3000:]
  # Each worker read its own shard, 500 examples per step, of the global 1,000.
  assert "reader 0 of 2 reads 1 of the 2 training files" in log0
  assert "reader 1 of 2 reads 1 of the 2 training files" in log1
  assert "on 2 workers (2 replicas), 1 steps of 1000 per epoch" in log0
  assert "Task worker 1 finished; the chief writes the outputs" in log1
  metrics = eval_metrics(model_dir)
  assert metrics["workers"] == 2 and metrics["distribution"] == "multi_worker"
  # Only the chief wrote; the other worker's temporary checkpoint copies are gone.
  leftovers = [d for _, dirs, _ in os.walk(model_dir) for d in dirs if "workertemp" in d]
  assert not leftovers
  # Same global batch: the all-reduced mean gradient equals the single worker's,
  # up to float32 summation order.
  assert_same_run(model_dir, single_worker_run, atol=1e-5)


@pytest.fixture(scope="module")
def ps_cluster(tmp_path_factory):
  """(cluster, server processes): two workers and a parameter server, waiting
  for a chief; each chief that connects in turn runs its own job on them."""
  chief, worker0, worker1, ps = (f"127.0.0.1:{p}" for p in free_ports(4))
  cluster = {"chief": [chief], "worker": [worker0, worker1], "ps": [ps]}
  servers = Processes(str(tmp_path_factory.mktemp("ps_cluster")))
  try:
    for task in (("worker", 0), ("worker", 1), ("ps", 0)):
      servers.start(f"{task[0]}{task[1]}", "--distribution=parameter_server",
                    cluster=cluster, task=task)
    yield cluster, servers
  finally:
    servers.stop()


def serving_cluster(ps_cluster) -> dict:
  """The cluster, after checking that its servers are still up (a test before
  may have left them dead)."""
  cluster, servers = ps_cluster
  exited = [name for name, (proc, _) in servers.procs.items() if proc.poll() is not None]
  assert not exited, f"parameter-server cluster tasks exited: {exited}"
  return cluster


@pytest.mark.slow
def test_parameter_server_cluster_trains_and_exports_a_round_tripping_model(
    two_shards, ps_cluster, processes, tmp_path):
  cluster = serving_cluster(ps_cluster)
  model_dir, export_dir = str(tmp_path / "run"), str(tmp_path / "export")
  # Tables of at least 1 KiB split in two, so even one ps holds sharded variables.
  processes.start("chief", f"--train_files={two_shards}/train-*",
                  f"--eval_files={two_shards}/eval-*", "--epochs=2", "--batch_size=250",
                  "--distribution=parameter_server", "--ps_shards=2",
                  "--ps_min_shard_bytes=1024", f"--model_dir={model_dir}",
                  f"--export_dir={export_dir}", cluster=cluster, task=("chief", 0))
  code, log = processes.wait("chief")
  assert code == 0, log[-3000:]
  assert "Variables split over the parameter servers: feature_embedding/embeddings" in log
  assert "Input: the 2 workers read disjoint shares of the 2 training files" in log
  metrics = eval_metrics(model_dir)
  assert metrics["distribution"] == "parameter_server" and metrics["workers"] == 2
  assert np.isfinite(metrics["train_loss"]["loss"])

  schema = schema_lib.Schema.load(model_dir)
  columns = reader.read_columns(f"{two_shards}/eval-*", schema)
  serialized = tf.constant(schema.serving_examples(columns))
  (version,) = os.listdir(export_dir)
  served = tf.saved_model.load(os.path.join(export_dir, version)).signatures[
      "serving_default"](examples=serialized)
  keras_model = keras.models.load_model(os.path.join(model_dir, "model.keras"))
  direct = keras_model(schema.parse_serving_examples(serialized), training=False)
  for task in schema.task_names:
    np.testing.assert_allclose(served[task].numpy(), direct[task].numpy().ravel(),
                               rtol=0, atol=1e-6)
  # The export holds the trained (sharded) weights joined back correctly: its
  # eval AUC is the one the chief measured on the distributed model.
  assert metrics_lib.auc(columns["click"], served["ctr"].numpy()) == pytest.approx(
      metrics["eval"]["ctr"]["auc"], abs=1e-6)


@pytest.fixture(scope="module")
def ps_data(tmp_path_factory):
  """40,000 training impressions in four shards, 20,000 for evaluation: enough
  that a run's eval AUC depends on the training, not on sampling noise (the CVR
  AUC is measured on the ~2,400 clicks). The generator's version-2 policy, which
  the bound was measured on: the default one's log has a quarter fewer clicks."""
  out = str(tmp_path_factory.mktemp("ps") / "ads")
  SOURCES["synthetic"].write(out, num_shards=4, seed=1, synthetic_requests=4000,
                             synthetic_eval_requests=2000, synthetic_policy_taste=1.0,
                             synthetic_policy_item_error=0.0)
  return out


@pytest.mark.slow
def test_parameter_server_eval_auc_is_within_001_of_one_process(ps_data, ps_cluster,
                                                                 processes, tmp_path):
  cluster = serving_cluster(ps_cluster)
  # Same data, seed, epochs, global batch and learning rate: 157 steps of 256 per
  # epoch in both. No variable is split over the servers, so both runs start from
  # the same initial weights (a split table is initialised part by part). At
  # the learning rate the bound was measured with (BUILD_NOTES): at the default,
  # ten times higher early on, a cvr gap of 0.013 was seen (2,281 clicks).
  flags = [f"--train_files={ps_data}/train-*", f"--eval_files={ps_data}/eval-*",
           "--epochs=2", "--batch_size=256", "--learning_rate=2e-3",
           "--learning_rate_decay_steps=0", "--export_dir="]
  single_dir, ps_dir = str(tmp_path / "single"), str(tmp_path / "ps")
  processes.start("single", *flags, f"--model_dir={single_dir}")
  processes.start("chief", *flags, "--distribution=parameter_server", f"--model_dir={ps_dir}",
                  cluster=cluster, task=("chief", 0))
  for name in ("single", "chief"):
    code, log = processes.wait(name)
    assert code == 0, log[-3000:]
    assert "157 steps of 256 per epoch" in log
  assert "Variables split over the parameter servers: none" in log  # the chief's
  distributed, single = eval_metrics(ps_dir), eval_metrics(single_dir)
  assert distributed["distribution"] == "parameter_server" and distributed["workers"] == 2
  # Asynchronous updates (a worker's step may read variables the other is about
  # to change) and each worker reading its own files change the order of the
  # updates, not what is learnt (BUILD_NOTES: the gaps measured).
  for task in ("ctr", "cvr"):
    gap = abs(distributed["eval"][task]["auc"] - single["eval"][task]["auc"])
    assert gap <= 0.01, (task, distributed["eval"][task], single["eval"][task])


@pytest.mark.slow
def test_killed_training_resumes_from_its_last_backup_and_ends_as_if_never_killed(
    ads_dir, processes, tmp_path):
  def flags(model_dir, *extra):
    # 3,000 examples / 32 = 94 steps per epoch, a backup every 10.
    return [f"--train_files={ads_dir}/train-*", f"--eval_files={ads_dir}/eval-*",
            "--epochs=2", "--batch_size=32", "--backup_every_steps=10", "--export_dir=",
            f"--model_dir={model_dir}", *extra]

  reference, killed = str(tmp_path / "reference"), str(tmp_path / "killed")
  processes.start("reference", *flags(reference))
  victim = processes.start("victim", *flags(killed))
  marker = os.path.join(killed, "backup", "chief", "checkpoint")
  deadline = time.monotonic() + TIMEOUT
  while not os.path.exists(marker):
    assert victim.poll() is None and time.monotonic() < deadline, "no backup appeared"
    time.sleep(0.01)
  victim.send_signal(signal.SIGKILL)
  assert processes.wait("victim")[0] == -signal.SIGKILL
  # Nothing that looks finished was left behind.
  assert not os.path.exists(os.path.join(killed, "metrics.json"))
  assert not os.path.exists(os.path.join(killed, "model.keras"))
  epoch, step = distribute.backup_resume_point(os.path.join(killed, "backup"), 94, True)
  assert (epoch, step) != (0, 0) and step > 0  # killed mid-epoch, after a backup

  processes.start("other", *flags(killed, "--learning_rate=0.01"))
  code, log = processes.wait("other")
  assert code != 0 and "unfinished run with other settings (learning_rate)" in log

  # The rerun is killed again in epoch 2, after the in-memory cache of the parsed
  # data was filled (and lost with the process), once a backup at step 30 is written.
  processes.start("resumed", *flags(killed), kill_at=(1, 35))
  code, log = processes.wait("resumed")
  assert code == -signal.SIGKILL, log[-3000:]
  assert f"Resuming from the backup in {killed}/backup: epoch {epoch + 1}, step {step} " \
         "of 94." in log
  processes.start("finished", *flags(killed))
  code, log = processes.wait("finished")
  assert code == 0, log[-3000:]
  assert f"Resuming from the backup in {killed}/backup: epoch 2, step 30 of 94." in log
  assert eval_metrics(killed)["resumed_from"] == {"epoch": 2, "step": 30}
  assert not os.path.exists(os.path.join(killed, "backup"))  # done: a rerun starts afresh
  code, log = processes.wait("reference")
  assert code == 0, log[-3000:]
  # The resumed run skipped the batches already trained on and read the data in
  # the same deterministic order, so it ends where the uninterrupted run does,
  # up to float rounding in multi-threaded kernels (1e-5 measured at worst).
  assert_same_run(killed, reference, atol=1e-4)


def killable_flags(data_dir: str, model_dir: str) -> list:
  """1,000 examples / 100 = 10 steps per epoch (50 per worker under multi_worker),
  a backup after every 4th step and at each epoch's end, the parsed data cached
  in a file in the run's directory. (With this little data the block shuffle
  buffer reads a worker's whole share before its first step: the cache is
  complete from then on.)"""
  return [f"--train_files={data_dir}/train-*", f"--eval_files={data_dir}/eval-*",
          "--epochs=2", "--batch_size=100", "--learning_rate=0.02",
          "--backup_every_steps=4", "--cache=file", f"--model_dir={model_dir}",
          "--export_dir="]


def start_multi_worker(processes: Processes, name: str, flags: list, kill_at=None) -> None:
  cluster = {"worker": [f"127.0.0.1:{p}" for p in free_ports(2)]}
  for index in (0, 1):
    processes.start(f"{name}{index}", *flags, "--distribution=multi_worker", cluster=cluster,
                    task=("worker", index), kill_at=kill_at)


@pytest.fixture(scope="module")
def multi_worker_reference(two_shards, tmp_path_factory):
  """The uninterrupted multi_worker run the killed ones must end equal to."""
  model_dir = str(tmp_path_factory.mktemp("multi_reference") / "run")
  procs = Processes(os.path.dirname(model_dir))
  try:
    start_multi_worker(procs, "worker", killable_flags(two_shards, model_dir))
    for index in (0, 1):
      code, log = procs.wait(f"worker{index}")
      assert code == 0, log[-3000:]
  finally:
    procs.stop()
  return model_dir


# Where both workers die (0-based epoch and batch, None for the epoch's end) and
# where the rerun then resumes (1-based epoch and step, as printed), in the order
# one run meets them: each rerun but the last is killed at the next point.
KILL_POINTS = [
    ("mid first epoch", (0, 5), (1, 4)),  # backed up after step 4; steps 5-6 redone
    ("at an epoch boundary", (0, None), (2, 0)),  # after epoch 1's eval and backup
    ("after the cache is filled", (1, 6), (2, 4)),  # epoch 2: reads the full cache
]


@pytest.mark.slow
def test_multi_worker_killed_at_three_points_ends_as_if_never_killed(
    two_shards, multi_worker_reference, processes, tmp_path):
  killed = str(tmp_path / "killed")
  resume_line = None
  for run, (point, kill_at, (epoch, step)) in enumerate(KILL_POINTS):
    start_multi_worker(processes, f"run{run}-", killable_flags(two_shards, killed), kill_at)
    for index in (0, 1):
      code, log = processes.wait(f"run{run}-{index}")
      assert code == -signal.SIGKILL, (point, log[-3000:])
    if resume_line:  # this run resumed where the previous one was killed
      assert resume_line in log, (point, log[-3000:])
    assert not os.path.exists(os.path.join(killed, "metrics.json"))
    if epoch > 1:  # both workers' file caches complete: index written, no lock left
      cache = os.listdir(os.path.join(killed, "cache"))
      assert {"train-0.index", "train-1.index"} <= set(cache), (point, cache)
      assert not [f for f in cache if f.endswith(".lockfile")], (point, cache)
    resume_line = f"Resuming from the backup in {killed}/backup: epoch {epoch}, step {step} of 10."

  start_multi_worker(processes, "finished", killable_flags(two_shards, killed))
  for index in (1, 0):  # the chief's log last
    code, log = processes.wait(f"finished{index}")
    assert code == 0, log[-3000:]
  assert resume_line in log
  assert eval_metrics(killed)["resumed_from"] == {"epoch": 2, "step": 4}
  assert not os.path.exists(os.path.join(killed, "backup"))
  # Each rerun skips the steps the backup holds and both workers read their files
  # in the same deterministic order as before, so the all-reduced updates are the
  # uninterrupted run's (README: to 1e-4; bit-identical in the runs measured).
  assert_same_run(killed, multi_worker_reference, atol=1e-4)


@pytest.mark.parametrize("flags, cluster, message", [
    (["--distribution=mirrored", "--loss_weighting=pcgrad"], None,
     "--loss_weighting=pcgrad trains with its own train step"),
    (["--distribution=parameter_server", "--train_files={ads}/train-*"], None,
     "needs TF_CONFIG with 'chief', 'worker' and 'ps' tasks"),
    # Checked before the strategy waits for the other worker, which never comes.
    (["--distribution=multi_worker", "--train_files={ads}/train-00000-of-00003.tfrecord"],
     {"worker": ["127.0.0.1:1", "127.0.0.1:2"]},
     "matches 1 file(s) but 2 workers read whole files"),
])
def test_distribution_errors_name_the_problem(flags, cluster, message, ads_dir, processes,
                                              tmp_path):
  processes.start("run", *[f.format(ads=ads_dir) for f in flags],
                  f"--model_dir={tmp_path}/run", "--export_dir=", cluster=cluster,
                  task=("worker", 0))
  code, log = processes.wait("run", timeout=120)
  assert code not in (0, None) and message in log, log[-3000:]
  assert "Traceback" not in log


# ------------------------------------------------------------- in-process


def test_resume_point_is_where_keras_resumes(tmp_path):
  """backup_resume_point predicts the (epoch, step) BackupAndRestore resumes at,
  read from a real Keras backup."""
  x, y = np.ones((40, 2), np.float32), np.zeros((40, 1), np.float32)

  def fit(callbacks):
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    steps = []
    record = keras.callbacks.LambdaCallback(
        on_train_batch_begin=lambda batch, logs: steps.append((epochs[-1], batch)),
        on_epoch_begin=lambda epoch, logs: epochs.append(epoch))
    epochs = []
    model.fit(x, y, batch_size=4, epochs=3, verbose=0, callbacks=[*callbacks, record])
    return steps

  class Interrupt(keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
      if self._epoch == 1 and batch == 6:
        raise RuntimeError("interrupted")

    def on_epoch_begin(self, epoch, logs=None):
      self._epoch = epoch

  backup = str(tmp_path / "backup")
  with pytest.raises(RuntimeError):
    fit([distribute.Backup(backup, save_freq=3), Interrupt()])
  predicted = distribute.backup_resume_point(backup, steps_per_epoch=10, per_step=True)
  # Backups after 3, 6, 9 steps, at epoch 0's end (10), then after 13 and 16:
  # epoch 1's step 5 was the last one backed up.
  assert predicted == (1, 6)
  assert fit([distribute.Backup(backup, save_freq=3)])[0] == predicted
  assert distribute.backup_resume_point(backup, 10, True) is None  # deleted when done


def test_tf_config_roles_and_errors(monkeypatch):
  monkeypatch.delenv("TF_CONFIG", raising=False)
  assert distribute.tf_config() == {} and distribute.is_chief({})
  cluster = {"chief": ["a:1"], "worker": ["b:1", "c:1"], "ps": ["d:1"]}
  assert distribute.is_chief({"cluster": cluster, "task": {"type": "chief", "index": 0}})
  assert not distribute.is_chief({"cluster": cluster, "task": {"type": "worker", "index": 0}})
  workers_only = {"cluster": {"worker": ["b:1", "c:1"]}, "task": {"type": "worker", "index": 0}}
  assert distribute.is_chief(workers_only)
  monkeypatch.setenv("TF_CONFIG", "{not json")
  with pytest.raises(distribute.ClusterError, match="TF_CONFIG is not valid JSON"):
    distribute.tf_config()
  monkeypatch.setenv("TF_CONFIG", json.dumps(workers_only))
  with pytest.raises(distribute.ClusterError, match=r"lacks \['chief', 'ps'\]"):
    distribute.make_strategy("parameter_server")
  monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": cluster,
                                              "task": {"type": "chief", "index": 0}}))
  with pytest.raises(distribute.ClusterError, match="multi_worker takes 'chief' and 'worker'"):
    distribute.make_strategy("multi_worker")


def test_weight_values_join_the_parts_of_sharded_variables():
  class Weight:
    def __init__(self, name):
      self.name = name

  class Sharded:
    weights = [Weight("emb/table/part_0:0"), Weight("emb/table/part_1:0"),
               Weight("dense/kernel:0"), Weight("other/part_0:0")]

    def get_weights(self):
      return [np.zeros((3, 2)), np.ones((2, 2)), np.full((2, 1), 5.0), np.ones(4)]

  values = distribute.weight_values(Sharded())
  assert [v.shape for v in values] == [(5, 2), (2, 1), (4,)]
  np.testing.assert_array_equal(values[0][3:], np.ones((2, 2)))
  assert distribute.sharded_variables(Sharded()) == {"emb/table:0": 2, "other:0": 1}


def test_model_save_is_atomic(tmp_path, monkeypatch):
  from mtl_zoo import runner
  model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
  path = str(tmp_path / "model.keras")
  runner.save_model(model, path)
  good = open(path, "rb").read()

  def crash(self, filepath, *args, **kwargs):
    with open(filepath, "wb") as f:
      f.write(b"half a model")
    raise KeyboardInterrupt

  monkeypatch.setattr(keras.Model, "save", crash)
  with pytest.raises(KeyboardInterrupt):
    runner.save_model(model, path)
  assert open(path, "rb").read() == good
  assert os.listdir(tmp_path) == ["model.keras"]


def test_a_backup_from_before_a_setting_was_saved_resumes_under_its_old_value(tmp_path):
  backup = tmp_path / "backup"
  (backup / "chief").mkdir(parents=True)
  (backup / "run.json").write_text(json.dumps({"learning_rate": 0.02}))  # no decay saved
  old = {"learning_rate": 0.02, "learning_rate_decay_steps": 0}  # constant, as runs were
  assert distribute.claim_backup(str(tmp_path), False, old, 10, True) == (str(backup), None)
  with pytest.raises(distribute.BackupOwnerError, match=r"other settings \(learning_rate_"
                     r"decay_steps\)"):
    distribute.claim_backup(str(tmp_path), False, {**old, "learning_rate_decay_steps": 500},
                            10, True)
