"""The training loop.

`train_and_evaluate(config, workdir)` trains, evaluates and checkpoints; run
again on the same workdir, it continues from the newest checkpoint exactly
where it stopped (model, optimizer, data position, RNG), also after SIGTERM.
The step is the objective's (`capjax.objectives`), what is measured the
evaluators' (`capjax.evaluators`); this module only runs them.
"""

import contextlib
import functools
import itertools
import os
import signal
import time
from typing import Callable

from absl import logging
from flax import traverse_util
import jax
import ml_collections
import numpy as np

from capjax import cache_features
from capjax import concepts as concepts_lib
from capjax import evaluators
from capjax import optimizer
from capjax import preemption as preemption_lib
from capjax import start as start_lib
from capjax import state as state_lib
from capjax import stopping
from capjax import workdir as workdir_lib
from capjax.data import pipeline
from capjax.data import prepare
from capjax.errors import UserError
from capjax.evaluators import common


def _frozen_until(config: ml_collections.ConfigDict) -> int:
  """The last batch of a trainable encoder's frozen phase (0: none).

  Batches, not updates: with gradient accumulation over k batches, update
  `encoder_from_step` is the first to take batch k * encoder_from_step + 1.
  """
  e, t = config.model.encoder, config.train
  if e.frozen:
    return 0
  return t.encoder_from_step * max(t.grad_accum_steps, 1)


def _learning_rate(config, step: int) -> float:
  return float(optimizer.learning_rate(config)(
      step // max(config.train.grad_accum_steps, 1)))


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str,
    on_evaluated: Callable[[int, dict[str, float]], None] | None = None
) -> state_lib.TrainState:
  """Trains `config` in `workdir`, resuming from its newest checkpoint.

  Process 0 holds the workdir's lock meanwhile: a second trainer on the
  same workdir stops at once with a line naming this one.

  `on_evaluated(step, metrics)`, if given, gets the periodic evaluators'
  metrics of each step that ran them, after that step's checkpoint save
  has begun (the tuner reports them to its pruner; what it raises stops
  the run, once the save is written).
  """
  prepare.check_workdir(workdir)
  held = (workdir_lib.lock(workdir) if jax.process_index() == 0 else
          contextlib.nullcontext())
  with held:
    return _train_and_evaluate(config, workdir, on_evaluated)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                        on_evaluated) -> state_lib.TrainState:
  t = config.train
  is_chief = jax.process_index() == 0
  # ------------------------------------------- data, model, first state
  begun = start_lib.start(config, workdir)
  data, par, objective, predict, meta, checkpoints, state, start = (
      begun.data, begun.par, begun.objective, begun.predict, begun.meta,
      begun.checkpoints, begun.state, begun.step)
  if start >= t.num_steps:
    logging.info('Already trained to step %d of %d.', start, t.num_steps)

  # ---------------------------------------------------------------- input
  try:
    # From the feature cache of this state's encoder, when it is used.
    data = cache_features.attach(config, data, predict, state, par)
    targets = None
    if begun.concepts:  # What the concept head learns, by image id.
      targets = concepts_lib.targets(data.builder, config.data.train_split,
                                     begun.concepts)
    train_iter = iter(pipeline.train_dataset(
        config, data.source(config.data.train_split), data.vocab,
        references=objective.references, concepts=targets))
    if start:
      checkpoints.restore_data(start, train_iter)
  except BaseException:
    checkpoints.close()
    raise

  # -------------------------------------------------------------- logging
  # clu's writers import TensorFlow (3 s of a job's start): a job that ends
  # before it trains (a mistake in its data, a signal during start-up) is
  # spared it.
  # pylint: disable-next=g-import-not-at-top
  from clu import metric_writers, periodic_actions
  writer = metric_writers.create_default_writer(
      workdir, just_logging=not is_chief, asynchronous=True)
  if start == 0:
    writer.write_hparams(
        traverse_util.flatten_dict(config.to_dict(), sep='.'))
  if is_chief:
    workdir_lib.write_config(workdir, config)
  hooks = [periodic_actions.ReportProgress(num_train_steps=t.num_steps,
                                           writer=writer)]
  if t.profile and is_chief:
    hooks.append(periodic_actions.Profile(num_profile_steps=5,
                                          logdir=workdir))

  # --------------------------------------------------------------- update
  # The schedule's values are an input: a run of another length or learning
  # rate compiles (or finds in the compilation cache) the same step.
  constants = tuple(par.put_constant(c) for c in (
      optimizer.schedule_values(config), *objective.constants))
  make_step = lambda p: par.step(
      functools.partial(objective.step, predict=p, config=config),
      constant_argnums=tuple(range(3, 3 + len(constants))))
  p_train = make_step(predict)
  # Until the encoder starts learning (train.encoder_from_step) its update is
  # masked anyway; the frozen model stops the gradient at its features, so
  # XLA drops the encoder's backward pass, about two thirds of its cost. Both
  # steps take and return the same state: checkpoints do not record which
  # one ran.
  frozen_until = _frozen_until(config)
  p_frozen = make_step(predict.frozen()) if frozen_until > start else None
  evals = evaluators.build(config, par=par, predict=predict, data=data,
                           workdir=workdir)
  periodic = {n: e for n, e in evals.items() if e.every_steps > 0}
  at_end = {n: e for n, e in evals.items() if e.every_steps == 0}
  state = par.put_state(state)

  # ----------------------------------------------------------------- loop
  try:
    # A signal of start-up whose `Stopped` a library dropped stops the job
    # here, while the entry point's guard still takes the signals.
    stopping.raise_if_stopping()
  except stopping.Stopped:
    checkpoints.close()
    writer.close()
    raise
  preemption = preemption_lib.Preemption()
  pending = []  # Device metrics of the steps since the last fetch.
  since = time.perf_counter()
  step = start
  stop = False
  try:
    with metric_writers.ensure_flushes(writer):
      while step < t.num_steps:
        step += 1
        batch = par.put_batch(next(train_iter))
        p_step = p_frozen if step <= frozen_until else p_train
        state, metrics = p_step(state, batch, begun.step_rng, *constants)
        pending.append(metrics)
        for hook in hooks:
          hook(step)
        last = step == t.num_steps
        stop = preemption.stop(step)
        save = last or stop or step % t.checkpoint_every_steps == 0
        due = [e for e in periodic.values()
               if last or step % e.every_steps == 0]
        if save or due or step % t.log_every_steps == 0:
          now = time.perf_counter()
          _write_train_metrics(writer, config, step, pending, now - since,
                               data.vocab)
          pending, since = [], now
        eval_metrics = {}
        for evaluator in due:
          eval_metrics |= evaluator.run(state, step, writer)
        if save:
          # Only a step whose evaluation logged train.best_metric can be the
          # best checkpoint.
          best_by = (eval_metrics if t.best_metric in eval_metrics else None)
          checkpoints.save(step, par.get_state(state), train_iter, meta,
                           best_by)
        if save or due:
          since = time.perf_counter()  # examples/s counts training only.
        if on_evaluated and eval_metrics:
          on_evaluated(step, eval_metrics)
        if stop:
          logging.warning('%s received: saved step %d, stopping.',
                          preemption.signal, step)
          break
      if step >= t.num_steps:
        # While the last checkpoint is written: the final test decodes.
        _evaluate_at_end(at_end, state, step, writer, preemption,
                         stopped=stop)
  finally:
    # The handlers stay until the last save is written: a second signal must
    # not cut it short.
    checkpoints.wait()
    checkpoints.close()
    writer.close()
    preemption.restore()
  logging.info('Checkpoints in %s; logs (TensorBoard) in %s.',
               checkpoints.directory, os.path.abspath(workdir))
  return par.get_state(state)


