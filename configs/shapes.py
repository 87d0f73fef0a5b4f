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
  # One of the five captions per image and step (sampled anew each epoch):
  # on a CPU, more images per second teach more than more captions per image.
  d.captions_per_image = 1
  d.read_threads = 4

  m = config.model
  m.encoder.arch = 'resnet_small'  # 4x4 feature grid at 64 px.
  m.encoder.frozen = False  # Trained from scratch, with the decoder.
  m.encoder.freeze_bn = False
  m.decoder.embed_dim = 64
  m.decoder.hidden_dim = 128
  m.decoder.attention_dim = 64
  # No dropout: this small model underfits (train accuracy stayed below
  # validation with 0.2), and 0.0 gave 75.3% vs 73.5% validation accuracy.
  m.decoder.dropout = 0.0
  # With --config.model.decoder.name=transformer: two layers each side, of
  # the LSTM's width.
  m.decoder.transformer.update(encoder_layers=2, layers=2, model_dim=128,
                               heads=4, mlp_dim=256)
  # The concept head: each grid position's colour and shape, predicted apart
  # (capjax.models.concepts), so that it can name pairs no training image
  # shows.
  m.concepts.head = True
  # Shapes told apart without their hues: from the colour image's features,
  # it named the shape of only 13% of the held-out pairs' objects
  # (test_novel); README, "Captions that name what is there".
  m.concepts.objects_without_hue = True

  t = config.train
  t.num_steps = 2_200  # About 7 epochs; under 7 minutes on 2 CPU cores.
  t.learning_rate = 3e-3
  t.encoder_learning_rate = 3e-3
  t.warmup_steps = 100
  # 16 positions: the paper's target of total attention 1 per position
  # cannot be met by ~12 words, so the penalty is kept light.
  t.attention_penalty = 0.1
  t.log_every_steps = 50
  t.checkpoint_every_steps = 1_100
  config.evals.val.every_steps = 1_100
  config.evals.val.num_samples = 4
  # The end of the run: test, and test_novel's unseen colour-shape pairs.
  config.evals.test.every_steps = 0
  config.evals.test_novel = config_lib.decode_split('test_novel')
  # The captions must name each object the concept head finds (constrained
  # beam search): README, "Captions that name what is there".
  config.decode.concepts = True
  return config
