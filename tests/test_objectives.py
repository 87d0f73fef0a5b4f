"""Objectives looked up by name: each one's step and what it needs."""

import pytest

from capjax import objectives
from capjax.data import prepare
from capjax.errors import UserError
from capjax.objectives import cross_entropy
from capjax.objectives import scst


def test_unknown_objective_is_one_line(test_config):
  test_config.train.objective = 'ppo'
  with pytest.raises(UserError, match="objective='ppo'; choose one of "
                     'cross_entropy, scst'):
    objectives.check(test_config)


def test_each_objective_says_what_it_needs(test_config, tmp_path):
  data = prepare.prepare(test_config, str(tmp_path))
  ce = objectives.make(test_config, data)
  assert ce.step is cross_entropy.train_step
  assert (ce.constants, ce.references, ce.needs_init_from) == ((), 0, False)
  test_config.train.objective = 'scst'
  test_config.scst.max_references = 3
  objectives.check(test_config)
  sc = objectives.make(test_config, data)
  assert sc.step is scst.train_step and sc.needs_init_from
  assert sc.references == 3
  table, = sc.constants  # The reward's document frequencies of train.
  assert len(table) > 0


def test_objective_checks_run_before_any_work(test_config):
  test_config.train.objective = 'scst'
  test_config.scst.baseline = 'median'
  with pytest.raises(UserError, match="baseline='median'"):
    objectives.check(test_config)
