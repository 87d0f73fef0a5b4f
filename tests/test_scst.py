"""Self-critical training: sampling, the SCST step, and the SCST phase."""

import functools
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tensorflow_datasets as tfds

from capjax import checkpoint
from capjax import decode
from capjax import objectives
from capjax import parallel
from capjax import train
from capjax.data import pipeline
from capjax.data import prepare
from capjax.data.vocab import BOS, EOS, PAD, UNK
from capjax.errors import UserError
from capjax.metrics import cider_jax
from capjax.models import decoders
from capjax.objectives import scst
from conftest import REPO
from conftest import coco_config
from conftest import coco_data_source
from conftest import init_model
from conftest import random_batch
from conftest import step_config
from conftest import tiny_coco_training
from configs import coco_scst
from configs import test as test_configs


def _scst_config(test_config, kind='jit', baseline='greedy'):
  config = step_config(test_config, kind)
  config.train.objective = 'scst'
  config.scst.baseline = baseline
  config.scst.num_samples = 3
  config.scst.min_words = 2
  config.scst.max_references = 3
  return config


def _scst_batch(config, seed=0):
  batch = random_batch(config, seed)
  r = config.scst.max_references
  references = random_batch(config, seed + 100)['captions']
  while references.shape[1] < r:
    references = np.concatenate([references, references[:, :1]], 1)
  references = references[:, :r].copy()
  references[1, 1:] = PAD  # An image with one reference.
  return dict(batch, references=references)


def _table(batch):
  refs = batch['references'][..., 1:]
  present = refs[..., 0] != PAD
  images = np.broadcast_to(np.arange(len(refs))[:, None], present.shape)
  return cider_jax.DocumentFrequencies.build(refs[present], images[present])


def test_samples_follow_the_model_and_its_bans(test_config):
  config = step_config(test_config)
  predict, _, state = init_model(config)
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  images = jnp.asarray(random_batch(config)['image'][:6])
  max_len, min_words = 7, 2

  @jax.jit
  def run(variables, rng):
    features = predict.encode(variables, {'image': images})
    return decode.sample(predict.decoding(variables, features, 4), rng,
                         max_len=max_len, temperature=0.7,
                         min_words=min_words, ban_unk=True)

  out = run(variables, jax.random.key(3))
  tokens = np.asarray(out.tokens)  # [6, 4, 6]
  assert tokens.shape == (6, 4, max_len - 1)
  assert not np.isin(tokens, [BOS, UNK]).any()
  assert not (tokens[..., :min_words] == EOS).any()
  assert not (tokens[..., :min_words] == PAD).any()
  # <pad> exactly after the <eos>, and the samples differ.
  ended = np.cumsum(tokens == EOS, -1) - (tokens == EOS)
  np.testing.assert_array_equal(tokens == PAD, ended > 0)
  assert len({tuple(t) for t in tokens.reshape(-1, max_len - 1)}) > 12
  # The log-probabilities are those teacher forcing gives the samples,
  # under the same temperature and bans.
  captions = np.concatenate([np.full((6, 4, 1), BOS), tokens], -1)
  logits, _ = predict.model.apply(variables, images,
                                  captions)  # [6, 4, 6, V]
  logits = np.array(logits) / 0.7
  logits[..., [PAD, BOS, UNK]] = decode.NEG_INF
  logits[..., :min_words, EOS] = decode.NEG_INF
  logp = jax.nn.log_softmax(logits)
  want = np.take_along_axis(np.asarray(logp), tokens[..., None], -1)[..., 0]
  drawn = tokens != PAD
  np.testing.assert_allclose(np.asarray(out.logprobs)[drawn], want[drawn],
                             rtol=1e-4, atol=1e-5)
  assert np.all(np.asarray(out.logprobs)[~drawn] == 0)
  # Another key, other samples; the same key, the same samples.
  assert not np.array_equal(run(variables, jax.random.key(4)).tokens, tokens)
  np.testing.assert_array_equal(run(variables, jax.random.key(3)).tokens,
                                tokens)


