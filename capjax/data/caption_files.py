"""TFDS builder that turns a user's own images and captions into a dataset.

Training reads every dataset through one schema (`features.caption_features`,
the schema of TFDS `coco_captions`) and through TFDS's random-access
`array_record` files. A folder of images with a captions JSON is converted
into that once, here, instead of teaching the input pipeline a second way to
read data: decoding odd image files, resizing and re-encoding all happen at
preparation time, and training only ever reads clean uint8 RGB JPEGs.

Two JSON layouts are understood, because they are what captioning data comes
in: the COCO captions layout (`captions_train2014.json`) and the Karpathy
split files (`dataset_coco.json`, `dataset_flickr8k.json`, ...).

Bad input (a missing manual dir, a broken JSON file) raises `UserError`
before any image is read. A bad image does not stop the build: it is skipped,
logged by path, and counted in `CaptionFiles.skipped`. An empty caption (or
one of whitespace only) is dropped and counted in the split's summary: kept,
it would train the model to stop at once and score every caption against an
empty reference.

Usage:

  config = CaptionFilesConfig(name='pets', annotations='captions.json')
  builder = CaptionFiles(config=config, data_dir=data_dir)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=manual_dir))
"""

import collections
import dataclasses
import io
import os
import posixpath
import re
from typing import Any, NamedTuple

from absl import logging
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from capjax.data import coco_json
from capjax.data import features
from capjax.data import images
from capjax.errors import UserError

NAME = 'caption_files'

# Quality of the JPEGs stored in the dataset. High, because they are decoded
# again for every epoch and any artefact becomes part of the training data.
JPEG_QUALITY = 95

# What the user has to fix, named the way the capjax command line names it.
_MANUAL_DIR_FLAG = '--config.data.manual_dir'
_ANNOTATIONS_FLAG = '--config.data.annotations'
_IMAGES_FLAG = '--config.data.images'
_NAME_FLAG = '--config.data.builder_config'

_SPLIT_NAME = re.compile(r'[A-Za-z0-9_]+')
# Config names become a directory and part of 'caption_files/<name>' strings,
# which TFDS parses; keep to what its parser accepts.
_CONFIG_NAME = re.compile(r'[A-Za-z0-9_][A-Za-z0-9_.+-]*')

_COCO_HINT = ('{"images": [{"id", "file_name"}], '
              '"annotations": [{"image_id", "caption"}]}')
_KARPATHY_HINT = ('{"images": [{"filename", "split", "imgid", '
                  '"sentences": [{"raw", "sentid"}]}]}')

MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
Put your images and a captions JSON file in one folder and pass that folder as
the manual dir ({_MANUAL_DIR_FLAG}, or `manual_dir` of
`tfds.download.DownloadConfig`). The JSON is either
  * COCO captions format,
      {_COCO_HINT}
    one file (it becomes split 'train') or several given as
    `annotations='train=captions_train.json,val=captions_val.json'`; or
  * Karpathy split format (dataset_coco.json, dataset_flickr8k.json, ...),
      {_KARPATHY_HINT}
    where each image's `split` (train, restval, val, test) picks its split.
