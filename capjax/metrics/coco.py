"""Pairing a results file with its annotations, before they are scored.

The files themselves are read and checked by capjax.data.coco_json. Here
the two are matched: every result is of an annotated image, and every
annotated image has a result (or the user said to score only those that
do), so that the scores are of the images the user thinks.
"""

from absl import logging

from capjax.data import coco_json
from capjax.errors import UserError

ImageId = coco_json.ImageId
_some = coco_json.some_ids  # ids named in a message


def match(references: dict[ImageId, list[str]],
          candidates: dict[ImageId, str], *, allow_partial: bool = False,
          annotations_source: str = '', results_source: str = '',
          ) -> tuple[dict[ImageId, list[str]], dict[ImageId, str]]:
  """The references and candidates of the images to score, same keys.

  Args:
    references: from `coco_json.parse_annotations`.
    candidates: from `coco_json.parse_results`.
    allow_partial: score only the annotated images that have a result
      (with a warning) instead of refusing.
    annotations_source: the annotations file, for messages.
    results_source: the results file, for messages.

  Returns:
    (references, candidates) restricted to the scored images, in the order
    of the annotations.

  Raises:
    UserError: a result for an image the annotations do not have, or
      annotated images without a result (unless `allow_partial`).
  """
  unknown = [i for i in candidates if i not in references]
  if unknown:
    hint = ''
    ref_types = {type(i) for i in references}
    if any(type(i) not in ref_types for i in unknown):
      hint = (' (the annotations use '
              f'{" and ".join(sorted(t.__name__ for t in ref_types))} ids: '
              '42 and "42" are different ids)')
    raise UserError(
        f'results {results_source}: {len(unknown)} of {len(candidates)} '
        f'image ids are not in the annotations {annotations_source} '
        f'({_some(unknown)}){hint}; score results against the annotations '
        'of the same split')
  missing = [i for i in references if i not in candidates]
  if missing:
    if not allow_partial:
      raise UserError(
          f'results {results_source} cover {len(candidates)} of the '
          f'{len(references)} annotated images; {len(missing)} have no '
          f'result ({_some(missing)}). Caption every image, or pass '
          '--allow-partial to score only the images with results')
    logging.warning(
        'Scoring only the %d of %d annotated images that have a result: %d '
        'left out (%s).', len(candidates), len(references), len(missing),
        _some(missing))
  scored = [i for i in references if i in candidates]
  return ({i: references[i] for i in scored},
          {i: candidates[i] for i in scored})


def load(annotations_path: str, results_path: str, *,
         allow_partial: bool = False,
         ) -> tuple[dict[ImageId, list[str]], dict[ImageId, str]]:
  """Reads, checks and matches an annotations and a results file.

  Returns:
    (references, candidates) with the same image ids, ready for
    `capjax.metrics.score`.

  Raises:
    UserError: for anything wrong with either file (see
      `coco_json.load_json`, `coco_json.parse_annotations`,
      `coco_json.parse_results`, `match`).
  """
  references = coco_json.parse_annotations(
      coco_json.load_json(annotations_path, 'annotations'), annotations_path)
  candidates = coco_json.parse_results(
      coco_json.load_json(results_path, 'results'), results_path)
  return match(references, candidates, allow_partial=allow_partial,
               annotations_source=annotations_path,
               results_source=results_path)
