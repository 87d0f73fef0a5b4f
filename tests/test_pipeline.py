"""The grain input pipeline."""

import json

import grain
import numpy as np
import pytest

from capjax import config as config_lib
from capjax.data import datasets
from capjax.data import images
from capjax.data import pipeline
from capjax.data import vocab as vocab_lib
from capjax.errors import UserError

VOCAB = vocab_lib.Vocab.build(['a red circle', 'a blue square'], min_count=1)


def _source(n, captions_per_example=5):
  """In-memory examples shaped like TFDS's numpy output."""
  rng = np.random.default_rng(0)
  return [{
      'image': rng.integers(0, 256, (20 + i % 3, 30, 3), dtype=np.uint8),
      'image/id': np.int64(1000 + i),
      'image/filename': f'{i}.jpg',
      'captions': {'id': list(range(captions_per_example)),
                   'text': [f'a red circle {"square " * j}'.encode()
                            for j in range(captions_per_example)]},
  } for i in range(n)]


def _config(batch_size=4, **data):
  config = config_lib.defaults()
  config.batch_size = batch_size
  config.data.image_size = 16
  config.data.max_len = 8
  config.data.captions_per_image = 3
  config.data.read_threads = 2
  config.data.update(data)
  return config


def _ids(batches):
  return [int(i) for b in batches for i, m in zip(b['image/id'], b['mask'])
          if m]


def test_train_batch_shapes_and_dtypes():
  it = iter(pipeline.train_dataset(_config(), _source(10), VOCAB,
                                   process_index=0, process_count=1))
  batch = next(it)
  assert batch['image'].shape == (4, 16, 16, 3)
  assert batch['image'].dtype == np.uint8  # Normalised on the device.
  assert batch['captions'].shape == (4, 3, 8)
  assert batch['captions'].dtype == np.int32
  assert batch['image/id'].dtype == np.int64 and batch['mask'].all()
  # Every caption starts with <bos> and has an <eos>.
  assert (batch['captions'][..., 0] == vocab_lib.BOS).all()
  assert ((batch['captions'] == vocab_lib.EOS).sum(-1) == 1).all()


def test_images_reach_the_batch_as_uint8_pixels():
  # A constant image keeps its exact values through resize and batching.
  source = [dict(_source(1)[0], image=np.full((7, 9, 3), [255, 128, 0],
                                              np.uint8))] * 4
  batch = next(iter(pipeline.train_dataset(
      _config(), source, VOCAB, process_index=0, process_count=1)))
  np.testing.assert_array_equal(batch['image'][0, 5, 5], [255, 128, 0])


def test_encoded_images_are_decoded_at_the_model_size():
  """Sources that leave images encoded (the originals, without the copy)."""
  rng = np.random.default_rng(0)
  pixels = rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)
  source = [dict(_source(1)[0], image=images.encode_jpeg(pixels, 95))] * 4
  batch = next(iter(pipeline.train_dataset(
      _config(), source, VOCAB, process_index=0, process_count=1)))
  np.testing.assert_array_equal(batch['image'][0],
                                images.decode_resized(source[0]['image'], 16))


@pytest.mark.parametrize('shape', [(5, 7), (5, 7, 1), (5, 7, 4), (1, 1, 3),
                                   (3, 1000, 3)])
def test_resize_any_layout_to_rgb_square(shape):
  out = images.resize(np.zeros(shape, np.uint8) + 77, 16)
  assert out.shape == (16, 16, 3) and out.dtype == np.uint8
  assert (out == 77).all()


def test_caption_sampling_covers_few_and_many():
  preprocess = pipeline.Preprocess(VOCAB, 8, 5, 12)
  example = _source(1, captions_per_example=2)[0]
  out = preprocess(example, np.random.default_rng(0))
  lengths = sorted(set((out['captions'] > 0).sum(-1)))
  assert lengths == [5, 6]  # Both captions, some repeated.
  example = _source(1, captions_per_example=7)[0]
  out = preprocess(example, np.random.default_rng(0))
  assert len({tuple(c) for c in out['captions']}) == 5  # 5 distinct of 7.
  # Without an rng (evaluation) the first K, deterministically.
  out = preprocess(example, None)
  assert list((out['captions'] > 0).sum(-1)) == [5, 6, 7, 8, 9]


