"""Checkpoints: model state, data iterator and metadata in one orbax step.

Each step directory holds three items, written together (and atomically, by
orbax's finalisation) so that a resumed run continues exactly:

  state  the TrainState (params, batch_stats, opt_state, step)
  data   the grain iterator's position (one file per process)
  meta   the model config and vocabulary the state belongs to

The latest `train.keep_checkpoints` steps are kept, plus the best by
`train.best_metric`. A write that runs out of disk space is reported as
one line (`UserError`) naming the step to resume from; the steps before it
stay as they are.

Every byte restored is verified: a fourth item, `checksums`, holds a
checksum of every array of the state (`capjax.checksums`), and every
restore (training's resume, `init_from`, the decode jobs, captioning)
compares the restored arrays with it. A step whose arrays differ is
damaged: training sets it aside and resumes from the newest intact one; a
job that only reads stops with one line naming the damaged step and the
intact ones (`DamagedCheckpoint`). Steps of capjax versions before the
checksum restore as they did, with one warning.
"""

import contextlib
import copy
import hashlib
import json
import logging as python_logging
import os
import shutil
import sys
import warnings
from typing import Any, TYPE_CHECKING

from absl import logging
from flax import serialization
import jax
from jax.experimental import multihost_utils as multihost
import ml_collections
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as managers

from capjax import checksums
from capjax import config as config_lib
from capjax import files
from capjax import stopping
from capjax.data.vocab import Vocab
from capjax.errors import UserError

# grain is imported only where a data iterator is saved or restored:
# loading a trained state to caption images (`restore_state`) must import no
# input pipeline, neither grain nor tensorflow_datasets.
if TYPE_CHECKING:
  import grain  # pylint: disable=g-import-not-at-top


# orbax copies a replicated array to the host in one slice per replica, in
# parallel (`use_replica_parallel`), however small the array: a dispatched
# slicing op each, and one compile per shape at a process's first save.
# For the small arrays of a train state (all biases and norms; every array
# of a small model) that costs more than it saves: their copy starts at one
# replica (per process). orbax's options reach only the handler it
# registers, so the registered one is copied with its threshold set.
_MIN_REPLICA_SLICE_BYTES = 1 << 20


def _copy_small_arrays_whole() -> None:
  handler = copy.copy(ocp.type_handlers.get_type_handler(jax.Array))
  if getattr(handler, '_min_slice_bytes_for_replica_parallel', 0) is None:
    handler._min_slice_bytes_for_replica_parallel = _MIN_REPLICA_SLICE_BYTES  # pylint: disable=protected-access
    # Without orbax's warning that a handler is replaced: it is on purpose.
    absl_logger = python_logging.getLogger('absl')
    level = absl_logger.level
    absl_logger.setLevel(python_logging.ERROR)
    try:
      ocp.type_handlers.register_type_handler(jax.Array, handler,
                                              override=True)
    finally:
      absl_logger.setLevel(level)


_copy_small_arrays_whole()


class DamagedCheckpoint(UserError):
  """A step that a job which only reads cannot use; it names the others."""


def meta(config: ml_collections.ConfigDict, vocab: Vocab) -> dict[str, Any]:
  """What a state is only valid with: its model and its vocabulary."""
  return {
      'model': config_lib.model_record(config.model.to_dict()),
      'vocab': {'size': len(vocab), 'sha256': hashlib.sha256(
          '\n'.join(vocab.words).encode()).hexdigest()},
  }


# What a checkpoint's optimizer state and data position only fit, beyond the
# model: each field with the part of its value that matters. The data
# position counts batches, so the batch size must stay; the optimizer
# state's structure changes with accumulation (optax.MultiSteps), clipping
# and a delayed encoder update (a masked AdamW), not with their amounts.
_RESUME_FIELDS = {
    'batch_size': lambda v: v,
    'train.grad_accum_steps': lambda v: v > 1,
    'train.grad_clip_norm': lambda v: v > 0,
    'train.encoder_from_step': lambda v: v > 0,
}


def _resume_fields(config: ml_collections.ConfigDict) -> dict[str, Any]:
  return {name: config_lib.field(config, name) for name in _RESUME_FIELDS}


