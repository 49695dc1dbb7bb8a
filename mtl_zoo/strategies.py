"""The four ways to rank by several objectives, and one report that compares
their ranking scores on the same eval data.

  multi_task        one model with an output per task (any architecture); the
                    ranking score fuses the outputs (by default their product:
                    pCTR x pCVR = pCTCVR).
  fusion            one single-objective model per task, trained separately and
                    fused at ranking time (`mtl_zoo.models.combine_models`).
  sample_weighting  one binary "engagement" task: the target is "any event",
                    each example weighted by its deepest event.
  learning_to_rank  one ranking task: graded relevance from the deepest event,
                    a list loss over each request's examples.

Each strategy other than fusion is a schema transformation: the same TFRecords
train every one of them.
"""

from typing import Dict, List, Optional

import numpy as np
import tensorflow as tf

from mtl_zoo import layers
from mtl_zoo import metrics
from pipelines import schema as schema_lib

STRATEGIES = ("multi_task", "fusion", "sample_weighting", "learning_to_rank")
ENGAGEMENT_TASK = "engagement"
RELEVANCE_TASK = "relevance"


def funnel(schema: schema_lib.Schema) -> List[schema_lib.Task]:
  """The binary tasks from the shallowest event to the deepest: a task masked
  by another task's label (cvr, masked by click) comes after it."""
  by_label = {t.label: t for t in schema.tasks}

  def depth(task, seen=()):
    parent = by_label.get(task.mask)
    if parent is None or parent in seen:
      return 1 if task.mask else 0
    return 1 + depth(parent, seen + (task,))

  binary = [t for t in schema.tasks if t.type == schema_lib.BINARY and not t.events]
  return sorted(binary, key=depth)


def _deepest_label(schema: schema_lib.Schema) -> str:
  tasks = funnel(schema)
  if not tasks:
    raise schema_lib.SchemaError(f"schema {schema.name!r} has no binary tasks to rank by; "
                                 f"its tasks are {schema.task_names}.")
  return tasks[-1].label


def default_grades(schema: schema_lib.Schema) -> Dict[str, float]:
  """Relevance grades by funnel depth: click 1, conversion 2, ..."""
  return {t.label: float(i + 1) for i, t in enumerate(funnel(schema))}


def default_fusion(schema: schema_lib.Schema) -> dict:
  """The product of every binary task's probability, each with weight 1."""
  terms = [t.name for t in funnel(schema)]
  return {"mode": "product", "terms": terms, "weights": [1.0] * len(terms)}


def parse_event_values(spec: str, what: str) -> Dict[str, float]:
  """'conversion=1,click=0.2' -> {"conversion": 1.0, "click": 0.2}."""
  values = {}
  for item in spec.split(","):
    name, eq, value = item.partition("=")
    try:
      values[name.strip()] = float(value)
    except ValueError:
      raise schema_lib.SchemaError(f"{what} entries look like click=0.2, got "
                                   f"{item!r}.") from None
    if not eq or not name.strip():
      raise schema_lib.SchemaError(f"{what} entries look like click=0.2, got {item!r}.")
  return values


def _with_single_task(schema: schema_lib.Schema, task: schema_lib.Task
                      ) -> schema_lib.Schema:
  return schema.replace(tasks=[task])


def sample_weighting_schema(schema: schema_lib.Schema, event_weights: Dict[str, float]
                            ) -> schema_lib.Schema:
  """One "engagement" task that learns "any of these events", weighted by the
  deepest one (see `pipelines.schema.Task.events`)."""
  if not event_weights:
    raise schema_lib.SchemaError("sample weighting needs at least one event weight.")
  deepest = max(event_weights, key=event_weights.get)
  return _with_single_task(schema, schema_lib.Task(ENGAGEMENT_TASK, deepest,
                                                   events=dict(event_weights)))


def learning_to_rank_schema(schema: schema_lib.Schema, grades: Dict[str, float],
                            list_size: int = 10, ranking_loss: str = "listwise"
                            ) -> schema_lib.Schema:
  """One "relevance" ranking task with these grades, trained per request."""
  if not grades:
    raise schema_lib.SchemaError("learning to rank needs at least one relevance grade.")
  deepest = max(grades, key=grades.get)
  return _with_single_task(schema, schema_lib.Task(
      RELEVANCE_TASK, deepest, type=schema_lib.RANKING, events=dict(grades),
      list_size=list_size, ranking_loss=ranking_loss))


def ranking_score(outputs: Dict[str, np.ndarray], columns: Dict[str, np.ndarray],
                  fusion: Optional[dict], schema: schema_lib.Schema) -> np.ndarray:
  """The one score a strategy ranks by: the fused outputs, or the only output
  when there is no fusion.

  Args:
    outputs: task name -> model outputs [examples].
    columns: feature columns (`reader.read_columns`); numeric fusion terms such
      as price come from here.
    fusion: {"mode", "terms", "weights"}, or None.
    schema: the data's schema: numeric terms that are missing or not finite
      count as missing exactly as in the served `rank` signature (one fusion
      layer, `layers.score_fusion`).

  Returns:
    The scores [examples].
  """
  if fusion is None:
    if len(outputs) != 1:
      raise ValueError(f"outputs {sorted(outputs)} need a fusion to make one score.")
    return np.asarray(next(iter(outputs.values()))).ravel()
  fuse = layers.score_fusion(fusion, schema, task_names=list(outputs))
  terms = {t: outputs[t] if t in outputs else columns[t] for t in fusion["terms"]}
  return fuse({t: tf.constant(np.asarray(v, np.float32)) for t, v in terms.items()}
              ).numpy()