def test_references_are_every_caption_in_order():
  preprocess = pipeline.Preprocess(VOCAB, 8, 1, 12, references=5)
  for count in (2, 7):
    example = _source(1, captions_per_example=count)[0]
    out = preprocess(example, np.random.default_rng(0))
    kept = min(count, 5)
    np.testing.assert_array_equal(
        out['references'][:kept],
        VOCAB.encode_batch([t.decode() for t in
                            example['captions']['text'][:kept]], 12))
    assert (out['references'][kept:] == vocab_lib.PAD).all()
  # The objective says how many references the batches carry; none by
  # default.
  config = _config()
  batch = next(iter(pipeline.train_dataset(config, _source(8), VOCAB,
                                           process_index=0,
                                           process_count=1)))
  assert 'references' not in batch
  batch = next(iter(pipeline.train_dataset(config, _source(8), VOCAB,
                                           references=3, process_index=0,
                                           process_count=1)))
  assert batch['references'].shape == (4, 3, 8)


def test_train_shards_are_disjoint_and_cover_an_epoch():
  source = _source(16)
  config = _config(batch_size=4)
  seen = []
  for p in range(2):
    it = iter(pipeline.train_dataset(config, source, VOCAB, process_index=p,
                                     process_count=2))
    epoch = [next(it) for _ in range(4)]  # 8 examples per process.
    assert all(b['image'].shape[0] == 2 for b in epoch)  # Per-process batch.
    seen.append(_ids(epoch))
  assert not set(seen[0]) & set(seen[1])
  assert sorted(seen[0] + seen[1]) == [1000 + i for i in range(16)]
  assert seen[0] != sorted(seen[0])  # Shuffled.


def test_processes_split_the_batches_of_one_process():
  # 2 processes x 2 rows are exactly the global batches of 1 process x 4,
  # captions included: the job trains the same whatever the process count.
  source = _source(16)
  config = _config(batch_size=4)
  one = iter(pipeline.train_dataset(config, source, VOCAB, process_index=0,
                                    process_count=1))
  two = [iter(pipeline.train_dataset(config, source, VOCAB, process_index=p,
                                     process_count=2)) for p in range(2)]
  for _ in range(6):  # Into the second epoch.
    whole = next(one)
    parts = [next(it) for it in two]
    for key in ('image', 'captions', 'image/id'):
      np.testing.assert_array_equal(
          whole[key], np.concatenate([p[key] for p in parts]))


def test_epochs_are_reshuffled_and_seeded():
  def first_two_epochs(seed):
    config = _config(batch_size=4)
    config.seed = seed
    it = iter(pipeline.train_dataset(config, _source(8), VOCAB,
                                     process_index=0, process_count=1))
    return [_ids([next(it), next(it)]) for _ in range(2)]
  e1, e2 = first_two_epochs(0)
  assert sorted(e1) == sorted(e2) and e1 != e2
  assert first_two_epochs(0) == [e1, e2]
  assert first_two_epochs(1) != [e1, e2]


def test_eval_covers_split_once_with_equal_steps_per_process():
  source = _source(13)
  config = _config(batch_size=4)
  per_process = []
  for p in range(2):
    batches = list(pipeline.eval_dataset(config, source, VOCAB,
                                         process_index=p, process_count=2))
    assert len(batches) == 4  # ceil(13 / (2 * 2)) for both processes.
    pad = [i for b in batches for i, m in zip(b['image/id'], b['mask'])
           if not m]
    assert all(i == -1 for i in pad)
    per_process.append(_ids(batches))
  assert sorted(per_process[0] + per_process[1]) == [1000 + i
                                                     for i in range(13)]
  # Deterministic: the same batches again.
  again = list(pipeline.eval_dataset(config, source, VOCAB, process_index=0,
                                     process_count=2))
  assert _ids(again) == per_process[0]