def _check_resume_fields(saved: dict[str, Any], current: dict[str, Any],
                         directory: str) -> None:
  """A one-line error for a setting the checkpoints cannot continue with."""
  for name, key in _RESUME_FIELDS.items():
    if name in saved and key(saved[name]) != key(current[name]):
      why = ('the saved data position counts batches of that size'
             if name == 'batch_size' else
             "the optimizer's state has another structure with it")
      raise UserError(
          f'--config.{name}={current[name]!r}, but the checkpoints in '
          f'{directory} were trained with {saved[name]!r} and {why}: set it '
          'back, or start a new --workdir (--config.init_from can take the '
          "model's weights from this one)")


# Model fields that leave the parameters as they are: a run started from
# another's weights (config.init_from) may set them otherwise.
_PARAMETER_FREE = ('model.dtype', 'model.encoder.frozen',
                   'model.encoder.freeze_bn', 'model.encoder.pretrained',
                   'model.decoder.dropout')


def _differences(saved: Any, current: Any, prefix: str = '') -> list[str]:
  if isinstance(saved, dict) and isinstance(current, dict):
    out = []
    for key in sorted(set(saved) | set(current)):
      out += _differences(saved.get(key), current.get(key),
                          f'{prefix}.{key}' if prefix else key)
    return out
  return [] if saved == current else [f'{prefix}: {saved!r} -> {current!r}']


def _read_meta(manager: ocp.CheckpointManager, step: int) -> dict[str, Any]:
  return manager.restore(step, args=ocp.args.Composite(
      meta=ocp.args.JsonRestore()))['meta']


def _check_same_model(saved: dict[str, Any], meta_data: dict[str, Any],
                      holder: str, fix: str,
                      ignore: tuple[str, ...] = ()) -> None:
  """A one-line error if a checkpoint's metadata is another model's.

  Only the fields of `meta_data` are compared (the saved process count and
  resume fields are checked where they matter); differences starting with
  one of `ignore` are allowed. Another decoder is named first.
  """
  if 'model' in saved and 'model' in meta_data:
    # Either may be a record of before decoders had names.
    saved, meta_data = (dict(m, model=config_lib.model_record(m['model']))
                        for m in (saved, meta_data))
    names = [m['model']['decoder']['name'] for m in (saved, meta_data)]
    if names[0] != names[1]:
      raise UserError(f'{holder} a model with the {names[0]} decoder, not '
                      f'the --config.model.decoder.name={names[1]!r} asked '
                      f'for; {fix}')
  differences = [d for d in _differences(
      {key: saved.get(key) for key in meta_data}, meta_data)
                 if not d.startswith(ignore)]
  if differences:
    raise UserError(f'{holder} another model or vocabulary '
                    f'({"; ".join(differences[:5])}); {fix}')


def _checksums(state: Any) -> dict[str, str]:
  """Checksums of a state (a TrainState or a dict of its fields), keyed by
  the same paths whichever form it has, so that the partial restore of
  `load_weights` compares its leaves with the whole state's."""
  return checksums.tree(serialization.to_state_dict(state))


def _restore_verified(manager: ocp.CheckpointManager, step: int, item: Any,
                      verify: bool = True) -> tuple[Any, str | None]:
  """(the state item of `step`, restored with the args `item` and checked
  against its checksums, None), or (None, why it is unreadable or
  damaged). State and checksums are read in one restore."""
  saved = verify and (manager.directory / str(step) / 'checksums').exists()
  items = dict(state=item)
  if saved:
    items['checksums'] = ocp.args.JsonRestore()
  try:
    restored = manager.restore(step, args=ocp.args.Composite(**items))
  except Exception as e:  # pylint: disable=broad-except
    stopping.raise_if_stopping()  # Not the file's fault.
    return None, f'unreadable ({_first_line(e)})'
  why = verify and _verify(restored['checksums'] if saved else None,
                           restored['state'], step)
  return (None, f'damaged: {why}') if why else (restored['state'], None)


_warned_unverified = False


def _verify(saved: dict[str, str] | None, restored: Any,
            step: int) -> str | None:
  """Why `restored` (a state or part of one) is not what step `step` saved
  (`saved`: its checksums), or None if its every array matches."""
  global _warned_unverified
  if saved is None:
    if not _warned_unverified:
      logging.warning('Checkpoint %d was written by a capjax without '
                      'checksums: its arrays restore unverified.', step)
      _warned_unverified = True
    return None
  bad = checksums.mismatches(saved, _checksums(restored))
  if not bad:
    return None
  arrays = ('1 array differs from the checksum saved with it' if len(bad) == 1
            else f'{len(bad)} arrays differ from the checksums saved with '
            'them')
  return f'{arrays} ({", ".join(bad[:3])}{", ..." if len(bad) > 3 else ""})'


