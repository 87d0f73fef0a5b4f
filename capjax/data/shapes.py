"""`shapes`: the embedded synthetic captioning dataset, as a TFDS builder.

Scenes and captions come from `scenes.py`. `test_novel` is a
compositional-generalisation split: every image in it holds at least one
colour-shape pair from `scenes.HELD_OUT`, and no other split ever has one.

Each example is a function of (config.seed, split, index) alone, so the build
is deterministic however many processes render it.
"""

import concurrent.futures
import functools
import multiprocessing
import os

import tensorflow_datasets as tfds

from capjax.data import features
from capjax.data import scenes

SPLITS = ('train', 'validation', 'test', 'test_novel')
# Below this many images a process pool costs more than it saves.
_MIN_PARALLEL = 2_000


class ShapesConfig(tfds.core.BuilderConfig):
  """Split sizes, resolution and seed of one `shapes` variant."""

  def __init__(self, *, num_train: int, num_eval: int, image_size: int = 96,
               seed: int = 0, **kwargs):
    super().__init__(version=tfds.core.Version('1.0.0'), **kwargs)
    self.num_train = num_train
    self.num_eval = num_eval  # Each of validation, test and test_novel.
    self.image_size = image_size
    self.seed = seed


class Shapes(tfds.core.GeneratorBasedBuilder):
  """Synthetic scenes of coloured shapes with five grammar captions each."""

  VERSION = tfds.core.Version('1.0.0')
  BUILDER_CONFIGS = [
      ShapesConfig(name='default', num_train=20_000, num_eval=1_000,
                   description='20,000 train and 1,000 images per eval split.'),
      ShapesConfig(name='tiny', num_train=256, num_eval=64,
                   description='A few hundred images, for tests.'),
  ]

  def __init__(self, **kwargs):
    # grain reads through random access, which needs ArrayRecord files.
    kwargs.setdefault('file_format', 'array_record')
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=__doc__,
        features=features.caption_features(
            'jpeg',
            objects=tfds.features.Sequence({
                'shape': tfds.features.ClassLabel(names=scenes.SHAPES),
                'color': tfds.features.ClassLabel(names=scenes.COLORS_LIST),
                'size': tfds.features.ClassLabel(names=scenes.SIZES),
                'bbox': tfds.features.BBoxFeature(),
            })),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    c = self.builder_config
    sizes = {'train': c.num_train, 'validation': c.num_eval,
             'test': c.num_eval, 'test_novel': c.num_eval}
    return {s: self._generate_examples(s, sizes[s]) for s in SPLITS}

  def _generate_examples(self, split: str, num: int):
    c = self.builder_config
    split_index = SPLITS.index(split)
    make = functools.partial(scenes.make_scene, c.seed, split_index,
                             image_size=c.image_size,
                             novel=split == 'test_novel')
    workers = os.cpu_count() or 1
    if num < _MIN_PARALLEL or workers == 1:
      rendered = map(make, range(num))
    else:
      # 'spawn': the workers need only numpy and Pillow, and never inherit
      # the parent's threads (forking a process with threads can deadlock).
      pool = concurrent.futures.ProcessPoolExecutor(
          workers, mp_context=multiprocessing.get_context('spawn'))
      rendered = pool.map(make, range(num), chunksize=256)
    for i, scene in enumerate(rendered):
      image_id = split_index * 1_000_000 + i
      yield image_id, features.caption_example(
          scene.jpeg, image_id, f'{split}_{i:06d}.jpg', scene.captions,
          objects={
              'shape': [o.shape for o in scene.objects],
              'color': [o.color for o in scene.objects],
              'size': [o.size for o in scene.objects],
              'bbox': [tfds.features.BBox(*b) for b in scene.boxes],
          })
    if num >= _MIN_PARALLEL and workers > 1:
      pool.shutdown()
