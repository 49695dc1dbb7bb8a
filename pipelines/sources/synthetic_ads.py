"""The built-in synthetic ads log: impressions grouped in requests, click and
conversion, with its oracle (the true probabilities) beside the shards.

A request is one user in one context (hour, device) shown a page of items. The
log has the effects that make ranking on real logs hard:

  * Popularity is skewed. Users make requests with Zipf-like frequencies
    (USER_ZIPF), and the candidates of a page are drawn by a Zipf-like item
    popularity (ITEM_ZIPF) that favours better items, so a few users and items
    fill most of the log and the tail ids are rare (cold).
  * A logging policy chose and ordered each page: CANDIDATES_PER_SLOT times as
    many distinct candidates as slots, the best by its estimate of click
    relevance kept and sorted, so position and relevance are correlated. The
    policy is a previous ranker, not an oracle: by default (POLICY_TASTE,
    POLICY_ITEM_ERROR) it knows the items' appeal and the context but none of a
    user's own taste (the user x item affinity), and it makes a lasting error
    about each item besides fresh noise per request, which a model reading
    clicks naively inherits. `policy_taste` (up to 1: the true taste, as the
    version-2 log's policy knew it) and `policy_item_error` (0: none) change it.
  * Clicks depend on the position: P(click) = examination(position) x
    P(click | examined), examination (1 + position)^-EXAMINATION_DECAY (the
    top slot is always seen). A model that reads clicks naively confuses a
    good slot with a good item.
  * Objectives conflict: besides user x item factors for click and for
    conversion (correlated, not equal), an item is click-bait (high click
    appeal, converts badly) or a sleeper (the reverse) with shares that vary by
    category; the logging policy, ranking by clicks, favours click-bait.
  * A conversion happens only after a click and does not depend on the
    position (the user is past the page by then).

The oracle (`pipelines/oracle.py`) holds per impression P(click), P(click)
without the position effect, P(conversion | click) and P(click and
conversion); it is written beside the shards, never as features.

The log is drawn and written in chunks of CHUNK_REQUESTS requests, each from a
generator of its own, so memory stays bounded at any size (the oracle, ~40
bytes an impression, is held per split); the first chunk's generator is the
seed's, so a log of up to CHUNK_REQUESTS requests (the default's 12,000
included) is the one a single draw gives.
"""

from typing import Dict, Iterator, Optional, Tuple

import numpy as np

from pipelines import oracle as oracle_lib
from pipelines import schema as schema_lib
from pipelines import writer as writer_lib
from pipelines.sources import base

CHUNK_REQUESTS = 20_000
IMPRESSIONS_PER_REQUEST = 10

LATENT_DIM = 8
NUM_SEGMENTS = 8
NUM_CATEGORIES = 20
NUM_TAGS = 50
MAX_TAGS = 4
NUM_HOURS = 24
NUM_DEVICES = 3

# Request frequency of the user of popularity rank r ~ (r + 10)^-USER_ZIPF (the
# offset keeps the heaviest of 5,000 users near 1.5% of requests, not a bot's share).
USER_ZIPF = 1.0
# Candidate frequency of the item of popularity rank r ~ r^-ITEM_ZIPF.
ITEM_ZIPF = 1.0
CANDIDATES_PER_SLOT = 2
# Noise (logit scale) of the logging policy's estimate of click relevance.
POLICY_NOISE = 1.0
EXAMINATION_DECAY = 0.5
# The default logging policy (generator version 3): the share of each user's taste
# it knows, and the standard deviation (logit scale) of its lasting error per item.
# Version 2 was 1.0 and 0.0, an oracle-like logger (BUILD_NOTES "Position bias").
POLICY_TASTE, POLICY_ITEM_ERROR = 0.0, 1.0
# Items that are click-bait / sleepers, on average over categories, and their
# offsets of the click and conversion logits.
BAIT_SHARE, SLEEPER_SHARE = 0.15, 0.10
BAIT_OFFSETS, SLEEPER_OFFSETS = (1.0, -2.0), (-0.5, 1.5)


def make_schema(num_users: int = 5000, num_items: int = 2000,
                impressions_per_request: int = IMPRESSIONS_PER_REQUEST
                ) -> schema_lib.Schema:
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
                           request_id="request_id", name="synthetic_ads",
                           item_id="item_id", item_category="item_category")


def zipf_weights(n: int, exponent: float, offset: float = 0.0) -> np.ndarray:
  """Probabilities of ranks 1..n proportional to (rank + offset)^-exponent."""
  weights = (np.arange(1, n + 1) + offset) ** -exponent
  return weights / weights.sum()


def examination(positions: np.ndarray) -> np.ndarray:
  """The probability that a user looks at the slot (1 for the top slot)."""
  return (1.0 + positions) ** -EXAMINATION_DECAY


