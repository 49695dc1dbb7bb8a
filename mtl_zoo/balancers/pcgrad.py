"""PCGrad (Yu et al., NeurIPS 2020)."""

from typing import Sequence

import tensorflow as tf

from mtl_zoo.balancers.base import LossBalancer


def project_conflicting(task_gradients: Sequence[tf.Tensor], order: tf.Tensor) -> tf.Tensor:
  """PCGrad's projection: the sum of the task gradients, each with the components
  that conflict (negative dot product) with the other tasks' gradients removed.

  Args:
    task_gradients: T flat gradients of one shape.
    order: [T, T] int32; row k is the order in which task k visits the others.

  Returns:
    The combined flat gradient.
  """
  g = tf.stack(task_gradients)
  projected = []
  for k in range(len(task_gradients)):
    gk = g[k]
    for step in range(len(task_gradients)):
      gj = tf.gather(g, order[k, step])
      dot = tf.reduce_sum(gk * gj)
      conflict = tf.logical_and(dot < 0.0, tf.not_equal(order[k, step], k))
      gk = tf.where(conflict, gk - dot / (tf.reduce_sum(gj * gj) + 1e-12) * gj, gk)
    projected.append(gk)
  return tf.add_n(projected)


class PCGrad(LossBalancer):
  """The schema's weights, with per-task gradients on the balanced shared dense
  parameters (`balancers.shared`: by default the last shared layer) projected
  off each other where they conflict. Every other parameter (embedding tables,
  lower shared layers, each task's own) gets the plain gradient of the
  weighted sum, sparse where it is sparse; the regularisation's gradient is
  added unprojected. Memory per step: 2 x tasks x balanced parameters floats."""

  persistent_tape = True
  uses_task_gradients = True

  def combine_gradients(self, tape, weighted_losses, rest, total, variables) -> list:
    balanced = [variables[i] for i in self.balanced]
    others = [i for i in range(len(variables)) if i not in set(self.balanced)]
    per_task = [tape.gradient(loss, balanced) for loss in weighted_losses]
    flat = [tf.concat([tf.reshape(tf.zeros_like(v) if g is None else tf.convert_to_tensor(g),
                                  [-1]) for g, v in zip(grads, balanced)], 0)
            for grads in per_task]
    n = len(weighted_losses)
    # A fresh random visiting order per task and step (seeded by the global seed).
    order = tf.stack([tf.random.shuffle(tf.range(n)) for _ in range(n)])
    combined = project_conflicting(flat, order)
    out = [None] * len(variables)
    offset = 0
    for i, v, rest_grad in zip(self.balanced, balanced, tape.gradient(rest, balanced)):
      size = v.shape.num_elements()
      out[i] = tf.reshape(combined[offset:offset + size], v.shape)
      offset += size
      if rest_grad is not None:
        out[i] += tf.convert_to_tensor(rest_grad)
    for i, g in zip(others, tape.gradient(total, [variables[i] for i in others])):
      out[i] = g
    return out
