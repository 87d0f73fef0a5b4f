"""Caption your own images, from the command line or a notebook.

    python -m capjax.caption --workdir=runs/shapes photos/ cat.jpg \\
        [--output=captions.jsonl] [--html=report.html --attention]

    from capjax import Captioner
    captioner = Captioner.from_workdir('runs/shapes')
    for result in captioner.caption(['cat.jpg', pixels]):
      print(result.caption)

The model, its vocabulary and its input settings come from a training
workdir (`config.json`, `vocab.json`, `checkpoints/`), and are loaded once.
Images go through the training job's own preprocessing (`images.resize`;
the model normalises) after `images.load_rgb`, which turns any file a user
may have into upright RGB pixels or one `ImageError`, decoding JPEGs at
reduced scale where the model input allows.
Files are read by a thread pool while the accelerator captions the batch
before, and every batch has the same shape, so the search compiles once.

Each input gives one JSON line: {"path", "caption", "score",
"alternatives": [{"caption", "score"}, ...]} or {"path", "error"}.
"""

from collections.abc import Iterable, Iterator, Sequence
import concurrent.futures
import dataclasses
import functools
import json
import os
import sys
from typing import Any

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import PIL.Image
import tqdm

from capjax import config as config_lib
from capjax import decode
from capjax import models
from capjax.data import images as images_lib
from capjax.data import vocab as vocab_lib
from capjax.errors import UserError

# What a folder is searched for (recursively); a file named explicitly is
# read whatever its extension.
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.webp', '.bmp', '.gif')
CONFIG_FILENAME = 'config.json'
# Longest side images are decoded at (larger ones are shrunk on reading, so
# memory stays bounded), and the size the report shows them at.
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
  # The attention of each word of `caption`, and of its <eos> unless it
  # reached max_len: [len(words) (+ 1), g, g].
  attention: np.ndarray | None = None
  # The image as decoded, at most REPORT_SIZE px, for reports (keep_pixels).
  pixels: np.ndarray | None = None

  @property
  def words(self) -> list[str]:
    return self.caption.split() if self.caption else []

  def to_json(self) -> dict[str, Any]:
    if self.error is not None:
      return {'path': self.path, 'error': self.error}
    return {'path': self.path, 'caption': self.caption,
            'score': round(self.score, 4), 'alternatives': self.alternatives}


def find_images(paths: Iterable[str]) -> list[str]:
  """Files named and image files under folders named, in order, sorted
  within each folder. A path that does not exist is kept: it becomes an
  error line."""
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


def load_trained(workdir: str, step: int | None = None):
  """(config, vocab, variables, step) of a training workdir's checkpoint:
  the latest, or `step`."""
  # pylint: disable=g-import-not-at-top
  from capjax import checkpoint as checkpoint_lib
  from capjax import train
  # pylint: enable=g-import-not-at-top
  hint = ('train one first: python -m capjax.main --config=configs/'
          f'shapes.py --workdir={workdir}')
  if not os.path.isdir(workdir):
    raise UserError(f'--workdir={workdir} does not exist; {hint}')
  config = load_config(workdir, hint)
  vocab_path = os.path.join(workdir, vocab_lib.FILENAME)
  if not os.path.exists(vocab_path):
    raise UserError(f'{workdir} has no {vocab_lib.FILENAME}; {hint}')
  vocab = vocab_lib.Vocab.load(vocab_path)
  model = models.build_captioner(config.model, len(vocab),
                                 config.data.normalization)
  checkpoints = checkpoint_lib.Checkpoints(
      os.path.join(os.path.abspath(workdir), 'checkpoints'), config,
      create=False)
  try:
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    state, step = checkpoints.restore_state(
        state_lib.abstract(config, model, device),
        checkpoint_lib.meta(config, vocab), step)
  finally:
    checkpoints.close()
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  return config, vocab, variables, step


class Captioner:
  """A trained captioner, loaded once; `caption` takes paths or pixels."""

  def __init__(self, config: ml_collections.ConfigDict, vocab: vocab_lib.Vocab,
               variables: Any, *, step: int | None = None, beam_size: int = 5,
               max_len: int | None = None, alpha: float = 0.0,
               batch_size: int = 16, read_threads: int = 8):
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
    model = models.build_captioner(config.model, len(vocab),
                                 config.data.normalization)
    self._search = jax.jit(functools.partial(
        decode.beam_search, model, beam_size=beam_size, max_len=self.max_len,
        alpha=alpha, num_return=beam_size, ban_unk=True))

  @classmethod
  def from_workdir(cls, workdir: str, step: int | None = None,
                   **options) -> 'Captioner':
    """The model of a training workdir: its latest checkpoint, or `step`.

    Options are those of `Captioner` (beam_size, max_len, batch_size, ...).
    """
    config, vocab, variables, step = load_trained(workdir, step)
    return cls(config, vocab, variables, step=step, **options)

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
      out = jax.device_get(self._search(self.variables, jnp.asarray(batch),
                                        mask=jnp.asarray(mask)))
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
      if attention:
        # The words and <eos> (none if the caption reached max_len).
        alphas = out.alphas[i, :len(result.words) + 1]  # [steps, P]
        grid = int(round(np.sqrt(alphas.shape[-1])))
        result.attention = alphas.reshape(-1, grid, grid)
      if keep_pixels:
        result.pixels = _thumbnail(pixels)
      results.append(result)
    return results


