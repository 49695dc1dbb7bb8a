"""Distributed and resumable training for the train CLI (`--distribution`).

  none              one process, TensorFlow's default (no) strategy
  mirrored          MirroredStrategy: every local GPU (or the CPU), one process
  multi_worker      MultiWorkerMirroredStrategy: synchronous data parallelism over
                    the workers of TF_CONFIG (all-reduce of gradients)
  parameter_server  ParameterServerStrategy: the chief (coordinator) runs the train
                    CLI and dispatches steps to workers, which update variables on
                    parameter servers asynchronously; large variables (embedding
                    tables) are split across the servers

`--batch_size` is the global batch: the examples behind one optimizer update.
Mirrored strategies split it over all replicas; a parameter-server step runs on
one worker, which reads the whole batch. Every worker reads its own share of the
training files (whole files) and repeats them: an epoch is a fixed number of
steps, one pass over the data's examples in total, so that workers never wait
on one that ran out of data.
"""

import json
import os
import re
from typing import Callable, Dict, Optional, Tuple

import numpy as np
import tensorflow as tf

from mtl_zoo._keras import keras
from pipelines import files

DISTRIBUTIONS = ("none", "mirrored", "multi_worker", "parameter_server")


class ClusterError(ValueError):
  """TF_CONFIG does not describe a cluster the chosen distribution can use."""


def tf_config() -> dict:
  """The parsed TF_CONFIG environment variable ({} when unset)."""
  text = os.environ.get("TF_CONFIG", "").strip()
  if not text:
    return {}
  try:
    config = json.loads(text)
  except json.JSONDecodeError as e:
    raise ClusterError(f"TF_CONFIG is not valid JSON ({e}); see README 'Training on a "
                       "cluster'.") from None
  if not isinstance(config, dict) or not isinstance(config.get("cluster", {}), dict):
    raise ClusterError("TF_CONFIG must be a JSON object with 'cluster' and 'task'.")
  return config


def role(config: dict) -> Tuple[Optional[str], int]:
  """This process's (task type, index) in TF_CONFIG; (None, 0) without one."""
  task = config.get("task") or {}
  try:
    return task.get("type"), int(task.get("index", 0))
  except (AttributeError, TypeError, ValueError):
    raise ClusterError(f"TF_CONFIG's task should look like {{\"type\": \"worker\", "
                       f"\"index\": 0}}, got {task!r}.") from None


def is_chief(config: dict) -> bool:
  """Whether this process writes the outputs: the `chief` task, or worker 0 of a
  cluster without one, or a process without a cluster."""
  task_type, index = role(config)
  cluster = config.get("cluster") or {}
  if task_type is None or task_type == "chief":
    return True
  return task_type == "worker" and index == 0 and "chief" not in cluster


def num_workers(distribution: str, config: dict) -> int:
  """Processes that read training data: the workers (and chief) of a mirrored
  cluster, the workers of a parameter-server cluster, else 1."""
  cluster = config.get("cluster") or {}
  if distribution == "multi_worker":
    return len(cluster.get("chief", [])) + len(cluster.get("worker", [])) or 1
  if distribution == "parameter_server":
    return len(cluster.get("worker", []))
  return 1


