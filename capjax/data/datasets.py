"""Which TFDS builder a config names, preparing it, and reading its splits.

Every dataset is read through `tfds.data_source` (random access over
ArrayRecord files), which is what grain needs for global shuffling and
resumable iteration.
"""

from collections.abc import Iterator, Sequence
import os
import re
import time

from absl import logging
import jax
import ml_collections
import tensorflow_datasets as tfds

from capjax import files
from capjax.data import locks
from capjax.errors import UserError

NAMES = ('shapes', 'coco_captions', 'caption_files')

_PREPARE_HINT = {
    'coco_captions': (
        'prepare it once with `python -m capjax.main --config=configs/coco.py '
        '--workdir=DIR --mode=prepare` (downloads about 20 GB of COCO 2014)'),
    'caption_files': (
        'prepare it with `python -m capjax.main --config=configs/'
        'caption_files.py --workdir=DIR --mode=prepare`'),
    'shapes': 'prepare it with `--mode=prepare` or `--config.data.prepare=True`',
}


def get_builder(data: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
  """The TFDS builder of `config.data`, writing ArrayRecord files."""
  if data.name not in NAMES:
    raise UserError(f'unknown dataset --config.data.name={data.name!r}; '
                    f'choose one of {", ".join(NAMES)}')
  # None, not '': TFDS would read '' as the current directory.
  kwargs = dict(data_dir=data.data_dir or None, file_format='array_record')
  if data.data_dir and not os.path.isdir(os.path.expanduser(data.data_dir)):
    if not data.prepare:
      raise UserError(f'data dir --config.data.data_dir={data.data_dir} does '
                      'not exist; point it at the folder holding the '
                      'prepared TFDS datasets')
  try:
    return _builder(data, kwargs)
  except ValueError as e:
    if 'File format is already set' not in str(e):
      raise
    # Prepared before, by plain `tfds build`, in TFRecord format.
    raise UserError(
        f'{data.name} is prepared in {data.data_dir or "the TFDS data dir"} as '
        'TFRecord, but capjax reads ArrayRecord: convert it (`pip install '
        'apache-beam; tfds convert_format --dataset_dir=DIR '
        '--out_file_format=array_record`) or prepare it with --mode=prepare '
        'into another --config.data.data_dir') from None


def _builder(data: ml_collections.ConfigDict,
             kwargs: dict) -> tfds.core.DatasetBuilder:
  if data.name == 'shapes':
    from capjax.data import shapes  # pylint: disable=g-import-not-at-top
    return shapes.Shapes(config=data.builder_config or 'default', **kwargs)
  if data.name == 'caption_files':
    from capjax.data import caption_files  # pylint: disable=g-import-not-at-top
    if not data.builder_config:
      raise UserError('caption_files needs a dataset name: set '
                      '--config.data.builder_config=NAME (any identifier)')
    config = caption_files.CaptionFilesConfig(
        name=data.builder_config, annotations=data.annotations,
        images=data.images)
    return caption_files.CaptionFiles(config=config, **kwargs)
  return tfds.builder(data.name, config=data.builder_config or None, **kwargs)


def prepare(data: ml_collections.ConfigDict,
            force: bool = False) -> tfds.core.DatasetBuilder:
  """Returns the builder, building the dataset first when allowed.

  With `force` (the `--mode=prepare` job) or `config.data.prepare`, a missing
  dataset is downloaded and written; otherwise a missing dataset is an error
  that says how to prepare it. A prepared dataset is never rewritten. In a
  multi-process job, process 0 builds and the others wait for its build.
  """
  builder = get_builder(data)
  if builder.is_prepared():
    return builder
  if not (force or data.prepare):
    raise UserError(f'{data.name} is not prepared in {builder.data_dir}: '
                    f'{_PREPARE_HINT[data.name]}, or set '
                    '--config.data.data_dir to where it is')
  logging.info('Preparing %s in %s.', data.name, builder.data_dir)
  download_config = None
  if data.name == 'caption_files':
    if not data.manual_dir:
      raise UserError('caption_files needs the folder of your images and '
                      'captions: set --config.data.manual_dir')
    download_config = tfds.download.DownloadConfig(
        manual_dir=os.path.expanduser(data.manual_dir))
  if jax.process_index() == 0:
    # A read-only or full data dir: one line, not TFDS's traceback.
    with files.reporting(
        os.fspath(builder.data_dir_root), f'the {data.name} dataset',
        instead='prepare it in another --config.data.data_dir'):
      # Two jobs building into one data dir would clash (e.g. the workers
      # of a tuning study on a fresh machine): the second waits, then reads.
      with locks.waiting(f'{os.fspath(builder.data_dir)}.prepare.lock',
                         f'preparing {data.name} in {builder.data_dir}'):
        builder = get_builder(data)  # As the holder left it.
        if not builder.is_prepared():
          builder.download_and_prepare(download_config=download_config)
    return builder
  # Process 0 builds; the other processes of its job wait for it.
  return _wait_for_build(data, PREPARE_WAIT_SECONDS)


# How long the other processes of a job wait for process 0's dataset build.
PREPARE_WAIT_SECONDS = 4 * 3600


def _wait_for_build(data: ml_collections.ConfigDict,
                    seconds: float) -> tfds.core.DatasetBuilder:
  deadline = time.monotonic() + seconds
  while time.monotonic() < deadline:
    time.sleep(5)
    builder = get_builder(data)
    if builder.is_prepared():
      return builder
  raise UserError(
      f'process {jax.process_index()} waited {seconds:.0f} s for process 0 '
      f'to prepare {data.name} in {builder.data_dir}; the TFDS data dir must '
      'be shared by all processes, or prepared on every host first '
      '(--mode=prepare)')


def split_names(split: str) -> list[str]:
  """The split names in a TFDS split spec ('train+restval[:10%]' -> both)."""
  return [re.sub(r'\[.*\]$', '', part.strip()) for part in split.split('+')]


def num_examples(builder: tfds.core.DatasetBuilder, split: str) -> int:
  """The number of examples of the split `split` (a name, not a spec)."""
  if split in builder.info.splits:
    return builder.info.splits[split].num_examples
  # Unknown to the metadata (only under tfds.testing.mock_data).
  return len(builder.as_data_source(split))


def check_split(builder: tfds.core.DatasetBuilder, split: str) -> None:
  known = list(builder.info.splits)
  if not known:  # Not known before preparation (and under tfds mock_data).
    return
  for name in split_names(split):
    if name not in known:
      raise UserError(f'{builder.name} has no split {name!r} (in {split!r}); '
                      f'its splits are {", ".join(known)}')


def data_source(builder: tfds.core.DatasetBuilder, split: str,
                decoders=None) -> Sequence[dict]:
  """Random-access examples of `split`, decoded to numpy."""
  check_split(builder, split)
  return builder.as_data_source(split, decoders=decoders)


def iter_captions(builder: tfds.core.DatasetBuilder,
                  split: str) -> Iterator[str]:
  """Streams every caption of `split` without decoding a single image."""
  source = without_images(builder, split)
  for i in range(len(source)):
    for text in source[i]['captions']['text']:
      yield as_str(text)


def references(builder: tfds.core.DatasetBuilder,
               split: str) -> dict[int, list[str]]:
  """Every caption of every image of `split`, by image id (no decoding)."""
  source = without_images(builder, split)
  out = {}
  for i in range(len(source)):
    example = source[i]
    out[int(example['image/id'])] = [
        as_str(text) for text in example['captions']['text']]
  return out


def objects(builder: tfds.core.DatasetBuilder,
            split: str) -> tuple[str, dict[int, list], list[str]] | None:
  """The annotated objects of every image of `split`, for
  `capjax.metrics.objects`: (kind, image id -> objects, category names).

  'shapes' (a feature with each object's colour and shape): objects are
  (colour, shape) names. 'categories' (COCO's `label` per object): objects
  are category names, and the names are every category's. None where the
  dataset annotates no objects (a user's captions).
  """
  features = builder.info.features
  if 'objects' not in features.keys():
    return None
  inner = features['objects'].feature
  if {'color', 'shape'} <= set(inner.keys()):
    kind, names = 'shapes', []
    colors, shapes = inner['color'].names, inner['shape'].names
    read = lambda o: [(colors[int(c)], shapes[int(s)])
                      for c, s in zip(o['color'], o['shape'])]
  elif 'label' in inner.keys():
    kind, names = 'categories', list(inner['label'].names)
    if names == [str(i) for i in range(len(names))]:
      return None  # Numbered, not named (names come with the download).
    read = lambda o: [names[int(label)] for label in o['label']]
  else:
    return None
  source = without_images(builder, split)
  out = {}
  for i in range(len(source)):
    example = source[i]
    out[int(example['image/id'])] = read(example['objects'])
  return kind, out, names


def without_images(builder, split: str) -> Sequence[dict]:
  """Random access to `split`'s ids and captions; images left encoded."""
  return data_source(builder, split,
                     decoders={'image': tfds.decode.SkipDecoding()})


def as_str(text) -> str:
  return text.decode('utf-8') if isinstance(text, bytes) else str(text)
