import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, mixed_schema
from pipelines import schema as schema_lib


def test_json_round_trip(tmp_path):
  schema = mixed_schema()
  path = str(tmp_path / "schema.json")
  schema.save(path)
  loaded = schema_lib.Schema.load(path)
  assert loaded == schema
  assert loaded.feature("tags").max_len == 3
  assert loaded.task("cvr").mask == "click"
  assert not os.path.exists(path + ".tmp")
  # Human-readable: plain JSON with named fields.
  assert json.load(open(path))["tasks"][1] == {
      "name": "cvr", "label": "conversion", "type": "binary", "loss_weight": 2.0,
      "mask": "click"}


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d["features"].append(dict(d["features"][0])), "declared twice"),
    (lambda d: d["features"][0].update(kind="image"), "unknown kind 'image'"),
    (lambda d: d["features"][0].update(vocab_size=0), "vocab_size must be a positive"),
    (lambda d: d["tasks"][0].update(label="purchase"), "'purchase' is not a label column"),
    (lambda d: d["tasks"][1].update(mask="view"), "its mask 'view'"),
    (lambda d: d["tasks"][0].update(type="ordinal"), "unknown type 'ordinal'"),
    (lambda d: d["features"][0].update(colour="red"), "unknown fields ['colour']"),
    (lambda d: d.update(tasks=[]), "declares no tasks"),
    (lambda d: d["labels"].append("user"), "both features and labels"),
    (lambda d: d["labels"].append("click"), "label columns must be unique"),
    (lambda d: d["tasks"].append(dict(d["tasks"][0])), "task 'ctr' is declared twice"),
    (lambda d: d["features"][3].update(vocab_size=-2), "vocab_size must be a positive"),
    (lambda d: d["features"][0].update(embedding_dim=0), "embedding_dim must be a positive"),
    (lambda d: d["features"][3].update(max_len=0), "max_len must be a positive"),
    (lambda d: d["features"][5].update(mean=float("nan")), "mean must be a finite number"),
    (lambda d: d["features"][5].update(std=0.0), "std must be a positive finite"),
])
def test_invalid_schemas_name_the_problem(mutate, message):
  d = mixed_schema().to_dict()
  mutate(d)
  with pytest.raises(schema_lib.SchemaError, match=message.replace("[", r"\[")
                     .replace("]", r"\]")):
    schema_lib.Schema.from_dict(d)


def test_missing_schema_file_says_how_to_fix(tmp_path):
  with pytest.raises(FileNotFoundError, match="pipelines.convert"):
    schema_lib.Schema.load(str(tmp_path))


def test_record_with_feature_missing_from_schema():
  with pytest.raises(schema_lib.SchemaError, match=r"fields \['colour'\].*does not declare"):
    mixed_schema().serving_example({"user": 1, "colour": 3})
  with pytest.raises(schema_lib.SchemaError, match="lacks label columns"):
    mixed_schema().training_example({"user": 1})


def test_unknown_feature_lookup_lists_known_ones():
  with pytest.raises(schema_lib.SchemaError, match="'colour' is not in schema.*'user'"):
    mixed_schema().feature("colour")


def test_statistics_are_required_for_models():
  with pytest.raises(schema_lib.SchemaError, match="'price' has no mean/std"):
    mixed_schema(with_stats=False).require_statistics()


def test_serving_signature_has_features_only():
  spec = mixed_schema().feature_signature()
  assert sorted(spec) == ["age", "price", "raw_id", "slot", "tags", "user"]
  assert spec["tags"].shape.as_list() == [None, 3]
  assert "click" not in spec and "conversion" not in spec


def _run(code, **env_vars):
  env = {k: v for k, v in os.environ.items()
         if k not in ("TF_USE_LEGACY_KERAS", "MTL_ZOO_KERAS")}
  return subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**env, **env_vars},
                        capture_output=True, text=True, timeout=120)


def test_import_selects_keras_2():
  result = _run("import mtl_zoo, tensorflow as tf, tensorflow_recommenders as tfrs\n"
                "print(tf.keras.__name__, mtl_zoo.keras.__name__)")
  assert result.returncode == 0, result.stderr
  assert [name.split(".")[0] for name in result.stdout.split()[-2:]] == ["tf_keras"] * 2


@pytest.mark.parametrize("code", [
    "import tensorflow as tf\ntf.keras.layers\nimport mtl_zoo",  # tf.keras already Keras 3
    "import keras\nimport mtl_zoo",  # the user's code imports Keras 3 itself
])
def test_import_follows_the_keras_3_the_process_already_uses(code):
  result = _run(code + "\nimport keras\nprint(mtl_zoo.keras is keras, keras.__version__)")
  assert result.returncode == 0, result.stderr[-2000:]
  same, version = result.stdout.split()[-2:]
  assert same == "True" and version.startswith("3.")


@pytest.mark.parametrize("code, env, message", [
    ("import tensorflow as tf\ntf.keras.layers\nimport mtl_zoo", {"MTL_ZOO_KERAS": "2"},
     "MTL_ZOO_KERAS=2 asks for Keras 2, but tf.keras is already bound to Keras 3"),
    ("import mtl_zoo", {"MTL_ZOO_KERAS": "4"}, "MTL_ZOO_KERAS='4': set it to 2"),
])
def test_import_refuses_a_keras_choice_it_cannot_follow(code, env, message):
  result = _run(code, **env)
  assert result.returncode != 0
  assert message in result.stderr