class AdsWorld:
  """Users, items and the hidden factors that drive their behaviour.

  Args:
    num_users: users in the world.
    num_items: items in the world.
    seed: the world's random seed.
    click_conversion_correlation: correlation of an item's click and conversion
      factors.
    policy_taste: the share of the user x item click affinity the logging
      policy knows (1: all of it; default POLICY_TASTE).
    policy_item_error: standard deviation (logit scale) of the logging policy's
      lasting error per item (0: none; default POLICY_ITEM_ERROR).
  """

  def __init__(self, num_users: int, num_items: int, seed: int,
               click_conversion_correlation: float = 0.5,
               policy_taste: float = POLICY_TASTE,
               policy_item_error: float = POLICY_ITEM_ERROR):
    rng = np.random.default_rng(seed)
    self.policy_taste = policy_taste
    self.num_users, self.num_items = num_users, num_items
    self.user_segment = rng.integers(0, NUM_SEGMENTS, num_users)
    centroids = rng.normal(size=(NUM_SEGMENTS, LATENT_DIM))
    self.user_factors = (centroids[self.user_segment]
                         + 0.4 * rng.normal(size=(num_users, LATENT_DIM))) / np.sqrt(LATENT_DIM)
    # Ids say nothing about popularity: ranks are dealt to ids at random.
    self.user_weights = zipf_weights(num_users, USER_ZIPF, offset=10)[
        rng.permutation(num_users)]
    # What the site knows of a user's activity: log requests per average user, noisy.
    self.user_activity = (np.log1p(num_users * self.user_weights)
                          * rng.lognormal(0.0, 0.3, num_users))
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
    # Click-bait and sleepers, more of them in some categories than in others.
    bait_share = rng.beta(2.0, 2.0 / BAIT_SHARE - 2.0, NUM_CATEGORIES)[self.item_category]
    sleeper_share = rng.beta(2.0, 2.0 / SLEEPER_SHARE - 2.0,
                             NUM_CATEGORIES)[self.item_category]
    draw = rng.random(num_items)
    self.is_bait = draw < bait_share
    self.is_sleeper = ~self.is_bait & (draw > 1.0 - sleeper_share)
    self.click_offset = (BAIT_OFFSETS[0] * self.is_bait + SLEEPER_OFFSETS[0] * self.is_sleeper)
    self.conversion_offset = (BAIT_OFFSETS[1] * self.is_bait
                              + SLEEPER_OFFSETS[1] * self.is_sleeper)
    # Popular items are popular partly because they are good.
    appeal = self.item_quality + rng.normal(size=num_items)
    self.item_weights = np.empty(num_items)
    self.item_weights[np.argsort(-appeal)] = zipf_weights(num_items, ITEM_ZIPF)
    # Tags follow the category (a few typical tags) plus noise.
    category_tags = rng.integers(0, NUM_TAGS, (NUM_CATEGORIES, 3))
    # Each item's tags, padded with -1 to MAX_TAGS (the training layout's form).
    self.item_tags = np.full((num_items, MAX_TAGS), schema_lib.LIST_PADDING_ID, np.int64)
    for i in range(num_items):
      n = rng.integers(1, MAX_TAGS + 1)
      own = list(category_tags[self.item_category[i]][: max(1, n - 1)])
      self.item_tags[i, :n] = own + list(rng.integers(0, NUM_TAGS, n - len(own)))
    # Traffic peaks in the evening (hour_weights); the click rate varies by hour too.
    self.hour_weights = 1.0 + 0.6 * np.sin((np.arange(NUM_HOURS) - 13) / NUM_HOURS * 2 * np.pi)
    self.hour_weights /= self.hour_weights.sum()
    self.hour_effect = 0.3 * np.sin(np.arange(NUM_HOURS) / NUM_HOURS * 2 * np.pi)
    self.device_weights = np.array([0.55, 0.35, 0.10])
    self.device_effect = np.array([0.0, -0.2, 0.15])
    # The logging policy's lasting error per item, from a generator of its own so
    # that the rest of the world (and a log without it) is the same at any size.
    self.policy_item_error = policy_item_error * np.random.default_rng(
        [seed, 1]).normal(size=num_items)

  def sample_log(self, num_requests: int, impressions_per_request: int, seed,
                 first_request_id: int = 0
                 ) -> Tuple[Dict[str, np.ndarray], oracle_lib.Oracle]:
    """Columns of `num_requests * impressions_per_request` impressions, and
    their oracle.

    Args:
      num_requests: requests to draw.
      impressions_per_request: items shown per request (at most num_items).
      seed: what `np.random.default_rng` takes (an int, or a list of ints).
      first_request_id: the first request's id (ids are consecutive).

    Returns:
      (columns, oracle): feature and label columns, item_tags as an int64 array
      [impressions, MAX_TAGS] padded with -1; the true probabilities of the same
      impressions in the same order (`pipelines.oracle`).
    """
    if impressions_per_request > self.num_items:
      raise ValueError(f"a page of {impressions_per_request} distinct items needs at least "
                       f"as many items; the world has {self.num_items}.")
    rng = np.random.default_rng(seed)
    slots = impressions_per_request
    users = rng.choice(self.num_users, num_requests, p=self.user_weights)
    hours = rng.choice(NUM_HOURS, num_requests, p=self.hour_weights)
    devices = rng.choice(NUM_DEVICES, num_requests, p=self.device_weights)
    candidates = self._distinct_items(
        rng, num_requests, min(self.num_items, CANDIDATES_PER_SLOT * slots))
    relevance = self._click_logit(users[:, None], candidates, hours[:, None], devices[:, None])
    # The logging policy: the best candidates by its own noisy estimate of the
    # relevance (the part of the taste it knows, its lasting item errors), best on top.
    known = relevance if self.policy_taste == 1.0 else self._click_logit(
        users[:, None], candidates, hours[:, None], devices[:, None], self.policy_taste)
    estimate = (known + self.policy_item_error[candidates]
                + POLICY_NOISE * rng.normal(size=relevance.shape))
    shown = np.argsort(-estimate, axis=1, kind="stable")[:, :slots]
    item = np.take_along_axis(candidates, shown, axis=1).ravel()
    p_relevant = _sigmoid(np.take_along_axis(relevance, shown, axis=1).ravel())
    user, hour, device = (np.repeat(v, slots) for v in (users, hours, devices))
    position = np.tile(np.arange(slots), num_requests)
    p_click = examination(position) * p_relevant
    conversion_logit = (-1.6 + 2.5 * np.einsum("nd,nd->n", self.user_factors[user],
                                               self.conversion_factors[item])
                        - 0.6 * (np.log(self.price[item]) - 3.0)
                        + 0.3 * np.log1p(self.user_activity[user])
                        + self.conversion_offset[item])
    p_conversion = _sigmoid(conversion_logit)
    click = rng.random(len(item)) < p_click
    conversion = click & (rng.random(len(item)) < p_conversion)
    request_id = first_request_id + np.repeat(np.arange(num_requests), slots)
    columns = {
        "user_id": user, "user_segment": self.user_segment[user], "item_id": item,
        "item_category": self.item_category[item], "hour": hour, "device": device,
        "position": position, "item_tags": self.item_tags[item],
        "price": self.price[item], "user_activity": self.user_activity[user],
        "item_quality": self.item_quality[item],
        "click": click.astype(np.float32), "conversion": conversion.astype(np.float32),
        "request_id": request_id,
    }
    name = oracle_lib.probability_name
    truth = oracle_lib.Oracle({
        "request_id": request_id, "position": position, "item_id": item,
        name("click"): p_click.astype(np.float32),
        oracle_lib.position_free_name("click"): p_relevant.astype(np.float32),
        name("conversion", "click"): p_conversion.astype(np.float32),
        name("conversion"): (p_click * p_conversion).astype(np.float32),
    }, funnel=["click", "conversion"])
    return columns, truth

  def _click_logit(self, user: np.ndarray, item: np.ndarray, hour: np.ndarray,
                   device: np.ndarray, taste: float = 1.0) -> np.ndarray:
    """Logit of P(click | examined) of (user, item) in context; the arguments
    broadcast against each other. `taste` scales the user x item affinity (the
    logging policy's partial knowledge of it)."""
    affinity = np.einsum("...d,...d->...", self.user_factors[user], self.click_factors[item])
    return (-2.8 + 2.5 * taste * affinity + 0.4 * self.item_quality[item]
            + self.click_offset[item] + self.hour_effect[hour] + self.device_effect[device]
            + 0.1 * np.log1p(self.user_activity[user]))

  def _distinct_items(self, rng: np.random.Generator, rows: int, count: int) -> np.ndarray:
    """[rows, count] items by popularity, distinct within a row (repeats drawn again)."""
    items = rng.choice(self.num_items, (rows, count), p=self.item_weights)
    while True:
      order = np.argsort(items, axis=1, kind="stable")
      ranked = np.take_along_axis(items, order, axis=1)
      repeat = np.zeros(items.shape, bool)
      np.put_along_axis(repeat, order[:, 1:], ranked[:, 1:] == ranked[:, :-1], axis=1)
      if not repeat.any():
        return items
      items[repeat] = rng.choice(self.num_items, int(repeat.sum()), p=self.item_weights)


