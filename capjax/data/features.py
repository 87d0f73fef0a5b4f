"""The feature schema every capjax dataset shares with TFDS `coco_captions`.

One schema means one input pipeline: it reads `image` (uint8 [H, W, 3]),
`image/id`, `image/filename` and `captions/text` and nothing else, so a
builder may add features of its own (shapes adds the scene's objects).
"""

import numpy as np
import tensorflow_datasets as tfds


def caption_features(image_format: str, **extra) -> tfds.features.FeaturesDict:
  """FeaturesDict with the `coco_captions` caption fields, plus `extra`."""
  return tfds.features.FeaturesDict({
      'image': tfds.features.Image(shape=(None, None, 3),
                                   encoding_format=image_format),
      'image/id': tfds.features.Scalar(dtype=np.int64),
      'image/filename': tfds.features.Text(),
      'captions': tfds.features.Sequence({
          'id': tfds.features.Scalar(dtype=np.int64),
          'text': tfds.features.Text(),
      }),
      **extra,
  })


def caption_example(image, image_id: int, filename: str, captions: list[str],
                    caption_ids: list[int] | None = None, **extra):
  """One example in that schema; caption ids default to 0, 1, 2, ..."""
  if caption_ids is None:
    caption_ids = list(range(len(captions)))
  return {
      'image': image,
      'image/id': image_id,
      'image/filename': filename,
      'captions': {
          'id': list(caption_ids),
          'text': captions,
      },
      **extra,
  }