class _Manager(ocp.CheckpointManager):
  """orbax's manager, leaving JAX's preemption sync point to
  `capjax.preemption`.

  JAX keeps one step per process, the last one asked about. orbax's
  save-finalising thread asks about the saved step after the loop has moved
  on; if a preemption notice were settled then, with process 0 ahead of the
  others, they would agree on a step process 0 has passed, and hang.
  """

  def reached_preemption(self, step: int) -> bool:
    del step
    return False  # orbax only logs it: capjax saves with force=True.


class Checkpoints:
  """An orbax CheckpointManager for `DIR/checkpoints`."""

  def __init__(self, directory: str, config: ml_collections.ConfigDict,
               create: bool = True, checksums: bool = True):
    """`create=False` for the decode jobs, which only read. `checksums=False`
    neither stores nor verifies them: only to measure what they cost."""
    self._checksums = checksums
    t = config.train
    metric, higher_is_better = config_lib.best_metric(config)
    policy = managers.AnyPreservationPolicy([
        managers.LatestN(n=t.keep_checkpoints),
        managers.BestN(get_metric_fn=lambda m: m[metric],
                       reverse=not higher_is_better, n=1,
                       keep_checkpoints_without_metrics=False),
    ])
    self.directory = directory
    self._resume = _resume_fields(config)
    self.discard_data_state = t.discard_data_state
    if not create and not os.path.isdir(directory):
      raise UserError(f'no checkpoint in {directory}: train first '
                      '(--mode=train with the same --workdir)')
    self._state_bytes = 0  # Of the state saved last: what a step needs.
    self.manager = _Manager(
        directory,
        options=ocp.CheckpointManagerOptions(
            preservation_policy=policy, create=create,
            enable_async_checkpointing=True,
            # Without best_fn, orbax would not store the metrics that the
            # BestN policy reads.
            best_fn=lambda m: m[metric],
            best_mode='max' if higher_is_better else 'min'))

  def save(self, step: int, state: Any, iterator: 'grain.DatasetIterator',
           meta_data: dict[str, Any],
           metrics: dict[str, float] | None = None) -> None:
    """Starts writing `step` in the background; see `wait`.

    A failure of the previous step's write is raised here.
    """
    import grain  # pylint: disable=g-import-not-at-top
    # The data position is one file per process: it only restores on as
    # many processes.
    meta_data = dict(meta_data, processes=jax.process_count(),
                     resume=self._resume)
    items = dict(state=ocp.args.StandardSave(state),
                 data=grain.checkpoint.CheckpointSave(iterator),
                 meta=ocp.args.JsonSave(meta_data))
    if self._checksums:
      # Now: the next train step may reuse (donate) the state's buffers.
      items['checksums'] = ocp.args.JsonSave(_checksums(state))
    self._state_bytes = sum(getattr(leaf, 'nbytes', 8)
                            for leaf in jax.tree.leaves(state))
    with self._reporting_a_full_disk():
      self.manager.save(step, args=ocp.args.Composite(**items),
                        metrics=metrics, force=True)

  def restore(self, abstract_state: Any,
              meta_data: dict[str, Any]) -> tuple[Any, int] | None:
    """(state, step) of the newest readable checkpoint, or None if none.

    A checkpoint that cannot be read is skipped with a warning (the previous
    one is tried); one made for another model or vocabulary is an error.
    Then `restore_data` moves the input pipeline to where that step left
    it: the pipeline is built in between, since what it reads (the feature
    cache) may depend on the restored weights.
    """
    steps = sorted(self.manager.all_steps(), reverse=True)
    if not steps:
      return None
    unreadable = []
    for step in steps:
      try:
        saved = _read_meta(self.manager, step)
      except Exception as e:  # pylint: disable=broad-except
        stopping.raise_if_stopping()
        if not any(self._has_item(s, 'meta') for s in steps):
          raise UserError(
              f'{self.directory} holds checkpoints that capjax did not write '
              f'(step {step} has no capjax metadata); use a new --workdir'
          ) from None
        # Some step is capjax's: this one was cut short (or damaged).
        logging.warning('Checkpoint %d is unreadable (%s); trying the one '
                        'before.', step, _first_line(e))
        unreadable.append(step)
        continue
      processes = saved.pop('processes', jax.process_count())
      # Absent from checkpoints of older versions, which then resume as
      # they did.
      _check_resume_fields(saved.pop('resume', {}), self._resume,
                           self.directory)
      _check_same_model(saved, meta_data,
                        f'the checkpoints in {self.directory} belong to',
                        'use a new --workdir or set the config back')
      if processes != jax.process_count() and not self.discard_data_state:
        raise UserError(
            f'checkpoint {step} in {self.directory} was written by '
            f'{processes} processes and this job has '
            f'{jax.process_count()}: the data position of each process '
            f'cannot be carried over. Resume with {processes} processes, '
            'or set --config.train.discard_data_state=True to restore the '
            'model and optimizer and restart the data order')
      state, why = self._read_state(step, abstract_state)
      if why is None and processes == jax.process_count():
        why = self._data_unreadable(step)
      if why is not None:
        logging.warning('Checkpoint %d is %s; trying the one before.', step,
                        why)
        unreadable.append(step)
        continue
      self._set_aside(unreadable)
      logging.info('Restored step %d from %s.', step, self.directory)
      return state, step
    raise UserError(f'no checkpoint in {self.directory} could be read (tried '
                    f'steps {steps}); see the warnings above')

  def _read_state(self, step: int,
                  abstract_state: Any) -> tuple[Any, str | None]:
    """(state, None) of `step`, verified against its checksums, or (None,
    why it is unreadable or damaged)."""
    return _restore_verified(self.manager, step,
                             ocp.args.StandardRestore(abstract_state),
                             self._checksums)

  def _data_unreadable(self, step: int) -> str | None:
    """Why the data position of `step` cannot restore, or None.

    Every process checks every process's file (they are small JSON), so
    that all agree on the step to resume from; grain reads its own later,
    once the input pipeline is built.
    """
    if self.discard_data_state:
      return None
    folder = self.manager.directory / str(step) / 'data'
    for path in sorted(folder.glob('*.json')):
      try:
        json.loads(path.read_text())
      except (OSError, ValueError) as e:
        return (f'unreadable (its data position {path.name}: '
                f'{_first_line(e)})')
    return None

  def restore_data(self, step: int,
                   iterator: 'grain.DatasetIterator') -> None:
    """Moves `iterator` to where checkpoint `step` left it (unless another
    number of processes wrote it, with discard_data_state)."""
    import grain  # pylint: disable=g-import-not-at-top
    processes = _read_meta(self.manager, step).get('processes',
                                                   jax.process_count())
    if processes != jax.process_count():
      logging.warning('Checkpoint %d was written by %d processes: its data '
                      'position is discarded (discard_data_state).', step,
                      processes)
      return
    try:
      self.manager.restore(step, args=ocp.args.Composite(
          data=grain.checkpoint.CheckpointRestore(iterator)))
    except Exception as e:  # pylint: disable=broad-except
      stopping.raise_if_stopping()
      if not self.discard_data_state:
        raise UserError(
            f'checkpoint {step} in {self.directory}: its model restored but '
            f'not its data position ({_first_line(e)}); set '
            '--config.train.discard_data_state=True to resume with the data '
            'order restarted') from None
      logging.warning('Checkpoint %d: its data position is unreadable (%s) '
                      'and discarded (discard_data_state).', step,
                      _first_line(e))

  def steps(self) -> list[int]:
    """The saved steps, oldest first (re-read from disk)."""
    self.manager.reload()
    return sorted(self.manager.all_steps())

  def restore_state(self, abstract_state: Any, meta_data: dict[str, Any],
                    step: int | None = None,
                    step_flag: str = '--config.decode.checkpoint_step'
                    ) -> tuple[Any, int]:
    """(state, step) of `step` (default: the latest), for evaluation.

    Only the model (step, params, batch_stats) and its metadata are read:
    the optimizer state and the data position belong to training. A damaged
    or unreadable step raises a `DamagedCheckpoint` that names the intact
    steps and `step_flag`, the option of the calling job that picks one.
    """
    steps = self.steps()
    if not steps:
      raise UserError(f'no checkpoint in {self.directory}: train first '
                      '(--mode=train with the same --workdir)')
    if step is None:
      step = steps[-1]
    elif step not in steps:
      raise UserError(f'no checkpoint of step {step} in {self.directory}; '
                      f'it has steps {", ".join(map(str, steps))}')
    try:
      saved = _read_meta(self.manager, step)
    except Exception as e:  # pylint: disable=broad-except
      stopping.raise_if_stopping()
      saved, why = None, f'unreadable ({_first_line(e)})'
    if saved is not None:
      # Evaluation reads no data position and no optimizer state: the saved
      # process count and resume fields do not matter.
      _check_same_model(saved, meta_data,
                        f'checkpoint {step} in {self.directory} belongs to',
                        'decode with the config it was trained with')
      state, why = self._read_model(step, abstract_state)
      if why is None:
        return state, step
    intact = [s for s in reversed(steps)
              if s != step and self._read_model(s, abstract_state)[1] is None]
    pick = (f'intact: {", ".join(map(str, intact))}; pick one with '
            f'{step_flag}={intact[0]}' if intact else
            'no other step is intact: train again')
    raise DamagedCheckpoint(f'checkpoint {step} in {self.directory} is {why}; '
                            f'{pick}')

  def _read_model(self, step: int,
                  abstract_state: Any) -> tuple[Any, str | None]:
    """As `_read_state`, but only what evaluation uses: the step, params and
    batch_stats (a TrainState's opt_state is None). The optimizer's moments,
    twice the parameters with Adam, are neither read nor checked."""
    full = serialization.to_state_dict(abstract_state)
    target = {k: full[k] for k in ('step', 'params', 'batch_stats')}
    restored, why = _restore_verified(
        self.manager, step, ocp.args.PyTreeRestore(
            target, partial_restore=True,
            restore_args=ocp.checkpoint_utils.construct_restore_args(target)),
        self._checksums)
    if restored is None or isinstance(abstract_state, dict):
      return restored, why
    return abstract_state.replace(opt_state=None, **restored), why

  def _set_aside(self, steps: list[int]) -> None:
    """Renames unreadable steps, so the resumed run can write them again.

    Renamed, not deleted: whatever is left of them stays for inspection.
    """
    for step in steps:
      if jax.process_index() == 0:
        # The same step may have been set aside before, and written again.
        target = self.manager.directory / f'unreadable-{step}'
        again = 1
        while target.exists():
          target = self.manager.directory / f'unreadable-{step}.{again}'
          again += 1
        (self.manager.directory / str(step)).rename(target)
        logging.warning('Moved unreadable checkpoint %d to %s.', step, target)
    if steps:
      multihost.sync_global_devices('capjax_set_aside_checkpoints')
      self.manager.reload()

  def _has_item(self, step: int, item: str) -> bool:
    path = self.manager.directory / str(step) / item
    return path.exists()

  @contextlib.contextmanager
  def _reporting_a_full_disk(self):
    """Turns a write that ran out of space into one line.

    orbax raises a background write's error from the next call that waits
    for it (`save`, `wait` or `close`), as a traceback hundreds of lines
    long; the user needs the directory, the space and the step to resume.
    """
    try:
      yield
    except Exception as e:  # pylint: disable=broad-except
      if not files.is_disk_full(e):
        raise
      try:
        free = files.human_bytes(shutil.disk_usage(self.directory).free)
      except OSError:  # A remote file system.
        free = 'an unknown amount'
      self.manager.reload()  # The steps on disk, without the failed one.
      last = max(self.manager.all_steps(), default=None)
      then = ('No checkpoint is complete yet: free some space, then run '
              'again' if last is None else
              f'The last good checkpoint is step {last}: free some space, '
              'then run again to resume from it')
      raise UserError(
          f'no space left for checkpoints in {self.directory}: a checkpoint '
          f'needs about {files.human_bytes(self._state_bytes)} and {free} '
          'are free. '
          f'{then}') from None

  def wait(self) -> None:
    """Until the step being written is complete; raises if it failed."""
    with self._reporting_a_full_disk():
      self.manager.wait_until_finished()

  def close(self) -> None:
    with self._reporting_a_full_disk():
      self.manager.close()


