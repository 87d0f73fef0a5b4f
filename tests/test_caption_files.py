"""Tests for capjax.data.caption_files: user folders become TFDS datasets.

The builder tests really run `download_and_prepare` into array_record files
and read them back the way training does, through a TFDS data source.
"""

import json
import logging
import os

import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from capjax.data import caption_files
from capjax.errors import UserError

# (image id, file relative to the images folder, how to write it).
_GOOD = [
    (11, 'a.jpg', 'jpeg'),
    (12, 'b.png', 'png'),
    (13, 'sub/c.jpg', 'jpeg'),
    (14, 'd.png', 'gray'),
    (15, 'e.png', 'rgba'),
    (16, 'f.jpg', 'cmyk'),
    (17, 'g.png', 'png'),
]
_CORRUPT = (18, 'corrupt.jpg')
_MISSING = (19, 'missing.jpg')


def _write_image(path, kind, seed):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  rng = np.random.default_rng(seed)
  if kind == 'gray':
    Image.fromarray(rng.integers(0, 256, (32, 48), np.uint8)).save(path)
  elif kind == 'rgba':
    Image.fromarray(rng.integers(0, 256, (32, 48, 4), np.uint8)).save(path)
  elif kind == 'cmyk':
    Image.new('CMYK', (48, 32), (0, 255, 255, 0)).save(path)
  else:
    Image.fromarray(rng.integers(0, 256, (32, 48, 3), np.uint8)).save(path)


def _captions(image_id):
  return [f'caption {k} of image {image_id}' for k in range(2)]


@pytest.fixture
def manual_dir(tmp_path):
  root = tmp_path / 'manual'
  for seed, (_, name, kind) in enumerate(_GOOD):
    _write_image(str(root / 'images' / name), kind, seed)
  (root / 'images' / _CORRUPT[1]).write_bytes(b'\xff\xd8 this is no jpeg')
  return root


def _coco(entries):
  images, annotations = [], []
  for image_id, name in entries:
    images.append({'id': image_id, 'file_name': name, 'width': 48})
    for k, text in enumerate(_captions(image_id)):
      annotations.append({'image_id': image_id, 'caption': text,
                          'id': image_id * 100 + k})
  return {'info': {}, 'images': images, 'annotations': annotations}


def _all_entries():
  return [(i, name) for i, name, _ in _GOOD] + [_CORRUPT, _MISSING]


def _write_json(path, data):
  path.write_text(json.dumps(data))


def _prepare(tmp_path, manual_dir, name, annotations, images='images'):
  config = caption_files.CaptionFilesConfig(
      name=name, annotations=annotations, images=images, max_image_size=40)
  builder = caption_files.CaptionFiles(
      config=config, data_dir=str(tmp_path / 'data'),
      file_format='array_record')
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=str(manual_dir)))
  return builder


def _read(source):
  examples = {}
  for i in range(len(source)):
    example = source[i]
    examples[int(example['image/id'])] = example
  return examples


def _check_example(example, image_id, filename, caption_ids):
  image = example['image']
  assert image.dtype == np.uint8
  assert image.ndim == 3 and image.shape[2] == 3
  assert max(image.shape[:2]) <= 40  # max_image_size applied.
  assert example['image/filename'].decode() == filename
  texts = [t.decode() for t in example['captions']['text']]
  assert texts == _captions(image_id)
  assert [int(i) for i in example['captions']['id']] == caption_ids


def test_coco_single_file(tmp_path, manual_dir, caplog):
  _write_json(manual_dir / 'captions.json', _coco(_all_entries()))
  with caplog.at_level(logging.WARNING):
    builder = _prepare(tmp_path, manual_dir, 'mine', 'captions.json')

  assert list(builder.info.splits) == ['train']
  source = tfds.data_source('caption_files/mine', split='train',
                            data_dir=str(tmp_path / 'data'))
  examples = _read(source)
  assert sorted(examples) == [i for i, _, _ in _GOOD]
  for image_id, name, _ in _GOOD:
    _check_example(examples[image_id], image_id, name,
                   [image_id * 100, image_id * 100 + 1])
  # Pure red CMYK stays red: the Adobe inversion was undone.
  red = examples[16]['image'][10, 10].astype(int)
  assert red[0] > 200 and red[1] < 60 and red[2] < 60

  images_dir = str(manual_dir / 'images')
  corrupt = os.path.join(images_dir, _CORRUPT[1])
  missing = os.path.join(images_dir, _MISSING[1])
  assert builder.written == {'train': len(_GOOD)}
  assert builder.skipped == {'train': [
      (corrupt, 'cannot identify image file'), (missing, 'no such file')]}
  assert corrupt in caplog.text and missing in caplog.text
  assert 'caption_files/train: wrote 7 images, skipped 2' in caplog.text