def test_batch_size_must_divide_over_processes():
  with pytest.raises(UserError, match='not divisible'):
    pipeline.train_dataset(_config(batch_size=5), _source(10), VOCAB,
                           process_index=0, process_count=2)
  with pytest.raises(UserError, match='fewer than one batch'):
    pipeline.train_dataset(_config(batch_size=16), _source(10), VOCAB,
                           process_index=0, process_count=1)


def _train_iterator(config, source):
  return iter(pipeline.train_dataset(config, source, VOCAB, process_index=0,
                                     process_count=1))


def test_iterator_state_restores_the_exact_next_batches():
  config = _config(batch_size=4)
  source = _source(10)  # Several epochs in 9 batches: crosses reshuffles.
  it = _train_iterator(config, source)
  for _ in range(5):
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # Survives serialisation.
  expected = [next(it) for _ in range(4)]
  resumed = _train_iterator(config, source)
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])


def test_shapes_batches_from_tfds(test_config):
  builder = datasets.prepare(test_config.data)
  vocab = vocab_lib.Vocab.build(
      datasets.iter_captions(builder, 'train'), min_count=1)
  source = datasets.data_source(builder, 'validation')
  batches = list(pipeline.eval_dataset(test_config, source, vocab,
                                       process_index=0, process_count=1))
  assert len(batches) == 8 and all(b['mask'].all() for b in batches)
  b = batches[0]
  assert b['image'].shape == (8, 32, 32, 3)
  assert b['image'].dtype == np.uint8 and 20 < b['image'].mean() < 235
  assert (b['captions'][..., 1:] != vocab_lib.UNK).all()
  words = vocab.decode(b['captions'][0, 0])
  assert words.split()[-1] in {'circle', 'disk', 'square', 'triangle', 'star',
                               'cross', 'sign', 'diamond', 'shape', 'shapes',
                               'object', 'objects', 'corner', 'center', 'left',
                               'right', 'top', 'bottom', 'circles', 'disks',
                               'squares', 'triangles', 'stars', 'crosses',
                               'signs', 'diamonds', 'red', 'green', 'blue',
                               'yellow', 'purple', 'orange'}


def test_worker_processes_give_the_same_batches(test_config):
  builder = datasets.prepare(test_config.data)
  source = datasets.data_source(builder, 'train')
  vocab = vocab_lib.Vocab.build(['a'], min_count=1)
  plain = iter(pipeline.train_dataset(test_config, source, vocab,
                                      process_index=0, process_count=1))
  test_config.data.workers = 2
  workers = iter(pipeline.train_dataset(test_config, source, vocab,
                                        process_index=0, process_count=1))
  for _ in range(3):
    a, b = next(plain), next(workers)
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['image/id'], b['image/id'])
  workers.close()


def test_iterator_state_in_an_orbax_checkpoint(tmp_path):
  """The form training uses: the iterator beside the model state in orbax."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  config = _config(batch_size=4)
  source = _source(10)
  it = _train_iterator(config, source)
  for _ in range(3):
    next(it)
  with ocp.CheckpointManager(tmp_path / 'ckpt') as manager:
    manager.save(3, args=ocp.args.Composite(
        data=grain.checkpoint.CheckpointSave(it)))
    manager.wait_until_finished()
  expected = [next(it) for _ in range(3)]
  resumed = _train_iterator(config, source)
  with ocp.CheckpointManager(tmp_path / 'ckpt') as manager:
    manager.restore(manager.latest_step(), args=ocp.args.Composite(
        data=grain.checkpoint.CheckpointRestore(resumed)))
  for want in expected:
    np.testing.assert_array_equal(next(resumed)['image/id'], want['image/id'])