def _run(config, steps=2):
  predict, schedule, state = init_model(config)
  tx = optax.adam(1e-2)
  state = state.replace(opt_state=tx.init(state.params))
  initial = jax.tree.map(np.array, state.params)
  par = parallel.Parallel(config)
  traces = []

  def counted(*args):
    traces.append(1)
    return scst.train_step(*args, predict=predict, tx=lambda _: tx,
                           config=config)

  step = par.step(counted, constant_argnums=(4,))
  batches = [_scst_batch(config, seed) for seed in range(steps)]
  table = par.put_constant(_table(batches[0]))
  state = par.put_state(state)
  for batch in batches:
    state, metrics = step(state, par.put_batch(batch), jax.random.key(5),
                          schedule, table)
  assert len(traces) == 1  # One compilation for every step.
  return initial, par.get_state(state), jax.device_get(metrics)


# Each decoder's step under jit; the first's also under pmap. The form is
# the step's wrapper (capjax/parallel.py), the same for every decoder and
# objective, and test_cross_entropy runs each decoder in both forms.
@pytest.mark.parametrize('decoder, pmap', [
    (name, name == decoders.NAMES[0]) for name in decoders.NAMES])
def test_scst_step_under_jit_and_pmap(test_config, decoder, pmap):
  test_config.model.decoder.name = decoder
  initial, jitted, metrics = _run(_scst_config(test_config, 'jit'))
  assert int(jitted.step) == 2 and not metrics['nonfinite']
  moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()),
                       initial['decoder'], jitted.params['decoder'])
  assert max(jax.tree.leaves(moved)) > 1e-3
  assert 0 <= metrics['max_len_fraction'] <= 1 and metrics['entropy'] > 0
  assert metrics['reward'] >= 0 and metrics['sample_length'] >= 3
  assert metrics['examples'].shape == (scst.EXAMPLES, 6)
  if pmap:
    _, pmapped, pmap_metrics = _run(_scst_config(test_config, 'pmap'))
    # The same samples on the same devices: the same update.
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-4,
                                   atol=1e-6), jitted.params, pmapped.params)
    for name in ('reward', 'baseline', 'entropy', 'max_len_fraction'):
      np.testing.assert_allclose(metrics[name], pmap_metrics[name],
                                 rtol=1e-4)


class _RecordingPredict:
  """The predict functions, recording the keys of the dropout of teacher
  forcing as the step uses them."""

  def __init__(self, predict, dropout_keys):
    self._predict, self._keys = predict, dropout_keys

  def logits(self, *args, rng=None, **kwargs):
    if rng is not None:
      jax.debug.callback(self._keys.append, jax.random.key_data(rng))
    return self._predict.logits(*args, rng=rng, **kwargs)

  def __getattr__(self, name):  # The other functions, as they are.
    return getattr(self._predict, name)


def test_sampling_and_dropout_draw_from_independent_keys(test_config,
                                                          monkeypatch):
  """Also: the loss logged is the one optimised (the same step)."""
  config = _scst_config(test_config)
  config.scst.ce_weight = 0.5  # The cross-entropy term uses dropout.
  predict, schedule, state = init_model(config)
  sample_keys, dropout_keys = [], []
  sample = decode.sample

  def recording_sample(decoding, rng, **kwargs):
    if rng is not None:  # Every token's key, as `decode.sample` derives it.
      for t in range(config.data.max_len):
        jax.debug.callback(sample_keys.append,
                           jax.random.key_data(jax.random.fold_in(rng, t)))
    return sample(decoding, rng, **kwargs)

  monkeypatch.setattr(scst.decode, 'sample', recording_sample)
  par = parallel.Parallel(config)
  step = par.step(functools.partial(
      scst.train_step, predict=_RecordingPredict(predict, dropout_keys),
      config=config), constant_argnums=(4,))
  batch = _scst_batch(config)
  _, metrics = jax.device_get(step(
      par.put_state(state), par.put_batch(batch), jax.random.key(0),
      schedule, par.put_constant(_table(batch))))
  jax.effects_barrier()
  assert sample_keys and dropout_keys
  drawn = {tuple(np.asarray(k).ravel()) for k in sample_keys}
  assert not drawn & {tuple(np.asarray(k).ravel()) for k in dropout_keys}

  # The loss logged is the one optimised.
  np.testing.assert_allclose(
      metrics['loss'], metrics['policy_gradient_loss'] +
      0.5 * metrics['cross_entropy'], rtol=1e-5)
  assert metrics['cross_entropy'] > 1  # A random model's: far from 0.