def test_coco_split_files(tmp_path, manual_dir):
  entries = _all_entries()
  _write_json(manual_dir / 'train.json', _coco(entries[:5]))
  _write_json(manual_dir / 'val.json', _coco(entries[5:]))
  builder = _prepare(tmp_path, manual_dir, 'pairs',
                     'train=train.json, val=val.json')
  assert builder.written == {'train': 5, 'val': 2}
  assert [p for p, _ in builder.skipped['val']] == [
      str(manual_dir / 'images' / n) for _, n in (_CORRUPT, _MISSING)]
  val = _read(builder.as_data_source('val'))
  assert sorted(val) == [16, 17]
  _check_example(val[17], 17, 'g.png', [1700, 1701])
  assert len(builder.as_data_source('train')) == 5


def _karpathy():
  splits = ['train', 'train', 'val', 'test', 'restval', 'train', 'test']
  records = []
  for k, ((image_id, name, _), split) in enumerate(zip(_GOOD, splits)):
    folder, _, filename = name.rpartition('/')
    record = {'filename': filename, 'split': split, 'imgid': k,
              'sentences': [{'raw': text, 'tokens': text.split(),
                             'sentid': image_id * 10 + j}
                            for j, text in enumerate(_captions(image_id))]}
    if folder:
      record['filepath'] = folder
    # Half carry a COCO id, which wins over imgid; the rest use imgid.
    if image_id % 2:
      record['cocoid'] = image_id
    else:
      record['imgid'] = image_id
    records.append(record)
  for image_id, name in (_CORRUPT, _MISSING):
    records.append({'filename': name, 'split': 'train', 'imgid': image_id,
                    'sentences': [{'raw': t, 'sentid': image_id * 10 + j}
                                  for j, t in enumerate(_captions(image_id))]})
  return {'dataset': 'test', 'images': records}


def test_karpathy(tmp_path, manual_dir):
  _write_json(manual_dir / 'dataset_test.json', _karpathy())
  builder = _prepare(tmp_path, manual_dir, 'karpathy', 'dataset_test.json')
  assert builder.written == {'train': 3, 'val': 1, 'test': 2, 'restval': 1}
  assert len(builder.skipped['train']) == 2
  assert sorted(builder.info.splits) == ['restval', 'test', 'train', 'val']
  expected = {'train': [11, 12, 16], 'val': [13], 'test': [14, 17],
              'restval': [15]}
  names = {image_id: name for image_id, name, _ in _GOOD}
  for split, ids in expected.items():
    examples = _read(tfds.data_source(
        'caption_files/karpathy', split=split,
        data_dir=str(tmp_path / 'data')))
    assert sorted(examples) == ids
    for image_id in ids:
      _check_example(examples[image_id], image_id, names[image_id],
                     [image_id * 10, image_id * 10 + 1])


def test_read_annotations_karpathy_fields(tmp_path):
  path = tmp_path / 'k.json'
  _write_json(path, {'images': [
      {'filename': 'x.jpg', 'filepath': 'val2014', 'split': 'val',
       'imgid': 0, 'cocoid': 391895,
       'sentences': [{'raw': 'A man.', 'tokens': ['a', 'man'], 'sentid': 7}]},
      {'filename': 'y.jpg', 'split': 'train', 'imgid': 1,
       'sentences': [{'tokens': ['two', 'dogs']}]},
  ]})
  assert caption_files.read_annotations(str(path)) == [
      caption_files.Record('val', 391895, 'val2014/x.jpg', ('A man.',), (7,)),
      caption_files.Record('train', 1, 'y.jpg', ('two dogs',), (0,)),
  ]


def test_image_without_captions_is_skipped(tmp_path, manual_dir):
  data = _coco([(11, 'a.jpg'), (12, 'b.png')])
  data['annotations'] = [a for a in data['annotations'] if a['image_id'] == 11]
  _write_json(manual_dir / 'c.json', data)
  builder = _prepare(tmp_path, manual_dir, 'nocap', 'c.json')
  assert builder.written == {'train': 1}
  assert builder.skipped == {
      'train': [(str(manual_dir / 'images' / 'b.png'), 'no captions')]}


def test_empty_captions_are_dropped_and_counted(tmp_path, manual_dir,
                                                caplog):
  entries = [(i, name) for i, name, _ in _GOOD[:6]]
  data = _coco(entries)
  # Image 11 loses both captions, image 12 one: three dropped in all.
  by_id = {(a['image_id'], a['id'] % 100): a for a in data['annotations']}
  by_id[11, 0]['caption'] = ''
  by_id[11, 1]['caption'] = ' \t'
  by_id[12, 1]['caption'] = '\n'
  _write_json(manual_dir / 'c.json', data)
  with caplog.at_level(logging.INFO):
    builder = _prepare(tmp_path, manual_dir, 'empty', 'c.json')

  assert builder.written == {'train': 5}
  assert builder.skipped == {
      'train': [(str(manual_dir / 'images' / 'a.jpg'), 'no captions')]}
  assert ('caption_files/train: wrote 5 images, skipped 1 (1 without '
          'captions); 3 empty captions dropped') in caplog.text
  examples = _read(tfds.data_source('caption_files/empty', split='train',
                                    data_dir=str(tmp_path / 'data')))
  assert sorted(examples) == [12, 13, 14, 15, 16]
  # What is left of image 12: its one real caption, under its own id.
  captions = examples[12]['captions']
  assert [t.decode() for t in captions['text']] == ['caption 0 of image 12']
  assert [int(i) for i in captions['id']] == [1200]
  for image_id in (13, 14, 15, 16):
    assert len(examples[image_id]['captions']['text']) == 2


