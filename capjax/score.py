"""Scores a COCO results file: BLEU-1..4, METEOR, ROUGE-L, CIDEr.

    python -m capjax.score --annotations=captions_val2014.json \\
        --results=results.json [--json=metrics.json] [--allow-partial] \\
        [--meteor=auto|java|nltk|none]

A drop-in for the official COCO caption evaluation (`pycocoevalcap`): the
same numbers (see `capjax.metrics`), no Java start-up for tokenisation, and
a one-line message instead of a traceback for a broken file. Java is started
only for the official METEOR 1.5; without Java, METEOR is NLTK's and is
reported as METEOR_nltk.
"""

import json
import os
import sys

from absl import app
from absl import flags

from capjax import files
from capjax.errors import UserError

FLAGS = flags.FLAGS
flags.DEFINE_string('annotations', None, 'COCO captions JSON with the '
                    'reference captions, e.g. captions_val2014.json.')
flags.DEFINE_string('results', None, 'JSON list of {"image_id", "caption"}: '
                    'one candidate caption per image.')
flags.DEFINE_string('json', None, 'Also write the metrics to this JSON file.')
flags.DEFINE_bool('allow-partial', False, 'Score only the annotated images '
                  'that have a result, instead of refusing a results file '
                  'that leaves images out.')
flags.DEFINE_enum('meteor', 'auto', ['auto', 'java', 'nltk', 'none'],
                  'java: the official METEOR 1.5 (needs Java). nltk: NLTK\'s '
                  'METEOR (needs WordNet), reported as METEOR_nltk. auto: '
                  'java if Java runs, else nltk, else none.')


def write_json(path: str, results: dict[str, float], num_images: int,
               annotations: str, results_file: str) -> None:
  """Writes the metrics and what they were computed on to `path`."""
  record = {'metrics': results, 'num_images': num_images,
            'annotations': annotations, 'results': results_file}
  directory = os.path.dirname(os.path.abspath(path))
  try:
    with files.reporting(directory, f'--json={path}'):
      os.makedirs(directory, exist_ok=True)
      files.write_text(path, json.dumps(record, indent=2) + '\n')
  except OSError as e:  # What `files` cannot tell more about.
    raise UserError(f'cannot write --json={path}: {e.strerror}') from None


def run(annotations: str, results: str, *, json_path: str | None = None,
        allow_partial: bool = False, meteor: str = 'auto') -> dict[str, float]:
  """Checks the files, scores them, prints the table; returns the metrics.

  Raises:
    UserError: anything wrong with the files, or a METEOR that cannot run.
  """
  if json_path:  # Written at the end: a wrong path is told now.
    files.check_output(json_path, f'--json={json_path}')
  # pylint: disable=g-import-not-at-top
  # Imported here so that `--help` and flag mistakes answer at once.
  from capjax import metrics
  from capjax.metrics import coco
  # pylint: enable=g-import-not-at-top
  references, candidates = coco.load(annotations, results,
                                     allow_partial=allow_partial)
  scores = metrics.score(references, candidates, meteor=meteor)
  print(metrics.format_table(scores, len(candidates)))
  if json_path:
    write_json(json_path, scores, len(candidates), annotations, results)
  return scores


def parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing, with flag mistakes as one line, not a usage dump."""
  try:
    return FLAGS(argv)
  except flags.Error as e:
    sys.exit(f'capjax: error: {e}')


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  for name in ('annotations', 'results'):
    if not FLAGS[name].value:
      sys.exit(f'capjax: error: --{name} is required: {FLAGS[name].help}')
  try:
    run(FLAGS.annotations, FLAGS.results, json_path=FLAGS.json,
        allow_partial=FLAGS['allow-partial'].value, meteor=FLAGS.meteor)
  except UserError as e:
    sys.exit(f'capjax: error: {e}')


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
