"""The caption decoders, chosen by `config.model.decoder.name`, and the one
contract they all keep.

A decoder reads the image as P feature vectors [B, P, C] and writes a
caption a word at a time. Teacher forcing, beam search, sampling and
self-critical training all use it through these four methods alone:

  cache = decoder.prepare(features)          # [B, P, C] -> leaves [B, ...]
  carry = decoder.initial_carry(cache, k)    # leaves [B, k, ...]
  carry, logits, alpha = decoder.step(carry, tokens, cache, train)
      # tokens int [B, k] -> logits [B, k, V] float32, alpha [B, k, P]
  logits, alphas = decoder(features, tokens, train)
      # teacher forcing: tokens int [B, K, L] -> [B, K, L, V], [B, K, L, P]

`prepare` is the per-image work done once (attention keys, a Transformer's
encoder layers); `step` reads it unchanged. The carry is any pytree whose
leaves all lead with [B, k]: beam search reorders it by gathering axis 1,
whether it holds LSTM states or a Transformer's keys and values. `alpha` is
the attention over the P positions that the caption API draws: the soft
attention of the LSTM decoders, the last layer's cross-attention averaged
over heads for the Transformer. `decoder(features, tokens)` must create
every parameter `step` uses, and give its logits to float32 tolerance (a
Transformer in parallel over time).

The decoders:
  show_attend_tell  soft attention LSTM, Xu et al. 2015 (models/decoder.py)
  updown            top-down attention LSTMs, Anderson et al. 2018
                    (models/updown.py)
  transformer       encoder-decoder Transformer over the grid, Vaswani et
                    al. 2017 (models/transformer.py)
"""

from typing import Any

import flax.linen as nn
import ml_collections

from capjax import config as config_lib
from capjax.errors import UserError
from capjax.models import decoder as show_attend_tell
from capjax.models import transformer
from capjax.models import updown

NAMES = tuple(config_lib.DECODER_FIELDS)  # The config's list, checked there.


def check_name(name: str) -> None:
  """A one-line UserError for an unknown config.model.decoder.name."""
  if name not in NAMES:
    raise UserError(f'unknown --config.model.decoder.name={name!r}; choose '
                    f'one of {", ".join(NAMES)}')


def build(decoder: ml_collections.ConfigDict, vocab_size: int, *,
          max_len: int, dtype: Any) -> nn.Module:
  """The decoder `config.model.decoder` describes, for `vocab_size` words
  and captions of up to `max_len` tokens (config.data.max_len)."""
  name = decoder.get('name', config_lib.OLDEST_DECODER)
  check_name(name)
  if name == 'transformer':
    t = decoder.transformer
    if t.model_dim % t.heads:
      raise UserError(f'--config.model.decoder.transformer.model_dim='
                      f'{t.model_dim} is not divisible by its heads='
                      f'{t.heads}')
    if t.positions not in transformer.POSITIONS:
      raise UserError(f'unknown --config.model.decoder.transformer.positions='
                      f'{t.positions!r}; choose one of '
                      f'{", ".join(transformer.POSITIONS)}')
    return transformer.TransformerDecoder(
        vocab_size=vocab_size, max_len=max_len, num_layers=t.layers,
        num_encoder_layers=t.encoder_layers, model_dim=t.model_dim,
        num_heads=t.heads, mlp_dim=t.mlp_dim, dropout_rate=decoder.dropout,
        positions=t.positions, dtype=dtype)
  cell = {'show_attend_tell': show_attend_tell.AttentionLSTMCell,
          'updown': updown.UpDownCell}[name]
  return show_attend_tell.Decoder(cell(
      vocab_size=vocab_size, embed_dim=decoder.embed_dim,
      hidden_dim=decoder.hidden_dim, attention_dim=decoder.attention_dim,
      dropout_rate=decoder.dropout, dtype=dtype))


def unrolled(decoder: nn.Module) -> nn.Module:
  """`decoder` with its loop over time unrolled, for XLA's FLOP count
  (which counts a loop's body once); a parallel decoder as it is."""
  if isinstance(decoder, show_attend_tell.Decoder):
    return decoder.clone(unroll=True)
  return decoder
