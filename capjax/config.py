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

  config.model = m = ml_collections.ConfigDict()
  # Compute dtype ('bfloat16' on GPU/TPU); parameters are always float32.
  m.dtype = 'float32'
  m.encoder = e = ml_collections.ConfigDict()
  # 'resnet_tiny' (tests, shapes), 'resnet18', 'resnet34', 'resnet50',
  # 'resnet101' or 'resnet152'.
  e.arch = 'resnet50'
  # 'v1.5': stride on the 3x3 conv, no conv bias (torchvision, timm).
  # 'v1': stride on the first 1x1 conv, convs with bias (Keras applications).
  e.variant = 'v1.5'
  # Average-pool the feature grid to grid x grid (14 in Show, Attend and
  # Tell); 0 keeps the encoder's own grid (7x7 at 224 px).
  e.grid = 0
  # No gradient into the encoder (and no optimizer state for it).
  e.frozen = True
  # BatchNorm uses its running statistics in training too (always true for a
  # frozen encoder).
  e.freeze_bn = True
  # ImageNet weights: '' (random init); a file: .h5 / .keras from Keras
  # applications (variant 'v1', normalization 'caffe') or a torchvision/timm
  # .safetensors (variant 'v1.5'); or a download: 'keras:imagenet' (Keras
  # applications) or 'timm' / 'timm:TAG' (Hugging Face, needs huggingface_hub).
  e.pretrained = ''
  m.decoder = dc = ml_collections.ConfigDict()
  dc.embed_dim = 512  # Word embedding size.
  dc.hidden_dim = 512  # LSTM state size.
  dc.attention_dim = 512  # Size of the additive attention's hidden layer.
  dc.dropout = 0.5  # On the deep output layer's input (Xu et al. 2015).
  return config
