"""What a workdir holds, and the one place that knows where.

  WORKDIR/
    config.json    the config the model was trained with (`write_config`)
    vocab.json     the vocabulary: token ids for the life of the workdir
    concepts.json  what the concept head predicts, if the model has one
                   (`capjax.concepts`)
    checkpoints/   orbax steps: state, data position, model metadata
    decode/        the decode job's results, metrics and TensorBoard logs
    train.lock     held by the one trainer (`lock`)

Training writes it; the decode jobs, `capjax.inference` and the benchmark
read it back with `load_config`, `load_vocab` and `restore_trained`, whose
errors say how to train a model when something is missing.

Two trainers on one workdir would restore the same checkpoint and race to
write the same steps. Process 0 of a training job therefore holds an
exclusive lock on `WORKDIR/train.lock` while it runs: an OS file lock
(`fcntl.flock`), which the kernel releases however the process ends, even
by `kill -9`, so a lock can never be left stale. The file also names its
holder (host, pid), for the message a second trainer gets, and for the
warning when a trainer takes over from one that died without cleaning up.
"""

import contextlib
import fcntl
import json
import os
import socket
from collections.abc import Iterator
from typing import Any

from absl import logging
import jax
import ml_collections

from capjax import checkpoint as checkpoint_lib
from capjax import config as config_lib
from capjax import files
from capjax import state as state_lib
from capjax.data import vocab as vocab_lib
from capjax.errors import UserError

CONFIG = 'config.json'
CHECKPOINTS = 'checkpoints'
DECODE = 'decode'
LOCK = 'train.lock'


# ----------------------------------------------------------------------------
# Paths.
# ----------------------------------------------------------------------------


def config_path(workdir: str) -> str:
  return os.path.join(workdir, CONFIG)


def vocab_path(workdir: str) -> str:
  return os.path.join(workdir, vocab_lib.FILENAME)


def checkpoints_dir(workdir: str) -> str:
  # Absolute: orbax rejects relative checkpoint directories.
  return os.path.join(os.path.abspath(workdir), CHECKPOINTS)


def decode_dir(workdir: str) -> str:
  """Where the decode job writes its files and its TensorBoard logs."""
  return os.path.join(workdir, DECODE)


def decode_results_path(workdir: str, split: str, step: int,
                        search: str) -> str:
  """The captions of `split` at `step`, in the COCO results format.

  `search` names the settings that change the captions (`SearchOptions.tag`,
  e.g. 'beam3'): results of other settings never replace each other.
  """
  return os.path.join(decode_dir(workdir),
                      f'{split}_step{step}_{search}.json')


def decode_metrics_path(workdir: str, split: str, step: int,
                        search: str) -> str:
  """The metrics of those captions; its existence marks the step decoded."""
  return os.path.join(decode_dir(workdir),
                      f'{split}_step{step}_{search}_metrics.json')


# ----------------------------------------------------------------------------
# Reading a trained model back.
# ----------------------------------------------------------------------------


def _hint(workdir: str) -> str:
  return ('train one first: python -m capjax.main --config=configs/shapes.py '
          f'--workdir={workdir}')


def _check_exists(workdir: str) -> None:
  if not os.path.isdir(workdir):
    raise UserError(f'--workdir={workdir} does not exist; {_hint(workdir)}')


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Writes `config` as the workdir's config.json, on process 0 only.

  It is what rebuilds the model and its inputs later, without the config
  file or the flags training was started with.
  """
  if jax.process_index() != 0:
    return
  os.makedirs(workdir, exist_ok=True)
  # The first write of a (re)started job: what a killed one left goes.
  files.remove_leftovers(workdir)
  # Written whole, then renamed: a job reading it meanwhile (a captioner
  # beside a resumed trainer) never sees half a file.
  files.write_text(config_path(workdir), config.to_json_best_effort(indent=1))


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config the workdir's model was trained with."""
  _check_exists(workdir)
  path = config_path(workdir)
  if not os.path.exists(path):
    raise UserError(f'{workdir} has no {CONFIG}; {_hint(workdir)}')
  try:
    with open(path) as f:
      saved = json.load(f)
  except (OSError, ValueError) as e:
    raise UserError(f'cannot read {path}: {e}') from None
  # Onto today's defaults: a workdir from an older capjax lacks newer fields.
  config = config_lib.defaults()
  config.update(saved)
  return config


