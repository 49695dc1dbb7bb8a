"""Loss balancers: how the task losses of one multi-task model become one update.

  trainable = compile_model(model, schema, weighting="pcgrad")   # mtl_zoo.compile
  trainable.fit(dataset)          # `model` itself is what you export

Each method is one `LossBalancer` subclass in its own module and one line in
BALANCERS; its `OPTIONS` become flags of `python -m mtl_zoo.train`:
  fixed        sum_t w_t L_t with the schema's loss weights (plain Keras compile).
  uncertainty  sum_t exp(-s_t) L_t + s_t with learned log-variances s_t.
  dwa          Dynamic Weight Average: weights from the last two epochs' loss ratios.
  gradnorm     GradNorm: weights that equalise gradient norms on shared parameters
               relative to each task's training rate.
  pcgrad       PCGrad: conflicting components of per-task gradients projected away.
GradNorm and PCGrad take per-task gradients on shared dense parameters only
(`balance_on`, see `balancers.shared`); a model sharing none is refused.

A balancer from outside the package registers the same way:
  BALANCERS["mine"] = MyBalancer
"""

from typing import Dict, Sequence, Type

from mtl_zoo.balancers.base import (AdaptiveWeights, LossBalancer, MultiTaskTrainer,
                                    trained_tasks)
from mtl_zoo.balancers.dwa import DynamicWeightAverage
from mtl_zoo.balancers.fixed import FixedWeights
from mtl_zoo.balancers.gradnorm import GradNorm
from mtl_zoo.balancers.pcgrad import PCGrad
from mtl_zoo.balancers.shared import (ALL_DENSE, BALANCE_ON, LAST_SHARED, NothingSharedError,
                                      balanced_indices, sharing_architectures)
from mtl_zoo.balancers.uncertainty import UncertaintyWeighting

BALANCERS: Dict[str, Type[LossBalancer]] = {
    "fixed": FixedWeights,
    "uncertainty": UncertaintyWeighting,
    "dwa": DynamicWeightAverage,
    "gradnorm": GradNorm,
    "pcgrad": PCGrad,
}


def get_balancer(name: str) -> Type[LossBalancer]:
  """The balancer class registered as `name`; ValueError naming the choices."""
  try:
    return BALANCERS[name]
  except KeyError:
    raise ValueError(f"unknown loss balancer: got {name!r}; choose one of "
                     f"{sorted(BALANCERS)}.") from None


def option_owners() -> Dict[str, str]:
  """Option name -> the balancer that takes it, over the registry."""
  return {option: name for name, cls in BALANCERS.items() for option in cls.OPTIONS}


def make_balancer(name: str, base_weights: Sequence[float], **options) -> LossBalancer:
  """Builds balancer `name` with `options` (only those it declares).

  Args:
    name: a BALANCERS key.
    base_weights: the schema's loss weight of each trained task.
    **options: values of the balancer's OPTIONS.

  Returns:
    The balancer.
  """
  return get_balancer(name)(base_weights, **options)


__all__ = ["BALANCERS", "ALL_DENSE", "BALANCE_ON", "LAST_SHARED", "NothingSharedError",
           "balanced_indices", "sharing_architectures", "AdaptiveWeights", "LossBalancer", "MultiTaskTrainer", "get_balancer",
           "make_balancer", "option_owners", "trained_tasks", "FixedWeights",
           "UncertaintyWeighting", "DynamicWeightAverage", "GradNorm", "PCGrad"]