`annotations` is relative to the manual dir or absolute; `images` is the
folder, relative to the manual dir, that the JSON's file names are relative
to (default: the manual dir itself).
"""


class Record(NamedTuple):
  """One image and its captions, as read from an annotations file."""
  split: str
  image_id: int
  path: str  # Relative to the images folder, with '/' separators.
  captions: tuple[str, ...]
  caption_ids: tuple[int, ...]
  empty_captions: int = 0  # Left out of `captions`: empty or whitespace.


# ----------------------------------------------------------------------------
# Reading annotation files. Pure functions, so that tests need no builder.
# ----------------------------------------------------------------------------


def parse_annotations_spec(spec: str) -> list[tuple[str | None, str]]:
  """Splits `annotations` into (split, file) pairs.

  Args:
    spec: 'captions.json' (split None: taken from the file, or 'train') or
      'train=captions_train.json,val=captions_val.json'.

  Returns:
    The pairs, in the order given.

  Raises:
    UserError: for an empty spec, a malformed pair, a bad split name or a
      split named twice.
  """
  spec = spec.strip()
  if not spec:
    raise UserError(
        f'{NAME}: {_ANNOTATIONS_FLAG} is empty; set it to a captions JSON '
        "file or to 'train=captions_train.json,val=captions_val.json'")
  if '=' not in spec:
    return [(None, spec)]
  pairs = []
  seen = set()
  for part in spec.split(','):
    split, sep, filename = (s.strip() for s in part.partition('='))
    if not sep or not split or not filename:
      raise UserError(
          f"{NAME}: {_ANNOTATIONS_FLAG} entry '{part.strip()}' is not "
          "split=file; write it as "
          "'train=captions_train.json,val=captions_val.json'")
    if not _SPLIT_NAME.fullmatch(split):
      raise UserError(
          f"{NAME}: split name '{split}' in {_ANNOTATIONS_FLAG} may only use "
          'letters, digits and _; rename it')
    if split in seen:
      raise UserError(
          f"{NAME}: split '{split}' is given twice in {_ANNOTATIONS_FLAG}; "
          'give each split one file')
    seen.add(split)
    pairs.append((split, filename))
  return pairs


def load_json(path: str) -> Any:
  """Reads a JSON file, turning every way it can be wrong into a UserError."""
  if not os.path.exists(path):
    raise UserError(
        f'{NAME}: annotations file {path} not found; fix {_ANNOTATIONS_FLAG} '
        '(relative to the manual dir, or absolute)')
  if os.path.isdir(path):
    raise UserError(
        f'{NAME}: annotations {path} is a directory; point {_ANNOTATIONS_FLAG} '
        'at the JSON file inside it')
  # The rest (encoding, emptiness, syntax) as for any COCO-format file.
  return coco_json.load_json(path, f'{NAME}: annotations')


def detect_format(data: Any, source: str) -> str:
  """Returns 'coco' or 'karpathy' for the parsed JSON of `source`."""
  if isinstance(data, dict) and isinstance(data.get('images'), list):
    if 'annotations' in data:
      return 'coco'
    if data['images'] and all(
        isinstance(image, dict) and 'sentences' in image
        for image in data['images']):
      return 'karpathy'
  raise UserError(
      f'{NAME}: {source} is neither COCO captions JSON ({_COCO_HINT}) nor '
      f'Karpathy split JSON ({_KARPATHY_HINT}); convert it to one of them')


def _int_field(entry: Any, key: str, where: str, source: str) -> int:
  value = entry.get(key) if isinstance(entry, dict) else None
  # bool is an int to Python, but never an id.
  if not isinstance(value, int) or isinstance(value, bool):
    raise UserError(
        f"{NAME}: {source}: {where} needs an integer '{key}', got "
        f'{value!r}; fix that entry')
  return value


def _str_field(entry: Any, key: str, where: str, source: str) -> str:
  value = entry.get(key) if isinstance(entry, dict) else None
  if not isinstance(value, str) or not value:
    raise UserError(
        f"{NAME}: {source}: {where} needs a non-empty string '{key}', got "
        f'{value!r}; fix that entry')
  return value


def _check_unique_id(first_seen: dict[int, str], image_id: int, where: str,
                     source: str) -> None:
  if image_id in first_seen:
    raise UserError(
        f'{NAME}: {source}: image id {image_id} is used by both '
        f'{first_seen[image_id]} and {where}; give every image its own id')
  first_seen[image_id] = where


def _check_split_name(split: str, where: str, source: str) -> None:
  if not _SPLIT_NAME.fullmatch(split):
    raise UserError(
        f"{NAME}: {source}: {where} has split '{split}'; split names may only "
        'use letters, digits and _')


def parse_coco(data: dict[str, Any], split: str, source: str) -> list[Record]:
  """Records of a COCO captions JSON, all in `split`, in `images` order.

  Images without any caption are kept (with no captions): the builder skips
  and reports them, which the user should hear about. So are images whose
  every caption was empty.
  """
  by_id: dict[int, tuple[str, list[str], list[int]]] = {}
  empty: collections.Counter[int] = collections.Counter()
  first_seen: dict[int, str] = {}
  for i, image in enumerate(data['images']):
    where = f'images[{i}]'
    image_id = _int_field(image, 'id', where, source)
    filename = _str_field(image, 'file_name', where, source)
    _check_unique_id(first_seen, image_id, where, source)
    by_id[image_id] = (filename, [], [])
  annotations = data['annotations']
  if not isinstance(annotations, list):
    raise UserError(
        f"{NAME}: {source}: 'annotations' must be a list of "
        '{"image_id", "caption"} objects; fix the file')
  for i, annotation in enumerate(annotations):
    where = f'annotations[{i}]'
    image_id = _int_field(annotation, 'image_id', where, source)
    caption = annotation.get('caption')
    if not isinstance(caption, str):
      raise UserError(
          f"{NAME}: {source}: {where} needs a string 'caption', got "
          f'{caption!r}; fix that entry')
    # Without ids, the position in the file is unique and stable.
    caption_id = (_int_field(annotation, 'id', where, source)
                  if 'id' in annotation else i)
    if image_id not in by_id:
      raise UserError(
          f'{NAME}: {source}: {where} refers to image_id {image_id}, which '
          "is not in 'images'; add that image or remove the caption")
    if not caption.strip():
      empty[image_id] += 1
      continue
    by_id[image_id][1].append(caption)
    by_id[image_id][2].append(caption_id)
  return [
      Record(split, image_id, filename, tuple(captions), tuple(caption_ids),
             empty[image_id])
      for image_id, (filename, captions, caption_ids) in by_id.items()
  ]


def parse_karpathy(data: dict[str, Any], source: str) -> list[Record]:
  """Records of a Karpathy split JSON; each image names its own split."""
  records = []
  first_seen: dict[int, str] = {}
  for i, image in enumerate(data['images']):
    where = f'images[{i}]'
    filename = _str_field(image, 'filename', where, source)
    split = _str_field(image, 'split', where, source)
    _check_split_name(split, where, source)
    # dataset_coco.json numbers images 0.. in 'imgid' but the real COCO id,
    # the one evaluation and other tools know, is 'cocoid'.
    key = 'cocoid' if 'cocoid' in image else 'imgid'
    image_id = _int_field(image, key, where, source)
    _check_unique_id(first_seen, image_id, where, source)
    filepath = image.get('filepath') or ''
    if not isinstance(filepath, str):
      raise UserError(
          f"{NAME}: {source}: {where} has a non-string 'filepath' "
          f'{filepath!r}; fix that entry')
    sentences = image['sentences']
    if not isinstance(sentences, list):
      raise UserError(
          f"{NAME}: {source}: {where} 'sentences' must be a list; fix that "
          'entry')
    captions, caption_ids, empty = [], [], 0
    for j, sentence in enumerate(sentences):
      s_where = f'{where}.sentences[{j}]'
      if not isinstance(sentence, dict):
        raise UserError(
            f'{NAME}: {source}: {s_where} must be an object with "raw"; fix '
            'that entry')
      raw = sentence.get('raw')
      if raw is None and isinstance(sentence.get('tokens'), list):
        raw = ' '.join(str(token) for token in sentence['tokens'])
      if not isinstance(raw, str):
        raise UserError(
            f"{NAME}: {source}: {s_where} needs a string 'raw'; fix that "
            'entry')
      if not raw.strip():
        empty += 1
        continue
      captions.append(raw)
      caption_ids.append(_int_field(sentence, 'sentid', s_where, source)
                         if 'sentid' in sentence else j)
    records.append(Record(split, image_id, posixpath.join(filepath, filename),
                          tuple(captions), tuple(caption_ids), empty))
  return records


def read_annotations(path: str, split: str | None = None) -> list[Record]:
  """Reads one annotations file of either format.

  Args:
    path: the JSON file.
    split: the split a COCO file's images go to (default 'train'). Karpathy
      files name their own splits, so for them it must be None.

  Returns:
    One record per image in the file, in file order.

  Raises:
    UserError: for anything wrong with the file.
  """
  data = load_json(path)
  kind = detect_format(data, path)
  if kind == 'coco':
    records = parse_coco(data, split or 'train', path)
  else:
    if split is not None:
      raise UserError(
          f'{NAME}: {path} is a Karpathy split file, which names the split of '
          f"each image itself; give it alone, without '{split}='")
    records = parse_karpathy(data, path)
  if not records:
    raise UserError(f'{NAME}: {path} lists no images; add some')
  return records


def read_splits(spec: str, root: str) -> dict[str, list[Record]]:
  """Reads every file `spec` names into records grouped by split.

  Args:
    spec: the `annotations` setting, see `parse_annotations_spec`.
    root: what relative file names are relative to (the manual dir).

  Returns:
    split name -> records, only for splits that have images.
  """
  splits: dict[str, list[Record]] = {}
  seen_files: dict[str, str] = {}
  for split, filename in parse_annotations_spec(spec):
    path = os.path.join(root, os.path.expanduser(filename))
    real = os.path.realpath(path)
    if real in seen_files:
      raise UserError(
          f"{NAME}: annotations file {filename} is given for both splits "
          f"'{seen_files[real]}' and '{split}'; give each split its own file")
    seen_files[real] = split or ''
    for record in read_annotations(path, split):
      splits.setdefault(record.split, []).append(record)
  return splits


# ----------------------------------------------------------------------------
# The builder.
# ----------------------------------------------------------------------------


@dataclasses.dataclass(eq=False, kw_only=True)
class CaptionFilesConfig(tfds.core.BuilderConfig):
  """Where one user dataset's files are, and how to convert them.

  Attributes:
    name: tells datasets in the same data dir apart; the data goes to
      `<data_dir>/caption_files/<name>/1.0.0`.
    annotations: the captions JSON, relative to the manual dir or absolute;
      or 'split=file,split=file' for COCO-format files, one per split.
    images: the folder the JSON's file names are relative to, relative to the
      manual dir ('' is the manual dir).
    max_image_size: images with a longer side above this are shrunk to it,
      aspect kept, before storing. None keeps the original size.
  """
  annotations: str
  images: str = ''
  max_image_size: int | None = 1024

  def __post_init__(self):
    # Unset command-line values arrive as None.
    self.annotations = self.annotations or ''
    self.images = self.images or ''
    if not isinstance(self.name, str) or not _CONFIG_NAME.fullmatch(self.name):
      raise UserError(
          f'{NAME}: dataset name {_NAME_FLAG}={self.name!r} may only use '
          "letters, digits, '_', '.', '+' and '-'; rename it")
    if self.max_image_size is not None and (
        not isinstance(self.max_image_size, int) or self.max_image_size < 1):
      raise UserError(
          f'{NAME}: max_image_size must be a positive number of pixels or '
          f'None, got {self.max_image_size!r}; fix it')
    if self.description is None:
      self.description = (f'Captions from {self.annotations}, images from '
                          f"'{self.images or '.'}' of the manual dir.")


class CaptionFiles(tfds.core.GeneratorBasedBuilder):
  """A folder of images with COCO or Karpathy captions, in capjax's schema.

  After `download_and_prepare` has generated the data, `skipped[split]`
  lists the (path, reason) of every image left out and `written[split]`
  counts those stored. Both stay empty when the data was already prepared.
  """

  name = NAME
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'First version.'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS
  # No BUILDER_CONFIGS: each user dataset is its own config, and a config
  # listed here would reserve its name. TFDS accepts configs it does not know
  # (it logs 'Using custom data configuration').

  def __init__(self, *, config: CaptionFilesConfig | str | None = None,
               **kwargs):
    if not isinstance(config, CaptionFilesConfig):
      # Also how `tfds.builder('caption_files/<name>')` lands here when that
      # dataset has not been prepared in the data dir.
      which = f"'{config}' " if isinstance(config, str) else ''
      raise UserError(
          f'{NAME}: dataset {which}is not prepared in this data dir and has '
          'no CaptionFilesConfig to build it from; pass '
          "config=CaptionFilesConfig(name=..., annotations=...)")
    # grain reads TFDS data through random access, which needs array_record.
    kwargs.setdefault('file_format', 'array_record')
    super().__init__(config=config, **kwargs)
    self.skipped: dict[str, list[tuple[str, str]]] = {}
    self.written: dict[str, int] = {}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=('Images and captions from local files, in the schema of '
                     'coco_captions.'),
        features=features.caption_features('jpeg'),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    # Everything that can be wrong with the input is checked here, before
    # the generators below read a single image.
    config = self.builder_config
    try:
      manual_dir = os.fspath(dl_manager.manual_dir)
    except AssertionError:
      # TFDS asserts when the folder is missing or empty; its private
      # attribute is only read to name the folder in the message.
      where = getattr(dl_manager, '_manual_dir', None)
      where = f' {where}' if where else ''
      raise UserError(
          f'{NAME}: manual dir{where} does not exist or is empty; set '
          f'{_MANUAL_DIR_FLAG} to the folder with your images and captions '
          'JSON') from None
    images_dir = os.path.join(manual_dir, config.images)
    if not os.path.isdir(images_dir):
      raise UserError(
          f'{NAME}: images folder {images_dir} does not exist; set '
          f'{_IMAGES_FLAG} to the folder, relative to the manual dir, that '
          'holds the images')
    splits = read_splits(config.annotations, manual_dir)
    self.skipped = {split: [] for split in splits}
    self.written = {split: 0 for split in splits}
    return {
        split: self._generate_examples(split, records, images_dir)
        for split, records in splits.items()
    }

  def _generate_examples(self, split: str, records: list[Record],
                         images_dir: str):
    tag = f'{NAME}/{split}'
    max_size = self.builder_config.max_image_size

    def encode(record: Record) -> tuple[bytes | None, str]:
      if not record.captions:
        return None, 'no captions'
      try:
        pixels = images.load_rgb(os.path.join(images_dir, record.path),
                                 max_size=max_size)
      except images.ImageError as e:
        return None, e.reason
      return _encode_jpeg(pixels), ''

    skipped = self.skipped[split]
    for record, (jpeg, reason) in images.ordered_map(encode, records):
      if jpeg is None:
        path = os.path.join(images_dir, record.path)
        logging.warning('%s: skipped %s: %s', tag, path, reason)
        skipped.append((path, reason))
        continue
      self.written[split] += 1
      yield record.image_id, features.caption_example(
          jpeg, record.image_id, record.path, list(record.captions),
          list(record.caption_ids))

    summary = (f'{tag}: wrote {self.written[split]} images, '
               f'skipped {len(skipped)}')
    if skipped:
      kinds = collections.Counter(_reason_kind(r) for _, r in skipped)
      summary += ' (' + ', '.join(f'{n} {k}' for k, n in kinds.items()) + ')'
    empty = sum(record.empty_captions for record in records)
    if empty:
      summary += f'; {empty} empty captions dropped'
    if skipped:
      logging.warning('%s; each image is logged above with its path', summary)
    elif empty:
      logging.warning('%s', summary)
    else:
      logging.info('%s', summary)
    if not self.written[split]:
      # An empty split only fails later, obscurely, in training.
      path, reason = skipped[0]
      raise UserError(
          f'{tag}: none of the {len(records)} images could be used (first: '
          f'{path}: {reason}); check {_IMAGES_FLAG} and the file names in '
          'the JSON')


def _reason_kind(reason: str) -> str:
  if reason == 'no such file':
    return 'missing'
  if reason == 'no captions':
    return 'without captions'
  return 'unreadable'


def _encode_jpeg(pixels: np.ndarray) -> bytes:
  # PIL rather than TFDS's numpy path: TFDS encodes arrays by running a
  # TensorFlow graph per image, which is several times slower.
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format='JPEG', quality=JPEG_QUALITY)
  return buffer.getvalue()
