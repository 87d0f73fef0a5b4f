"""What every job needs before it starts: the dataset and the vocabulary."""

import dataclasses
import os

from absl import logging
import jax
import ml_collections
import tensorflow_datasets as tfds

from capjax.data import datasets
from capjax.data import vocab as vocab_lib
from capjax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Data:
  builder: tfds.core.DatasetBuilder
  vocab: vocab_lib.Vocab


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
  builder = datasets.prepare(d, force=force)
  for split in (d.train_split, d.eval_split):
    datasets.check_split(builder, split)
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
  return Data(builder, vocab)
