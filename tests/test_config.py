"""Config checks at the boundary (capjax.config.check)."""

import pytest

from capjax import config as config_lib
from capjax.errors import UserError
from configs import coco, shapes, test


@pytest.mark.parametrize('get_config', [coco.get_config, shapes.get_config,
                                        test.get_config, config_lib.defaults])
def test_the_shipped_configs_pass(get_config):
  config_lib.check(get_config())


def _set(config, name, value):
  parent, _, last = name.rpartition('.')
  (config_lib.field(config, parent) if parent else config)[last] = value


@pytest.mark.parametrize('name', config_lib._POSITIVE)  # pylint: disable=protected-access
def test_counts_must_be_positive(name):
  config = config_lib.defaults()
  _set(config, name, 0)
  with pytest.raises(UserError, match=f'--config.{name}=0 must be an integer'):
    config_lib.check(config)
  _set(config, name, -3)
  with pytest.raises(UserError, match=f'--config.{name}=-3'):
    config_lib.check(config)


@pytest.mark.parametrize('name', config_lib._NOT_NEGATIVE)  # pylint: disable=protected-access
def test_zero_allowed_but_not_below(name):
  config = config_lib.defaults()
  _set(config, name, 0)
  config_lib.check(config)
  _set(config, name, -1)
  with pytest.raises(UserError, match=f'--config.{name}=-1 must be an integer >= 0'):
    config_lib.check(config)


def test_other_ranges():
  config = config_lib.defaults()
  config.data.max_len = 2
  with pytest.raises(UserError, match='max_len=2 must be >= 3'):
    config_lib.check(config)
  config = config_lib.defaults()
  config.model.decoder.dropout = 1.0
  with pytest.raises(UserError, match='dropout=1.0 must be in'):
    config_lib.check(config)


def test_best_metric_names_a_validation_metric():
  config = config_lib.defaults()
  assert config_lib.best_metric(config) == ('val_CIDEr', True)
  config.train.best_metric = 'val_loss'
  assert config_lib.best_metric(config) == ('val_loss', False)
  # Turned off, validation logs nothing: no step is ever the best, as asked.
  config.evals.val.every_steps = -1
  config_lib.check(config)
  for name in ('val_CIDEr-D', 'test_CIDEr', 'CIDEr', ''):
    config.train.best_metric = name
    with pytest.raises(UserError, match=(
        rf"^--config.train.best_metric='{name}' is not a metric of a "
        r'validation evaluator in config.evals; choose one of val_loss, '
        r'val_cross_entropy, .*val_CIDEr$')):
      config_lib.check(config)
