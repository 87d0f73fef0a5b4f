"""capjax models: the ResNet encoder, the attention LSTM decoder, the captioner.

`build_captioner(config.model, len(vocab))` is the one way jobs make the
model, so training, evaluation and decoding agree on its shape.
"""

from typing import Any

import jax.numpy as jnp
import ml_collections

from capjax.errors import UserError
from capjax.models import captioner as captioner_lib
from capjax.models import resnet
from capjax.models.captioner import CaptionModel
from capjax.models.decoder import AttentionLSTMCell
from capjax.models.decoder import Cache
from capjax.models.decoder import Carry
from capjax.models.decoder import Decoder

__all__ = [
    'AttentionLSTMCell', 'Cache', 'CaptionModel', 'Carry', 'Decoder',
    'build_captioner', 'compute_dtype',
]

# float16 is left out: it would need loss scaling, which capjax does not do.
_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def compute_dtype(name: str) -> Any:
  """config.model.dtype ('float32' or 'bfloat16') -> the jnp dtype."""
  if name not in _DTYPES:
    raise UserError(f'config.model.dtype={name!r} is not a supported compute '
                    f'dtype; use one of {", ".join(map(repr, _DTYPES))}')
  return _DTYPES[name]


def build_captioner(model_config: ml_collections.ConfigDict, vocab_size: int,
                    normalization: str = 'imagenet',
                    concepts: tuple[int, int] = (0, 0)) -> CaptionModel:
  """The `CaptionModel` that config.model describes, for `vocab_size` words.

  `normalization` is config.data.normalization: how the encoder's pretrained
  weights expect pixels ('imagenet' or 'caffe'). `concepts` are the sizes
  of the dataset's concepts (`capjax.concepts.Concepts.sizes`), for the
  concept head of config.model.concepts.head.
  """
  encoder, decoder = model_config.encoder, model_config.decoder
  dtype = compute_dtype(model_config.dtype)
  if normalization not in captioner_lib.NORMALIZATIONS:
    raise UserError(f'unknown --config.data.normalization={normalization!r}; '
                    f'choose one of {", ".join(captioner_lib.NORMALIZATIONS)}')
  # Fail here, before any tracing, on an unknown arch.
  resnet.feature_dim(encoder.arch)
  head = model_config.concepts
  if head.head and not concepts[1]:
    raise UserError('--config.model.concepts.head=True needs a dataset that '
                    'annotates its images\' objects (shapes, or COCO with its '
                    'category names); set it to False')
  return CaptionModel(
      vocab_size=vocab_size,
      arch=encoder.arch,
      variant=encoder.variant,
      grid=encoder.grid,
      frozen=encoder.frozen,
      freeze_bn=encoder.freeze_bn,
      embed_dim=decoder.embed_dim,
      hidden_dim=decoder.hidden_dim,
      attention_dim=decoder.attention_dim,
      dropout_rate=decoder.dropout,
      dtype=dtype,
      normalization=normalization,
      concepts=tuple(concepts) if head.head else (0, 0),
      concept_hidden=head.hidden_dim,
      concept_without_hue=head.objects_without_hue)
