"""Training: the train state, the per-device train step, and the loop.

`train_and_evaluate(config, workdir)` trains, evaluates and checkpoints; run
again on the same workdir, it continues from the newest checkpoint exactly
where it stopped (model, optimizer, data position, RNG), also after SIGTERM.
"""

import contextlib
import dataclasses
import functools
import os
import signal
import threading
import time
from typing import Any

from absl import logging
import flax
from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from capjax import models
from capjax import optimizer
from capjax import losses
from capjax import parallel
from capjax import preemption as preemption_lib
from capjax import state as state_lib
from capjax import workdir as workdir_lib
from capjax.data.vocab import PAD
from capjax.errors import UserError


# ----------------------------------------------------------------------------
# The model and its state.
# ----------------------------------------------------------------------------


def _bn_trains(model: nn.Module) -> bool:
  # From the model rather than the config: the frozen phase of a fine-tuned
  # encoder runs a frozen copy of the model.
  return not (model.frozen or model.freeze_bn)


def _frozen_until(config: ml_collections.ConfigDict) -> int:
  """The last batch of a trainable encoder's frozen phase (0: none).

  Batches, not updates: with gradient accumulation over k batches, update
  `encoder_from_step` is the first to take batch k * encoder_from_step + 1.
  """
  e, t = config.model.encoder, config.train
  if e.frozen:
    return 0
  return t.encoder_from_step * max(t.grad_accum_steps, 1)


# ----------------------------------------------------------------------------
# Loss and steps, written for one device's share of the batch.
# ----------------------------------------------------------------------------


def train_step(state: state_lib.TrainState, batch: dict[str, jax.Array], rng: jax.Array,
               *, model: nn.Module, tx: optax.GradientTransformation,
               config: ml_collections.ConfigDict
               ) -> tuple[state_lib.TrainState, dict[str, jax.Array]]:
  """One optimizer step on this device's share of the global batch.

  The loss is normalised by the global token and caption counts, so the
  gradient averaged over devices is exactly that of one device holding the
  whole batch. A step whose loss or gradient is not finite leaves the state
  unchanged and is flagged in the metrics, so no checkpoint ever holds one.
  """
  t = config.train
  # A pure function of (seed, step, device): resumes exactly.
  rng = jax.random.fold_in(jax.random.fold_in(rng, state.step),
                           jax.lax.axis_index(parallel.AXIS))
  num_devices = jax.lax.psum(1, parallel.AXIS)
  bn_trains = _bn_trains(model)

  def loss_fn(params):
    variables = {'params': params, 'batch_stats': state.batch_stats}
    (logits, alphas), updates = model.apply(
        variables, batch['image'], batch['captions'], train=True,
        rngs={'dropout': rng}, mutable=['batch_stats'] if bn_trains else [])
    sums = losses.caption_losses(logits, batch['captions'], alphas, batch['mask'],
                          t.label_smoothing)
    totals = jax.lax.psum({k: sums[k] for k in ('tokens', 'captions')},
                          parallel.AXIS)
    ce = sums['ce'] / totals['tokens']
    penalty = sums['penalty'] / totals['captions']
    # pmean of the gradients of (n * local share) = gradient of the total.
    loss = num_devices * (ce + t.attention_penalty * penalty)
    return loss, (sums, updates)

  grads, (sums, updates) = jax.grad(loss_fn, has_aux=True)(state.params)
  grads = jax.lax.pmean(grads, parallel.AXIS)
  sums = jax.lax.psum(sums, parallel.AXIS)
  batch_stats = state.batch_stats
  if bn_trains:
    # Each device normalised its own share; keep one average of the stats.
    batch_stats = jax.lax.pmean(updates['batch_stats'], parallel.AXIS)
  ce = sums['ce'] / sums['tokens']
  penalty = sums['penalty'] / sums['captions']
  loss = ce + t.attention_penalty * penalty
  state, grad_norm, finite = state_lib.apply_gradients(state, grads, loss, tx,
                                             batch_stats)
  metrics = {
      'loss': loss, 'cross_entropy': ce, 'attention_penalty': penalty,
      'token_accuracy': sums['correct'] / sums['tokens'],
      'grad_norm': grad_norm, 'nonfinite': ~finite,
  }
  return state, metrics


def eval_step(state: state_lib.TrainState, batch: dict[str, jax.Array], *,
              model: nn.Module, config: ml_collections.ConfigDict
              ) -> dict[str, jax.Array]:
  """Summed validation losses of this batch (padding rows masked)."""
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  logits, alphas = model.apply(variables, batch['image'], batch['captions'])
  sums = losses.caption_losses(logits, batch['captions'], alphas, batch['mask'],
                        config.train.label_smoothing)
  return jax.lax.psum(sums, parallel.AXIS)


# ----------------------------------------------------------------------------
# The loop.
# ----------------------------------------------------------------------------


OBJECTIVES = ('cross_entropy', 'scst')


