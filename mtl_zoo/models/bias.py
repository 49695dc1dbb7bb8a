"""A training model around any serving model: the train-only bias tower.

`with_bias_tower(serving, schema)` wraps a built model (any architecture) into
the model that is trained: it takes the serving model's inputs plus the schema's
train-only features (`Feature.train_only`, e.g. the logged position) and, for
each task those features bias, outputs the serving output with the bias tower's
logit added (`layers.BiasedOutput`), under the same name; other outputs pass
through. The serving model is a layer of the training model and shares its
weights, so after training `serving_model(model)` is what is evaluated, saved
and exported: it never sees the train-only features.

ESMM: the entire-space products (pCTCVR = pCTR x pCVR) get no bias logit of
their own; in training they are recomputed from the biased first stage,
p_ctcvr = p_ctr_biased x p_cvr, as the log's conversions were also filtered
by the position's examination. Served, they are the serving model's
(bias-free) products.
"""

from typing import Dict, List

from mtl_zoo import layers
from mtl_zoo._keras import input_names, keras, output_names
from mtl_zoo.models import esmm
from pipelines import schema as schema_lib


def _entire_space_products(schema: schema_lib.Schema, outputs: List[str]
                           ) -> Dict[str, List[str]]:
  """ESMM's product outputs among `outputs`: product -> its chain's stage names."""
  try:
    chain = esmm.stage_chain(schema)
  except schema_lib.SchemaError:  # no stages chained by masks: no products
    return {}
  stages = [t.name for t in chain]
  return {product: stages[:i + 2]
          for i, product in enumerate(esmm.entire_space_names(chain)) if product in outputs}


def with_bias_tower(serving: keras.Model, schema: schema_lib.Schema) -> keras.Model:
  """The training model of `serving`: its outputs with the bias tower's logits.

  Args:
    serving: a built model over `schema`'s serving features, one output per
      task named by task (any `MODELS` builder's).
    schema: the schema it trains on; its train-only features feed the tower.

  Returns:
    A functional model named `<serving.name>_with_bias_tower` whose inputs are
    the serving inputs plus the train-only features and whose outputs are
    `serving`'s, by name: biased tasks through `layers.BiasedOutput`, ESMM
    products recomputed from the biased first stage, the others unchanged.
    `serving` itself when no train-only feature biases any of its tasks.
  """
  products = _entire_space_products(schema, output_names(serving))
  tasks = [t for t in output_names(serving) if t in schema.task_names and t not in products]
  tower = layers.bias_tower(schema, tasks)
  if tower is None:
    return serving
  inputs = {**layers.schema_inputs(schema), **layers.train_only_inputs(schema)}
  served = serving({name: inputs[name] for name in input_names(serving)})
  logits = tower({f.name: inputs[f.name] for f in schema.train_only_features})
  outputs = {}
  for task, output in served.items():
    if task in logits:
      outputs[task] = layers.BiasedOutput(schema.task(task).type, name=task)(
          [output, logits[task]])
  for task, output in served.items():
    if task in products and products[task][0] in logits:
      outputs[task] = layers.ProbabilityProduct(name=task)(
          [outputs[products[task][0]]] + [served[stage] for stage in products[task][1:]])
    elif task not in outputs:
      # A named pass-through: the output would otherwise be named after the
      # nested serving model instead of its task.
      outputs[task] = keras.layers.Activation("linear", name=task)(output)
  return keras.Model(inputs, {task: outputs[task] for task in served},
                     name=f"{serving.name}_with_bias_tower")


def serving_model(model: keras.Model) -> keras.Model:
  """The model to evaluate, save and export: the serving model inside a
  `with_bias_tower` training model, or `model` itself when it has no tower.

  Args:
    model: a model from `models.build` (or `with_bias_tower`).

  Returns:
    The Keras model over the serving features only.
  """
  if not any(isinstance(layer, layers.BiasTower) for layer in model.layers):
    return model
  return next(layer for layer in model.layers if isinstance(layer, keras.Model))


def biased_tasks(model: keras.Model) -> List[str]:
  """The outputs of a training model that the bias tower shapes.

  Args:
    model: a model from `models.build` (or `with_bias_tower`).

  Returns:
    The task names whose training output adds the tower's logit, and ESMM
    products recomputed from such an output; [] for a model without a tower.
  """
  if serving_model(model) is model:
    return []
  return [name for name in output_names(model)
          if isinstance(model.get_layer(name), (layers.BiasedOutput, layers.ProbabilityProduct))]
