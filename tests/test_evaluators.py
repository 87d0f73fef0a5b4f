"""The evaluators: built from config.evals, validation's one encoder pass."""

import functools

import jax
import numpy as np
import pytest

from capjax import config as config_lib
from capjax import evaluators
from capjax import models
from capjax import parallel
from capjax import state as state_lib
from capjax.data import pipeline
from capjax.data import prepare
from capjax.errors import UserError
from capjax.evaluators import common
from capjax.evaluators import validation


def _convolutions(fn, *args) -> int:
  # Every convolution of the traced program, nested loops included.
  return str(jax.make_jaxpr(fn)(*args)).count('conv_general_dilated')


def test_validation_runs_the_encoder_once_per_batch(test_config, tmp_path):
  config = test_config
  data = prepare.prepare(config, str(tmp_path))
  predict = models.Predict(models.build_captioner(
      config.model, len(data.vocab)))
  state = state_lib.create(config, predict, None, jax.random.key(0))
  batch = next(iter(pipeline.eval_dataset(
      config, data.source('validation'), data.vocab)))
  options = common.SearchOptions.of(config.decode, beam_size=2)
  validate = functools.partial(validation._validate, predict=predict,
                               config=config, options=options)
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  encoder = _convolutions(
      lambda v, x: predict.encode(v, {'image': x}), variables,
      batch['image'])
  assert encoder > 0
  # Loss and beam search from the same features: the encoder's convolutions
  # once, not once for the loss and again for the search.
  assert _convolutions(validate, state, batch) == encoder


def test_build_follows_config_evals(test_config, tmp_path):
  config = test_config
  config.evals.test.every_steps = 0
  config.evals.novel = config_lib.decode_split('test_novel', every_steps=4)
  config.evals.val.every_steps = -1  # Off: not built.
  data = prepare.prepare(config, str(tmp_path))
  predict = models.Predict(models.build_captioner(
      config.model, len(data.vocab)))
  built = evaluators.build(config, par=parallel.Parallel(config),
                           predict=predict, data=data, workdir=str(tmp_path))
  assert sorted(built) == ['novel', 'test']
  assert isinstance(built['test'], evaluators.DecodeSplit)
  assert (built['test'].split, built['test'].every_steps) == ('test', 0)
  assert (built['novel'].split, built['novel'].every_steps) == (
      'test_novel', 4)
  # Splits decoded alike share one compiled search.
  assert built['test']._search is built['novel']._search


@pytest.mark.parametrize('field, value, match', [
    ('type', 'bleu', "is not an evaluator"),
    ('every_steps', -2, 'must be an integer >= -1'),
    ('num_batches', 0, 'would validate nothing'),
    ('beam_size', 0, 'must be an integer >= 1'),
    ('split', '', 'split is empty'),
])
def test_config_check_names_the_bad_entry(field, value, match):
  config = config_lib.defaults()
  config.evals.val[field] = value
  with pytest.raises(UserError, match=match) as e:
    config_lib.check(config)
  assert 'evals.val' in str(e.value)


def test_on_chief_returns_the_value_in_one_process():
  assert common.on_chief(lambda: {'CIDEr': 1.5}) == {'CIDEr': 1.5}
  assert np.isclose(common.on_chief(lambda: 0.25), 0.25)


def _as_process(monkeypatch, index, chief_payloads):
  """This process as process `index` of 2, with broadcasts that hand out
  what process 0 sends (recorded in `chief_payloads` when index is 0)."""
  monkeypatch.setattr(jax, 'process_index', lambda: index)
  monkeypatch.setattr(jax, 'process_count', lambda: 2)

  def broadcast(x):
    if index == 0:
      chief_payloads.append(np.asarray(x))
      return x
    return chief_payloads.pop(0)
  monkeypatch.setattr(common.multihost_utils, 'broadcast_one_to_all',
                      broadcast)


def test_only_process_0_scores_and_the_others_get_its_metrics(monkeypatch):
  sent, calls = [], []

  def score():
    calls.append(jax.process_index())
    return {'CIDEr': 1.25}
  _as_process(monkeypatch, 0, sent)
  assert common.on_chief(score) == {'CIDEr': 1.25}
  _as_process(monkeypatch, 1, sent)
  assert common.on_chief(score) == {'CIDEr': 1.25}
  assert calls == [0]  # Scored (METEOR's Java started) once.


def test_a_scoring_error_reaches_every_process(monkeypatch):
  sent = []

  def fail():
    raise UserError('decoded 3 of the 4 images')
  for index in (0, 1):
    _as_process(monkeypatch, index, sent)
    with pytest.raises(UserError, match='decoded 3 of the 4'):
      common.on_chief(fail)
