"""Self-critical training on MS COCO, after configs/coco.py.

  python -m capjax.main --config=configs/coco_scst.py --workdir=DIR_SCST \
      --config.init_from=DIR_CE

Starts from the cross-entropy run's best checkpoint (by validation CIDEr-D)
and optimises the CIDEr-D of sampled captions, as Rennie et al. 2017 did
after cross-entropy training (capjax/objectives/scst.py).
"""

from configs import coco


def get_config():
  config = coco.get_config()
  config.train.objective = 'scst'
  config.init_from = ''  # The cross-entropy workdir: set it on the command line.
  config.batch_size = 64  # Images; x5 samples each (and one greedy caption).
  s = config.scst
  s.num_samples = 5
  s.baseline = 'greedy'
  s.min_words = 4  # COCO captions have 8 or more words but for a few.
  s.max_references = 7  # COCO images have 5 to 7 captions.
  # The encoder keeps its weights, as in Rennie et al. 2017.
  config.model.encoder.frozen = True
  t = config.train
  t.num_steps = 100_000  # ~57 epochs of 113,287 images at 64 per step.
  t.learning_rate = 5e-5
  t.schedule = 'constant'
  t.warmup_steps = 0
  t.checkpoint_every_steps = 2_000
  return config
