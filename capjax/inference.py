"""Captioning images with a trained model: the library behind capjax.caption.

    from capjax import Captioner
    captioner = Captioner.from_workdir('runs/shapes')
    for result in captioner.caption(['cat.jpg', pixels]):
      print(result.caption)

The model, its vocabulary and its input settings come from a training
workdir (`capjax.workdir`: config.json, vocab.json, checkpoints/), and are
loaded once. Images go through the training job's own preprocessing
(`images.resize`; the model normalises) after `images.load_rgb`, which turns
any file a user may have into upright RGB pixels or one `ImageError`,
decoding JPEGs at reduced scale where the model input allows. Files are read
by a thread pool while the accelerator captions the batch before, and every
batch has the same shape, so the search compiles once.

Nothing here reads a dataset: captioning needs neither grain nor TensorFlow
(Datasets), only what the model and the checkpoints need.
"""

from collections.abc import Iterable, Iterator, Sequence
import concurrent.futures
import dataclasses
import functools
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import PIL.Image

from capjax import concepts as concepts_lib
from capjax import constrained
from capjax import decode
from capjax import models
from capjax import workdir as workdir_lib
from capjax.data import images as images_lib
from capjax.data import vocab as vocab_lib
from capjax.errors import UserError

# What a folder is searched for (recursively); a file named explicitly is
# read whatever its extension.
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.webp', '.bmp', '.gif')
# Longest side images are decoded at (larger ones are shrunk on reading, so
# memory stays bounded), and the size reports show them at.
MAX_DECODE_SIZE = 1024
REPORT_SIZE = 320

Image = str | os.PathLike[str] | np.ndarray  # A path, or uint8 [H, W, 3].


@dataclasses.dataclass
class Result:
  """The captions of one image, or why it has none."""
  path: str
  caption: str | None = None
  score: float | None = None  # Log-probability / length penalty.
  alternatives: list[dict[str, Any]] = dataclasses.field(default_factory=list)
  error: str | None = None
  # With phrases to include, or concepts: whether `caption` contains all of
  # them (False when no caption that does fitted in max_len).
  satisfied: bool | None = None
  # With use_concepts: the concepts the head found ('red square', ...).
  concepts: list[str] | None = None
  # The attention of each word of `caption`, and of its <eos> unless it
  # reached max_len: [len(words) (+ 1), g, g].
  attention: np.ndarray | None = None
  # The image as decoded, at most REPORT_SIZE px, for reports (keep_pixels).
  pixels: np.ndarray | None = None

  @property
  def words(self) -> list[str]:
    return self.caption.split() if self.caption else []

  def to_json(self) -> dict[str, Any]:
    """The JSON line of this image: {"path", "caption", "score",
    "alternatives": [{"caption", "score"}, ...]} or {"path", "error"}."""
    if self.error is not None:
      return {'path': self.path, 'error': self.error}
    out = {'path': self.path, 'caption': self.caption,
           'score': round(self.score, 4), 'alternatives': self.alternatives}
    if self.concepts is not None:
      out['concepts'] = self.concepts
    if self.satisfied is not None:
      out['satisfied'] = self.satisfied
    return out


def find_images(paths: Iterable[str]) -> list[str]:
  """Files named and image files under folders named, in order, sorted
  within each folder. A path that does not exist is kept: it becomes an
  error result."""
  out = []
  for path in paths:
    if os.path.isdir(path):
      found = []
      for root, dirs, files in os.walk(path):
        dirs.sort()
        found += [os.path.join(root, f) for f in sorted(files)
                  if f.lower().endswith(IMAGE_EXTENSIONS)]
      out += found
    else:
      out.append(path)
  return out


def _load(item: Image, index: int,
          min_size: int | None = None) -> tuple[str, np.ndarray]:
  """(name, uint8 [H, W, 3]) of a path or an array; raises ImageError.

  A JPEG may be decoded at reduced scale, down to `min_size` a side.
  """
  if not isinstance(item, np.ndarray):
    name = os.fspath(item)
    return name, images_lib.load_rgb(name, max_size=MAX_DECODE_SIZE,
                                     min_size=min_size)
  name = f'<array {index}>'
  if item.ndim == 3 and item.shape[-1] == 1:
    item = item[..., 0]
  if item.dtype != np.uint8 or not (
      item.ndim == 2 or (item.ndim == 3 and item.shape[-1] in (3, 4))):
    raise images_lib.ImageError(
        name, f'expected uint8 [H, W, 3], got {item.dtype} {item.shape}')
  # Grey and RGBA arrays as image files of those modes would be.
  return name, np.asarray(images_lib.to_rgb(PIL.Image.fromarray(item)))


