"""Your own images and captions (a folder with a COCO or Karpathy JSON).

    python -m capjax.main --config=configs/caption_files.py --workdir=DIR \
      --config.data.builder_config=flickr8k \
      --config.data.manual_dir=~/data/flickr8k \
      --config.data.annotations=dataset_flickr8k.json \
      --config.data.images=Flicker8k_Dataset

The first run converts the files into a TFDS dataset named after
`builder_config` (once; later runs reuse it). The encoder is configs/coco.py's
ResNet-101 with the same ImageNet weights (downloaded once into the Hugging
Face cache; `--mode=prepare` fetches them ahead), kept frozen.
"""

from capjax import config as config_lib


def get_config():
  config = config_lib.defaults()
  config.batch_size = 64
  d = config.data
  d.name = 'caption_files'
  d.builder_config = 'mydata'  # Name of the converted dataset in data_dir.
  d.manual_dir = ''  # Required: the folder holding the JSON and the images.
  d.annotations = 'dataset.json'  # Relative to manual_dir.
  d.images = ''  # Images folder relative to manual_dir ('' = manual_dir).
  # Karpathy-style files have train/restval/val/test splits; a single COCO
  # file becomes 'train' (use 'train=a.json,val=b.json' for more).
  d.train_split = 'train'
  config.evals.val.split = 'val'
  d.image_size = 224
  d.max_len = 18
  d.min_count = 5
  e = config.model.encoder
  e.arch = 'resnet101'
  e.variant = 'v1.5'
  e.pretrained = 'timm:a1h_in1k'  # As configs/coco.py: see there why.
  return config
