"""PCGrad (Yu et al., NeurIPS 2020)."""

from typing import Sequence

import tensorflow as tf

from mtl_zoo.balancers.base import LossBalancer, shared_variables


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
  """The schema's weights, with per-task gradients on the shared parameters
  projected off each other where they conflict; parameters of one task only get
  that task's gradient, and the regularisation's gradient is added unprojected."""

  persistent_tape = True

  def combine_gradients(self, tape, weighted_losses, rest, total, variables) -> list:
    per_task = [tape.gradient(loss, variables) for loss in weighted_losses]
    shared = shared_variables(per_task)
    dense = [[tf.convert_to_tensor(g[i]) if g[i] is not None else tf.zeros_like(v)
              for i, v in enumerate(variables)] for g in per_task]
    flat = [tf.concat([tf.reshape(d, [-1]) for d, s in zip(grads, shared) if s], 0)
            for grads in dense]
    n = len(weighted_losses)
    # A fresh random visiting order per task and step (seeded by the global seed).
    order = tf.stack([tf.random.shuffle(tf.range(n)) for _ in range(n)])
    combined = project_conflicting(flat, order) if any(shared) else None
    rest_grads = tape.gradient(rest, variables)
    out, offset = [], 0
    for i, v in enumerate(variables):
      if shared[i]:
        size = v.shape.num_elements()
        g = tf.reshape(combined[offset:offset + size], v.shape)
        offset += size
      else:
        g = tf.add_n([d[i] for d in dense])
      if rest_grads[i] is not None:
        g = g + tf.convert_to_tensor(rest_grads[i])
      out.append(g)
    return out