def make_strategy(distribution: str, ps_shards: int = 0,
                  ps_min_shard_bytes: int = 256 << 10,
                  cpu_replicas: int = 0) -> Optional[tf.distribute.Strategy]:
  """The strategy for `--distribution` (None for `none`).

  Call it before TensorFlow runs anything else: the multi-worker strategy
  configures collective ops for the whole process. A parameter-server cluster
  needs `chief`, `worker` and `ps` tasks and must be called on the chief; its
  variables of at least `ps_min_shard_bytes` are split along their first axis
  into up to `ps_shards` parts (default: one per ps task), so an embedding
  table larger than one server's memory still fits. On a machine without GPUs,
  `cpu_replicas` > 1 splits the CPU into that many logical devices and mirrors
  over them (several replicas on one CPU: slower, but exercises the same
  splitting and all-reduce as several GPUs).
  """
  if distribution not in DISTRIBUTIONS:
    raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}.")
  config = tf_config()
  if distribution == "none":
    return None
  if distribution == "mirrored":
    if cpu_replicas > 1 and not tf.config.list_physical_devices("GPU"):
      cpu = tf.config.list_physical_devices("CPU")[0]
      try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * cpu_replicas)
      except RuntimeError:
        raise ClusterError("--cpu_replicas must be set before TensorFlow starts running "
                           "(start a new process).") from None
      return tf.distribute.MirroredStrategy(
          [d.name for d in tf.config.list_logical_devices("CPU")])
    return tf.distribute.MirroredStrategy()
  cluster = config.get("cluster") or {}
  task_type, _ = role(config)
  if distribution == "multi_worker":
    unknown = sorted(set(cluster) - {"chief", "worker"})
    if unknown or (cluster and task_type not in ("chief", "worker")):
      raise ClusterError(f"multi_worker takes 'chief' and 'worker' tasks; TF_CONFIG has "
                         f"cluster {sorted(cluster)} and task {task_type!r}.")
    return tf.distribute.MultiWorkerMirroredStrategy()
  missing = [t for t in ("chief", "worker", "ps") if not cluster.get(t)]
  if missing:
    raise ClusterError(f"parameter_server needs TF_CONFIG with 'chief', 'worker' and 'ps' "
                       f"tasks; it lacks {missing}. See README 'Training on a cluster'.")
  if task_type != "chief":
    raise ClusterError(f"this process is task {task_type!r}; only the chief coordinates "
                       "training (workers and parameter servers run `serve`).")
  partitioner = tf.distribute.experimental.partitioners.MinSizePartitioner(
      min_shard_bytes=ps_min_shard_bytes, max_shards=ps_shards or len(cluster["ps"]))
  resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
  return tf.distribute.ParameterServerStrategy(resolver, variable_partitioner=partitioner)


def serve(config: dict) -> None:
  """Runs this process as a parameter-server cluster's worker or ps: a
  tf.distribute.Server that executes what the chief sends, until killed."""
  task_type, index = role(config)
  if task_type not in ("worker", "ps"):
    raise ClusterError(f"only 'worker' and 'ps' tasks serve; this one is {task_type!r}.")
  resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
  server = tf.distribute.Server(resolver.cluster_spec(), job_name=task_type,
                                task_index=index, protocol=resolver.rpc_layer or "grpc",
                                start=True)
  print(f"Serving as {task_type} {index} at {server.target}; stop with SIGTERM when the "
        "chief has finished.", flush=True)
  server.join()


def input_shard(strategy: Optional[tf.distribute.Strategy],
                context: tf.distribute.InputContext, workers: int) -> Tuple[int, object]:
  """(number of readers, this reader's index) for file sharding inside a dataset_fn.

  A parameter-server worker learns its index only when the chief's dataset
  function runs there, so it is a tensor; the mirrored strategies pass it in
  `context`.
  """
  if isinstance(strategy, tf.distribute.ParameterServerStrategy):
    return workers, tf.distribute.coordinator.experimental_get_current_worker_index()
  return context.num_input_pipelines, context.input_pipeline_id


def training_input(strategy: Optional[tf.distribute.Strategy],
                   dataset_fn: Callable[[tf.distribute.InputContext], tf.data.Dataset]):
  """What `fit` takes for `dataset_fn(input_context)` under `strategy`."""
  if strategy is None:
    return dataset_fn(tf.distribute.InputContext())
  if isinstance(strategy, tf.distribute.ParameterServerStrategy):
    return keras.utils.experimental.DatasetCreator(dataset_fn)
  return strategy.distribute_datasets_from_function(dataset_fn)


_PART = re.compile(r"/part_(\d+)(?=:\d+$)")


def weight_values(model: keras.Model) -> list:
  """`model.get_weights()` with the parts of every sharded variable joined back
  into one array, so the values fit the same architecture built without a
  strategy (which is what gets saved and exported)."""
  values, previous = [], None
  for weight, value in zip(model.weights, model.get_weights()):
    base = _PART.sub("", weight.name)
    if _PART.search(weight.name) and base == previous:
      values[-1] = np.concatenate([values[-1], value])
    else:
      values.append(value)
    previous = base
  return values


def sharded_variables(model: keras.Model) -> Dict[str, int]:
  """Variables split across parameter servers: name -> number of parts."""
  parts: Dict[str, int] = {}
  for weight in model.weights:
    if _PART.search(weight.name):
      base = _PART.sub("", weight.name)
      parts[base] = parts.get(base, 0) + 1
  return parts


