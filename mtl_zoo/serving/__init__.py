"""Serving: SavedModel export for TF Serving, with signatures derived from the schema.

  signatures.py  SIGNATURES, the one table of signatures (name -> builder, TF
                 Serving method name), and the ServingModule they build from
  export.py      versioned export (`export_saved_model`), versions, pruning
  warmup.py      warm-up requests TF Serving replays before taking traffic
  configs.py     models.config and batching_parameters.txt

Every export has:
  serving_default  examples: string [batch] of serialized serving-layout
                   tf.Examples (one named feature per schema feature) ->
                   one float32 [batch] output per task, named by task.
  features         the schema's raw feature tensors (see
                   `Schema.feature_signature`) -> the same outputs.
  classify         (binary serving task) TF Serving's Classify API: inputs
                   (serialized tf.Examples) -> scores float32 [batch, 2]
                   (P(0), P(1)) and classes string [batch, 2] ("0", "1").
  regress          TF Serving's Regress API: inputs -> outputs float32 [batch],
                   the serving task's value (its probability, if binary).
  rank             (with a fusion) examples -> every task output and `score`, the
                   fused ranking score (`mtl_zoo.layers.ScoreFusion`). A request
                   may override the fusion weights per example with the float
                   feature `__fusion_weights__` (one weight per term, in order).
The serving task is `serving_task`, by default the schema's first task. Labels
are never inputs. The schema travels in `assets.extra/schema.json` so clients
can build requests from it.
"""

from mtl_zoo.serving.configs import write_serving_configs
from mtl_zoo.serving.export import (SCHEMA_ASSET, existing_versions, export_saved_model,
                                    next_version, prune_versions)
from mtl_zoo.serving.signatures import (CLASSIFY_METHOD, CLASSIFY_SIGNATURE, EXAMPLES_INPUT,
                                        EXAMPLES_SPEC, FEATURES_SIGNATURE,
                                        FUSION_WEIGHTS_FEATURE, INPUTS_SPEC, PREDICT_METHOD,
                                        RANK_SIGNATURE, REGRESS_METHOD, REGRESS_SIGNATURE,
                                        SERVING_DEFAULT, SIGNATURES, ServingModule, Signature)
from mtl_zoo.serving.warmup import WARMUP_ASSET, write_warmup_requests

__all__ = ["export_saved_model", "write_serving_configs", "prune_versions",
           "existing_versions", "next_version", "write_warmup_requests", "SIGNATURES",
           "Signature", "ServingModule", "SERVING_DEFAULT", "FEATURES_SIGNATURE",
           "CLASSIFY_SIGNATURE", "REGRESS_SIGNATURE", "RANK_SIGNATURE", "EXAMPLES_INPUT",
           "EXAMPLES_SPEC", "INPUTS_SPEC", "PREDICT_METHOD", "CLASSIFY_METHOD",
           "REGRESS_METHOD", "FUSION_WEIGHTS_FEATURE", "SCHEMA_ASSET", "WARMUP_ASSET"]
