"""MS COCO 2014 with the Karpathy splits, set up as in the literature.

Train on train+restval (113,287 images), validate on val, report on test
(5,000 images each). Prepare the data once with `--mode=prepare`.
"""

from capjax import config as config_lib


def get_config():
  config = config_lib.defaults()
  config.batch_size = 256  # Images; x5 captions each.
  d = config.data
  d.name = 'coco_captions'
  d.builder_config = '2014'  # The only coco_captions config: Karpathy splits.
  d.prepare = False  # ~20 GB download: prepare explicitly, once.
  d.train_split = 'train+restval'
  d.eval_split = 'val'
  d.image_size = 224
  d.max_len = 18  # 16 words + <bos>/<eos> covers ~98% of COCO captions.
  d.min_count = 5  # As in Karpathy & Li; ~10,000 words.
  d.workers = 16  # JPEG decoding of 224 px images needs processes on a GPU host.
  # Validation: loss, and greedy captions of 20 batches (5,120 images: all
  # of val) scored with CIDEr-D, which picks the best checkpoint.
  config.eval.num_batches = 20
  config.eval.every_steps = 2_000
  # The papers' test: beam 3 on the Karpathy test split, after training too.
  config.decode.split = 'test'
  config.decode.beam_size = 3
  config.decode.batch_size = 1_024
  config.decode.after_training = 'test'
  return config