def test_empty_karpathy_sentences_are_dropped(tmp_path):
  path = tmp_path / 'k.json'
  _write_json(path, {'images': [
      {'filename': 'x.jpg', 'split': 'train', 'imgid': 0,
       'sentences': [{'raw': ' ', 'sentid': 1}, {'raw': 'a dog', 'sentid': 2},
                     {'tokens': [], 'sentid': 3}]},
      {'filename': 'y.jpg', 'split': 'train', 'imgid': 1,
       'sentences': [{'raw': ''}]},
  ]})
  assert caption_files.read_annotations(str(path)) == [
      caption_files.Record('train', 0, 'x.jpg', ('a dog',), (2,), 2),
      caption_files.Record('train', 1, 'y.jpg', (), (), 1),
  ]


# Bad input: each raises a one-line UserError naming the problem.


def _user_error(fn, *args, **kwargs) -> str:
  with pytest.raises(UserError) as info:
    fn(*args, **kwargs)
  message = str(info.value)
  assert '\n' not in message
  return message


def test_missing_manual_dir(tmp_path):
  message = _user_error(_prepare, tmp_path, tmp_path / 'nowhere', 'x',
                        'captions.json', '')
  assert '--config.data.manual_dir' in message
  assert str(tmp_path / 'nowhere') in message
  assert not (tmp_path / 'data' / 'caption_files' / 'x' / '1.0.0').exists()


def test_missing_annotations_file(tmp_path, manual_dir):
  message = _user_error(_prepare, tmp_path, manual_dir, 'x', 'nope.json')
  assert str(manual_dir / 'nope.json') in message and 'not found' in message


def test_empty_json(tmp_path, manual_dir):
  (manual_dir / 'c.json').write_text('  \n')
  message = _user_error(_prepare, tmp_path, manual_dir, 'x', 'c.json')
  assert 'c.json is empty' in message


def test_invalid_json(tmp_path):
  path = tmp_path / 'c.json'
  path.write_text('{"images": [\n  {"id": 1,}\n]}')
  message = _user_error(caption_files.read_annotations, str(path))
  assert 'not valid JSON' in message and 'line 2 column 12' in message


@pytest.mark.parametrize('data', [
    [], {'images': []}, {'annotations': []},
    {'images': [{'file_name': 'a.jpg'}]},
])
def test_unknown_format(tmp_path, data):
  path = tmp_path / 'c.json'
  _write_json(path, data)
  message = _user_error(caption_files.read_annotations, str(path))
  assert 'neither COCO' in message and 'Karpathy' in message


def test_duplicate_image_ids(tmp_path):
  path = tmp_path / 'c.json'
  _write_json(path, _coco([(1, 'a.jpg'), (1, 'b.jpg')]))
  message = _user_error(caption_files.read_annotations, str(path))
  assert 'image id 1' in message and 'images[0]' in message
  data = _karpathy()
  data['images'][1]['imgid'] = 11  # Same id as the cocoid of images[0].
  _write_json(path, data)
  assert 'image id 11' in _user_error(
      caption_files.read_annotations, str(path))


def test_unknown_image_id(tmp_path):
  path = tmp_path / 'c.json'
  data = _coco([(1, 'a.jpg')])
  data['annotations'].append({'image_id': 5, 'caption': 'lost'})
  _write_json(path, data)
  message = _user_error(caption_files.read_annotations, str(path))
  assert 'image_id 5' in message and 'annotations[2]' in message


def test_split_given_twice(tmp_path):
  _write_json(tmp_path / 'a.json', _coco([(1, 'a.jpg')]))
  _write_json(tmp_path / 'b.json', _coco([(2, 'b.jpg')]))
  message = _user_error(caption_files.read_splits,
                        'train=a.json,train=b.json', str(tmp_path))
  assert "split 'train' is given twice" in message
  message = _user_error(caption_files.read_splits,
                        'train=a.json,val=./a.json', str(tmp_path))
  assert 'a.json' in message and 'both splits' in message


def test_karpathy_with_split_prefix(tmp_path):
  _write_json(tmp_path / 'k.json', _karpathy())
  message = _user_error(caption_files.read_splits, 'train=k.json',
                        str(tmp_path))
  assert 'Karpathy' in message


def test_config_without_builder_config(tmp_path):
  message = _user_error(tfds.builder, 'caption_files/unbuilt',
                        data_dir=str(tmp_path))
  assert "'unbuilt' is not prepared" in message


def test_split_without_usable_images(tmp_path, manual_dir):
  # The usual cause: `images` points at the wrong folder.
  _write_json(manual_dir / 'c.json', _coco(_all_entries()))
  message = _user_error(_prepare, tmp_path, manual_dir, 'x', 'c.json', '')
  assert 'caption_files/train: none of the 9 images' in message
  assert str(manual_dir / 'a.jpg') in message
