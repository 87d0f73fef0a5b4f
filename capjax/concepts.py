"""Concepts: what the concept head predicts of an image, and the phrases that
name them.

A dataset that annotates its images' objects (`datasets.objects`) gives the
concept head (`capjax.models.concepts`) its targets, of one of two kinds:

  'pairs'   each object's attribute and object class, as two separate
            (factorised) predictions at the position of the encoder's grid
            that holds the object's centre (shapes: colour and shape), so
            that a pair no training image shows can still be predicted;
  'labels'  the object categories an image holds, a multi-label tagger
            (COCO's 80 categories).

A workdir keeps its concepts in concepts.json next to vocab.json: the caption
CLI and API read them, without the dataset, to turn the head's predictions
into phrases ("red square", "red squares", ...) that constrained beam search
then puts into the caption.
"""

from collections.abc import Sequence
import dataclasses
import json
import os

from typing import Any

import jax
import ml_collections
import numpy as np

from capjax import constrained
from capjax import files
from capjax.data.vocab import UNK, Vocab
from capjax.errors import UserError
from capjax.metrics import objects as objects_lib

FILENAME = 'concepts.json'
_FORMAT = 'capjax-concepts-1'
KINDS = ('pairs', 'labels')
# Objects per image the targets keep (shapes has at most 4; a COCO image
# rarely more than 16 distinct categories).
MAX_OBJECTS = 16
NONE = -1  # No object in this row of the targets.


@dataclasses.dataclass(frozen=True)
class Concepts:
  """The concept vocabulary of a dataset.

  Attributes:
    kind: 'pairs' or 'labels' (see the module docstring).
    attributes: the attribute names ('pairs' only; shapes: colours).
    objects: the object names (shapes) or category names (COCO).
  """
  kind: str
  attributes: tuple[str, ...]
  objects: tuple[str, ...]

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f'unknown kind of concepts {self.kind!r}')
    if not self.objects or (self.kind == 'pairs') != bool(self.attributes):
      raise ValueError(f'{self.kind} concepts need objects'
                       f'{" and attributes" if self.kind == "pairs" else ""}')

  @property
  def sizes(self) -> tuple[int, int]:
    """(attributes, objects): the head's output sizes."""
    return len(self.attributes), len(self.objects)

  def name(self, concept: int) -> str:
    """A concept id (`models.concepts.confident`) in words: 'red square',
    'person'."""
    if self.kind == 'pairs':
      attribute, obj = divmod(int(concept), len(self.objects))
      return f'{self.attributes[attribute]} {self.objects[obj]}'
    return self.objects[int(concept)]

  def phrases(self, attribute: int | None, obj: int) -> list[str]:
    """The phrases that name a concept, each read by the object metrics as
    naming it: 'pairs' (colour 0, shape 0) -> ['red circle', 'red circles',
    'red disk', 'red disks']; 'labels' 'person' -> ['person', 'persons',
    'people']."""
    if self.kind == 'pairs':
      return objects_lib.pair_phrases(self.attributes[attribute],
                                      self.objects[obj])
    return objects_lib.category_phrases(self.objects[obj])

  def save(self, path: str) -> None:
    files.write_text(path, json.dumps(
        {'format': _FORMAT, **dataclasses.asdict(self)}, indent=0))

  @classmethod
  def load(cls, path: str) -> 'Concepts':
    try:
      with open(path, encoding='utf-8') as f:
        data = json.load(f)
      if data.pop('format') != _FORMAT:
        raise ValueError(f'not "format": "{_FORMAT}"')
      return cls(data['kind'], tuple(data['attributes']),
                 tuple(data['objects']))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
      raise UserError(f'cannot read the concepts {path}: {e}') from None


def phrase_table(concepts: Concepts, vocab: Vocab) -> np.ndarray:
  """Every concept's phrases as token ids, indexed by the concept ids of
  `models.concepts.confident`: int32 [N, A, L] (N = attributes x objects,
  or the categories), NO_TOKEN after each phrase and for absent ones. A
  phrase with a word outside the vocabulary is left out (no caption could
  hold it), and a concept without phrases left is never a constraint."""
  num_attributes, num_objects = concepts.sizes
  rows = []
  for attribute in range(max(num_attributes, 1)):
    for obj in range(num_objects):
      rows.append([p for p in concepts.phrases(
          attribute if num_attributes else None, obj) if _known(vocab, p)])
  width = max(1, max(len(r) for r in rows))
  length = max([1] + [len(vocab.encode(p)) for r in rows for p in r])
  table = np.full((len(rows), width, length), constrained.NO_TOKEN, np.int32)
  for i, phrases in enumerate(rows):
    for j, phrase in enumerate(phrases):
      ids = vocab.encode(phrase)
      table[i, j, :len(ids)] = ids
  return table


