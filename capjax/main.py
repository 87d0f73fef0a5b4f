"""capjax's entry point: flags -> the job the `--mode` names.

    python -m capjax.main --config=configs/shapes.py --workdir=runs/shapes
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from capjax import cli
from capjax import config as config_lib
from capjax import distributed
from capjax.errors import UserError

FLAGS = flags.FLAGS
CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file, e.g. configs/shapes.py.', lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for vocabulary, checkpoints, '
                    'logs and results.')
flags.DEFINE_enum(
    'mode', 'train',
    ['train', 'decode', 'evaluate_continuously', 'prepare', 'cache_features'],
    'train: the main job. decode: caption and score --config.decode.split '
    'with a checkpoint of --workdir. evaluate_continuously: decode each new '
    'checkpoint as a training job writes it. prepare: only build the dataset '
    'and vocabulary, and fetch the encoder\'s pretrained weights (e.g. '
    'download COCO and ImageNet weights once). cache_features: run the '
    'frozen encoder once over every split the run reads and store the '
    'features (see --config.data.features).')
flags.DEFINE_string('coordinator_address', None, 'Multi-process jobs: '
                    'host:port of process 0 (see capjax/distributed.py for '
                    'what is detected without it).')
flags.DEFINE_integer('num_processes', None, 'Multi-process jobs: how many.')
flags.DEFINE_integer('process_id', None, 'Multi-process jobs: this one, '
                     '0..num_processes-1.')
flags.mark_flags_as_required(['config', 'workdir'])


def run(config, workdir: str, mode: str) -> None:
  # The jobs load here, once the flags and the config have been checked: a
  # mistake in them is answered in 0.6 s, not after the 3.4 s that importing
  # TFDS, grain and the rest takes (2-core CPU).
  # pylint: disable=g-import-not-at-top
  from capjax import cache_features
  from capjax import checkpoint
  from capjax import evaluate
  from capjax import pretrained
  from capjax import train
  from capjax.data import prepare
  # pylint: enable=g-import-not-at-top
  checkpoint.quiet_reported_failures()
  if mode == 'prepare':
    prepare.prepare(config, workdir, force=True)
    # The encoder's weights too, so that training needs no internet.
    weights = pretrained.fetch_encoder_weights(config)
    if weights:
      logging.info('Encoder weights %s: ready.', weights)
  elif mode == 'train':
    train.train_and_evaluate(config, workdir)
  elif mode == 'decode':
    evaluate.decode_checkpoint(config, workdir)
  elif mode == 'evaluate_continuously':
    evaluate.evaluate_continuously(config, workdir)
  elif mode == 'cache_features':
    cache_features.run(config, workdir)


def main(argv):
  logging.get_absl_handler().addFilter(cli.QuietLibraries())
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  try:
    distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes,
                           FLAGS.process_id, os.environ)
    logging.info('JAX process %d of %d; local devices: %s',
                 jax.process_index(), jax.process_count(),
                 jax.local_devices())
    config = cli.load_config(CONFIG)
    config_lib.check(config)
    run(config, FLAGS.workdir, FLAGS.mode)
  except UserError as e:
    sys.exit(f'capjax: error: {e}')


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