def load_config(workdir: str, hint: str = '') -> ml_collections.ConfigDict:
  """The config a workdir was trained with (written by the training job)."""
  path = os.path.join(workdir, CONFIG_FILENAME)
  if not os.path.exists(path):
    raise UserError(f'{workdir} has no {CONFIG_FILENAME}'
                    + (f'; {hint}' if hint else ''))
  with open(path) as f:
    saved = json.load(f)
  # Onto today's defaults: a workdir from an older capjax lacks newer fields.
  config = config_lib.defaults()
  config.update(saved)
  return config


# ----------------------------------------------------------------------------
# The command line.
# ----------------------------------------------------------------------------

FLAGS = flags.FLAGS


def _define_flags() -> None:
  # Only when run as the program: importing the API defines no flags.
  flags.DEFINE_string('workdir', None, 'A training workdir: its config.json, '
                      'vocab.json and checkpoints.')
  flags.DEFINE_integer('step', -1, 'The checkpoint to use; -1: the latest.')
  flags.DEFINE_integer('beam_size', 5, 'Beams per image; the other beams\' '
                       'captions are the alternatives. 1: greedy.')
  flags.DEFINE_integer('max_len', 0, 'Tokens per caption with <bos> and <eos>; '
                       '0: as in training.')
  flags.DEFINE_float('alpha', 0.0, 'Length penalty exponent (GNMT).')
  flags.DEFINE_integer('batch_size', 16, 'Images per batch on the device.')
  flags.DEFINE_string('output', None, 'JSON Lines file to write; default: '
                      'stdout.')
  flags.DEFINE_string('html', None, 'Also write this HTML report, with every '
                      'image embedded.')
  flags.DEFINE_bool('attention', False, 'In the HTML report, show where the '
                    'model looked for each word.')


USAGE_ERROR = 2  # Exit codes: 0 all captioned, 1 some failed, 2 bad usage.


def parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing, with flag mistakes as one line and exit code 2."""
  try:
    return FLAGS(argv)
  except flags.Error as e:
    print(f'capjax: error: {e}', file=sys.stderr)
    sys.exit(USAGE_ERROR)


def main(argv: list[str]) -> int:
  # A tool's output, not a job's log: library INFO lines would drown it.
  logging.set_verbosity(logging.WARNING)
  paths = argv[1:]
  try:
    if not FLAGS.workdir:
      raise UserError('--workdir is required: the training workdir whose '
                      'model captions the images')
    if not paths:
      raise UserError('give the images or folders to caption, e.g. '
                      'python -m capjax.caption --workdir=DIR photos/')
    if FLAGS.attention and not FLAGS.html:
      raise UserError('--attention draws heatmaps into the --html report; '
                      'give --html=FILE too')
    captioner = Captioner.from_workdir(
        FLAGS.workdir, None if FLAGS.step < 0 else FLAGS.step,
        beam_size=FLAGS.beam_size, max_len=FLAGS.max_len or None,
        alpha=FLAGS.alpha, batch_size=FLAGS.batch_size)
  except UserError as e:
    print(f'capjax: error: {e}', file=sys.stderr)
    return USAGE_ERROR
  items = find_images(paths)
  if not items:
    print(f'capjax: error: no image files ({", ".join(IMAGE_EXTENSIONS)}) in '
          f'{", ".join(paths)}', file=sys.stderr)
    return USAGE_ERROR
  out = open(FLAGS.output, 'w') if FLAGS.output else sys.stdout
  results, failed = [], 0
  # A progress bar for people watching a terminal, none in pipes and logs.
  with tqdm.tqdm(total=len(items), unit='image', file=sys.stderr,
                 disable=len(items) <= 8 or not sys.stderr.isatty()) as bar:
    for result in captioner.caption_iter(items, attention=FLAGS.attention,
                                         keep_pixels=bool(FLAGS.html)):
      out.write(json.dumps(result.to_json()) + '\n')
      out.flush()
      failed += result.error is not None
      if FLAGS.html:
        results.append(result)
      bar.update()
  if out is not sys.stdout:
    out.close()
  if FLAGS.html:
    from capjax import report  # pylint: disable=g-import-not-at-top
    report.write_html(results, FLAGS.html, attention=FLAGS.attention,
                      title=f'capjax captions: {FLAGS.workdir}, step '
                      f'{captioner.step}')
  print(f'{len(items) - failed} of {len(items)} images captioned'
        + (f', {failed} failed' if failed else ''), file=sys.stderr)
  return 1 if failed else 0


if __name__ == '__main__':
  _define_flags()
  app.run(main, flags_parser=parse_flags)
