"""The built-in synthetic ads log: impressions grouped in requests, click and conversion.

Each request is one user in one context (hour, device) shown a list of items.
Click and conversion come from latent user x item factors: the click factors of
an item and its conversion factors are correlated but not equal, so CTR and CVR
are related tasks that disagree in places (the click-bait item that converts
badly exists). A conversion only happens after a click. Everything is drawn from
one seeded generator, so the same seed gives the same log.

The log is drawn and written in chunks of CHUNK_REQUESTS requests, each from a
generator of its own, so memory stays bounded at any size; the first chunk's
generator is the seed's, so a log of up to CHUNK_REQUESTS requests (the
default's 12,000 included) is the one a single draw gives.
"""

from typing import Dict, Iterator, Optional

import numpy as np

from pipelines import schema as schema_lib
from pipelines import writer as writer_lib
from pipelines.sources import base

CHUNK_REQUESTS = 20_000

LATENT_DIM = 8
NUM_SEGMENTS = 8
NUM_CATEGORIES = 20
NUM_TAGS = 50
MAX_TAGS = 4
NUM_HOURS = 24
NUM_DEVICES = 3


def make_schema(num_users: int = 2000, num_items: int = 1000,
                impressions_per_request: int = 10) -> schema_lib.Schema:
  """The log's schema, without numeric statistics (the writer adds them)."""
  F = schema_lib.Feature
  features = [
      F("user_id", "categorical", vocab_size=num_users, embedding_dim=8),
      F("user_segment", "categorical", vocab_size=NUM_SEGMENTS, embedding_dim=4),
      F("item_id", "categorical", vocab_size=num_items, embedding_dim=8),
      F("item_category", "categorical", vocab_size=NUM_CATEGORIES, embedding_dim=4),
      F("hour", "categorical", vocab_size=NUM_HOURS, embedding_dim=4),
      F("device", "categorical", vocab_size=NUM_DEVICES, embedding_dim=4),
      F("position", "categorical", vocab_size=impressions_per_request, embedding_dim=4,
        train_only=True),
      F("item_tags", "categorical_list", vocab_size=NUM_TAGS, embedding_dim=8,
        max_len=MAX_TAGS),
      F("price", "numeric", transform="log1p"),
      F("user_activity", "numeric"),
      F("item_quality", "numeric"),
  ]
  tasks = [schema_lib.Task("ctr", label="click"),
           schema_lib.Task("cvr", label="conversion", mask="click")]
  return schema_lib.Schema(features, ["click", "conversion"], tasks,
                           request_id="request_id", name="synthetic_ads")


