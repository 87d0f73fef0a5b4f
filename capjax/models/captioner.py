"""The captioning model: a ResNet encoder feeding the attention LSTM decoder.

Images [B, S, S, 3] become a grid of features (average-pooled to grid x grid
when config.model.encoder.grid is set) flattened to the P = h * w annotation
vectors [B, P, C] the decoder attends over (Xu et al. 2015, Sec. 3.1.1). The
encoder runs once per image; its K captions (training) or K beams (decoding)
share those features by broadcasting.

Variables: params {'encoder', 'decoder'} and batch_stats {'encoder'}.

  model = models.build_captioner(config.model, len(vocab))
  variables = model.init({'params': key}, images, captions)
  logits, alphas = model.apply(variables, images, captions, train=True,
                               rngs={'dropout': key})
  # A trainable encoder with live BatchNorm (frozen=False, freeze_bn=False)
  # also needs mutable=['batch_stats'] when train=True.
  cache = model.apply(variables, images, method=model.decode_prepare)
  carry = model.apply(variables, cache, beam,
                      method=model.decode_initial_carry)
  carry, logits, alpha = model.apply(variables, carry, tokens, cache,
                                     method=model.decode_step)
  # The same from images encoded once, for several uses:
  features = model.apply(variables, images, method=model.encode)
  # or from a batch of images or of cached features alike:
  features = model.apply(variables, batch, method=model.encode_batch)
  logits, alphas = model.apply(variables, features, captions,
                               method=model.teacher_forcing)
  cache = model.apply(variables, features, method=model.prepare)

Methods are passed as the bound methods of the module `apply` is called on
(`method=model.encode`): flax takes the unbound function, so this works as
well on a `model.clone(...)` and under `jax.jit`.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from capjax.models import concepts as concepts_lib
from capjax.models import decoder as decoder_lib
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
  """ResNet encoder + soft-attention LSTM decoder.

  Attributes:
    vocab_size: V, word ids including the special tokens.
    arch: a `resnet.build` architecture ('resnet_tiny', 'resnet50', ...).
    variant: the ResNet variant, 'v1.5' or 'v1'.
    grid: average-pool the encoder's grid to grid x grid; 0 keeps it.
    frozen: no gradient reaches the encoder, and its BatchNorm uses the
      running statistics.
    freeze_bn: BatchNorm uses the running statistics even when training a
      trainable encoder.
    embed_dim, hidden_dim, attention_dim, dropout_rate: the decoder's sizes
      and deep-output dropout.
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
  arch: str = 'resnet50'
  variant: str = 'v1.5'
  grid: int = 0
  frozen: bool = True
  freeze_bn: bool = True
  embed_dim: int = 512
  hidden_dim: int = 512
  attention_dim: int = 512
  dropout_rate: float = 0.5
  dtype: Dtype = jnp.float32
  normalization: str = 'imagenet'
  unroll: int | bool = 1  # The decoder's (see `Decoder.unroll`).
  concepts: tuple[int, int] = (0, 0)
  concept_hidden: int = 128
  concept_without_hue: bool = False

  def setup(self):
    self.encoder = resnet.build(self.arch, variant=self.variant,
                                dtype=self.dtype)
    self.decoder = decoder_lib.Decoder(
        decoder_lib.AttentionLSTMCell(
            vocab_size=self.vocab_size, embed_dim=self.embed_dim,
            hidden_dim=self.hidden_dim, attention_dim=self.attention_dim,
            dropout_rate=self.dropout_rate, dtype=self.dtype),
        unroll=self.unroll)
    self.concept_head = None
    if self.concepts[1]:
      self.concept_head = concepts_lib.ConceptHead(
          *self.concepts, hidden_dim=self.concept_hidden, dtype=self.dtype)

  def encode_grid(self, images: Array, train: bool = False) -> Array:
    """images [B, S, S, 3] (pixels, 0..255) -> the grid [B, h, w, C].

    What the feature cache stores (`capjax.cache_features`).
    """
    images = normalize(images, self.normalization)
    # A frozen encoder's statistics must not drift with the caption data,
    # so its BatchNorm always normalizes with the stored running averages.
    freeze_bn = self.frozen or self.freeze_bn
    features = self.encoder(images, train=train,
                            freeze_bn=freeze_bn)  # [B, h, w, C]
    return resnet.pool_grid(features, self.grid)  # [B, g, g, C]

  def encode(self, images: Array, train: bool = False) -> Array:
    """images [B, S, S, 3] (pixels, 0..255) -> features [B, P, C]."""
    return self.annotations(self.encode_grid(images, train))

  def annotations(self, grid: Array) -> Array:
    """The grid [B, h, w, C] -> the P = h * w vectors [B, P, C] attended
    over, in the compute dtype."""
    batch, height, width, channels = grid.shape
    features = grid.reshape(batch, height * width,
                            channels).astype(self.dtype)  # [B, P, C]
    if self.frozen:
      # Zero gradient into the encoder: XLA then drops its backward pass.
      features = jax.lax.stop_gradient(features)
    return features

  def encode_batch(self, batch: dict[str, Array],
                   train: bool = False) -> Array:
    """A batch's features [B, P, C]: from its `features` [B, h, w, C] when
    it carries them (the feature cache), else from its `image` pixels."""
    if 'features' in batch:
      return self.annotations(batch['features'])
    return self.encode(batch['image'], train)

  def __call__(self, images: Array, captions: Array,
               train: bool = False) -> tuple[Array, Array]:
    """Teacher forcing on K captions per image.

    Args:
      images: [B, S, S, 3] pixels in 0..255, uint8 (or float).
      captions: int [B, K, L] token ids: <bos> words <eos> <pad>...
      train: dropout (needs a 'dropout' rng) and, for a trainable encoder
        without freeze_bn, BatchNorm batch statistics (mutable batch_stats).

    Returns:
      logits [B, K, L-1, V] float32 for the targets captions[..., 1:] and
      the attention weights alphas [B, K, L-1, P] float32.
    """
    features = self.encode(images, train)  # [B, P, C], once per image
    if self.concept_head is not None and self.is_initializing():
      self.concept_head(features, features)  # Its parameters, too.
    return self.teacher_forcing(features, captions, train)

  def caption_batch(self, batch: dict[str, Array],
                    train: bool = False) -> tuple[Array, Array]:
    """`__call__` on a batch: its `captions` [B, K, L], and `image` pixels
    or cached `features` (see `encode_batch`)."""
    return self.teacher_forcing(self.encode_batch(batch, train),
                                batch['captions'], train)

  def caption_batch_and_concepts(
      self, batch: dict[str, Array], train: bool = False
  ) -> tuple[Array, Array, dict[str, Array]]:
    """`caption_batch` and the concept head's logits, of one encoding of
    the batch (`encode_with_concepts`)."""
    features, concepts = self.encode_with_concepts(batch, train)
    return (*self.teacher_forcing(features, batch['captions'], train),
            concepts)

  def encode_with_concepts(self, batch: dict[str, Array], train: bool = False
                           ) -> tuple[Array, dict[str, Array]]:
    """A batch's features [B, P, C] (`encode_batch`) and the concept
    head's logits (`models.concepts.ConceptHead`).

    With `concept_without_hue`, the images with and without hues are
    encoded together, as one batch [2B, ...]: BatchNorm then sees the same
    mixture in every training step, and its running statistics are that
    mixture's.
    """
    if self.concept_head is None:
      raise ValueError('this model has no concept head '
                       '(config.model.concepts.head)')
    if not self.concept_without_hue:
      features = self.encode_batch(batch, train)  # [B, P, C]
      return features, self.concept_head(features)
    if 'image' not in batch:
      raise ValueError('a concept head that reads images without hues '
                       'needs the pixels, not cached features')
    images = batch['image']  # [B, S, S, 3]
    both = self.encode(jnp.concatenate([images, without_hue(images)]),
                       train)  # [2B, P, C]
    features, hueless = jnp.split(both, 2)
    return features, self.concept_head(features, hueless)

  def teacher_forcing(self, features: Array, captions: Array,
                      train: bool = False) -> tuple[Array, Array]:
    """`__call__` from encoded images: features [B, P, C]."""
    return self.decoder(features, captions[..., :-1], train)

  def decode_prepare(self, images: Array) -> decoder_lib.Cache:
    """images [B, S, S, 3] pixels -> the decoder's cache (eval mode)."""
    return self.prepare(self.encode(images, train=False))

  def prepare(self, features: Array) -> decoder_lib.Cache:
    """`decode_prepare` from encoded images: features [B, P, C]."""
    return self.decoder.prepare(features)

  def decode_initial_carry(self, cache: decoder_lib.Cache,
                           k: int) -> decoder_lib.Carry:
    """(c_0, h_0), each [B, k, H] float32, for k hypotheses per image."""
    return self.decoder.initial_carry(cache, k)

  def decode_step(
      self, carry: decoder_lib.Carry, tokens: Array, cache: decoder_lib.Cache,
      train: bool = False) -> tuple[decoder_lib.Carry, Array, Array]:
    """tokens [B, k] -> (carry, logits [B, k, V], alpha [B, k, P])."""
    return self.decoder.step(carry, tokens, cache, train)
