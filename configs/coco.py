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
  return config