def _copy_vocab(source_workdir: str, workdir: str) -> None:
  """A run started from another one's weights needs its token ids."""
  # pylint: disable-next=g-import-not-at-top
  from capjax.data import vocab as vocab_lib
  source = os.path.join(source_workdir, vocab_lib.FILENAME)
  target = os.path.join(workdir, vocab_lib.FILENAME)
  if os.path.exists(source) and not os.path.exists(target):
    os.makedirs(workdir, exist_ok=True)
    vocab_lib.Vocab.load(source).save(target)


def _learning_rate(config, step: int) -> float:
  t = config.train
  return float(optimizer.learning_rate(config, t.learning_rate)(
      step // max(t.grad_accum_steps, 1)))


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str) -> state_lib.TrainState:
  """Trains `config` in `workdir`, resuming from its newest checkpoint.

  Process 0 holds the workdir's lock meanwhile: a second trainer on the
  same workdir stops at once with a line naming this one.
  """
  from capjax.data import prepare  # pylint: disable=g-import-not-at-top
  prepare.check_workdir(workdir)
  held = (workdir_lib.lock(workdir) if jax.process_index() == 0 else
          contextlib.nullcontext())
  with held:
    return _train_and_evaluate(config, workdir)


def _train_and_evaluate(config: ml_collections.ConfigDict,
                        workdir: str) -> state_lib.TrainState:
  # The loop's own dependencies (TFDS, grain, clu) load here, so that the
  # steps above import on machines that have only jax, flax and optax.
  # pylint: disable=g-import-not-at-top
  from clu import metric_writers
  from clu import periodic_actions
  from capjax import checkpoint as checkpoint_lib
  from capjax import pretrained
  from capjax import evaluate
  from capjax import scst
  from capjax.data import datasets
  from capjax.data import pipeline
  from capjax.data import prepare
  # pylint: enable=g-import-not-at-top

  t = config.train
  is_chief = jax.process_index() == 0
  if t.objective not in OBJECTIVES:
    raise UserError(f'unknown --config.train.objective={t.objective!r}; '
                    f'choose one of {", ".join(OBJECTIVES)}')
  self_critical = t.objective == 'scst'
  if self_critical:
    scst.check_config(config)
  pretrained.check_random_frozen(config)
  if config.init_from and is_chief:
    _copy_vocab(checkpoint_lib.locate(config.init_from)[0], workdir)
  # ---------------------------------------------------------------- input
  data = prepare.prepare(config, workdir)
  par = parallel.Parallel(config)
  train_source = data.source(config.data.train_split)
  eval_source = data.source(config.data.eval_split)
  train_iter = iter(pipeline.train_dataset(config, train_source, data.vocab))

  # ---------------------------------------------------------------- model
  model = models.build_captioner(config.model, len(data.vocab),
                                 config.data.normalization)
  rng = jax.random.key(config.seed)
  init_rng, step_rng = jax.random.split(rng)
  abstract = state_lib.abstract(config, model, par.replicated)
  tx = optimizer.make(config, abstract.params)
  meta = checkpoint_lib.meta(config, data.vocab)

  # ----------------------------------------------------------- checkpoint
  checkpoints = checkpoint_lib.Checkpoints(
      os.path.join(os.path.abspath(workdir), 'checkpoints'), config)
  restored = checkpoints.restore(abstract, train_iter, meta)
  if restored:
    state, start = restored
  elif config.init_from:
    start = 0
    params, batch_stats, _ = checkpoint_lib.load_weights(
        config.init_from, config, abstract, meta)
    state = jax.jit(functools.partial(state_lib.fresh, tx=tx),
                    out_shardings=par.replicated)(params, batch_stats)
  elif self_critical:
    raise UserError('self-critical training starts from a cross-entropy '
                    'model: set --config.init_from to its workdir')
  else:
    start = 0
    encoder_weights = None
    if config.model.encoder.pretrained:
      encoder_abstract = {'params': abstract.params['encoder'],
                          'batch_stats': abstract.batch_stats['encoder']}
      encoder_weights = pretrained.load_encoder_weights(
          config.model.encoder, encoder_abstract)
    state = jax.jit(functools.partial(state_lib.create, config, model, tx),
                    out_shardings=par.replicated)(init_rng, encoder_weights)
  if start >= t.num_steps:
    logging.info('Already trained to step %d of %d.', start, t.num_steps)

  # -------------------------------------------------------------- logging
  writer = metric_writers.create_default_writer(
      workdir, just_logging=not is_chief, asynchronous=True)
  if start == 0:
    writer.write_hparams(
        traverse_util.flatten_dict(config.to_dict(), sep='.'))
  if is_chief:
    # What `capjax.caption` needs to rebuild the model and its inputs.
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config.to_json_best_effort(indent=1))
  hooks = [periodic_actions.ReportProgress(num_train_steps=t.num_steps,
                                           writer=writer)]
  if t.profile and is_chief:
    hooks.append(periodic_actions.Profile(num_profile_steps=5,
                                          logdir=workdir))

  # --------------------------------------------------------------- update
  if self_critical:
    table = scst.document_frequencies(
        datasets.references(data.builder, config.data.train_split),
        data.vocab, config)
    step_args = (par.put_constant(table),)
    make_step = lambda m: par.step(functools.partial(
        scst.train_step, model=m, tx=tx, config=config), constant_argnums=(3,))
  else:
    step_args = ()
    make_step = lambda m: par.step(functools.partial(
        train_step, model=m, tx=tx, config=config))
  p_train = make_step(model)
  # Until the encoder starts learning (train.encoder_from_step) its update is
  # masked anyway; the frozen model stops the gradient at its features, so
  # XLA drops the encoder's backward pass, about two thirds of its cost. Both
  # steps take and return the same state: checkpoints do not record which
  # one ran.
  frozen_until = _frozen_until(config)
  p_frozen = make_step(model.clone(frozen=True)) if frozen_until > start else (
      None)
  p_eval = par.step(functools.partial(eval_step, model=model, config=config),
                    donate_state=False)
  search = evaluate.SearchOptions.of(config.decode)
  val_decoder = evaluate.BatchDecoder(
      config, par, model, data,
      dataclasses.replace(search, beam_size=config.eval.beam_size))
  val_references = None
  if config.eval.num_batches:
    val_references = datasets.references(data.builder, config.data.eval_split)
  state = par.put_state(state)

  # ----------------------------------------------------------------- loop
  preemption = preemption_lib.Preemption()
  pending = []  # Device metrics of the steps since the last fetch.
  since = time.perf_counter()
  step = start
  try:
    with metric_writers.ensure_flushes(writer):
      while step < t.num_steps:
        step += 1
        batch = par.put_batch(next(train_iter))
        p_step = p_frozen if step <= frozen_until else p_train
        state, metrics = p_step(state, batch, step_rng, *step_args)
        pending.append(metrics)
        for hook in hooks:
          hook(step)
        last = step == t.num_steps
        stop = preemption.stop(step)
        save = last or stop or step % t.checkpoint_every_steps == 0
        validate = config.eval.num_batches != 0 and (
            last or step % config.eval.every_steps == 0)
        if save or validate or step % t.log_every_steps == 0:
          now = time.perf_counter()
          _write_train_metrics(writer, config, step, pending, now - since,
                               data.vocab)
          pending, since = [], now
        eval_metrics = None
        if validate:
          eval_metrics = _evaluate(config, p_eval, val_decoder, state,
                                   eval_source, val_references, writer, step)
        if save:
          checkpoints.save(step, par.get_state(state), train_iter, meta,
                           eval_metrics)
        if save or validate:
          since = time.perf_counter()  # examples/s counts training only.
        if stop:
          logging.warning('%s received: saved step %d, stopping.',
                          preemption.signal, step)
          break
      if step >= t.num_steps:
        test_decoder = evaluate.BatchDecoder(config, par, model, data, search)
        for split in filter(None, config.decode.after_training.split(',')):
          evaluate.evaluate_split(test_decoder, state, step, split.strip(),
                                  workdir, writer)
  finally:
    preemption.restore()
    checkpoints.wait()
    checkpoints.close()
    writer.close()
  logging.info('Checkpoints in %s; logs (TensorBoard) in %s.',
               checkpoints.directory, os.path.abspath(workdir))
  return par.get_state(state)


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


