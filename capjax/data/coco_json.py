"""Reading and checking COCO-format caption files.

* Annotations: the COCO captions JSON, `{"images": [{"id": ...}, ...],
  "annotations": [{"image_id": ..., "caption": ...}, ...]}`, several captions
  per image. "images" may be left out; the images are then those the
  annotations name.
* Results: a JSON list of `{"image_id": ..., "caption": ...}`, one caption
  per image, the format the COCO evaluation server takes.

Users bring these files to score (capjax.score, through capjax.metrics.coco)
and to build a dataset of their own (capjax.data.caption_files). The
official tools assume well-formed files and fail with an assertion or, worse,
score a different set of images than the user thinks. Here every mistake is
a `UserError` that names the file, the entry and the fix. Image ids are
integers (as in COCO) or strings.
"""

from collections.abc import Hashable
import json
import os
from typing import Any

from capjax.errors import UserError

ImageId = Hashable  # int or str
_EXAMPLES = 5  # ids named in a message about many images
_UTF8_BOM = b'\xef\xbb\xbf'
_RESULTS_FORMAT = '[{"image_id": ..., "caption": "..."}, ...]'
_ANNOTATIONS_FORMAT = ('{"images": [{"id": ...}, ...], "annotations": '
                       '[{"image_id": ..., "caption": "..."}, ...]}')


def some_ids(ids: list[ImageId]) -> str:
  """A few of `ids`, for a message: '1, 2, 3, 4, 5, ...'."""
  shown = ', '.join(repr(i) for i in ids[:_EXAMPLES])
  return shown + (', ...' if len(ids) > _EXAMPLES else '')


def load_json(path: str, what: str) -> Any:
  """The parsed JSON of `path`; `what` names the file in messages.

  Raises:
    UserError: the file is missing, not UTF-8, empty or not JSON.
  """
  if not os.path.exists(path):
    raise UserError(f'{what} file {path} not found')
  if os.path.isdir(path):
    raise UserError(f'{what} file {path} is a directory; give the JSON file')
  with open(path, 'rb') as f:
    data = f.read()
  # Files saved by Windows editors may start with a byte order mark.
  skipped = len(_UTF8_BOM) if data.startswith(_UTF8_BOM) else 0
  try:
    text = data[skipped:].decode('utf-8')
  except UnicodeDecodeError as e:
    raise UserError(
        f'{what} file {path} is not UTF-8 text (bad byte 0x'
        f'{data[skipped + e.start]:02x} at byte offset {skipped + e.start}); '
        'save it as UTF-8') from None
  if not text.strip():
    raise UserError(f'{what} file {path} is empty')
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    raise UserError(
        f'{what} file {path} is not valid JSON: {e.msg} at line {e.lineno} '
        f'column {e.colno}') from None


def _image_id(entry: dict[str, Any], key: str, where: str) -> ImageId:
  if key not in entry:
    raise UserError(f'{where} has no "{key}"')
  value = entry[key]
  # bool is an int to Python, but never an id.
  if isinstance(value, bool) or not isinstance(value, (int, str)):
    raise UserError(f'{where}: "{key}" must be an integer or a string, got '
                    f'{json.dumps(value)}')
  return value


def _caption(entry: dict[str, Any], where: str) -> str:
  if 'caption' not in entry:
    raise UserError(f'{where} has no "caption"')
  caption = entry['caption']
  if not isinstance(caption, str):
    raise UserError(f'{where}: "caption" must be a string, got '
                    f'{json.dumps(caption)}')
  if not caption.strip():
    raise UserError(f'{where}: the caption is empty')
  return caption


def parse_annotations(data: Any, source: str) -> dict[ImageId, list[str]]:
  """Image id -> its reference captions, from parsed annotations JSON.

  Images are in the order of "images" if given, else of first mention.

  Raises:
    UserError: for anything malformed, an annotation of an image that
      "images" does not list, or an image without captions.
  """
  if not isinstance(data, dict) or 'annotations' not in data:
    hint = (' (this looks like a results file)'
            if isinstance(data, list) else '')
    raise UserError(
        f'annotations {source} must be a COCO captions JSON object, '
        f'{_ANNOTATIONS_FORMAT}{hint}')
  references: dict[ImageId, list[str]] = {}
  images = data.get('images')
  if images is not None:
    if not isinstance(images, list):
      raise UserError(f'annotations {source}: "images" must be a list of '
                      '{"id": ...} objects')
    for i, image in enumerate(images):
      where = f'annotations {source}: images[{i}]'
      if not isinstance(image, dict):
        raise UserError(f'{where} must be an object with an "id"')
      image_id = _image_id(image, 'id', where)
      if image_id in references:
        raise UserError(f'{where}: image id {image_id!r} is listed twice')
      references[image_id] = []
  annotations = data['annotations']
  if not isinstance(annotations, list):
    raise UserError(f'annotations {source}: "annotations" must be a list of '
                    '{"image_id": ..., "caption": ...} objects')
  for i, annotation in enumerate(annotations):
    where = f'annotations {source}: annotations[{i}]'
    if not isinstance(annotation, dict):
      raise UserError(f'{where} must be an object with "image_id" and '
                      '"caption"')
    image_id = _image_id(annotation, 'image_id', where)
    caption = _caption(annotation, f'{where} (image {image_id!r})')
    if images is None:
      references.setdefault(image_id, [])
    elif image_id not in references:
      raise UserError(f'{where} is a caption of image {image_id!r}, which '
                      '"images" does not list')
    references[image_id].append(caption)
  if not references:
    raise UserError(f'annotations {source} has no captions')
  uncaptioned = [i for i, captions in references.items() if not captions]
  if uncaptioned:
    raise UserError(
        f'annotations {source}: {len(uncaptioned)} of {len(references)} '
        f'images have no captions ({some_ids(uncaptioned)}); every scored '
        'image needs reference captions')
  return references


def parse_results(data: Any, source: str) -> dict[ImageId, str]:
  """Image id -> candidate caption, from parsed results JSON.

  Raises:
    UserError: for anything malformed, or two results for one image.
  """
  if not isinstance(data, list):
    hint = (' (this looks like an annotations file: are --annotations and '
            '--results swapped?)'
            if isinstance(data, dict) and 'annotations' in data else '')
    raise UserError(f'results {source} must be a JSON list, '
                    f'{_RESULTS_FORMAT}, got a JSON {_json_type(data)}{hint}')
  if not data:
    raise UserError(f'results {source} is an empty list: no captions to '
                    'score')
  candidates: dict[ImageId, str] = {}
  first_entry: dict[ImageId, int] = {}
  for i, entry in enumerate(data):
    where = f'results {source}: entry {i}'
    if not isinstance(entry, dict):
      raise UserError(f'{where} must be an object with "image_id" and '
                      f'"caption", got a JSON {_json_type(entry)}')
    image_id = _image_id(entry, 'image_id', where)
    caption = _caption(entry, f'{where} (image {image_id!r})')
    if image_id in candidates:
      raise UserError(
          f'results {source}: image {image_id!r} has more than one result '
          f'(entries {first_entry[image_id]} and {i}); give one caption per '
          'image')
    candidates[image_id] = caption
    first_entry[image_id] = i
  return candidates


def _json_type(value: Any) -> str:
  for kind, name in ((dict, 'object'), (list, 'list'), (str, 'string'),
                     (bool, 'boolean'), ((int, float), 'number')):
    if isinstance(value, kind):
      return name
  return 'null'
