"""capjax models: the ResNet encoder, the caption decoders, the captioner.

`build_captioner(config.model, len(vocab), max_len=config.data.max_len)` is
the one way jobs make the model, so training, evaluation and decoding agree
on its shape; `predict.Predict(model)` is the one way they run it.
"""

from typing import Any

import jax.numpy as jnp
import ml_collections

from capjax.errors import UserError
from capjax.models import captioner as captioner_lib
from capjax.models import decoders
from capjax.models import resnet
from capjax.models.captioner import CaptionModel
from capjax.models.decoder import AttentionLSTMCell
from capjax.models.decoder import Decoder
from capjax.models.predict import Predict

__all__ = [
    'AttentionLSTMCell', 'CaptionModel', 'Decoder', 'Predict',
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
                    concepts: tuple[int, int] = (0, 0), *,
                    max_len: int = 0) -> CaptionModel:
  """The `CaptionModel` that config.model describes, for `vocab_size` words.

  `max_len` is config.data.max_len, the longest caption in tokens: the
  Transformer decoder's positions (the LSTM decoders need no bound).

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
  if decoder.get('name') == 'transformer' and max_len < 2:
    raise ValueError('the transformer decoder needs max_len, '
                     'config.data.max_len')
  return CaptionModel(
      vocab_size=vocab_size,
      decoder=decoders.build(decoder, vocab_size, max_len=max_len,
                             dtype=dtype),
      arch=encoder.arch,
      variant=encoder.variant,
      grid=encoder.grid,
      frozen=encoder.frozen,
      freeze_bn=encoder.freeze_bn,
      dtype=dtype,
      normalization=normalization,
      concepts=tuple(concepts) if head.head else (0, 0),
      concept_hidden=head.hidden_dim,
      concept_without_hue=head.objects_without_hue)