def objective_report(score: np.ndarray, columns: Dict[str, np.ndarray],
                     schema: schema_lib.Schema, k: int = 10,
                     item_popularity: Optional[np.ndarray] = None,
                     beyond_k: Optional[int] = None) -> Dict[str, float]:
  """How well one ranking score serves each objective of the data's schema.

  Per binary task: `<task>_auc` on the examples its mask selects (CVR AUC on
  clicked impressions) and, for masked tasks, `<task>_entire_auc` on all
  impressions (for cvr that is the CTCVR AUC). With request ids: `gauc`
  (impression-weighted per-request AUC of the shallowest event) and
  `ndcg@k` with the deepest event as relevance; beyond accuracy, over each
  request's top `beyond_k` by the score, where the schema names the item
  (`item_id`): `coverage@k` (`metrics.catalog_coverage`) and, given the
  items' training popularity, `novelty@k` (`metrics.novelty`); where it names
  their category (`item_category`): `diversity@k`
  (`metrics.intra_list_diversity`).

  Args:
    score: the ranking score [examples].
    columns: the eval data's columns (`reader.read_columns`).
    schema: the data's schema.
    k: list length of NDCG.
    item_popularity: `metrics.popularity` of the training impressions per
      item row (`reader.count_ids`); None: no novelty.
    beyond_k: list length of coverage, diversity and novelty (default:
      `default_beyond_k`). They measure what a ranking shows, so they only
      tell scores apart when requests hold more than `beyond_k` candidates.

  Returns:
    Metric name -> value.

  Raises:
    metrics.MetricError: a metric is undefined on these data (e.g. no positive
      conversion), or a label has missing values where it counts.
  """
  score = np.asarray(score).ravel()
  report = {}
  for task in funnel(schema):
    label = np.asarray(columns[task.label]).ravel()
    keep = (np.asarray(columns[task.mask]).ravel() > 0.5 if task.mask
            else np.ones(label.size, bool))
    where = f" where {task.mask} is 1" if task.mask else ""
    report[f"{task.name}_auc"] = metrics.reported_auc(label[keep], score[keep], task.label,
                                                      where)
    if task.mask:
      report[f"{task.name}_entire_auc"] = metrics.reported_auc(label, score, task.label)
  if schema.request_id and schema.request_id in columns:
    requests = columns[schema.request_id]
    shallowest, deepest = funnel(schema)[0].label, _deepest_label(schema)
    report["gauc"] = metrics.gauc(columns[shallowest], score, requests)
    if np.isnan(report["gauc"]):
      raise metrics.MetricError(f"no request in the eval data has both a positive and a "
                                f"negative {shallowest}: GAUC is undefined.")
    report[f"ndcg@{k}"] = metrics.ndcg_at_k(columns[deepest], score, requests, k)
    if schema.item_id and schema.item_id in columns:
      report.update(_beyond_accuracy(score, columns, schema,
                                     beyond_k or default_beyond_k(requests, k),
                                     item_popularity))
  return report


def default_beyond_k(requests: np.ndarray, k: int) -> int:
  """The list length of the beyond-accuracy metrics when none is given: `k`
  where the median request holds more than `k` candidates, else a third of the
  median request, at least 2 (diversity rates pairs). At `k` on requests of at
  most `k` candidates every ranking shows the same items, and coverage,
  diversity and novelty are the same for any score (the built-in log's
  requests hold 10 impressions: 3).

  Args:
    requests: the request id of every example.
    k: the list length otherwise used (NDCG's).

  Returns:
    The list length.
  """
  _, sizes = np.unique(np.asarray(requests).ravel(), return_counts=True)
  median = int(np.median(sizes)) if sizes.size else 0
  return k if median > k else max(2, median // 3)


def _beyond_accuracy(score, columns, schema, k, item_popularity) -> Dict[str, float]:
  """Coverage, diversity and novelty of each request's top k (see `objective_report`)."""
  lists = metrics.top_k_lists(score, columns[schema.request_id], k)
  item = schema.feature(schema.item_id)
  rows = metrics.item_rows(columns[item.name], item)
  shown = [rows[index] for index in lists]
  report = {f"coverage@{k}": metrics.catalog_coverage(shown, item.vocab_size)}
  if schema.item_category and schema.item_category in columns:
    categories = metrics.item_rows(columns[schema.item_category],
                                   schema.feature(schema.item_category))
    report[f"diversity@{k}"] = metrics.intra_list_diversity(
        [categories[index] for index in lists])
  if item_popularity is not None:
    report[f"novelty@{k}"] = metrics.novelty(shown, item_popularity)
  return report
