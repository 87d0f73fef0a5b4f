"""Every config field, with its default, unit and meaning.

The files in `configs/` start from `defaults()` and change what their setup
needs; `--config.FIELD=VALUE` overrides any field on the command line. The
config is locked, so a misspelt field is an error rather than a new field.
"""

import ml_collections


def defaults() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0  # Seeds shuffling, caption sampling, initialisation, dropout.
  config.batch_size = 64  # Global batch, in images (each with K captions).

  config.data = d = ml_collections.ConfigDict()
  d.name = 'shapes'  # 'shapes', 'coco_captions' or 'caption_files'.
  # TFDS builder config: shapes 'default' or 'tiny'; coco_captions '2014';
  # caption_files: a name you choose for your dataset.
  d.builder_config = ''
  # Where TFDS keeps prepared datasets; '' is TFDS's default
  # (~/tensorflow_datasets, or $TFDS_DATA_DIR when set).
  d.data_dir = ''
  # Build the dataset when it is missing. False for COCO, whose download is
  # large: prepare it once with --mode=prepare.
  d.prepare = True
  # caption_files only: the folder with your images and captions JSON
  # (a TFDS manual dir), the JSON inside it (COCO format or Karpathy's
  # dataset_*.json; 'split=file,split=file' for one COCO file per split) and
  # the images' folder relative to it.
  d.manual_dir = ''
  d.annotations = ''
  d.images = ''
  d.train_split = 'train'  # TFDS split spec: 'train+restval', 'train[:10%]'.
  d.eval_split = 'validation'
  d.image_size = 96  # Pixels; images are resized to image_size^2, not cropped.
  d.normalization = 'imagenet'  # 'imagenet' (mean/std, RGB) or 'caffe' (BGR).
  d.captions_per_image = 5  # K: captions trained per image and batch row.
  d.max_len = 24  # Tokens per caption, <bos> and <eos> included.
  d.min_count = 5  # Words seen fewer times in train become <unk>.
  d.workers = 0  # Preprocessing processes; 0 preprocesses in threads here.
  d.read_threads = 8  # Threads reading and preprocessing examples.
  d.prefetch_buffer_size = 128  # Examples read ahead by those threads.
  return config
