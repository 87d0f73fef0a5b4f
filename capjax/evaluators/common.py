"""What the evaluators share: search options, batched decoding, scoring on
process 0, and agreeing on its results."""

from collections.abc import Callable, Mapping
import dataclasses
import json
import os
from typing import Any

import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np

from capjax import constrained
from capjax import decode
from capjax import files
from capjax import metrics as metrics_lib
from capjax.data.vocab import Vocab
from capjax.errors import UserError


class Interrupted(Exception):
  """An evaluator's `stop` callback ended it before its last batch; nothing
  of its run was written or logged. The argument: the evaluator's name."""


@dataclasses.dataclass(frozen=True)
class SearchOptions:
  """How captions are searched for; see `decode.search`."""
  beam_size: int = 1
  alpha: float = 0.0
  ban_unk: bool = True
  ban_repeated_trigrams: bool = False
  # Constrained to the concept head's confident concepts, or to the phrases
  # a file gives each image (config.decode).
  concepts: bool = False
  concept_threshold: float = 0.5
  constraints: str = ''

  def __post_init__(self):
    if self.beam_size < 1:
      raise UserError(f'beam_size={self.beam_size} must be >= 1')

  def search_kwargs(self) -> dict[str, Any]:
    """The options `decode.search` (and the constrained one) take."""
    return dict(beam_size=self.beam_size, alpha=self.alpha,
                ban_unk=self.ban_unk,
                ban_repeated_trigrams=self.ban_repeated_trigrams)

  def tag(self) -> str:
    """The options in a file name: 'beam3', 'beam5-alpha0.6-no3rep-unk'.

    Results of other options go in other files, never over each other.
    """
    parts = [f'beam{self.beam_size}']
    if self.alpha:
      parts.append(f'alpha{self.alpha:g}')
    if self.ban_repeated_trigrams:
      parts.append('no3rep')
    if not self.ban_unk:
      parts.append('unk')
    if self.concepts:
      parts.append('concepts' if self.concept_threshold == 0.5 else
                   f'concepts{self.concept_threshold:g}')
    if self.constraints:
      name = os.path.splitext(os.path.basename(self.constraints))[0]
      parts.append(f'include-{name}')
    return '-'.join(parts)

  @classmethod
  def of(cls, section: ml_collections.ConfigDict, **changes) -> 'SearchOptions':
    """The options in `config.decode`, with `changes`."""
    fields = {f.name: section[f.name] for f in dataclasses.fields(cls)}
    return cls(**(fields | changes))


def search_rows(predict, variables, batch: Mapping[str, jax.Array], *,
                max_len: int, options: SearchOptions,
                features: jax.Array | None = None,
                phrase_table: jax.Array | None = None
                ) -> dict[str, jax.Array]:
  """Per device: the best caption of each image of `batch`, as rows, by
  the model of `predict` (`models.Predict`).

  From `features` [b, P, C] when the caller has encoded the batch already
  (not with `options.concepts`). With `options.concepts`, each caption
  must name the image's confident concepts, whose phrases `phrase_table`
  holds (`concepts.phrase_table`); where the batch has `phrases`
  [b, C, A, L], it must contain those.
  The ids and the mask travel with the captions, so that rows and ids match
  whatever order the devices' shards are gathered in.
  """
  search = dict(max_len=max_len, mask=batch['mask'], **options.search_kwargs())
  if options.concepts:
    out, _ = constrained.concept_beam_search(
        predict, variables, batch, phrase_table,
        threshold=options.concept_threshold, **search)
  else:
    if features is None:  # From the batch's pixels or cached features.
      features = predict.encode(variables, batch)  # [b, P, C]
    if 'phrases' in batch:  # [b, C, A, L]
      out = constrained.constrained_beam_search_features(
          predict, variables, features, batch['phrases'], **search)
    else:
      out = decode.beam_search_features(predict, variables, features,
                                        **search)
  return {'tokens': out.tokens[:, 0],  # [b, T]
          'image/id': batch['image/id'], 'mask': batch['mask']}


def captions_of(rows: Mapping[str, np.ndarray], vocab: Vocab) -> dict[int, str]:
  """`search_rows` of every process, fetched -> captions of the real images
  by image id (padding rows dropped)."""
  return {int(i): vocab.decode(tokens) for tokens, i, real
          in zip(rows['tokens'], rows['image/id'], rows['mask']) if real}


def score_captions(references: dict[int, list[str]], captions: dict[int, str],
                   meteor: str) -> dict[str, float]:
  """The caption metrics of `captions` against their images' references."""
  missing = set(captions) - set(references)
  if missing:
    raise UserError(f'{len(missing)} decoded image ids have no references, '
                    f'e.g. {sorted(missing)[:3]}')
  return metrics_lib.score({i: references[i] for i in captions}, captions,
                           meteor=meteor)


def on_chief(fn: Callable[[], Any]) -> Any:
  """`fn()` run by process 0 only (scoring: METEOR starts Java, CIDEr
  counts n-grams; once is enough), its JSON-able result sent to all.

  A UserError of `fn` is raised on every process, so that none waits
  forever for a result that will not come.
  """
  if jax.process_count() == 1:
    return fn()
  if jax.process_index() == 0:
    try:
      payload = {'value': fn()}
    except UserError as e:
      payload = {'error': str(e)}
  else:
    payload = {}
  data = json.dumps(payload).encode() if payload else b''
  size = multihost_utils.broadcast_one_to_all(np.int64(len(data))).item()
  buffer = np.zeros(size, np.uint8)  # Process 0's fills it; the others' not.
  buffer[:len(data)] = np.frombuffer(data, np.uint8)
  buffer = multihost_utils.broadcast_one_to_all(buffer)
  payload = json.loads(np.asarray(buffer).tobytes().decode())
  if 'error' in payload:
    raise UserError(payload['error'])
  return payload['value']


def write_json(path: str, value: Any) -> None:
  """Writes whole, then renames: a reader never sees half a file."""
  files.write_text(path, json.dumps(value, indent=1))