def _sigmoid(x: np.ndarray) -> np.ndarray:
  return 1.0 / (1.0 + np.exp(-x))


def sample_chunks(world: AdsWorld, num_requests: int, impressions_per_request: int,
                  seed: int, first_request_id: int = 0
                  ) -> Iterator[Tuple[Dict[str, np.ndarray], oracle_lib.Oracle]]:
  """The log of `num_requests` requests in chunks of CHUNK_REQUESTS requests,
  each with its oracle: chunk k drawn with seed [seed, k] (the first with
  `seed` itself)."""
  for k, start in enumerate(range(0, num_requests, CHUNK_REQUESTS)):
    yield world.sample_log(min(CHUNK_REQUESTS, num_requests - start), impressions_per_request,
                           seed if k == 0 else [seed, k], first_request_id + start)


def _columns_keeping_oracle(chunks, parts: list) -> Iterator[Dict[str, np.ndarray]]:
  """The chunks' columns, for the writer; their oracles appended to `parts`."""
  for columns, truth in chunks:
    parts.append(truth)
    yield columns


class SyntheticAdsSource(base.Source):
  """The built-in synthetic ads log: `train`, `eval` and `calibration` splits of
  impressions, each with its oracle (`oracle-<split>.npz`)."""

  name = "synthetic"
  # 2, issue 13: Zipf popularity, logging policy, position bias, oracle;
  # 3: the logging policy a previous ranker (POLICY_TASTE, POLICY_ITEM_ERROR).
  version = 3
  description = "the built-in synthetic ads log (click, conversion) with its oracle"
  options = (
      base.Option("synthetic_requests", 12_000, int, "synthetic: training requests (10 "
                  "impressions each); eval gets a quarter as many.", lower_bound=1),
      base.Option("synthetic_eval_requests", None, int, "synthetic: eval requests "
                  "(default: a quarter of --synthetic_requests).", lower_bound=1),
      base.Option("synthetic_calibration_requests", None, int, "synthetic: requests of the "
                  "calibration split, for fitting calibrators on data that is neither "
                  "training nor eval data (default: as many as eval).", lower_bound=1),
      base.Option("synthetic_users", 5000, int, "synthetic: users in the log.",
                  lower_bound=1),
      base.Option("synthetic_items", 2000, int, "synthetic: items in the log (at least "
                  f"{IMPRESSIONS_PER_REQUEST}, a page's worth).",
                  lower_bound=IMPRESSIONS_PER_REQUEST),
      base.Option("synthetic_policy_taste", POLICY_TASTE, float, "synthetic: the share (0 to 1) "
                  "of each user's taste (the user x item affinity of clicks) that the "
                  "logging policy knows: 1, all of it, as an oracle would; 0, none, as a "
                  "ranker by item appeal and context.", lower_bound=0.0),
      base.Option("synthetic_policy_item_error", POLICY_ITEM_ERROR, float, "synthetic: standard "
                  "deviation (logit scale) of the logging policy's lasting error per item, "
                  "the same in every request (a previous ranker's mistakes about an item); "
                  "0: its only error is drawn afresh per request.", lower_bound=0.0),
  )

  def convert(self, out_dir: str, *, num_shards: int, compression: Optional[str],
              overwrite: bool, seed: int, synthetic_requests: int,
              synthetic_eval_requests: Optional[int],
              synthetic_calibration_requests: Optional[int], synthetic_users: int,
              synthetic_items: int, synthetic_policy_taste: float,
              synthetic_policy_item_error: float) -> schema_lib.Schema:
    if synthetic_policy_taste > 1.0:
      raise ValueError(f"synthetic_policy_taste is a share of the users' taste, from 0 to 1; "
                       f"got {synthetic_policy_taste}.")
    impressions = IMPRESSIONS_PER_REQUEST
    eval_requests = synthetic_eval_requests or max(1, synthetic_requests // 4)
    calibration_requests = synthetic_calibration_requests or eval_requests
    world = AdsWorld(synthetic_users, synthetic_items, seed,
                     policy_taste=synthetic_policy_taste,
                     policy_item_error=synthetic_policy_item_error)
    schema = make_schema(synthetic_users, synthetic_items, impressions)
    # split, requests, seed of its draws, shards; request ids run on across splits.
    splits = [("train", synthetic_requests, seed + 1, num_shards),
              ("eval", eval_requests, seed + 2, max(1, num_shards // 4)),
              ("calibration", calibration_requests, seed + 3, max(1, num_shards // 4))]
    first_request_id = 0
    with writer_lib.DatasetWriter(out_dir, schema, compression, overwrite,
                                  statistics_split="train", verbose=True) as w:
      for split, requests, split_seed, shards in splits:
        parts = []
        chunks = sample_chunks(world, requests, impressions, split_seed, first_request_id)
        w.write_chunks(split, _columns_keeping_oracle(chunks, parts), requests * impressions,
                       shards)
        oracle_lib.Oracle.concatenate(parts).save(w.path(oracle_lib.filename(split)))
        first_request_id += requests
    return w.schema
