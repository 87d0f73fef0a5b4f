"""python -m capjax.caption: caption your own images from the command line.

    python -m capjax.caption --workdir=runs/shapes photos/ cat.jpg \\
        [--output=captions.jsonl] [--html=report.html --attention] \\
        [--include="red square|red box" ... | --concepts]

Captions files, and image files under folders, with the model of a training
workdir (`capjax.inference`, which is also the Python API). Each input gives
one JSON line: {"path", "caption", "score", "alternatives": [{"caption",
"score"}, ...]} (and "satisfied" with --include: whether the caption
contains every phrase; with --concepts also the "concepts" it had to
name) or {"path", "error"}. `--html` adds the page of
`capjax.report`. Exit codes: 0 all captioned, 1 some failed (or an output
could not be written), 2 bad usage (an output path that cannot be written
included, told before any image is captioned).
"""

# pylint: disable=g-import-not-at-top,wrong-import-position
from capjax import garbage

if __name__ == '__main__':
  garbage.collect_rarely()  # Before the imports below (capjax/garbage.py).

from collections.abc import Iterator
import contextlib
import json
import os
import sys
from typing import Any, IO

from absl import app
from absl import flags
from absl import logging

from capjax import files
from capjax.errors import UserError
# pylint: enable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
USAGE_ERROR = 2


def _define_flags() -> None:
  # Only when run as the program: capjax.main defines flags of the same
  # names, and a process (a test, a notebook) may import both modules.
  flags.DEFINE_string('workdir', None, 'A training workdir: its config.json, '
                      'vocab.json and checkpoints.')
  flags.DEFINE_integer('step', -1, 'The checkpoint to use; -1: the latest.')
  flags.DEFINE_integer('beam_size', 5, 'Beams per image; the other beams\' '
                       'captions are the alternatives. 1: greedy.')
  flags.DEFINE_integer('max_len', 0, 'Tokens per caption with <bos> and <eos>; '
                       '0: as in training.')
  flags.DEFINE_float('alpha', 0.0, 'Length penalty exponent (GNMT).')
  flags.DEFINE_integer('batch_size', 16, 'Images per batch on the device.')
  flags.DEFINE_string('output', None, 'JSON Lines file to write; default: '
                      'stdout.')
  flags.DEFINE_string('html', None, 'Also write this HTML report, with every '
                      'image embedded.')
  flags.DEFINE_bool('attention', False, 'In the HTML report, show where the '
                    'model looked for each word.')
  flags.DEFINE_multi_string(
      'include', [], 'A phrase every caption must contain, found by '
      'constrained beam search; alternatives separated by "|": '
      '--include="red square|red box". Repeat for more phrases (at most 4; '
      'each doubles the search).')
  flags.DEFINE_bool(
      'concepts', False, 'Each caption must name the concepts (colour-shape '
      'pairs, object categories) that the model\'s concept head finds in its '
      'image; they are listed in the JSON as "concepts". Needs a model '
      'trained with --config.model.concepts.head=True.')
  flags.DEFINE_float('concept_threshold', 0.5, 'With --concepts: the least '
                     'probability of a concept that the caption must name.')


def parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing, with flag mistakes as one line and exit code 2."""
  try:
    return FLAGS(argv)
  except flags.Error as e:
    print(f'capjax: error: {e}', file=sys.stderr)
    sys.exit(USAGE_ERROR)


def _check_usage(paths: list[str]) -> None:
  """A UserError for a usage mistake the flags and paths alone show."""
  if not FLAGS.workdir:
    raise UserError('--workdir is required: the training workdir whose '
                    'model captions the images')
  if not paths:
    raise UserError('give the images or folders to caption, e.g. '
                    'python -m capjax.caption --workdir=DIR photos/')
  if FLAGS.attention and not FLAGS.html:
    raise UserError('--attention draws heatmaps into the --html report; '
                    'give --html=FILE too')
  # Written as the images are captioned, or after: a wrong path is told
  # now, before the model is even loaded; a missing folder is made.
  for flag, path in (('--output', FLAGS.output), ('--html', FLAGS.html)):
    if path:
      files.check_output(path, f'{flag}={path}')


def _search_options() -> dict[str, Any]:
  """`inference.Captioner.from_workdir`'s options, as the flags set them."""
  return dict(
      beam_size=FLAGS.beam_size, max_len=FLAGS.max_len or None,
      alpha=FLAGS.alpha, batch_size=FLAGS.batch_size,
      include=[[p.strip() for p in phrase.split('|')]
               for phrase in FLAGS.include],
      use_concepts=FLAGS.concepts, concept_threshold=FLAGS.concept_threshold)


