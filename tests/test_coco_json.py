"""capjax.data.coco_json: reading and checking COCO-format caption files.

Each bad file is one case: a UserError that names the file and the problem.
"""

import pytest

from capjax.data import coco_json
from capjax.errors import UserError


def test_annotations_and_results_are_read(tmp_path):
  path = tmp_path / 'ann.json'
  path.write_text('{"images": [{"id": 2}, {"id": 1}], "annotations": ['
                  '{"image_id": 1, "caption": "a dog"}, '
                  '{"image_id": 2, "caption": "a cat"}, '
                  '{"image_id": 1, "caption": "a brown dog"}]}')
  references = coco_json.parse_annotations(
      coco_json.load_json(str(path), 'annotations'), str(path))
  # In the order of "images", every caption of each.
  assert list(references.items()) == [(2, ['a cat']),
                                      (1, ['a dog', 'a brown dog'])]
  assert coco_json.parse_results(
      [{'image_id': 1, 'caption': 'a dog'}], 'res.json') == {1: 'a dog'}


def test_some_ids_names_a_few():
  assert coco_json.some_ids([1, 'a']) == "1, 'a'"
  assert coco_json.some_ids(list(range(9))) == '0, 1, 2, 3, 4, ...'


def test_string_image_ids_are_accepted():
  references = coco_json.parse_annotations(
      {'annotations': [{'image_id': 'a.jpg', 'caption': 'a cat'}]}, 'x')
  assert references == {'a.jpg': ['a cat']}


# ---------------------------------------------------------------------------
# Bad files: each is a UserError that names the problem.


def test_missing_file(tmp_path):
  with pytest.raises(UserError, match='results file .*nope.json not found'):
    coco_json.load_json(str(tmp_path / 'nope.json'), 'results')
  with pytest.raises(UserError, match='is a directory'):
    coco_json.load_json(str(tmp_path), 'results')


@pytest.mark.parametrize('bom', [b'', b'\xef\xbb\xbf'])
def test_file_that_is_not_utf8(tmp_path, bom):
  path = tmp_path / 'res.json'
  data = bom + b'[{"image_id": 1, "caption": "caf\xe9"}]'  # Latin-1
  path.write_bytes(data)
  offset = data.index(0xe9)
  with pytest.raises(UserError, match=r'not UTF-8 text \(bad byte 0xe9 at '
                     rf'byte offset {offset}\)'):
    coco_json.load_json(str(path), 'results')


def test_utf8_byte_order_mark_is_fine(tmp_path):
  path = tmp_path / 'res.json'
  path.write_bytes(b'\xef\xbb\xbf[{"image_id": 1, "caption": "caf\xc3\xa9"}]')
  assert coco_json.load_json(str(path), 'results') == [
      {'image_id': 1, 'caption': 'café'}]


def test_file_that_is_not_json(tmp_path):
  path = tmp_path / 'res.json'
  path.write_text('[\n  {"image_id": 1, "caption": "a"}\n  {"image_id": 2}\n]')
  with pytest.raises(UserError, match="not valid JSON: Expecting ',' "
                     'delimiter at line 3 column 3'):
    coco_json.load_json(str(path), 'results')
  path.write_text('  \n')
  with pytest.raises(UserError, match='is empty'):
    coco_json.load_json(str(path), 'results')


@pytest.mark.parametrize('data, message', [
    ({'a': 1}, 'must be a JSON list'),
    ({'annotations': [{'image_id': 1, 'caption': 'a'}]},
     'looks like an annotations file'),
    ([], 'empty list'),
    (['a man'], 'entry 0 must be an object'),
    ([{'caption': 'a man'}], 'entry 0 has no "image_id"'),
    ([{'image_id': 1.5, 'caption': 'a'}], '"image_id" must be an integer or '
     'a string, got 1.5'),
    ([{'image_id': True, 'caption': 'a'}], 'got true'),
    ([{'image_id': 1}], r'entry 0 \(image 1\) has no "caption"'),
    ([{'image_id': 1, 'caption': 3}], r'entry 0 \(image 1\): "caption" must '
     'be a string, got 3'),
    ([{'image_id': 1, 'caption': None}], 'must be a string, got null'),
    ([{'image_id': 1, 'caption': 'a'}, {'image_id': 2, 'caption': ' \n'}],
     r'entry 1 \(image 2\): the caption is empty'),
    ([{'image_id': 1, 'caption': 'a'}, {'image_id': 2, 'caption': 'b'},
      {'image_id': 1, 'caption': 'c'}],
     r'image 1 has more than one result \(entries 0 and 2\)'),
])
def test_bad_results(data, message):
  with pytest.raises(UserError, match=message):
    coco_json.parse_results(data, 'res.json')


@pytest.mark.parametrize('data, message', [
    ([{'image_id': 1, 'caption': 'a'}], 'looks like a results file'),
    ({'images': []}, 'must be a COCO captions JSON object'),
    ({'annotations': {}}, '"annotations" must be a list'),
    ({'annotations': [], 'images': {}}, '"images" must be a list'),
    ({'annotations': []}, 'has no captions'),
    ({'annotations': [{'caption': 'a'}]}, r'annotations\[0\] has no '
     '"image_id"'),
    ({'annotations': [{'image_id': 4, 'caption': ''}]},
     r'annotations\[0\] \(image 4\): the caption is empty'),
    ({'annotations': [{'image_id': 4, 'caption': ['a']}]},
     'must be a string'),
    ({'annotations': [], 'images': [{'file_name': 'x.jpg'}]},
     r'images\[0\] has no "id"'),
    ({'annotations': [], 'images': [{'id': 1}, {'id': 1}]},
     'image id 1 is listed twice'),
    ({'annotations': [{'image_id': 2, 'caption': 'a'}],
      'images': [{'id': 1}]},
     'a caption of image 2, which "images" does not list'),
    ({'images': [{'id': 1}, {'id': 2}, {'id': 3}],
      'annotations': [{'image_id': 1, 'caption': 'a'}]},
     r'2 of 3 images have no captions \(2, 3\)'),
])
def test_bad_annotations(data, message):
  with pytest.raises(UserError, match=message):
    coco_json.parse_annotations(data, 'ann.json')
