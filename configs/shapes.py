"""The embedded default: the synthetic `shapes` dataset, small enough for a
laptop CPU. `python -m capjax.main --config=configs/shapes.py --workdir=DIR`."""

from capjax import config as config_lib


def get_config():
  config = config_lib.defaults()
  config.batch_size = 64
  d = config.data
  d.name = 'shapes'
  d.builder_config = 'default'  # 20,000 train images; 'tiny' for a smoke run.
  d.image_size = 64  # The shapes stay legible at 64 px, and CPU steps are fast.
  d.max_len = 27  # The longest grammar caption has 25 words.
  d.min_count = 1  # A closed grammar: every word is a real word.
  d.eval_split = 'validation'
  return config
