"""The concept head: what an image shows, predicted from its encoded grid.

Two kinds (`capjax.concepts`):

  'pairs'   at every position of the grid [B, P, C], an attribute (shapes:
            colour) and an object (shape), as two separate classifiers with
            a class 0 for "nothing here". A pair is the two predictions of
            one position, so a colour and a shape never seen together in
            training can still be predicted together.
  'labels'  which object categories the image holds: a multi-label tagger
            on the mean of the grid's positions.

Training targets come in the batch (`capjax.concepts.targets`); the loss
sums here follow `capjax.losses`: summed per device, divided by global
counts. At decoding, `confident` picks each image's most likely concepts,
which become the phrases of a constrained beam search.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

Array = jax.Array


class ConceptHead(nn.Module):
  """Concept logits of encoded images.

  Attributes:
    num_attributes: A, the attribute classes of a 'pairs' head; 0 makes a
      'labels' head.
    num_objects: O, the object classes (or categories).
    hidden_dim: the width of its hidden layers.
    dtype: the compute dtype.
  """
  num_attributes: int
  num_objects: int
  hidden_dim: int = 128
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features: Array,
               object_features: Array | None = None) -> dict[str, Array]:
    """features [B, P, C] -> 'pairs': {'attribute': [B, P, A + 1],
    'object': [B, P, O + 1]} (class 0: nothing); 'labels': {'labels':
    [B, O]}. Logits in float32.

    'pairs' classify attributes from `features` and objects from
    `object_features` (default: the same), each through its own hidden
    layer.
    """
    dense = lambda n, name: nn.Dense(n, dtype=self.dtype, name=name)
    mlp = lambda x, n, name: dense(n, name)(nn.relu(
        dense(self.hidden_dim, f'{name}_hidden')(x))).astype(jnp.float32)
    if not self.num_attributes:
      return {'labels': mlp(jnp.mean(features, axis=1), self.num_objects,
                            'labels')}  # [B, O]
    if object_features is None:
      object_features = features
    return {
        'attribute': mlp(features, self.num_attributes + 1,
                         'attribute'),  # [B, P, A + 1]
        'object': mlp(object_features, self.num_objects + 1,
                      'object'),  # [B, P, O + 1]
    }


def position_targets(batch: dict[str, Array], num_positions: int
                     ) -> tuple[Array, Array]:
  """The 'pairs' targets at each position of a square grid of
  `num_positions`: (attribute, object), each int32 [B, P], 0 where no
  object's centre falls, else the class + 1. Of two objects in one
  position, the larger class wins (the shapes grid keeps them apart)."""
  side = int(round(num_positions**0.5))
  assert side * side == num_positions, 'the concept head needs a square grid'
  cell = jnp.clip(jnp.floor(batch['concepts/centre'] * side).astype(jnp.int32),
                  0, side - 1)  # [B, M, 2]
  index = cell[..., 0] * side + cell[..., 1]  # [B, M]
  valid = batch['concepts/object'] >= 0  # [B, M]
  here = (index[..., None] == jnp.arange(num_positions)) & valid[..., None]

  def at_positions(classes):  # [B, M] -> [B, P]
    return jnp.max(jnp.where(here, classes[..., None] + 1, 0), axis=1)
  return (at_positions(batch['concepts/attribute']),
          at_positions(batch['concepts/object']))


def label_targets(batch: dict[str, Array], num_objects: int) -> Array:
  """The 'labels' targets: float32 [B, O], 1 for each category present."""
  objects = batch['concepts/object']  # [B, M], -1 after the last
  hot = jax.nn.one_hot(objects, num_objects)  # [B, M, O]; -1 -> zeros
  return jnp.max(hot, axis=1)


def losses(logits: dict[str, Array], batch: dict[str, Array],
           mask: Array) -> dict[str, Array]:
  """Sums over the real images (`mask` [B]) of the concept loss and its
  counts: 'concept' (per image: the mean over positions of the attribute
  and object cross-entropies, or the mean binary cross-entropy over
  categories), 'concept_images', and 'concept_correct' / 'concept_total'
  (positions, or categories, predicted right)."""
  if 'labels' in logits:
    labels = logits['labels']  # [B, O]
    targets = label_targets(batch, labels.shape[-1])
    per_image = jnp.mean(optax.sigmoid_binary_cross_entropy(labels, targets),
                         axis=-1)  # [B]
    correct = jnp.sum((labels > 0) == (targets > 0), axis=-1)  # [B]
    total = labels.shape[-1]
  else:
    attribute, obj = logits['attribute'], logits['object']  # [B, P, A+1 / O+1]
    attribute_targets, object_targets = position_targets(batch,
                                                         obj.shape[1])
    ce = (optax.softmax_cross_entropy_with_integer_labels(
        attribute, attribute_targets) +
          optax.softmax_cross_entropy_with_integer_labels(
              obj, object_targets))  # [B, P]
    per_image = jnp.mean(ce, axis=-1)  # [B]
    correct = jnp.sum((jnp.argmax(attribute, -1) == attribute_targets) &
                      (jnp.argmax(obj, -1) == object_targets), axis=-1)
    total = obj.shape[1]
  return {
      'concept': jnp.sum(per_image * mask),
      'concept_images': jnp.sum(mask),
      'concept_correct': jnp.sum(correct * mask),
      'concept_total': jnp.sum(mask) * total,
  }


def confident(logits: dict[str, Array], *, threshold: float, k: int) -> Array:
  """Each image's k most likely distinct concepts with a probability over
  `threshold`, as concept ids int32 [B, k], -1 for none.

  A 'pairs' concept is attribute * O + object, taken at a position whose
  probability of holding an object (1 - P(nothing) of the object
  classifier) is over `threshold`; its attribute and object are each the
  most likely real class there. A 'labels' concept is the category.
  """
  if 'labels' in logits:
    score = jax.nn.sigmoid(logits['labels'])  # [B, O]
    ids = jnp.broadcast_to(jnp.arange(score.shape[-1]), score.shape)
  else:
    obj = jax.nn.softmax(logits['object'], axis=-1)  # [B, P, O + 1]
    score = 1.0 - obj[..., 0]  # [B, P]
    num_objects = obj.shape[-1] - 1
    attribute = jnp.argmax(logits['attribute'][..., 1:], axis=-1)  # [B, P]
    ids = attribute * num_objects + jnp.argmax(obj[..., 1:], axis=-1)
  k = min(k, score.shape[-1])
  top, where = jax.lax.top_k(score, k)  # [B, k]
  ids = jnp.take_along_axis(ids, where, axis=-1)  # [B, k]
  # Two positions of one pair (two red squares) are one concept.
  earlier = jnp.tril(jnp.ones((k, k), bool), -1)  # [k, k]: j < i
  repeated = jnp.any((ids[:, :, None] == ids[:, None, :]) & earlier, axis=-1)
  return jnp.where((top > threshold) & ~repeated, ids, -1).astype(jnp.int32)
