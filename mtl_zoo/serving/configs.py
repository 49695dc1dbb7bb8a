"""TF Serving's configuration files, written beside the exported models:

  tensorflow_model_server --model_config_file=<parent>/models.config \\
      --enable_batching --batching_parameters_file=<parent>/batching_parameters.txt
"""

from typing import List, Optional

import tensorflow as tf

from mtl_zoo.serving import export
from pipelines import files

MODELS_CONFIG = "models.config"
BATCHING_PARAMETERS = "batching_parameters.txt"


def write_serving_configs(export_dir: str, serving_root: str = "/models",
                          num_versions: int = 1, max_batch_size: int = 256,
                          num_batch_threads: Optional[int] = None) -> List[str]:
  """Writes `models.config` and `batching_parameters.txt` beside the model's base
  directory, each atomically.

  The config serves every model found beside `export_dir` (each directory with
  numbered versions), so exporting a second model does not drop the first.

  Args:
    export_dir: the model's base directory (`export_saved_model`'s).
    serving_root: `export_dir`'s parent as the server sees it (the
      tensorflow/serving Docker image mounts models under /models).
    num_versions: how many of the newest versions each model serves.
    max_batch_size: the largest batch the server forms from requests.
    num_batch_threads: batches run in parallel; None leaves it to TF Serving,
      whose default is one per core of the machine it runs on (the training
      machine's count would be wrong there).

  Returns:
    The paths of models.config and batching_parameters.txt.
  """
  if num_batch_threads is not None and num_batch_threads < 1:
    raise ValueError(f"num_batch_threads must be >= 1, got {num_batch_threads}; pass None "
                     "for TF Serving's default (one per core of the serving machine).")
  parent, name = export.split_export_dir(export_dir)
  names = sorted({name} | {
      d.rstrip("/") for d in tf.io.gfile.listdir(parent)
      if export.existing_versions(files.join(parent, d.rstrip("/")))})
  entries = "".join(
      "  config {\n"
      f'    name: "{model}"\n'
      f'    base_path: "{serving_root.rstrip("/")}/{model}"\n'
      '    model_platform: "tensorflow"\n'
      f"    model_version_policy {{ latest {{ num_versions: {num_versions} }} }}\n"
      "  }\n" for model in names)
  models_config = "model_config_list {\n" + entries + "}\n"
  # CPU defaults: batches up to max_batch_size, waiting at most 2 ms to fill one.
  batching = (f"max_batch_size {{ value: {max_batch_size} }}\n"
              "batch_timeout_micros { value: 2000 }\n"
              + (f"num_batch_threads {{ value: {num_batch_threads} }}\n"
                 if num_batch_threads else "")
              + "max_enqueued_batches { value: 100 }\n"
              "pad_variable_length_inputs: true\n")
  written = []
  for filename, text in ((MODELS_CONFIG, models_config), (BATCHING_PARAMETERS, batching)):
    path = files.join(parent, filename)
    files.write_text(path, text)
    written.append(path)
  return written
