"""Compiling a built model for training: its task losses and a loss balancer."""

from typing import Optional, Union

from mtl_zoo import _keras
from mtl_zoo import balancers as balancers_lib
from mtl_zoo import losses
from mtl_zoo._keras import keras
from pipelines import schema as schema_lib


def compile_model(model: keras.Model, schema: schema_lib.Schema,
                  learning_rate: float = 1e-3,
                  learning_rate_decay_steps: int = 0,
                  optimizer: Optional[keras.optimizers.Optimizer] = None,
                  weighting: Union[str, balancers_lib.LossBalancer] = "fixed",
                  weighting_options: Optional[dict] = None,
                  balance_on: str = balancers_lib.LAST_SHARED,
                  masked_loss: str = losses.DEFAULT_MASKED_LOSS,
                  **compile_kwargs) -> keras.Model:
  """Compiles `model` for training with one loss per task; returns what to `fit`.

  With fixed weights that is `model` itself, compiled with the schema's loss
  weights. Other balancers return a `balancers.MultiTaskTrainer` wrapping
  `model`: fit the trainer, export `model`.

  Masks arrive as per-task sample weights from the reader, so a masked example
  adds nothing to its task's loss. Exact per-task metrics are computed on eval
  data by `mtl_zoo.metrics` rather than by streaming Keras metrics, which are
  approximate (AUC) and slow down every training step. The optimizer's slots
  and the loss means are made here, so `fit` traces its train step once
  (`_keras.create_training_state`). All of it happens under the
  `tf.distribute` strategy the model was built under, so a model built inside
  `strategy.scope()` may be compiled outside it (Keras 3 otherwise refuses to
  mix the default optimizer's strategy with the model's).

  Args:
    model: a built model with one output per schema task.
    schema: the schema it trains on (`models.training_schema`).
    learning_rate: Adam's learning rate (when no `optimizer` is given; at the
      first step with `learning_rate_decay_steps`).
    learning_rate_decay_steps: N > 0: Adam's rate at step t is learning_rate /
      (1 + t / N); 0: constant.
    optimizer: the optimizer; default Adam (`_keras.default_adam`: Keras 2's
      legacy, fused one). One given must be made under the model's strategy.
    weighting: a `balancers.BALANCERS` name, or a built `LossBalancer`.
    weighting_options: the named balancer's options (e.g. dwa_temperature).
    balance_on: the shared dense parameters GradNorm and PCGrad act on:
      "last_shared" (the last shared layer) or "all_dense" (`balancers.shared`).
    masked_loss: what a masked task's loss is averaged over: "masked" (the
      examples its mask keeps) or "batch" (the whole batch; `losses`).
    **compile_kwargs: passed to Keras' `compile`.

  Returns:
    The model to fit.

  Raises:
    ValueError: an unknown balancer, balance_on or masked_loss, or fewer than
      two trained tasks for a balancer; `balancers.NothingSharedError` (a
      ValueError) for GradNorm or PCGrad on a model whose tasks share no dense
      parameter (e.g. single_task).
  """
  # Under the strategy Keras recorded when the model was built: the optimizer,
  # a balancer's trainer and their variables must belong to it.
  with model.distribute_strategy.scope():
    optimizer = optimizer or _keras.default_adam(learning_rate, learning_rate_decay_steps)
    # Task masks arrive as sample weights; no streaming metrics need them.
    compile_kwargs.setdefault("weighted_metrics", [])
    if isinstance(weighting, str):
      trained = balancers_lib.trained_tasks(schema)
      balancer = balancers_lib.make_balancer(weighting, [t.loss_weight for t in trained],
                                             **(weighting_options or {}))
    else:
      balancer = weighting
    if balancer.needs_train_step:
      if balancer.num_tasks < 2:
        raise ValueError(f"loss balancing needs at least two tasks with loss_weight > 0; "
                         f"schema {schema.name!r} trains "
                         f"{[t.name for t in balancers_lib.trained_tasks(schema)]}.")
      trainer = balancers_lib.MultiTaskTrainer(model, schema, balancer, balance_on,
                                               masked_loss)
      trainer.compile(optimizer=optimizer, **compile_kwargs)
      _keras.create_training_state(trainer)
      return trainer
    model.compile(optimizer=optimizer, loss=losses.task_losses(schema, masked_loss),
                  loss_weights={t.name: t.loss_weight for t in schema.tasks},
                  **compile_kwargs)
    _keras.create_training_state(model)
    return model
