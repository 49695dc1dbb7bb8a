"""Fixed weights: sum_t w_t L_t with the schema's loss weights."""

from mtl_zoo.balancers.base import LossBalancer


class FixedWeights(LossBalancer):
  """The schema's loss weights, unchanged. Keras' own compile computes exactly
  this update, so `compile_model` compiles the model directly (no trainer)."""

  needs_train_step = False