def backup_resume_point(backup_dir: str, steps_per_epoch: int,
                        per_step: bool) -> Optional[Tuple[int, int]]:
  """(epoch, step) that `keras.callbacks.BackupAndRestore(backup_dir)` will
  resume training from, or None when there is no backup.

  Reads the two counters Keras stores in its backup checkpoint (names fixed by
  tf_keras' WorkerTrainingState) and applies its rule: a backup taken after
  the epoch's last step (or any backup with per-epoch saving) resumes at the
  next epoch.
  """
  latest = tf.train.latest_checkpoint(os.path.join(backup_dir, "chief"))
  if not latest:
    return None
  try:
    checkpoint = tf.train.load_checkpoint(latest)
    epoch = int(checkpoint.get_tensor("ckpt_saved_epoch/.ATTRIBUTES/VARIABLE_VALUE"))
    batch = int(checkpoint.get_tensor("ckpt_saved_batch/.ATTRIBUTES/VARIABLE_VALUE"))
  except tf.errors.OpError as e:
    # Resuming without knowing where would silently retrain seen batches.
    raise BackupOwnerError(
        f"{backup_dir} holds a backup that cannot be read as a training backup "
        f"({type(e).__name__}: {e.message.splitlines()[0] if e.message else e}). Delete "
        f"{backup_dir} or pass another --model_dir to start over.") from None
  if epoch < 0 or (per_step and batch < 0):
    return None
  if not per_step or batch >= steps_per_epoch - 1:
    return epoch + 1, 0
  return epoch, batch + 1


class BackupOwnerError(ValueError):
  """A backup that another run's settings wrote, or that cannot be read; the
  message says how to go on."""


# Settings added to a backup's identity (run.json) after backups were first
# written, with the value every run had before: a backup from before still
# resumes under them.
SETTINGS_BEFORE_THEY_WERE_SAVED = {"learning_rate_decay_steps": 0}


def claim_backup(model_dir: Optional[str], chief: bool, identity: dict,
                 steps_per_epoch: int, per_step: bool
                 ) -> Tuple[Optional[str], Optional[Tuple[int, int]]]:
  """Takes ownership of `<model_dir>/backup` for a run with settings `identity`.

  Args:
    model_dir: the run's directory; None (no explicit directory: a rerun could
      not find it again) means no backup.
    chief: whether this task writes (the chief records the owner).
    identity: the settings the backup belongs to (JSON-serialisable).
    steps_per_epoch: the run's steps per epoch.
    per_step: whether backups are taken every N steps (else per epoch).

  Returns:
    (backup directory or None, the (epoch, step) to resume from or None).

  Raises:
    BackupOwnerError: the backup belongs to a run with other settings.
  """
  if model_dir is None:
    return None, None
  identity = json.loads(json.dumps(identity))  # as saved: tuples become lists
  backup_dir = os.path.join(model_dir, "backup")
  owner = os.path.join(backup_dir, "run.json")
  if tf.io.gfile.exists(os.path.join(backup_dir, "chief")):
    saved = files.read_json(owner) if tf.io.gfile.exists(owner) else {}
    saved = {**SETTINGS_BEFORE_THEY_WERE_SAVED, **saved}
    changed = sorted(k for k in identity if saved.get(k) != identity[k])
    if changed:
      raise BackupOwnerError(
          f"{backup_dir} holds the backup of an unfinished run with other settings "
          f"({', '.join(changed)}). Rerun with that run's flags to resume it, or pass "
          f"another --model_dir (or delete {backup_dir}) to start over.")
  resumed = backup_resume_point(backup_dir, steps_per_epoch, per_step)
  if chief:
    tf.io.gfile.makedirs(backup_dir)
    files.write_json(owner, identity)
  return backup_dir, resumed


def remove_backup(backup_dir: str) -> None:
  """Deletes a finished run's backup directory (kept by `Backup` until the run's
  outputs are saved). Other workers may still be removing their temporary
  copies: what cannot be removed now is left alone."""
  try:
    tf.io.gfile.remove(os.path.join(backup_dir, "run.json"))
    tf.io.gfile.rmtree(backup_dir)
  except tf.errors.OpError:
    pass


class Backup(keras.callbacks.BackupAndRestore):
  """BackupAndRestore that, when it saves every `save_freq` steps, also saves at
  the end of every epoch (Keras then saves only on the step count, so epochs
  shorter than `save_freq` would never be backed up)."""

  def on_epoch_end(self, epoch, logs=None):
    super().on_epoch_end(epoch, logs)
    if self.save_freq != "epoch":
      self._backup(epoch=epoch)
      self._batches_count = 0
