"""capjax's entry point: flags -> the job the `--mode` names.

    python -m capjax.main --config=configs/shapes.py --workdir=runs/shapes
"""

import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from capjax.errors import UserError

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    'config', None, 'Config file, e.g. configs/shapes.py.', lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for vocabulary, checkpoints, '
                    'logs and results.')
flags.DEFINE_enum('mode', 'train', ['train', 'prepare'],
                  'train: the main job. prepare: only build the dataset and '
                  'vocabulary (e.g. download COCO once).')
flags.mark_flags_as_required(['config', 'workdir'])


def run(config, workdir: str, mode: str) -> None:
  from capjax.data import prepare  # pylint: disable=g-import-not-at-top
  data = prepare.prepare(config, workdir, force=mode == 'prepare')
  if mode == 'train':
    from capjax.data import pipeline  # pylint: disable=g-import-not-at-top
    source = data.builder.as_data_source(config.data.train_split)
    batch = next(iter(pipeline.train_dataset(config, source, data.vocab)))
    logging.info('First training batch: %s', {
        k: (v.shape, v.dtype.name) for k, v in batch.items()})
    logging.info('Dataset and vocabulary are ready in %s; training arrives '
                 'with the model and the train step.', workdir)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing, with config-override mistakes as one line, not a trace."""
  try:
    return FLAGS(argv)
  except flags.Error as e:
    sys.exit(f'capjax: error: {e}')
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    # ml_collections wraps the message of a misspelt field in a repr.
    message = str(e).strip('\'"').replace('\\n', ' ').replace("\\'", "'")
    sys.exit(f'capjax: error: bad --config override: {message}')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  logging.info('JAX process %d of %d; local devices: %s', jax.process_index(),
               jax.process_count(), jax.local_devices())
  try:
    run(FLAGS.config, FLAGS.workdir, FLAGS.mode)
  except UserError as e:
    sys.exit(f'capjax: error: {e}')


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
