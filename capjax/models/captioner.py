"""The captioning model: a ResNet encoder feeding the attention LSTM decoder.

Images [B, S, S, 3] become a grid of features (average-pooled to grid x grid
when config.model.encoder.grid is set) flattened to the P = h * w annotation
vectors [B, P, C] the decoder attends over (Xu et al. 2015, Sec. 3.1.1). The
encoder runs once per image; its K captions (training) or K beams (decoding)
share those features by broadcasting.

Variables: params {'encoder', 'decoder'} and batch_stats {'encoder'}.

Three entry points, which `capjax.models.predict` wraps for the jobs:

  model = models.build_captioner(config.model, len(vocab))
  variables = model.init({'params': key}, images, captions)
  logits, alphas = model.apply(variables, images, captions, train=True,
                               rngs={'dropout': key})   # from pixels
  features = model.apply(variables, batch, method=model.encode)
  logits, alphas = model.apply(variables, features, captions,
                               method=model.logits)
  # and the decoder (`models.decoders`: prepare, initial_carry, step),
  # reached as model.decoder.

A trainable encoder with live BatchNorm (frozen=False, freeze_bn=False)
also needs mutable=['batch_stats'] when train=True.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from capjax.models import concepts as concepts_lib
from capjax.models import resnet

Array = jax.Array
Dtype = Any

# RGB statistics of ImageNet (torchvision / timm models).
IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)
# Keras ResNet v1 ("caffe" preprocessing): BGR order, mean subtracted only.
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
NORMALIZATIONS = ('imagenet', 'caffe')


def normalize(images: Array, method: str) -> Array:
  """Pixels [..., 3] in 0..255 (uint8 or float), RGB -> float32 model input.

  Done on the device, inside the jitted step: the host sends uint8, a
  quarter of the bytes of float32.
  """
  images = images.astype(jnp.float32)
  if method == 'imagenet':
    return (images - jnp.array(IMAGENET_MEAN)) / jnp.array(IMAGENET_STD)
  if method == 'caffe':
    return images[..., ::-1] - jnp.array(CAFFE_MEAN_BGR)
  raise ValueError(f'unknown normalization {method!r}')


def without_hue(images: Array) -> Array:
  """Pixels [..., 3] -> the same without their hues: each pixel's luma
  (ITU-R BT.601) and, twice, its chroma (the largest of its R, G, B less
  the smallest), float32.

  What the object classifier of a concept head with `concept_without_hue`
  sees: a form looks alike in any colour. Luma alone would lose a coloured
  form on a background of its brightness; chroma keeps it.
  """
  images = images.astype(jnp.float32)
  luma = images @ jnp.array([0.299, 0.587, 0.114])
  chroma = jnp.max(images, axis=-1) - jnp.min(images, axis=-1)
  return jnp.stack([luma, chroma, chroma], axis=-1)


class CaptionModel(nn.Module):
  """ResNet encoder + a caption decoder (`models.decoders`).

  Attributes:
    vocab_size: V, word ids including the special tokens.
    decoder: the decoder module (`decoders.build`), under params/decoder.
    arch: a `resnet.build` architecture ('resnet_tiny', 'resnet50', ...).
    variant: the ResNet variant, 'v1.5' or 'v1'.
    grid: average-pool the encoder's grid to grid x grid; 0 keeps it.
    frozen: no gradient reaches the encoder, and its BatchNorm uses the
      running statistics.
    freeze_bn: BatchNorm uses the running statistics even when training a
      trainable encoder.
    dtype: the compute dtype; parameters stay float32.
    normalization: how pixels become the encoder's input, as its pretrained
      weights expect: 'imagenet' (torchvision, timm) or 'caffe' (Keras).
    concepts: (A, O), the sizes of the concept head (`models.concepts`):
      A attributes and O objects ('pairs'), or A = 0 and O categories
      ('labels'); (0, 0): no head.
    concept_hidden: the concept head's hidden width.
    concept_without_hue: the concept head's object classifier reads the
      encoding of the image without its hues (`without_hue`), so that it
      tells shapes apart without their colours; the attribute classifier
      reads the colour image's. Needs pixels, not cached features.
  """

  vocab_size: int
  decoder: nn.Module
  arch: str = 'resnet50'
  variant: str = 'v1.5'
  grid: int = 0
  frozen: bool = True
  freeze_bn: bool = True
  dtype: Dtype = jnp.float32
  normalization: str = 'imagenet'
  concepts: tuple[int, int] = (0, 0)
  concept_hidden: int = 128
  concept_without_hue: bool = False

  def setup(self):
    self.encoder = resnet.build(self.arch, variant=self.variant,
                                dtype=self.dtype)
    self.concept_head = None
    if self.concepts[1]:
      self.concept_head = concepts_lib.ConceptHead(
          *self.concepts, hidden_dim=self.concept_hidden, dtype=self.dtype)

  def __call__(self, images: Array, captions: Array,
               train: bool = False) -> tuple[Array, Array]:
    """Teacher forcing on K captions per image, from pixels.

    Args:
      images: [B, S, S, 3] pixels in 0..255, uint8 (or float).
      captions: int [B, K, L] token ids: <bos> words <eos> <pad>...
      train: dropout (needs a 'dropout' rng) and, for a trainable encoder
        without freeze_bn, BatchNorm batch statistics (mutable batch_stats).

    Returns:
      logits [B, K, L-1, V] float32 for the targets captions[..., 1:] and
      the attention weights alphas [B, K, L-1, P] float32.
    """
    features = self._annotations(self._grid(images, train))  # [B, P, C]
    if self.concept_head is not None and self.is_initializing():
      self.concept_head(features, features)  # Its parameters, too.
    return self.logits(features, captions, train)

  def encode(self, batch: dict[str, Array], train: bool = False, *,
             grid: bool = False, concepts: bool = False) -> Any:
    """A batch's features [B, P, C], once per image.

    From its cached `features` [B, h, w, C] when it carries them (the
    feature cache), else from its `image` pixels [B, S, S, 3].

    Args:
      batch: 'image' or 'features'.
      train: BatchNorm batch statistics for a trainable encoder.
      grid: return the encoder's pooled grid [B, h, w, C] of the pixels
        instead: what the feature cache stores.
      concepts: also return the concept head's logits
        (`models.concepts.ConceptHead`): (features, logits).
    """
    if grid:
      return self._grid(batch['image'], train)  # [B, g, g, C]
    if not concepts:
      if 'features' in batch:
        return self._annotations(batch['features'])
      return self._annotations(self._grid(batch['image'], train))
    if self.concept_head is None:
      raise ValueError('this model has no concept head '
                       '(config.model.concepts.head)')
    if not self.concept_without_hue:
      features = self.encode(batch, train)  # [B, P, C]
      return features, self.concept_head(features)
    # The images with and without hues are encoded together, as one batch
    # [2B, ...]: BatchNorm then sees the same mixture in every training
    # step, and its running statistics are that mixture's.
    if 'image' not in batch:
      raise ValueError('a concept head that reads images without hues '
                       'needs the pixels, not cached features')
    images = batch['image']  # [B, S, S, 3]
    both = self._annotations(self._grid(
        jnp.concatenate([images, without_hue(images)]), train))  # [2B, P, C]
    features, hueless = jnp.split(both, 2)
    return features, self.concept_head(features, hueless)

  def logits(self, features: Array, captions: Array,
             train: bool = False) -> tuple[Array, Array]:
    """Teacher forcing from encoded images: features [B, P, C] and
    captions [B, K, L] -> logits [B, K, L-1, V], alphas [B, K, L-1, P]."""
    return self.decoder(features, captions[..., :-1], train)

  def _grid(self, images: Array, train: bool) -> Array:
    """images [B, S, S, 3] (pixels, 0..255) -> the grid [B, h, w, C]."""
    images = normalize(images, self.normalization)
    # A frozen encoder's statistics must not drift with the caption data,
    # so its BatchNorm always normalizes with the stored running averages.
    freeze_bn = self.frozen or self.freeze_bn
    features = self.encoder(images, train=train,
                            freeze_bn=freeze_bn)  # [B, h, w, C]
    return resnet.pool_grid(features, self.grid)  # [B, g, g, C]

  def _annotations(self, grid: Array) -> Array:
    """The grid [B, h, w, C] -> the P = h * w vectors [B, P, C] attended
    over, in the compute dtype."""
    batch, height, width, channels = grid.shape
    features = grid.reshape(batch, height * width,
                            channels).astype(self.dtype)  # [B, P, C]
    if self.frozen:
      # Zero gradient into the encoder: XLA then drops its backward pass.
      features = jax.lax.stop_gradient(features)
    return features