def _evaluate_at_end(at_end: dict, state, step: int, writer,
                     preemption: preemption_lib.Preemption,
                     stopped: bool) -> None:
  """Runs the end-of-run evaluators (`every_steps=0`) not done at `step`.

  A signal stops them at the next batch, on every process at the same one
  (the preemption sync point, asked with the steps after `step`): the
  results of those that finished are kept, and `stopping.Stopped` names
  the others. The same command run again finds training done and runs
  only those (`done`). `stopped`: the loop stopped at its last step.
  """
  if not at_end:
    return
  done = common.on_chief(
      lambda: [n for n, e in at_end.items() if e.done(step)])
  if done:
    logging.info('Done at step %d already: %s.', step, ', '.join(done))
  steps = itertools.count(step + 1)
  stop = lambda: preemption.stop(next(steps))
  finished = []
  for name, evaluator in at_end.items():
    if name in done:
      continue
    try:
      if stopped or stop():
        raise evaluators.Interrupted(name)
      logging.info('End-of-run evaluator %s at step %d.', name, step)
      evaluator.run(state, step, writer, stop=stop)
    except evaluators.Interrupted:
      left = [n for n in at_end if n not in done and n not in finished]
      kept = done + finished
      sig = preemption.signal
      # 'SIGTERM (to this process or another)' when JAX's service heard it.
      code = stopping.exit_code(getattr(signal, sig, signal.SIGTERM))
      raise stopping.Stopped(sig, code, everywhere=True, message=(
          f'stopped by {sig} during the end-of-run evaluators of step '
          f'{step}: ' + (f'{", ".join(kept)} done, ' if kept else '') +
          f'{", ".join(left)} left undone; the same command runs '
          f'{"it" if len(left) == 1 else "them"}')) from None
    finished.append(name)


def _write_train_metrics(writer, config, step: int, pending: list,
                         seconds: float | None = None, vocab=None) -> None:
  """Fetches the metrics of `pending` steps (one host sync) and logs them.

  Scalars are averaged over the steps; the self-critical step's `examples`
  (token ids) and `example_rewards` of the last step are logged as text.
  """
  if not pending:
    return
  fetched = jax.device_get(pending)
  examples = [m.pop('examples', None) for m in fetched][-1]
  rewards = [m.pop('example_rewards', None) for m in fetched][-1]
  if examples is not None and vocab is not None:
    lines = [f'reward {r:.3f}: {vocab.decode(e)}'
             for e, r in zip(examples, rewards)]
    writer.write_texts(step, {'train/samples': '\n'.join(lines)})
    for line in lines:
      logging.info('Sample: %s', line)
  first = step - len(fetched) + 1
  bad = [first + i for i, m in enumerate(fetched) if m['nonfinite']]
  if bad:
    raise UserError(
        f'the loss or gradient became NaN/Inf at step {bad[0]}; that update '
        'was not applied and the last checkpoint is intact. Lower '
        '--config.train.learning_rate or set --config.train.grad_clip_norm')
  means = {k: float(np.mean([m[k] for m in fetched]))
           for k in fetched[0] if k != 'nonfinite'}
  means['learning_rate'] = _learning_rate(config, step)
  if seconds:
    means['examples_per_sec'] = config.batch_size * len(fetched) / seconds
  writer.write_scalars(step, {f'train/{k}': v for k, v in means.items()})