def test_mean_baseline_averages_the_other_samples(test_config):
  config = _scst_config(test_config, baseline='mean')
  _, state, metrics = _run(config, steps=1)
  # Averaged over all samples, the mean of the others is the mean reward.
  np.testing.assert_allclose(metrics['baseline'], metrics['reward'],
                             rtol=1e-5)
  assert metrics['reward'] > 0 and int(state.step) == 1


def test_mean_of_others_leaves_each_sample_out():
  reward = jnp.array([[1.0, 2.0, 6.0], [0.0, 0.0, 3.0]])
  np.testing.assert_allclose(scst.mean_of_others(reward),
                             [[4.0, 3.5, 1.5], [1.5, 1.5, 0.0]])


@pytest.mark.parametrize('field, value, match', [
    ('baseline', 'best', 'baseline'),
    ('num_samples', 1, 'num_samples'),
    ('min_words', 5, 'min_words'),
    ('temperature', 0.0, 'temperature'),
])
def test_bad_scst_settings_are_named(test_config, field, value, match):
  config = _scst_config(test_config, baseline='mean')
  config.scst[field] = value
  with pytest.raises(UserError, match=match):
    scst.check(config)


def test_scst_steps_raise_the_reward_they_optimise(test_config):
  """Steps on one batch make its captions score higher: the gradient has
  the sign of the reward (flip it and the greedy CIDEr-D falls)."""
  config = _scst_config(test_config)
  config.scst.update(num_samples=6, min_words=1)
  # Three stages, as before configs/test.py took resnet_micro: with its
  # 8x8 grid of 16 channels, 40 steps raise the greedy CIDEr-D by 0.16.
  config.model.encoder.arch = 'resnet_small'
  predict, schedule, state = init_model(config)
  tx = optax.adam(3e-3)
  state = state.replace(opt_state=tx.init(state.params))
  par = parallel.Parallel(config)
  step = par.step(functools.partial(scst.train_step, predict=predict,
                                    tx=lambda _: tx, config=config),
                  constant_argnums=(4,))
  host_batch = _scst_batch(config)
  table = _table(host_batch)
  batch, placed = par.put_batch(host_batch), par.put_constant(table)

  @jax.jit
  def greedy_cider(params):
    variables = {'params': params, 'batch_stats': state.batch_stats}
    features = predict.encode(variables, {'image': host_batch['image']})
    # The greedy caption the step's baseline decodes, scored as it is.
    s = config.scst
    tokens = decode.sample(predict.decoding(variables, features, 1), None,
                           max_len=config.data.max_len, min_words=s.min_words,
                           ban_unk=s.ban_unk).tokens
    return jnp.mean(cider_jax.cider_d(
        tokens, host_batch['references'][..., 1:], table, eos=s.eos))

  before = float(greedy_cider(state.params))
  state = par.put_state(state)
  rewards = []
  for i in range(40):
    state, metrics = step(state, batch, jax.random.key(i), schedule, placed)
    rewards.append(float(metrics['reward']))
  after = float(greedy_cider(par.get_state(state).params))
  print(f'greedy CIDEr-D of the batch {before:.3f} -> {after:.3f}; sample '
        f'reward {np.mean(rewards[:5]):.3f} -> {np.mean(rewards[-5:]):.3f}')
  assert after > before + 0.3
  assert np.mean(rewards[-5:]) > np.mean(rewards[:5]) + 0.3


def test_coco_scst_config_runs_on_mock_data(tmp_path):
  ce = tiny_coco_training(coco_config())
  # No ImageNet weights for the tiny encoder: random, frozen for its 2 steps;
  # the least of them (what is checked is the SCST phase).
  ce.model.encoder.pretrained = ''
  ce.train.allow_random_frozen_encoder = True
  config = tiny_coco_training(coco_config(coco_scst.get_config))
  ce.model.encoder.arch = config.model.encoder.arch = 'resnet_micro'
  ce.evals.test.every_steps = config.evals.test.every_steps = -1
  ce.evals.val.every_steps = -1  # What is checked is the SCST run.
  config.init_from = str(tmp_path / 'ce')
  with tfds.testing.mock_data(as_data_source_fn=coco_data_source):
    train.train_and_evaluate(ce, str(tmp_path / 'ce'))
    with pytest.raises(UserError, match='init_from'):
      bad = config.copy_and_resolve_references()
      bad.init_from = ''
      train.train_and_evaluate(bad, str(tmp_path / 'none'))
    state = train.train_and_evaluate(config, str(tmp_path / 'scst'))
    data = prepare.prepare(config, str(tmp_path / 'scst'))
    objective = objectives.make(config, data)
    batch = next(iter(pipeline.train_dataset(
        config, data.source(config.data.train_split), data.vocab,
        references=objective.references)))
  assert int(state.step) == 2
  # COCO images have 5 to 7 captions: the batches carry them all, up to 7
  # rows, the missing ones <pad>.
  references = batch['references']  # [B, 7, L]
  assert references.shape[:2] == (config.batch_size, 7)
  counts = (references[..., 0] != PAD).sum(-1)  # [B]
  assert set(counts) <= {5, 6, 7} and counts.max() > 5


