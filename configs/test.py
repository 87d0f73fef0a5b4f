"""Tiny everything, for tests and smoke runs: the 'tiny' shapes build."""

from capjax import config as config_lib


def get_config():
  config = config_lib.defaults()
  config.batch_size = 8
  d = config.data
  d.name = 'shapes'
  d.builder_config = 'tiny'  # 256 train and 64 images per eval split.
  d.image_size = 32
  d.max_len = 27  # Shapes captions have at most 25 words.
  d.min_count = 1
  d.read_threads = 2
  d.prefetch_buffer_size = 16
  return config