def _thumbnail(pixels: np.ndarray) -> np.ndarray:
  image = PIL.Image.fromarray(pixels)
  image.thumbnail((REPORT_SIZE, REPORT_SIZE))
  return np.asarray(image)


def _concept_search(predict, phrase_table, threshold, variables, images, *,
                    mask, **options):
  """`constrained.concept_beam_search` of images [B, S, S, 3]."""
  return constrained.concept_beam_search(
      predict, variables, {'image': images}, phrase_table, threshold=threshold,
      mask=mask, **options)


class Trained(NamedTuple):
  """A workdir's model, ready to apply."""
  config: ml_collections.ConfigDict
  vocab: vocab_lib.Vocab
  variables: Any  # {'params', 'batch_stats'}
  step: int
  # What its concept head predicts (config.model.concepts.head), else None.
  concepts: concepts_lib.Concepts | None = None


def load_trained(workdir: str, step: int | None = None) -> Trained:
  """The workdir's checkpoint `step` (default: the latest), on the first
  local device."""
  config = workdir_lib.load_config(workdir)
  vocab = workdir_lib.load_vocab(workdir)
  concepts = (concepts_lib.load(workdir) if config.model.concepts.head
              else None)
  predict = models.Predict(models.build_captioner(
      config.model, len(vocab), config.data.normalization,
      concepts.sizes if concepts else (0, 0), max_len=config.data.max_len))
  # A damaged step's error names the caption CLI's option for another.
  state, step = workdir_lib.restore_trained(workdir, config, vocab, predict,
                                            step=step, step_flag='--step')
  variables = state.variables()
  return Trained(config, vocab, variables, step, concepts)


