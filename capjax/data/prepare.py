"""What every job needs before it starts: the dataset, its copy at the
training resolution, and the vocabulary."""

from collections.abc import Sequence
import dataclasses
import os
import time

from absl import logging
import jax
import ml_collections
import tensorflow_datasets as tfds

from capjax import files
from capjax.data import datasets
from capjax.data import feature_cache
from capjax.data import resized
from capjax.data import vocab as vocab_lib
from capjax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Data:
  """The prepared dataset, its vocabulary, and where its images come from."""
  builder: tfds.core.DatasetBuilder
  vocab: vocab_lib.Vocab
  config: ml_collections.ConfigDict  # config.data
  # Set by `capjax.cache_features.attach`: read the encoder's stored
  # features instead of images.
  features: feature_cache.Cache | None = None

  def source(self, split: str) -> Sequence[dict]:
    """Random-access examples of `split` (a TFDS split spec) for the pipeline.

    From the feature cache when `features` is set. Else with `resized_copy`
    (the default), from the copy at `image_size`, made on first use when the
    dataset may be prepared automatically; otherwise from the original
    files, images left encoded for `pipeline.Preprocess` to decode at
    reduced scale.
    """
    d = self.config
    if self.features:
      datasets.check_split(self.builder, split)
      absent = self.features.missing(datasets.split_names(split))
      if damage := absent and self.features.damaged(absent):
        raise UserError(
            f'the feature cache {self.features.folder} has no features of '
            f'{", ".join(absent)} that read as written: {damage}. Make them '
            'again with --mode=cache_features (or set '
            '--config.data.prepare=True to make them when needed)')
      if absent:
        raise UserError(
            f'the feature cache {self.features.folder} has no features of '
            f'{", ".join(absent)}: make them with --mode=cache_features (or '
            'set --config.data.prepare=True to make them when needed)')
      return self.features.source(split)
    if not d.resized_copy:
      return datasets.data_source(
          self.builder, split, decoders={'image': tfds.decode.SkipDecoding()})
    datasets.check_split(self.builder, split)
    names = datasets.split_names(split)
    if resized.missing(self.builder, names, d.image_size):
      if not d.prepare:
        if damage := resized.damaged(self.builder, names, d.image_size):
          raise UserError(
              f'the copy of {d.name} at {d.image_size} px is damaged: '
              f'{damage}. Make it again with --mode=prepare (or set '
              '--config.data.prepare=True to make it now)')
        raise UserError(
            f'{d.name} has no copy of {split} at {d.image_size} px in '
            f'{resized.directory(self.builder, d.image_size)}: make it once '
            f'with --mode=prepare (or set --config.data.prepare=True to make '
            'it now)')
      build_copy(self.builder, names, d.image_size)
    return resized.source(self.builder, split, d.image_size)

  def references(self, split: str) -> dict[int, list[str]]:
    """Every caption of every image of `split`, by image id."""
    return datasets.references(self.builder, split)

  def objects(self, split: str
              ) -> tuple[str, dict[int, list], list[str]] | None:
    """The annotated objects of every image of `split` (`datasets.objects`)."""
    return datasets.objects(self.builder, split)


def build_copy(builder: tfds.core.DatasetBuilder, splits: Sequence[str],
               image_size: int) -> None:
  """Process 0 copies `splits` at `image_size`; the others wait for it."""
  if jax.process_index() == 0:
    # Read-only data dir, disk full, ...: complete shards stay, and a later
    # run resumes from them.
    with files.reporting(
        resized.directory(builder, image_size), f'the copy at {image_size} px',
        instead='read the originals with --config.data.resized_copy=False'):
      resized.build(builder, splits, image_size)
    return
  deadline = time.monotonic() + datasets.PREPARE_WAIT_SECONDS
  while resized.missing(builder, splits, image_size):
    if time.monotonic() > deadline:
      raise UserError(
          f'process {jax.process_index()} waited for process 0 to copy '
          f'{", ".join(splits)} to {resized.directory(builder, image_size)};'
          ' the TFDS data dir must be shared by all processes')
    time.sleep(5)


def check_workdir(workdir: str) -> None:
  """Creates `workdir` if needed; it must be writable."""
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise UserError(f'cannot create --workdir={workdir}: {e.strerror}') from None
  if not os.access(workdir, os.W_OK | os.X_OK):
    raise UserError(f'--workdir={workdir} is not writable; choose another')


def prepare(config: ml_collections.ConfigDict, workdir: str,
            force: bool = False) -> Data:
  """The prepared dataset and the workdir's vocabulary (built on first use).

  `force` prepares a missing dataset even when `config.data.prepare` is off
  (the `--mode=prepare` job).
  """
  check_workdir(workdir)
  d = config.data
  if d.image_size < 1:
    raise UserError(f'--config.data.image_size={d.image_size} must be a '
                    'positive number of pixels')
  builder = datasets.prepare(d, force=force)
  # The splits the job reads: a misspelt one fails now, not hours in.
  used = [d.train_split] + [e.split for e in config.evals.values()
                            if e.every_steps >= 0]
  for split in used:
    datasets.check_split(builder, split)
  if force and d.resized_copy:
    # --mode=prepare: every split, so that later jobs never wait for one.
    splits = list(builder.info.splits) or [
        n for s in used for n in datasets.split_names(s)]
    build_copy(builder, splits, d.image_size)
  path = os.path.join(workdir, vocab_lib.FILENAME)
  if not os.path.exists(path):
    logging.info('Building the vocabulary from %s %s.', d.name, d.train_split)
  vocab = vocab_lib.load_or_build(
      path, lambda: datasets.iter_captions(builder, d.train_split),
      d.min_count,
      source=dict(dataset=d.name, builder_config=d.builder_config,
                  split=d.train_split),
      write=jax.process_index() == 0)
  logging.info('Vocabulary: %d words (%s).', len(vocab), path)
  return Data(builder, vocab, d)
