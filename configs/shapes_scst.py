"""Self-critical training on `shapes`, after configs/shapes.py.

  python -m capjax.main --config=configs/shapes.py --workdir=runs/shapes
  python -m capjax.main --config=configs/shapes_scst.py \
      --workdir=runs/shapes_scst --config.init_from=runs/shapes

Starts from the cross-entropy run's best checkpoint and optimises the CIDEr-D
of sampled captions (capjax/objectives/scst.py).
"""

from configs import shapes


def get_config():
  config = shapes.get_config()
  config.train.objective = 'scst'
  config.init_from = ''  # The cross-entropy workdir: set it on the command line.
  s = config.scst
  s.num_samples = 5
  s.baseline = 'greedy'
  s.min_words = 3  # The shortest shapes caption ("a red square") has 3.
  s.max_references = 5  # Every shapes image has 5 captions.

  # The encoder keeps its cross-entropy weights: the reward trains the
  # decoder, as in Rennie et al. 2017.
  config.model.encoder.frozen = True
  t = config.train
  t.num_steps = 600
  t.learning_rate = 5e-5  # Constant: a small step from a trained model.
  t.schedule = 'constant'
  t.warmup_steps = 0
  t.checkpoint_every_steps = 200
  config.evals.val.every_steps = 200
  return config
