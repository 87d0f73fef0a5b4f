"""`python -m capjax.score` and the matching of capjax.metrics.coco.

Two runs go through a real subprocess (a good pair of files, a bad one) to
check the exit codes and that errors are one line without a traceback; the
matching is called directly, one case each. The checks of each file are
tests/test_coco_json.py's.
"""

import json
import os
import subprocess
import sys

import pytest

from capjax import score
from capjax.errors import UserError
from capjax.metrics import coco

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

REFERENCES = {
    1: ['A man riding a horse on a beach.', 'A person rides a horse.'],
    2: ['Two dogs play in the snow.', "A dog's toy in the snow."],
    3: ['A red bus on a city street.', 'A bus parked by the road.'],
}
CANDIDATES = {1: 'A man riding a horse.', 2: 'Two dogs in the snow',
              3: 'a red bus'}
METRICS = ['BLEU-1', 'BLEU-2', 'BLEU-3', 'BLEU-4', 'ROUGE-L', 'CIDEr']


def _annotations(references=None, images=True):
  references = REFERENCES if references is None else references
  data = {'annotations': [
      {'image_id': i, 'id': 10 * i + j, 'caption': c}
      for i, captions in references.items() for j, c in enumerate(captions)]}
  if images:
    data['images'] = [{'id': i, 'file_name': f'{i}.jpg'} for i in references]
  return data


def _results(candidates=None):
  candidates = CANDIDATES if candidates is None else candidates
  return [{'image_id': i, 'caption': c} for i, c in candidates.items()]


def _write(path, data) -> str:
  with open(path, 'w', encoding='utf-8') as f:
    json.dump(data, f)
  return str(path)


def _cli(*args):
  return subprocess.run([sys.executable, '-m', 'capjax.score', *args],
                        capture_output=True, text=True, cwd=REPO, check=False)


def test_cli_scores_good_files(tmp_path):
  annotations = _write(tmp_path / 'ann.json', _annotations())
  results = _write(tmp_path / 'res.json', _results())
  out = tmp_path / 'out' / 'metrics.json'
  run = _cli(f'--annotations={annotations}', f'--results={results}',
             f'--json={out}', '--meteor=none')
  assert run.returncode == 0, run.stderr
  lines = run.stdout.splitlines()
  assert lines[0].split() == ['metric', 'value']
  assert [line.split()[0] for line in lines[2:-1]] == METRICS
  assert lines[-1] == '(3 images scored)'
  # One column of values, aligned.
  assert len({len(line) for line in lines[:-1]}) == 1
  with open(out) as f:
    written = json.load(f)
  assert list(written['metrics']) == METRICS
  assert written['num_images'] == 3
  assert written['results'] == results


def test_cli_error_is_one_line_without_traceback(tmp_path):
  annotations = _write(tmp_path / 'ann.json', _annotations())
  results = _write(tmp_path / 'res.json', _results({1: 'a man', 7: 'a dog'}))
  run = _cli(f'--annotations={annotations}', f'--results={results}',
             '--meteor=none')
  assert run.returncode == 1
  assert run.stdout == ''
  assert run.stderr.splitlines() == [
      f'capjax: error: results {results}: 1 of 2 image ids are not in the '
      f'annotations {annotations} (7); score results against the '
      'annotations of the same split']


def test_run_prints_and_returns_the_metrics(tmp_path, capsys):
  annotations = _write(tmp_path / 'ann.json', _annotations())
  results = _write(tmp_path / 'res.json', _results())
  metrics = score.run(annotations, results, meteor='none')
  assert list(metrics) == METRICS
  assert '(3 images scored)' in capsys.readouterr().out
  assert metrics['BLEU-1'] > 0.5


def test_run_scores_covered_images_with_allow_partial(tmp_path, capsys,
                                                      caplog):
  annotations = _write(tmp_path / 'ann.json', _annotations())
  results = _write(tmp_path / 'res.json', _results({1: 'a man on a horse'}))
  with pytest.raises(UserError, match='cover 1 of the 3 annotated images; '
                     r'2 have no result \(2, 3\).*--allow-partial'):
    score.run(annotations, results, meteor='none')
  score.run(annotations, results, meteor='none', allow_partial=True)
  assert '(1 images scored)' in capsys.readouterr().out
  assert 'Scoring only the 1 of 3 annotated images' in caplog.text
  assert '2 left out' in caplog.text


def test_run_refuses_an_unwritable_json_path(tmp_path):
  annotations = _write(tmp_path / 'ann.json', _annotations())
  results = _write(tmp_path / 'res.json', _results())
  blocker = tmp_path / 'file'
  blocker.write_text('')
  with pytest.raises(UserError, match='cannot write --json'):
    score.run(annotations, results, meteor='none',
              json_path=str(blocker / 'metrics.json'))


def test_annotations_without_images_are_accepted(tmp_path):
  annotations = _write(tmp_path / 'ann.json', _annotations(images=False))
  results = _write(tmp_path / 'res.json', _results())
  references, candidates = coco.load(annotations, results)
  assert references == REFERENCES and candidates == CANDIDATES


def test_results_for_unknown_images_are_named_and_counted():
  candidates = {i: 'a dog' for i in range(1, 11)}
  with pytest.raises(UserError, match=r'7 of 10 image ids are not in the '
                     r'annotations ann.json \(4, 5, 6, 7, 8, \.\.\.\)'):
    coco.match(REFERENCES, candidates, annotations_source='ann.json')


def test_string_ids_against_integer_ids_get_a_hint():
  with pytest.raises(UserError, match='the annotations use int ids'):
    coco.match(REFERENCES, {'1': 'a', '2': 'b', '3': 'c'})