def locate(init_from: str) -> tuple[str, str, int | None]:
  """config.init_from -> (its workdir, its checkpoints folder, step or None).

  A workdir means its best checkpoint (None); WORKDIR/checkpoints/STEP that
  step.
  """
  path = os.path.abspath(os.path.expanduser(init_from))
  if os.path.isdir(os.path.join(path, 'checkpoints')):
    return path, os.path.join(path, 'checkpoints'), None
  name = os.path.basename(path)
  if name.isdigit() and os.path.isdir(path):
    directory = os.path.dirname(path)
    return os.path.dirname(directory), directory, int(name)
  raise UserError(f'--config.init_from={init_from} is neither a workdir with '
                  'checkpoints nor a checkpoint (WORKDIR/checkpoints/STEP)')


def load_weights(init_from: str, config: ml_collections.ConfigDict,
                 abstract_state: Any, meta_data: dict[str, Any]
                 ) -> tuple[Any, Any, int]:
  """(params, batch_stats, step) of `config.init_from`'s checkpoint.

  A workdir gives its best checkpoint by train.best_metric, or its latest
  when none has metrics. Only the model is read: the optimizer state of
  that run (which may have another optimizer) is not.
  """
  _, directory, step = locate(init_from)
  checkpoints = Checkpoints(directory, config, create=False)
  try:
    steps = checkpoints.steps()
    if step is None and steps:
      # orbax has no best step when no checkpoint has metrics.
      step = checkpoints.manager.best_step() or steps[-1]
    if step not in steps:
      raise UserError(f'no checkpoint {step or ""} in {directory} '
                      '(--config.init_from)')
    _check_same_model(_read_meta(checkpoints.manager, step), meta_data,
                      f'--config.init_from={init_from} holds',
                      'start from a run of this model',
                      ignore=_PARAMETER_FREE)
    target = abstract_state.variables()
    restored, why = _restore_verified(
        checkpoints.manager, step, ocp.args.PyTreeRestore(
            target, partial_restore=True,
            restore_args=ocp.checkpoint_utils.construct_restore_args(target)))
    if why:
      raise DamagedCheckpoint(
          f'--config.init_from={init_from}: checkpoint {step} in '
          f'{directory} is {why}; start from another of its steps '
          f'({", ".join(str(s) for s in steps if s != step) or "none"}) with '
          f'--config.init_from={directory}/STEP')
  finally:
    checkpoints.close()
  logging.info('Initialised from step %d of %s.', step, directory)
  return restored['params'], restored['batch_stats'], step