class AdsWorld:
  """Users, items and the hidden factors that drive their behaviour."""

  def __init__(self, num_users: int, num_items: int, seed: int,
               click_conversion_correlation: float = 0.5):
    rng = np.random.default_rng(seed)
    self.num_users, self.num_items = num_users, num_items
    self.user_segment = rng.integers(0, NUM_SEGMENTS, num_users)
    centroids = rng.normal(size=(NUM_SEGMENTS, LATENT_DIM))
    self.user_factors = (centroids[self.user_segment]
                         + 0.4 * rng.normal(size=(num_users, LATENT_DIM))) / np.sqrt(LATENT_DIM)
    self.user_activity = rng.gamma(2.0, 1.0, num_users)
    self.item_category = rng.integers(0, NUM_CATEGORIES, num_items)
    category_factors = rng.normal(size=(NUM_CATEGORIES, LATENT_DIM))
    self.click_factors = (category_factors[self.item_category]
                          + 0.4 * rng.normal(size=(num_items, LATENT_DIM))) / np.sqrt(LATENT_DIM)
    rho = click_conversion_correlation
    self.conversion_factors = (rho * self.click_factors + np.sqrt(1 - rho ** 2)
                               * rng.normal(size=(num_items, LATENT_DIM)) / np.sqrt(LATENT_DIM))
    category_price = rng.normal(3.0, 1.0, NUM_CATEGORIES)
    self.price = np.exp(category_price[self.item_category] + 0.5 * rng.normal(size=num_items))
    self.item_quality = rng.normal(size=num_items)
    # Tags follow the category (a few typical tags) plus noise.
    category_tags = rng.integers(0, NUM_TAGS, (NUM_CATEGORIES, 3))
    # Each item's tags, padded with -1 to MAX_TAGS (the training layout's form).
    self.item_tags = np.full((num_items, MAX_TAGS), schema_lib.LIST_PADDING_ID, np.int64)
    for i in range(num_items):
      n = rng.integers(1, MAX_TAGS + 1)
      own = list(category_tags[self.item_category[i]][: max(1, n - 1)])
      self.item_tags[i, :n] = own + list(rng.integers(0, NUM_TAGS, n - len(own)))
    self.hour_effect = 0.3 * np.sin(np.arange(NUM_HOURS) / NUM_HOURS * 2 * np.pi)
    self.device_effect = np.array([0.0, -0.2, 0.15])

  def sample_log(self, num_requests: int, impressions_per_request: int,
                 seed, first_request_id: int = 0) -> Dict[str, np.ndarray]:
    """Columns of `num_requests * impressions_per_request` impressions.

    Args:
      num_requests: requests to draw.
      impressions_per_request: items shown per request.
      seed: what `np.random.default_rng` takes (an int, or a list of ints).
      first_request_id: the first request's id (ids are consecutive).

    Returns:
      Feature and label columns; item_tags as an int64 array [impressions,
      MAX_TAGS] padded with -1.
    """
    rng = np.random.default_rng(seed)
    n = num_requests * impressions_per_request
    user = np.repeat(rng.integers(0, self.num_users, num_requests), impressions_per_request)
    hour = np.repeat(rng.integers(0, NUM_HOURS, num_requests), impressions_per_request)
    device = np.repeat(rng.integers(0, NUM_DEVICES, num_requests), impressions_per_request)
    position = np.tile(np.arange(impressions_per_request), num_requests)
    item = rng.integers(0, self.num_items, n)
    affinity_click = np.einsum("nd,nd->n", self.user_factors[user], self.click_factors[item])
    affinity_conv = np.einsum("nd,nd->n", self.user_factors[user],
                              self.conversion_factors[item])
    log_price = np.log(self.price[item])
    click_logit = (-1.6 + 2.5 * affinity_click + 0.4 * self.item_quality[item]
                   - 0.12 * position + self.hour_effect[hour] + self.device_effect[device]
                   + 0.1 * np.log1p(self.user_activity[user]))
    conversion_logit = (-2.0 + 2.5 * affinity_conv - 0.6 * (log_price - 3.0)
                        + 0.3 * np.log1p(self.user_activity[user]))
    click = rng.random(n) < _sigmoid(click_logit)
    conversion = click & (rng.random(n) < _sigmoid(conversion_logit))
    return {
        "user_id": user, "user_segment": self.user_segment[user], "item_id": item,
        "item_category": self.item_category[item], "hour": hour, "device": device,
        "position": position, "item_tags": self.item_tags[item],
        "price": self.price[item], "user_activity": self.user_activity[user],
        "item_quality": self.item_quality[item],
        "click": click.astype(np.float32), "conversion": conversion.astype(np.float32),
        "request_id": first_request_id + np.repeat(np.arange(num_requests),
                                                   impressions_per_request),
    }


def _sigmoid(x: np.ndarray) -> np.ndarray:
  return 1.0 / (1.0 + np.exp(-x))


def sample_chunks(world: AdsWorld, num_requests: int, impressions_per_request: int,
                  seed: int, first_request_id: int = 0) -> Iterator[Dict[str, np.ndarray]]:
  """The log of `num_requests` requests in chunks of CHUNK_REQUESTS requests:
  chunk k drawn with seed [seed, k] (the first with `seed` itself)."""
  for k, start in enumerate(range(0, num_requests, CHUNK_REQUESTS)):
    yield world.sample_log(min(CHUNK_REQUESTS, num_requests - start), impressions_per_request,
                           seed if k == 0 else [seed, k], first_request_id + start)


class SyntheticAdsSource(base.Source):
  """The built-in synthetic ads log: `train` and `eval` splits of impressions."""

  name = "synthetic"
  description = "the built-in synthetic ads log (click, conversion)"
  options = (
      base.Option("synthetic_requests", 12_000, int, "synthetic: training requests (10 "
                  "impressions each); eval gets a quarter as many.", lower_bound=1),
      base.Option("synthetic_eval_requests", None, int, "synthetic: eval requests "
                  "(default: a quarter of --synthetic_requests).", lower_bound=1),
      base.Option("synthetic_users", 2000, int, "synthetic: users in the log.",
                  lower_bound=1),
      base.Option("synthetic_items", 1000, int, "synthetic: items in the log.",
                  lower_bound=1),
  )

  def convert(self, out_dir: str, *, num_shards: int, compression: Optional[str],
              overwrite: bool, seed: int, synthetic_requests: int,
              synthetic_eval_requests: Optional[int], synthetic_users: int,
              synthetic_items: int) -> schema_lib.Schema:
    impressions = 10
    eval_requests = synthetic_eval_requests or max(1, synthetic_requests // 4)
    world = AdsWorld(synthetic_users, synthetic_items, seed)
    schema = make_schema(synthetic_users, synthetic_items, impressions)
    with writer_lib.DatasetWriter(out_dir, schema, compression, overwrite,
                                  statistics_split="train", verbose=True) as w:
      w.write_chunks("train", sample_chunks(world, synthetic_requests, impressions, seed + 1),
                     synthetic_requests * impressions, num_shards)
      w.write_chunks("eval", sample_chunks(world, eval_requests, impressions, seed + 2,
                                           first_request_id=synthetic_requests),
                     eval_requests * impressions, max(1, num_shards // 4))
    return w.schema