def _evaluate(config, p_eval, decoder, state, source, references, writer,
              step: int) -> dict[str, float]:
  """Validation loss, and metrics of captions decoded for the same images."""
  # pylint: disable=g-import-not-at-top
  from capjax import evaluate
  from capjax.data import pipeline
  # pylint: enable=g-import-not-at-top
  ev = config.eval
  totals = None
  captions = {}
  for i, batch in enumerate(pipeline.eval_dataset(config, source,
                                                  decoder.data.vocab)):
    if i == ev.num_batches:
      break
    captions.update(decoder.batch(state, batch))
    sums = jax.device_get(p_eval(state, decoder.par.put_batch(batch)))
    totals = sums if totals is None else jax.tree.map(np.add, totals, sums)
  metrics = {
      'val_loss': float(totals['ce'] / totals['tokens'] +
                        config.train.attention_penalty *
                        totals['penalty'] / totals['captions']),
      'val_cross_entropy': float(totals['ce'] / totals['tokens']),
      'val_token_accuracy': float(totals['correct'] / totals['tokens']),
  }
  # No METEOR: its Java start-up would cost more than the rest.
  scores = evaluate.score(references, captions, meteor='none')
  metrics.update({f'val_{k}': v for k, v in scores.items()})
  writer.write_scalars(step, {f'eval/{k}': v for k, v in metrics.items()})
  samples = [f'image {i}: {captions[i]}\nreference: {references[i][0]}'
             for i in list(captions)[:ev.num_samples]]
  if samples:
    writer.write_texts(step, {'eval/samples': '\n\n'.join(samples)})
    for line in samples:
      logging.info('Sample: %s', line.replace('\n', ' | '))
  return metrics
