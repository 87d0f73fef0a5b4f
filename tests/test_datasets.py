"""Dataset registry and preparation; COCO through `tfds.testing.mock_data`."""

import os
import re
import subprocess
import sys
import threading
import time

import pytest
import tensorflow_datasets as tfds

from capjax import config as config_lib
from capjax.data import datasets
from capjax.data import locks
from capjax.data import pipeline
from capjax.data import prepare
from capjax.data import shapes
from capjax.data import vocab as vocab_lib
from capjax.errors import UserError
import conftest
import preload
from conftest import coco_config
from conftest import COCO_WORDS
from conftest import KARPATHY_SIZES
from conftest import coco_data_source
from conftest import REPO


def test_coco_config_through_mock_data(tmp_path):
  config = coco_config()
  with tfds.testing.mock_data(as_data_source_fn=coco_data_source):
    # Not prepared, and the COCO config never downloads on its own.
    with pytest.raises(UserError, match='--mode=prepare'):
      prepare.prepare(config, str(tmp_path))
    # --mode=prepare: TFDS's real download_and_prepare (a no-op when mocked).
    data = prepare.prepare(config, str(tmp_path), force=True)
    assert data.builder.name == 'coco_captions'
    assert data.vocab.source['split'] == 'train+restval'
    # The vocabulary comes from train+restval only, with min_count applied.
    assert set(data.vocab.words[4:]) <= set(COCO_WORDS)
    assert data.vocab.source['num_captions'] == sum(
        len(coco_data_source(data.builder, s)[i]['captions']['text'])
        for s in ('train', 'restval') for i in range(KARPATHY_SIZES[s]))
    train = datasets.data_source(data.builder, config.data.train_split)
    assert len(train) == 17
    batch = next(iter(pipeline.train_dataset(config, train, data.vocab)))
    assert batch['image'].shape == (4, 32, 32, 3)
    assert batch['captions'].shape == (4, 5, 18)
    assert set(batch['image/id']) <= set(range(17)) | set(range(1000, 1005))
    val = datasets.data_source(data.builder, config.evals.val.split)
    ids = [int(i) for b in pipeline.eval_dataset(config, val, data.vocab)
           for i, m in zip(b['image/id'], b['mask']) if m]
    assert sorted(ids) == [2000, 2001, 2002, 2003]


def test_objects_are_read_by_category_name(tmp_path):
  config = coco_config()
  with tfds.testing.mock_data(as_data_source_fn=coco_data_source):
    builder = prepare.prepare(config, str(tmp_path), force=True).builder
    label = builder.info.features['objects']['label']
    # Numbered categories (no download has named them) score nothing.
    assert datasets.objects(builder, 'test') is None
    names = ['person', 'bicycle', 'car', 'motorcycle'] + [
        f'category {i}' for i in range(4, label.num_classes)]
    label.names = names
    kind, objects, got = datasets.objects(builder, 'test')
  assert kind == 'categories' and got == names
  # The mock's one object per image is category 3.
  assert objects == {3000 + i: ['motorcycle']
                     for i in range(KARPATHY_SIZES['test'])}


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
  test_config.evals.val.split = 'validation+tset'
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


_PREPARE = """
import sys
from absl import logging
from capjax.data import datasets
from configs import test
config = test.get_config()
config.data.data_dir = sys.argv[1]
logging.set_verbosity(logging.INFO)
datasets.prepare(config.data)
print('prepared')
"""


def test_a_second_job_waits_for_the_dataset_build(tmp_path):
  from configs import test  # pylint: disable=g-import-not-at-top
  config = test.get_config()
  config.data.data_dir = str(tmp_path)
  builder = datasets.get_builder(config.data)
  lines = []
  with locks.waiting(f'{builder.data_dir}.prepare.lock', 'test'):
    proc = preload.Popen(
        [sys.executable, '-c', _PREPARE, str(tmp_path)], cwd=REPO,
        text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr))
    reader.start()
    try:
      deadline = time.monotonic() + 120
      while not any('Waiting for another job preparing shapes' in l
                    for l in lines):
        assert proc.poll() is None and time.monotonic() < deadline, lines
        time.sleep(0.2)
      # The first job builds meanwhile; the second must not build too.
      shapes.Shapes(config='tiny', data_dir=str(tmp_path),
                    file_format='array_record').download_and_prepare()
    except BaseException:
      proc.kill()
      raise
  out = proc.stdout.read()
  assert proc.wait(timeout=120) == 0, ''.join(lines)[-3000:]
  reader.join()
  assert out.strip() == 'prepared'  # TFDS prints its build here: none.
  assert datasets.get_builder(config.data).is_prepared()


@pytest.mark.parametrize('read_only', [True, False])
def test_a_read_only_or_full_data_dir_is_one_line(tmp_path, read_only):
  """The shapes build into a read-only TFDS data dir, or one that fills up
  while TFDS writes the dataset: the job's last line says which folder and
  why, with no traceback."""
  mount_point = tmp_path / 'mnt'
  proc = conftest.in_a_tmpfs(
      mount_point, sys.executable, '-m', 'capjax.main',
      '--config=configs/test.py', f'--workdir={tmp_path / "run"}',
      '--mode=prepare', f'--config.data.data_dir={mount_point / "tfds"}',
      size='1m' if read_only else '200k', read_only=read_only)
  assert proc.returncode == 1, proc.stderr[-3000:]
  reason = ('the file system is read-only. Choose a writable folder' if
            read_only else r'[0-9.]+ [KMGT]?i?B are free\. Free some space '
            'there, then run again')
  # TFDS's progress bars may still clear their lines after it.
  [line] = [l for l in proc.stderr.splitlines() if 'capjax: error' in l]
  assert re.fullmatch(
      r'capjax: error: (cannot write|no space left for) the shapes dataset in '
      f'{re.escape(str(mount_point / "tfds"))}: {reason}, or prepare it in '
      r'another --config\.data\.data_dir', line), proc.stderr[-3000:]
  assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
