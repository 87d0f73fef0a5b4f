"""capjax's entry point: flags -> the job the `--mode` names.

    python -m capjax.main --config=configs/shapes.py --workdir=runs/shapes

SIGINT and SIGTERM outside the training loop end the job with one line and
the status 128 + the signal (see capjax/stopping.py); in a multi-process
job, the others stop with it, and a process that is gone stops the others
with one line and the status 1 (`distributed.PeerWatch`).
"""

# pylint: disable=g-import-not-at-top,wrong-import-position
from capjax import garbage
from capjax import stopping

if __name__ == '__main__':
  garbage.collect_rarely()  # Before the imports below (capjax/garbage.py).
  # First, before the 2 s of imports below: a signal meanwhile ends the job
  # at once (nothing is written yet), not with a traceback through whichever
  # module was loading.
  _GUARD = stopping.Guard(
      at_once_line='capjax: stopped by {signal} while starting; nothing was '
      'written')
else:
  _GUARD = None

import functools
import os
import signal
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
# pylint: enable=g-import-not-at-top,wrong-import-position

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


# What each job was doing when a signal stopped it outside the training loop
# (which stops at a step of its own, and the end-of-run evaluators, which
# say what they did themselves).
_DURING = {
    'train': 'during start-up', 'decode': 'during the decode',
    'evaluate_continuously': 'while evaluating checkpoints',
    'prepare': 'while preparing the data',
    'cache_features': 'while caching features',
}


def _last_checkpoint(workdir: str) -> str:
  """'; the last checkpoint is step N (...)', or that there is none."""
  # Loaded by the training job by now; never imported here, as this may run
  # in a thread of the peer watch while the main thread imports.
  workdir_lib = sys.modules.get('capjax.workdir')
  if workdir_lib is None:
    return ''
  try:
    names = os.listdir(workdir_lib.checkpoints_dir(workdir))
  except OSError:
    names = []
  # orbax names a step's folder by its number once the step is complete.
  steps = [int(n) for n in names if n.isdigit()]
  if not steps:
    return '; no checkpoint was written yet'
  return (f'; the last checkpoint is step {max(steps)} (the same command '
          'resumes from it)')


def _stopped_line(e: stopping.Stopped, workdir: str, mode: str) -> str:
  if e.message:
    return f'capjax: {e.message}'
  line = (f'capjax: stopped by {e.signal} {_DURING[mode]}; nothing was '
          'written half-way')
  if mode == 'train':
    line += _last_checkpoint(workdir)
  elif mode == 'cache_features':
    line += ' (the same command goes on from the shards written)'
  return line


def _peer_ended(workdir: str, mode: str, text: str, code: int) -> None:
  """What the peer watch calls, from its thread, when another process of
  the job is gone or stopped: this one stops too, now. Its main thread is
  likely blocked in a collective that will never return, so there is
  nothing to unwind: a temporary file it was writing is removed by the next
  run that writes there."""
  line = f'capjax: {text}; stopping process {jax.process_index()} too'
  if mode == 'train':
    line += _last_checkpoint(workdir)
  stopping.exit_now(line, code)


def main(argv):
  logging.get_absl_handler().addFilter(cli.QuietLibraries())
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  guard = _GUARD or stopping.Guard()
  guard.at_once_line = None  # From here on a stop unwinds: see stopping.py.
  watch = None
  try:
    distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes,
                           FLAGS.process_id, os.environ)
    watch = distributed.watch_peers(
        functools.partial(_peer_ended, FLAGS.workdir, FLAGS.mode))
    if FLAGS.mode != 'train':
      # JAX's preemption notifier took SIGTERM in `initialize`, for the
      # training loop to stop at a step that every process agrees on; the
      # other jobs have no such step, and stop at once.
      guard.take_back(signal.SIGTERM)
    logging.info('JAX process %d of %d; local devices: %s',
                 jax.process_index(), jax.process_count(),
                 jax.local_devices())
    config = cli.load_config(CONFIG)
    config_lib.check(config)
    run(config, FLAGS.workdir, FLAGS.mode)
    guard.finished()
  except (UserError, KeyboardInterrupt) as e:
    if guard.received is not None and not isinstance(e, stopping.Stopped):
      # What a library made of the guard's `Stopped` (see stopping.py).
      e = guard.stopped()
    if isinstance(e, UserError):
      if watch:
        watch.close()
      sys.exit(f'capjax: error: {e}')
    if not isinstance(e, stopping.Stopped):
      raise
    if watch and e.everywhere:
      watch.close()
    elif watch:
      watch.stopped(f'{e.signal} {_DURING[FLAGS.mode]}', e.code)
    stopping.exit_now(_stopped_line(e, FLAGS.workdir, FLAGS.mode), e.code)
  if watch:
    watch.close()


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