class Captioner:
  """A trained captioner, loaded once; `caption` takes paths or pixels.

  `include`: phrases every caption must contain, each a phrase ("a red
  square") or a list of alternatives (["red square", "red box"]); at most
  `constrained.MAX_CONSTRAINTS`. The search is then the constrained beam
  search (`capjax.constrained`), 2^len(include) times the work.

  `use_concepts`: each caption must instead name the concepts that the
  model's concept head finds in its image with a probability over
  `concept_threshold` (`concepts`: the workdir's); 2^MAX_CONSTRAINTS times
  the work.
  """

  def __init__(self, config: ml_collections.ConfigDict, vocab: vocab_lib.Vocab,
               variables: Any, *, step: int | None = None, beam_size: int = 5,
               max_len: int | None = None, alpha: float = 0.0,
               batch_size: int = 16, read_threads: int = 8,
               include: Sequence[str | Sequence[str]] = (),
               concepts: concepts_lib.Concepts | None = None,
               use_concepts: bool = False, concept_threshold: float = 0.5):
    if beam_size < 1 or batch_size < 1:
      raise UserError('beam_size and batch_size must be >= 1')
    self.config = config
    self.vocab = vocab
    self.variables = variables
    self.step = step
    self.beam_size = beam_size
    self.batch_size = batch_size
    self.max_len = max_len or config.data.max_len
    if self.max_len < 2:
      raise UserError(f'max_len={self.max_len} must be >= 2')
    self._read_threads = read_threads
    if (self.max_len > config.data.max_len and
        config.model.decoder.get('name') == 'transformer'):
      raise UserError(f'max_len={self.max_len} is longer than the '
                      f'{config.data.max_len} positions the transformer '
                      'decoder was trained with')
    predict = models.Predict(models.build_captioner(
        config.model, len(vocab), config.data.normalization,
        concepts.sizes if concepts else (0, 0), max_len=config.data.max_len))
    options = dict(beam_size=beam_size, max_len=self.max_len, alpha=alpha,
                   num_return=beam_size, ban_unk=True)
    self._phrases = None
    self._concepts = None
    if use_concepts:
      if include:
        raise UserError('captions may include given phrases or the concept '
                        'head\'s concepts, not both')
      if not predict.has_concepts:
        raise UserError('this captioner has no concept head: train it with '
                        '--config.model.concepts.head=True')
      if not 0 < concept_threshold < 1:
        raise UserError(f'concept_threshold={concept_threshold} must be in '
                        '(0, 1)')
      self._concepts = concepts
      self._search = jax.jit(functools.partial(
          _concept_search, predict, jnp.asarray(concepts_lib.phrase_table(
              concepts, vocab)), concept_threshold, **options))
    elif include:
      try:
        # The same phrases for every image of a batch.
        self._phrases = jnp.asarray(constrained.encode_constraints(
            vocab, [list(include)] * batch_size))
      except ValueError as e:
        raise UserError(f'cannot include {list(include)}: {e}') from None
      self._search = jax.jit(functools.partial(
          constrained.constrained_beam_search, predict, **options))
    else:
      self._search = jax.jit(functools.partial(decode.beam_search, predict,
                                               **options))

  @classmethod
  def from_workdir(cls, workdir: str, step: int | None = None,
                   **options) -> 'Captioner':
    """The model of a training workdir: its latest checkpoint, or `step`.

    Options are those of `Captioner` (beam_size, max_len, batch_size, ...).
    """
    trained = load_trained(workdir, step)
    return cls(trained.config, trained.vocab, trained.variables,
               step=trained.step, concepts=trained.concepts, **options)

  def caption(self, items: Sequence[Image], *, attention: bool = False,
              keep_pixels: bool = False) -> list[Result]:
    """One `Result` per item (a path or uint8 pixels), in order."""
    return list(self.caption_iter(items, attention=attention,
                                  keep_pixels=keep_pixels))

  def caption_iter(self, items: Sequence[Image], *, attention: bool = False,
                   keep_pixels: bool = False) -> Iterator[Result]:
    """Like `caption`, yielding each result as soon as its batch is done."""
    batches = [range(i, min(i + self.batch_size, len(items)))
               for i in range(0, len(items), self.batch_size)]
    with concurrent.futures.ThreadPoolExecutor(self._read_threads) as pool:
      read = lambda batch: [pool.submit(self._read, items[i], i)
                            for i in batch]
      pending = read(batches[0]) if batches else []
      for n in range(len(batches)):
        loaded = [f.result() for f in pending]
        # The next batch is read while this one is captioned.
        pending = read(batches[n + 1]) if n + 1 < len(batches) else []
        yield from self._caption_batch(loaded, attention, keep_pixels)

  def _read(self, item: Image, index: int):
    """(name, model input or None, pixels or None, error or None)."""
    size = self.config.data.image_size
    try:
      # Decoded no larger than the model input and the report need.
      name, pixels = _load(item, index, max(size, REPORT_SIZE))
    except images_lib.ImageError as e:
      return e.path, None, None, e.reason
    model_input = images_lib.resize(pixels, size)
    return name, model_input, pixels, None

  def _caption_batch(self, loaded, attention: bool,
                     keep_pixels: bool) -> list[Result]:
    size = self.config.data.image_size
    batch = np.zeros((self.batch_size, size, size, 3), np.uint8)
    mask = np.zeros((self.batch_size,), bool)
    for i, (_, model_input, _, _) in enumerate(loaded):
      if model_input is not None:
        batch[i], mask[i] = model_input, True
    out = None
    if mask.any():
      # A fixed batch shape (padding rows masked): one compilation.
      phrases = () if self._phrases is None else (self._phrases,)
      out = jax.device_get(self._search(self.variables, jnp.asarray(batch),
                                        *phrases, mask=jnp.asarray(mask)))
      if self._concepts is not None:
        out, concept_ids = out  # [B, C]
    results = []
    for i, (name, _, pixels, error) in enumerate(loaded):
      if error is not None:
        results.append(Result(path=name, error=error))
        continue
      captions = [self.vocab.decode(t) for t in out.tokens[i]]
      scores = [float(s) for s in out.scores[i]]
      result = Result(
          path=name, caption=captions[0], score=scores[0],
          alternatives=[{'caption': c, 'score': round(s, 4)}
                        for c, s in zip(captions[1:], scores[1:])
                        if s > decode.NEG_INF / 2])
      if self._concepts is not None:
        result.concepts = [self._concepts.name(c) for c in concept_ids[i]
                           if c >= 0]
      if self._phrases is not None or self._concepts is not None:
        result.satisfied = bool(out.satisfied[i, 0])
      if attention:
        # The words and <eos> (none if the caption reached max_len).
        alphas = out.alphas[i, :len(result.words) + 1]  # [steps, P]
        grid = int(round(np.sqrt(alphas.shape[-1])))
        result.attention = alphas.reshape(-1, grid, grid)
      if keep_pixels:
        result.pixels = _thumbnail(pixels)
      results.append(result)
    return results
