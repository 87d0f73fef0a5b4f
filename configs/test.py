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
  m = config.model
  # The stem and one basic block: an 8x8 grid of 16 channels at 32 px, and
  # the least to trace and compile (a training takes 22% less CPU time than
  # with resnet_small's three stages).
  m.encoder.arch = 'resnet_micro'
  m.encoder.frozen = False
  m.encoder.freeze_bn = False
  m.decoder.embed_dim = m.decoder.hidden_dim = m.decoder.attention_dim = 16
  # With --config.model.decoder.name=transformer: one layer each side.
  m.decoder.transformer.update(encoder_layers=1, layers=1, model_dim=16,
                               heads=2, mlp_dim=32)
  t = config.train
  t.num_steps = 6
  t.warmup_steps = 2
  t.learning_rate = 1e-3
  t.encoder_learning_rate = 1e-3
  t.log_every_steps = 2
  t.checkpoint_every_steps = 3
  config.evals.val.every_steps = 3
  config.evals.val.num_batches = 2
  config.evals.val.num_samples = 2
  # The official METEOR starts a JVM and loads its paraphrase table: 7 s of
  # CPU a decode, more than the rest of a tiny run's decode. The slow tests
  # of the metrics and of `python -m capjax.main` ask for it.
  config.decode.meteor = 'none'
  return config