def load_vocab(workdir: str) -> vocab_lib.Vocab:
  """The vocabulary the workdir's model was trained with."""
  _check_exists(workdir)
  path = vocab_path(workdir)
  if not os.path.exists(path):
    raise UserError(f'{workdir} has no {vocab_lib.FILENAME}; '
                    f'{_hint(workdir)}')
  return vocab_lib.Vocab.load(path)


def restore_trained(workdir: str, config: ml_collections.ConfigDict,
                    vocab: vocab_lib.Vocab, predict: Any,
                    sharding: jax.sharding.Sharding | None = None,
                    step: int | None = None,
                    step_flag: str = '--config.decode.checkpoint_step'
                    ) -> tuple[state_lib.TrainState, int]:
  """(state, step) of the workdir's checkpoint `step`, or of its latest.

  Only the state is read (the data position belongs to training), placed by
  `sharding`: by default on the first local device. A checkpoint of another
  model or vocabulary than `config.model` and `vocab` is an error; a damaged
  one a `checkpoint.DamagedCheckpoint` naming `step_flag`, the caller's
  option that picks another step. `predict` is the model's
  `models.Predict`.
  """
  _check_exists(workdir)
  directory = checkpoints_dir(workdir)
  if not os.path.isdir(directory):
    raise UserError(f'{workdir} has no {CHECKPOINTS}/; {_hint(workdir)}')
  if sharding is None:
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  checkpoints = checkpoint_lib.Checkpoints(directory, config, create=False)
  try:
    return checkpoints.restore_state(
        state_lib.abstract(config, predict, sharding),
        checkpoint_lib.meta(config, vocab), step, step_flag)
  finally:
    checkpoints.close()


# ----------------------------------------------------------------------------
# The one-trainer lock.
# ----------------------------------------------------------------------------


def _holder_alive(holder: dict[str, Any]) -> bool:
  if holder.get('host') != socket.gethostname():
    return True  # Cannot tell; the OS lock has the last word anyway.
  try:
    os.kill(int(holder['pid']), 0)
  except (OSError, KeyError, ValueError):
    return False
  return True


@contextlib.contextmanager
def lock(workdir: str) -> Iterator[None]:
  """Holds the workdir's training lock, or raises a UserError naming its
  holder."""
  path = os.path.join(workdir, LOCK)
  f = open(path, 'a+')  # pylint: disable=consider-using-with
  try:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      f.seek(0)
      try:
        holder = json.loads(f.read())
      except ValueError:
        holder = {}
      raise UserError(
          f'{workdir} is being trained by another job (pid '
          f'{holder.get("pid", "?")} on {holder.get("host", "?")}); wait for '
          'it to end or stop it, or use another --workdir') from None
    f.seek(0)
    try:
      previous = json.loads(f.read() or 'null')
    except ValueError:
      previous = None
    if previous and not _holder_alive(previous):
      logging.warning('%s: taking over from pid %s on %s, which ended '
                      'without releasing it.', path, previous.get('pid'),
                      previous.get('host'))
    f.seek(0)
    f.truncate()
    f.write(json.dumps({'host': socket.gethostname(), 'pid': os.getpid()}))
    f.flush()
    try:
      yield
    finally:
      f.seek(0)
      f.truncate()  # Released cleanly: nothing to take over.
      f.flush()
      fcntl.flock(f, fcntl.LOCK_UN)
  finally:
    f.close()
