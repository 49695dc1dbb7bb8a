"""Several trained models as one: e.g. one single-objective model per task,
exported, fused and served as one SavedModel (`mtl_zoo.serving`)."""

from typing import List, Sequence, Tuple

from mtl_zoo import layers
from mtl_zoo._keras import input_names, keras, output_names
from pipelines import schema as schema_lib


def combine_models(models: Sequence[keras.Model], schema: schema_lib.Schema,
                   name: str = "combined") -> keras.Model:
  """One functional model over `schema`'s features whose outputs are all the
  given models' outputs.

  Args:
    models: Keras models over (a subset of) `schema`'s features, each with
      outputs named by task; no task may appear in two of them.
    schema: the features the combined model takes.
    name: the combined model's name.

  Returns:
    A functional model with one output per task of every model, named by task.
  """
  inputs = layers.schema_inputs(schema)
  outputs = {}
  names = [model.name for model in models]
  for model in models:
    if names.count(model.name) > 1:
      # A nested model is a layer, and layer names must be unique (separately
      # trained runs are often all called e.g. "single_task").
      model._name = f"{model.name}_{'_'.join(output_names(model))}"
    produced = model({n: inputs[n] for n in input_names(model)})
    clash = set(produced) & set(outputs)
    if clash:
      raise ValueError(f"models {[m.name for m in models]} both output {sorted(clash)}; "
                       "combined models need distinct task names.")
    # A named pass-through per output: nested models would otherwise name the
    # combined outputs after themselves instead of their tasks.
    outputs.update({task: keras.layers.Activation("linear", name=task)(tensor)
                    for task, tensor in produced.items()})
  return keras.Model(inputs, outputs, name=name)


def combine_runs(trained: Sequence[Tuple[keras.Model, schema_lib.Schema]],
                 name: str = "combined") -> Tuple[keras.Model, schema_lib.Schema]:
  """Combines separately trained runs on the same features (see `combine_models`).

  Args:
    trained: (model, schema) of each run; the schemas must declare the same
      features.
    name: the combined model's name.

  Returns:
    (the combined model, a schema with every run's tasks, in order).
  """
  base = trained[0][1]
  for _, schema in trained[1:]:
    if [f.to_dict() for f in schema.features] != [f.to_dict() for f in base.features]:
      raise schema_lib.SchemaError(
          f"schemas {base.name!r} and {schema.name!r} declare different features; only "
          "models trained on the same data layout can be combined.")
  tasks: List[schema_lib.Task] = [task for _, schema in trained for task in schema.tasks]
  schema = base.replace(tasks=tasks)
  return combine_models([model for model, _ in trained], schema, name), schema
