"""Checkpoints: model state, data iterator and metadata in one orbax step.

Each step directory holds three items, written together (and atomically, by
orbax's finalisation) so that a resumed run continues exactly:

  state  the TrainState (params, batch_stats, opt_state, step)
  data   the grain iterator's position (one file per process)
  meta   the model config and vocabulary the state belongs to

The latest `train.keep_checkpoints` steps are kept, plus the one with the
best validation metric.
"""

import hashlib
import os
from typing import Any

from absl import logging
import grain
import jax
from jax.experimental import multihost_utils as multihost
import ml_collections
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as managers

from capjax import config as config_lib
from capjax.data.vocab import Vocab
from capjax.errors import UserError

# The validation metric that picks the best checkpoint, and whether higher
# is better: CIDEr-D of the captions decoded in validation.
BEST_METRIC = ('val_CIDEr', True)


def meta(config: ml_collections.ConfigDict, vocab: Vocab) -> dict[str, Any]:
  """What a state is only valid with: its model and its vocabulary."""
  return {
      'model': config.model.to_dict(),
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


class Checkpoints:
  """An orbax CheckpointManager for `DIR/checkpoints`."""

  def __init__(self, directory: str, config: ml_collections.ConfigDict,
               create: bool = True):
    """`create=False` for the decode jobs, which only read."""
    t = config.train
    metric, higher_is_better = BEST_METRIC
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
    self.manager = ocp.CheckpointManager(
        directory,
        options=ocp.CheckpointManagerOptions(
            preservation_policy=policy, create=create,
            enable_async_checkpointing=True,
            # Without best_fn, orbax would not store the metrics that the
            # BestN policy reads.
            best_fn=lambda m: m[metric],
            best_mode='max' if higher_is_better else 'min'))

  def save(self, step: int, state: Any, iterator: grain.DatasetIterator,
           meta_data: dict[str, Any],
           metrics: dict[str, float] | None = None) -> None:
    """Starts writing `step` in the background; see `wait`."""
    # The data position is one file per process: it only restores on as
    # many processes.
    meta_data = dict(meta_data, processes=jax.process_count(),
                     resume=self._resume)
    self.manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(iterator),
            meta=ocp.args.JsonSave(meta_data)),
        metrics=metrics, force=True)

  def restore(self, abstract_state: Any, iterator: grain.DatasetIterator,
              meta_data: dict[str, Any]) -> tuple[Any, int] | None:
    """(state, step) of the newest readable checkpoint, or None if none.

    The iterator is moved to where that step left it. A checkpoint that
    cannot be read is skipped with a warning (the previous one is tried);
    one made for another model or vocabulary is an error.
    """
    steps = sorted(self.manager.all_steps(), reverse=True)
    if not steps:
      return None
    unreadable = []
    for step in steps:
      try:
        saved = self.manager.restore(step, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore()))['meta']
      except Exception as e:  # pylint: disable=broad-except
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
      differences = _differences(saved, meta_data)
      if differences:
        raise UserError(
            f'the checkpoints in {self.directory} belong to another model or '
            f'vocabulary ({"; ".join(differences[:5])}); use a new --workdir '
            'or set the config back')
      items = {'state': ocp.args.StandardRestore(abstract_state),
               'data': grain.checkpoint.CheckpointRestore(iterator)}
      if processes != jax.process_count():
        if not self.discard_data_state:
          raise UserError(
              f'checkpoint {step} in {self.directory} was written by '
              f'{processes} processes and this job has '
              f'{jax.process_count()}: the data position of each process '
              f'cannot be carried over. Resume with {processes} processes, '
              'or set --config.train.discard_data_state=True to restore the '
              'model and optimizer and restart the data order')
        logging.warning('Checkpoint %d was written by %d processes: its data '
                        'position is discarded (discard_data_state).', step,
                        processes)
        del items['data']
      try:
        restored = self.manager.restore(step,
                                        args=ocp.args.Composite(**items))
      except Exception as e:  # pylint: disable=broad-except
        logging.warning('Checkpoint %d is unreadable (%s); trying the one '
                        'before.', step, _first_line(e))
        unreadable.append(step)
        continue
      self._set_aside(unreadable)
      logging.info('Restored step %d from %s.', step, self.directory)
      return restored['state'], step
    raise UserError(f'no checkpoint in {self.directory} could be read (tried '
                    f'steps {steps}); see the warnings above')

  def steps(self) -> list[int]:
    """The saved steps, oldest first (re-read from disk)."""
    self.manager.reload()
    return sorted(self.manager.all_steps())

  def restore_state(self, abstract_state: Any, meta_data: dict[str, Any],
                    step: int | None = None) -> tuple[Any, int]:
    """(state, step) of `step` (default: the latest), for evaluation.

    Only the state and its metadata are read: the data iterator's position
    belongs to training.
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
    saved = self.manager.restore(step, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore()))['meta']
    # Evaluation reads no data position and no optimizer state.
    saved.pop('processes', None)
    saved.pop('resume', None)
    differences = _differences(saved, meta_data)
    if differences:
      raise UserError(
          f'checkpoint {step} in {self.directory} belongs to another model or '
          f'vocabulary ({"; ".join(differences[:5])}); decode with the config '
          'it was trained with')
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state)))
    return restored['state'], step

  def _set_aside(self, steps: list[int]) -> None:
    """Renames unreadable steps, so the resumed run can write them again.

    Renamed, not deleted: whatever is left of them stays for inspection.
    """
    for step in steps:
      if jax.process_index() == 0:
        target = self.manager.directory / f'unreadable-{step}'
        (self.manager.directory / str(step)).rename(target)
        logging.warning('Moved unreadable checkpoint %d to %s.', step, target)
    if steps:
      multihost.sync_global_devices('capjax_set_aside_checkpoints')
      self.manager.reload()

  def _has_item(self, step: int, item: str) -> bool:
    path = self.manager.directory / str(step) / item
    return path.exists()

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
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

  A workdir gives its best checkpoint by validation CIDEr-D, or its latest
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
    saved = checkpoints.manager.restore(step, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore()))['meta']
    differences = [d for d in _differences(
        {'model': saved['model'], 'vocab': saved['vocab']}, meta_data)
                   if not d.startswith(_PARAMETER_FREE)]
    if differences:
      raise UserError(
          f'--config.init_from={init_from} holds another model or vocabulary '
          f'({"; ".join(differences[:5])}); start from a run of this model')
    target = {'params': abstract_state.params,
              'batch_stats': abstract_state.batch_stats}
    restored = checkpoints.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(
            target, partial_restore=True,
            restore_args=ocp.checkpoint_utils.construct_restore_args(
                target))))['state']
  finally:
    checkpoints.close()
  logging.info('Initialised from step %d of %s.', step, directory)
  return restored['params'], restored['batch_stats'], step


def _first_line(error: Exception) -> str:
  text = str(error).strip()
  return text.splitlines()[0] if text else type(error).__name__