def _known(vocab: Vocab, phrase: str) -> bool:
  ids = vocab.encode(phrase)
  return bool(ids) and min(ids) > UNK


def of_builder(builder: Any) -> Concepts | None:
  """The concepts a dataset's annotations give; None where it has none
  (a user's captions, COCO without its category names)."""
  features = builder.info.features
  if 'objects' not in features.keys():
    return None
  inner = features['objects'].feature
  if {'color', 'shape'} <= set(inner.keys()):
    return Concepts('pairs', tuple(inner['color'].names),
                    tuple(inner['shape'].names))
  if 'label' in inner.keys():
    names = tuple(inner['label'].names)
    if names == tuple(str(i) for i in range(len(names))):
      return None  # Numbered, not named (names come with the download).
    return Concepts('labels', (), names)
  return None


def load_or_save(path: str, concepts: Concepts, write: bool) -> Concepts:
  """The workdir's concepts: saved on first use (by the process that
  `write`s); a workdir whose concepts differ is an error."""
  if os.path.exists(path):
    saved = Concepts.load(path)
    if saved != concepts:
      raise UserError(f'{path} holds other concepts than the dataset\'s; use '
                      'a new --workdir, or set the config back')
    return saved
  if write:
    concepts.save(path)
  return concepts


def for_run(config: ml_collections.ConfigDict, builder: Any,
            workdir: str) -> Concepts | None:
  """The concepts of a run whose config has the concept head, checked
  against the workdir's own if it has them; None without the head. The
  training job saves them (`save_for_run`) for the jobs that read them
  without the dataset."""
  if not config.model.concepts.head:
    return None
  concepts = of_builder(builder)
  if concepts is None:
    raise UserError(f'--config.model.concepts.head=True needs a dataset that '
                    f'annotates its images\' objects, and {builder.name} does '
                    'not (shapes does; COCO with its category names); set it '
                    'to False')
  return load_or_save(os.path.join(workdir, FILENAME), concepts, write=False)


def save_for_run(workdir: str, concepts: Concepts) -> None:
  """Saves a run's concepts in its workdir, by process 0, unless there."""
  load_or_save(os.path.join(workdir, FILENAME), concepts,
               write=jax.process_index() == 0)


def load(workdir: str) -> Concepts:
  """The concepts a workdir's concept head was trained on."""
  path = os.path.join(workdir, FILENAME)
  if not os.path.exists(path):
    raise UserError(f'{workdir} has no {FILENAME}, which its config\'s '
                    'concept head needs; was it trained with it?')
  return Concepts.load(path)


def targets(builder: Any, split: str,
            concepts: Concepts) -> dict[int, dict[str, np.ndarray]]:
  """Every image's concept targets, by image id, as the training batches
  carry them (`pipeline.Preprocess`):

    'concepts/object'     int32 [MAX_OBJECTS]: object (or category) indices,
                          then NONE; 'labels' lists each category once;
    'concepts/attribute'  int32 [MAX_OBJECTS]: 'pairs' only, the attributes;
    'concepts/centre'     float32 [MAX_OBJECTS, 2]: 'pairs' only, each
                          object's box centre (y, x) in [0, 1].
  """
  # Here, not at the top: the caption CLI and API read concepts without
  # the dataset libraries.
  from capjax.data import datasets  # pylint: disable=g-import-not-at-top
  source = datasets.without_images(builder, split)
  out = {}
  for i in range(len(source)):
    example = source[i]
    o = example['objects']
    if concepts.kind == 'pairs':
      rows = _pad({'concepts/object': o['shape'],
                   'concepts/attribute': o['color']})
      boxes = np.asarray(o['bbox'], np.float32).reshape(-1, 4)[:MAX_OBJECTS]
      centre = np.zeros((MAX_OBJECTS, 2), np.float32)
      centre[:len(boxes)] = (boxes[:, :2] + boxes[:, 2:]) / 2  # (y, x)
      rows['concepts/centre'] = centre
    else:
      rows = _pad({'concepts/object': sorted(set(int(v) for v in o['label']))})
    out[int(example['image/id'])] = rows
  return out


def _pad(rows: dict[str, Sequence[int]]) -> dict[str, np.ndarray]:
  out = {}
  for key, values in rows.items():
    values = np.asarray(values, np.int32)[:MAX_OBJECTS]
    out[key] = np.full(MAX_OBJECTS, NONE, np.int32)
    out[key][:len(values)] = values
  return out