def test_init_from_must_be_the_same_model(test_config, trained_workdir,
                                         tmp_path):
  test_config.train.num_steps = 1
  test_config.evals.val.every_steps = -1
  test_config.evals.test.every_steps = -1
  # The shared run, with its step 6 alone: its best checkpoint.
  a = tmp_path / 'a'
  shutil.copytree(trained_workdir, a)
  shutil.rmtree(a / 'checkpoints' / '3')
  for init_from, match in ((tmp_path / 'missing', 'neither a workdir'),
                           (a, 'another model')):
    config = test_config.copy_and_resolve_references()
    config.model.decoder.hidden_dim = 24
    config.init_from = str(init_from)
    with pytest.raises(UserError, match=match):
      train.train_and_evaluate(config, str(tmp_path / 'b'))
  # Settings that leave the parameters alone may change; a step's folder
  # is a checkpoint too.
  config = test_config.copy_and_resolve_references()
  config.model.encoder.frozen = True
  config.model.decoder.dropout = 0.3
  config.init_from = str(a / 'checkpoints' / '6')
  state = train.train_and_evaluate(config, str(tmp_path / 'c'))
  first = jax.tree.map(np.asarray, state.params['encoder'])
  config.init_from = str(a)
  again = train.train_and_evaluate(config, str(tmp_path / 'd'))
  jax.tree.map(np.testing.assert_array_equal, first,
               jax.tree.map(np.asarray, again.params['encoder']))


def _val_cider(workdir) -> dict[int, float]:
  """Validation CIDEr-D by step, as the run's checkpoints recorded it."""
  checkpoints = checkpoint.Checkpoints(str(workdir / 'checkpoints'),
                                       test_configs.get_config(), create=False)
  try:
    return {step: checkpoints.manager.metrics(step)['val_CIDEr']
            for step in checkpoints.steps()}
  finally:
    checkpoints.close()


@pytest.mark.slow
def test_shapes_scst_phase_raises_validation_cider(tmp_path):
  """The README's two shapes commands, the second shortened to 200 steps,
  without the concept head (about 7 minutes on 2 CPU cores): SCST trains
  the captioner's own captions, which validation scores, and the head
  would double the first command's time."""
  # One CPU device and XLA's optimisations: this trains for minutes.
  env = dict(os.environ, XLA_FLAGS='', JAX_DISABLE_MOST_OPTIMIZATIONS='0')
  common = [f'--config.data.data_dir={tmp_path / "tfds"}',
            '--config.model.concepts.head=False',
            '--config.decode.concepts=False',
            '--config.evals.test.every_steps=-1',
            '--config.evals.test_novel.every_steps=-1']

  def run(*args):
    subprocess.run([sys.executable, '-m', 'capjax.main', *args, *common],
                   cwd=REPO, env=env, check=True, timeout=1200)

  run('--config=configs/shapes.py', f'--workdir={tmp_path / "ce"}')
  run('--config=configs/shapes_scst.py', f'--workdir={tmp_path / "scst"}',
      f'--config.init_from={tmp_path / "ce"}', '--config.train.num_steps=200',
      '--config.evals.val.every_steps=100',
      '--config.train.checkpoint_every_steps=100')
  before = _val_cider(tmp_path / 'ce')[2200]
  after = _val_cider(tmp_path / 'scst')
  print(f'validation CIDEr-D: {before:.3f} (cross-entropy) -> {after}')
  # Up at once, and further: no collapse when SCST starts.
  assert before < after[100] < after[200]
  assert after[200] > before + 0.1
