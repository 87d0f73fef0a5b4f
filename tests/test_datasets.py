"""Dataset registry and preparation; COCO through `tfds.testing.mock_data`."""

import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from capjax import config as config_lib
from capjax.data import datasets
from capjax.data import pipeline
from capjax.data import prepare
from capjax.data import shapes
from capjax.data import vocab as vocab_lib
from capjax.errors import UserError

_WORDS = 'a man woman dog cat riding sitting on the red bench table with'.split()
_KARPATHY_SIZES = {'train': 12, 'restval': 5, 'val': 4, 'test': 4}


def _coco_data_source(builder, split, decoders=None, **kwargs):
  """What a prepared coco_captions would return, through its real features.

  Each example is serialised and parsed back with the builder's own feature
  spec, exactly as TFDS reads ArrayRecord files, so decoders such as
  `SkipDecoding` behave as they do on the real dataset. (TFDS's default
  mock draws sequence features of unequal lengths, which cannot be encoded.)
  """
  del kwargs
  features = builder.info.features
  records = []
  for name in datasets.split_names(split):
    offset = list(_KARPATHY_SIZES).index(name) * 1000
    for i in range(_KARPATHY_SIZES[name]):
      rng = np.random.default_rng(offset + i)
      captions = [' '.join(rng.choice(_WORDS, rng.integers(4, 12))).capitalize()
                  + '.' for _ in range(rng.integers(5, 8))]
      records.append(features.serialize_example({
          'image': rng.integers(0, 256, (rng.integers(30, 60), 50, 3),
                                dtype=np.uint8),
          'image/id': offset + i,
          'image/filename': f'COCO_{name}2014_{offset + i:012d}.jpg',
          'captions': {'id': list(range(len(captions))), 'text': captions},
          'objects': {'area': [10], 'bbox': [tfds.features.BBox(.1, .1, .5, .5)],
                      'id': [1], 'is_crowd': [False], 'label': [3]},
      }))

  class Source:
    def __len__(self):
      return len(records)

    def __getitem__(self, i):
      return features.deserialize_example_np(records[i], decoders=decoders)
  return Source()


def _coco_config(get_config=None):
  """configs/coco.py (or a config built on it), for the mock data."""
  from configs import coco  # pylint: disable=g-import-not-at-top
  config = (get_config or coco.get_config)()
  config.batch_size = 4
  config.data.image_size = 32
  config.data.min_count = 2
  config.data.workers = 0
  return config


def _tiny_coco_training(config):
  """`config` shrunk to 2 training steps of a tiny model on the mock data."""
  config.batch_size = 8
  config.model.encoder.arch = 'resnet_tiny'
  for name in ('embed_dim', 'hidden_dim', 'attention_dim'):
    config.model.decoder[name] = 16
  config.train.num_steps = 2
  config.eval.num_batches = 1
  config.eval.num_samples = 1
  config.decode.batch_size = 8
  config.decode.meteor = 'none'
  # Mocked, "preparing" downloads nothing; TFDS's real call still runs.
  config.data.prepare = True
  return config


def test_coco_config_through_mock_data(tmp_path):
  config = _coco_config()
  with tfds.testing.mock_data(as_data_source_fn=_coco_data_source):
    # Not prepared, and the COCO config never downloads on its own.
    with pytest.raises(UserError, match='--mode=prepare'):
      prepare.prepare(config, str(tmp_path))
    # --mode=prepare: TFDS's real download_and_prepare (a no-op when mocked).
    data = prepare.prepare(config, str(tmp_path), force=True)
    assert data.builder.name == 'coco_captions'
    assert data.vocab.source['split'] == 'train+restval'
    # The vocabulary comes from train+restval only, with min_count applied.
    assert set(data.vocab.words[4:]) <= set(_WORDS)
    assert data.vocab.source['num_captions'] == sum(
        len(_coco_data_source(data.builder, s)[i]['captions']['text'])
        for s in ('train', 'restval') for i in range(_KARPATHY_SIZES[s]))
    train = datasets.data_source(data.builder, config.data.train_split)
    assert len(train) == 17
    batch = next(iter(pipeline.train_dataset(config, train, data.vocab)))
    assert batch['image'].shape == (4, 32, 32, 3)
    assert batch['captions'].shape == (4, 5, 18)
    assert set(batch['image/id']) <= set(range(17)) | set(range(1000, 1005))
    val = datasets.data_source(data.builder, config.data.eval_split)
    ids = [int(i) for b in pipeline.eval_dataset(config, val, data.vocab)
           for i, m in zip(b['image/id'], b['mask']) if m]
    assert sorted(ids) == [2000, 2001, 2002, 2003]


def test_unknown_dataset_name():
  config = config_lib.defaults()
  config.data.name = 'cocoo'
  with pytest.raises(UserError, match="unknown dataset.*'cocoo'.*coco_captions"):
    datasets.get_builder(config.data)


def test_missing_data_dir_when_not_preparing(tmp_path):
  config = config_lib.defaults()
  config.data.data_dir = str(tmp_path / 'nope')
  config.data.prepare = False
  with pytest.raises(UserError, match='data dir.*does not exist'):
    datasets.get_builder(config.data)


def test_unprepared_dataset_names_the_fix(tmp_path):
  config = config_lib.defaults()
  config.data.data_dir = str(tmp_path)
  config.data.builder_config = 'tiny'
  config.data.prepare = False
  with pytest.raises(UserError, match='not prepared.*--mode=prepare'):
    datasets.prepare(config.data)


def test_unknown_split(test_config, tmp_path):
  test_config.data.eval_split = 'validation+tset'
  with pytest.raises(UserError, match="no split 'tset'.*test_novel"):
    prepare.prepare(test_config, str(tmp_path))


def test_split_names():
  assert datasets.split_names('train+restval') == ['train', 'restval']
  assert datasets.split_names('train[:10%] + val[5:]') == ['train', 'val']


def test_tfrecord_build_is_refused_with_the_conversion_command(tmp_path):
  shapes.Shapes(config='tiny', data_dir=str(tmp_path),
                file_format='tfrecord').download_and_prepare()
  config = config_lib.defaults()
  config.data.data_dir = str(tmp_path)
  config.data.builder_config = 'tiny'
  with pytest.raises(UserError, match='tfds convert_format'):
    datasets.prepare(config.data)


def test_prepare_builds_vocab_once_and_keeps_it(test_config, tmp_path):
  data = prepare.prepare(test_config, str(tmp_path))
  path = tmp_path / vocab_lib.FILENAME
  assert vocab_lib.Vocab.load(str(path)) == data.vocab
  assert {'red', 'circle', 'left', 'above'} <= set(data.vocab.words)
  before = path.read_bytes()
  test_config.data.min_count = 3
  with pytest.raises(UserError, match='built from other data'):
    prepare.prepare(test_config, str(tmp_path))
  assert path.read_bytes() == before


def test_unwritable_workdir(tmp_path, test_config):
  blocker = tmp_path / 'file'
  blocker.write_text('')
  with pytest.raises(UserError, match='cannot create --workdir'):
    prepare.prepare(test_config, str(blocker / 'run'))


def test_default_data_dir_is_tfds_own():
  # An empty data_dir means TFDS's data dir, never the current directory.
  builder = datasets.get_builder(config_lib.defaults().data)
  assert builder.data_dir.startswith(
      os.path.expanduser(tfds.core.constants.DATA_DIR))