@contextlib.contextmanager
def _output() -> Iterator[IO[str]]:
  """Where the JSON lines go: --output, or stdout.

  Not written whole and renamed, as the other files capjax writes are: a
  line per image as it is captioned, as on stdout, so that a reader can
  follow the progress.
  """
  if not FLAGS.output:
    yield sys.stdout
    return
  with files.reporting(os.path.dirname(os.path.abspath(FLAGS.output)),
                       f'--output={FLAGS.output}'):
    with open(FLAGS.output, 'w', encoding='utf-8') as out:
      yield out


def main(argv: list[str]) -> int:
  # A tool's output, not a job's log: library INFO lines would drown it.
  logging.set_verbosity(logging.WARNING)
  paths = argv[1:]
  try:
    _check_usage(paths)
  except UserError as e:
    print(f'capjax: error: {e}', file=sys.stderr)
    return USAGE_ERROR
  # Here, once the flags are known to be right: a mistake in them is told
  # in 0.1 s of CPU, not after the 1.3 s or more that importing JAX, flax
  # and orbax takes (2-core CPU).
  # pylint: disable=g-import-not-at-top
  from capjax import checkpoint
  from capjax import inference
  from capjax import report
  import tqdm
  # pylint: enable=g-import-not-at-top
  checkpoint.quiet_reported_failures()
  items = inference.find_images(paths)
  if not items:
    print('capjax: error: no image files '
          f'({", ".join(inference.IMAGE_EXTENSIONS)}) in {", ".join(paths)}',
          file=sys.stderr)
    return USAGE_ERROR
  try:
    captioner = inference.Captioner.from_workdir(
        FLAGS.workdir, None if FLAGS.step < 0 else FLAGS.step,
        **_search_options())
  except UserError as e:
    print(f'capjax: error: {e}', file=sys.stderr)
    return USAGE_ERROR
  results, failed = [], 0
  try:
    # A progress bar for people watching a terminal, none in pipes and logs.
    with _output() as out, tqdm.tqdm(
        total=len(items), unit='image', file=sys.stderr,
        disable=len(items) <= 8 or not sys.stderr.isatty()) as bar:
      for result in captioner.caption_iter(items, attention=FLAGS.attention,
                                           keep_pixels=bool(FLAGS.html)):
        out.write(json.dumps(result.to_json()) + '\n')
        out.flush()
        failed += result.error is not None
        if FLAGS.html:
          results.append(result)
        bar.update()
    if FLAGS.html:
      with files.reporting(os.path.dirname(os.path.abspath(FLAGS.html)),
                           f'--html={FLAGS.html}'):
        report.write_html(results, FLAGS.html, attention=FLAGS.attention,
                          title=f'capjax captions: {FLAGS.workdir}, step '
                          f'{captioner.step}')
  except files.WriteError as e:  # A full disk, meanwhile.
    print(f'capjax: error: {e}', file=sys.stderr)
    return 1
  print(f'{len(items) - failed} of {len(items)} images captioned'
        + (f', {failed} failed' if failed else ''), file=sys.stderr)
  return 1 if failed else 0


if __name__ == '__main__':
  _define_flags()
  app.run(main, flags_parser=parse_flags)