def _first_line(error: Exception, limit: int = 200) -> str:
  """The error's first line, cut to `limit` characters: tensorstore's
  carry whole specs."""
  text = str(error).strip()
  line = text.splitlines()[0] if text else type(error).__name__
  return line if len(line) <= limit else line[:limit - 3] + '...'


def _not_reported_by_capjax(record: python_logging.LogRecord) -> bool:
  """A logging filter for what `Checkpoints` reports as one line itself.

  A write that runs out of space fails in each of its concurrent writes:
  orbax logs the error (with its traceback) from each thread it passes
  through, and asyncio each write's error that nobody awaited, when its task
  is collected. Likewise a damaged step's reads: the restore fails with the
  first (and is reported, or the step before is used), and asyncio logs
  the tensorstore errors of the others.
  """
  if not record.exc_info:
    return True
  error = record.exc_info[1]
  return not (files.is_disk_full(error) or (
      record.name == 'asyncio' and 'tensorstore_spec' in str(error)))


def _late_tensorstore_callback(unraisable) -> bool:
  """Whether `unraisable` is a read finishing after orbax's event loop shut.

  orbax runs each restore on an event loop of its own, closed as soon as
  one read fails (a step missing its manifest.ocdbt); tensorstore's
  callbacks for the other reads then find it closed, and Python prints
  each as a traceback, though nothing waits for their results any more.
  """
  if (unraisable.exc_type is not RuntimeError or
      str(unraisable.exc_value) != 'Event loop is closed'):
    return False
  frames = unraisable.exc_traceback
  while frames is not None:
    if frames.tb_frame.f_code.co_name == 'call_soon_threadsafe':
      return True
    frames = frames.tb_next
  return False


def quiet_reported_failures() -> None:
  """Keeps off stderr what orbax and tensorstore print about failures that
  `Checkpoints` reports (or recovers from) itself, and nothing else.

  Process-wide (logging filters, `sys.unraisablehook`): the entry points
  install it, once (a second call changes nothing).
  """
  for name in ('absl', 'asyncio'):  # orbax's logger, and asyncio's.
    python_logging.getLogger(name).addFilter(_not_reported_by_capjax)
  # A write that ran out of space leaves orbax's other writes of that step
  # unawaited; Python says so as the process ends, after the one line.
  warnings.filterwarnings(
      'ignore', message=r"coroutine 'async_serialize.*' was never awaited",
      category=RuntimeWarning)
  previous = sys.unraisablehook
  if getattr(previous, 'capjax_quiet', False):
    return

  def hook(unraisable):
    if not _late_tensorstore_callback(unraisable):
      previous(unraisable)
  hook.capjax_quiet = True
  sys.unraisablehook = hook
