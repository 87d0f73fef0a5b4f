"""The captioning library (capjax.inference), beyond what the CLI tests of
test_caption.py cover: arrays, batching, and what it must not import."""

import io
import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

import capjax
from capjax import inference
from capjax.data import scenes
from capjax.errors import UserError
from conftest import REPO


def _scene(index: int, size: int = 96) -> np.ndarray:
  jpeg = scenes.make_scene(1, 2, index, size, False).jpeg
  return np.asarray(Image.open(io.BytesIO(jpeg)).convert('RGB'))


# Captioning your own images needs the model and its checkpoint, no dataset
# library: a machine with only JAX, orbax and Pillow can do it.
BLOCKED = ('grain', 'tensorflow', 'tensorflow_datasets')
# The dataset side of capjax, which would pull those in.
DATASET_MODULES = ('capjax.data.pipeline', 'capjax.data.datasets',
                   'capjax.data.prepare', 'capjax.data.shapes',
                   'capjax.data.caption_files', 'capjax.data.resized')

_SCRIPT = '''
import json
import runpy
import sys

BLOCKED, DATASET_MODULES, workdir, image, html = sys.argv[1:6]
for name in BLOCKED.split(','):
  # As if not installed: importing them fails, and find_spec (which orbax's
  # path library asks about tensorflow) finds nothing.
  sys.modules[name] = None
import capjax

# The API.
captioner = capjax.Captioner.from_workdir(workdir, beam_size=2)
print(json.dumps(captioner.caption([image])[0].to_json()))
# The command line, with its HTML report.
sys.argv = ['capjax.caption', f'--workdir={workdir}', f'--html={html}',
            '--attention', '--beam_size=2', image]
try:
  runpy.run_module('capjax.caption', run_name='__main__', alter_sys=True)
except SystemExit as e:
  print('exit', e.code)
print(json.dumps(sorted(set(sys.modules) & set(DATASET_MODULES.split(',')))))
'''


def test_captioning_imports_no_dataset_library(trained_workdir, tmp_path):
  image = tmp_path / 'scene.jpg'
  Image.fromarray(_scene(0)).save(image)
  html = tmp_path / 'report.html'
  proc = subprocess.run(
      [sys.executable, '-c', _SCRIPT, ','.join(BLOCKED),
       ','.join(DATASET_MODULES), trained_workdir, str(image), str(html)],
      cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  api, cli, code, loaded = proc.stdout.strip().splitlines()[-4:]
  assert json.loads(api)['caption'], api
  assert json.loads(cli) == json.loads(api)  # The CLI's line is the API's.
  assert code == 'exit 0', proc.stderr[-3000:]
  assert json.loads(loaded) == []
  assert 'alt="attention for ' in html.read_text()


def test_find_images_in_order(tmp_path):
  (tmp_path / 'b' / 'deep').mkdir(parents=True)
  (tmp_path / 'a').mkdir()
  for name in ('b/2.png', 'b/1.JPG', 'b/deep/0.webp', 'b/notes.txt',
               'a/x.gif', 'single.data'):
    (tmp_path / name).write_bytes(b'')
  found = inference.find_images([str(tmp_path / 'b'), str(tmp_path / 'a'),
                                 str(tmp_path / 'single.data'),
                                 str(tmp_path / 'missing.jpg')])
  assert [os.path.relpath(p, tmp_path) for p in found] == [
      # Sorted within a folder, subfolders after its files; text left out.
      'b/1.JPG', 'b/2.png', 'b/deep/0.webp', 'a/x.gif',
      # Named explicitly: kept whatever the extension, or whether it exists.
      'single.data', 'missing.jpg']


def test_result_json():
  ok = inference.Result(path='a.jpg', caption='a red square', score=-1.23456,
                        alternatives=[{'caption': 'a square', 'score': -2.0}],
                        attention=np.zeros((4, 2, 2)))
  assert ok.words == ['a', 'red', 'square']
  assert ok.to_json() == {'path': 'a.jpg', 'caption': 'a red square',
                          'score': -1.2346, 'alternatives': [
                              {'caption': 'a square', 'score': -2.0}]}
  bad = inference.Result(path='b.jpg', error='no such file')
  assert bad.words == [] and bad.to_json() == {'path': 'b.jpg',
                                               'error': 'no such file'}


@pytest.fixture(scope='module')
def captioner(trained_workdir):
  return inference.Captioner.from_workdir(trained_workdir, beam_size=2,
                                          batch_size=2)


def test_load_trained(trained_workdir):
  trained = inference.load_trained(trained_workdir)
  assert trained.step == 6
  assert set(trained.variables) == {'params', 'batch_stats'}
  assert trained.config.data.builder_config == 'tiny'
  assert capjax.Captioner is inference.Captioner
  with pytest.raises(UserError, match='beam_size and batch_size'):
    inference.Captioner(trained.config, trained.vocab, trained.variables,
                        beam_size=0)


def test_included_phrases_are_in_every_caption(trained_workdir):
  # One word each: the 6-step model reaches them with 2 beams per state
  # (a longer phrase has no beam of its own while half written; the tests
  # of capjax.constrained cover phrases of several words).
  scenes = [_scene(3), _scene(4), _scene(5)]
  include = ['square', ['star', 'stars']]
  captioner = inference.Captioner.from_workdir(
      trained_workdir, beam_size=2, batch_size=2, include=include)
  results = captioner.caption(scenes)
  for r in results:
    assert r.satisfied and 'square' in r.words, r.caption
    assert {'star', 'stars'} & set(r.words), r.caption
    assert r.to_json()['satisfied'] is True
  # A word the model cannot write is refused in one line, before any image.
  with pytest.raises(UserError, match="'zebra' of the phrase 'a zebra' is "
                     'not in the vocabulary'):
    inference.Captioner.from_workdir(trained_workdir, include=['a zebra'])


def test_arrays_of_every_layout_across_batches(captioner):
  rgb = _scene(3)
  grey = np.asarray(Image.fromarray(rgb).convert('L'))  # [H, W]
  items = [rgb, grey, grey[..., None], np.dstack([rgb, np.full_like(
      grey, 255)]), rgb.astype(np.float32)]
  # Five items in batches of two: the last batch is padded.
  results = captioner.caption(items, attention=True, keep_pixels=True)
  assert [r.path for r in results] == [f'<array {i}>' for i in range(5)]
  rgb_result, grey_result, grey1, rgba, wrong = results
  assert wrong.error == 'expected uint8 [H, W, 3], got float32 (96, 96, 3)'
  # A grey image captions as its grey RGB copy; an opaque RGBA as its RGB.
  assert grey1.caption == grey_result.caption == captioner.caption(
      [np.dstack([grey] * 3)])[0].caption
  assert rgba.caption == rgb_result.caption
  assert rgb_result.score >= rgb_result.alternatives[0]['score']
  # An attention map per word and for <eos>, unless max_len cut it off.
  grid = rgb_result.attention.shape[-1]
  assert rgb_result.attention.shape == (
      min(len(rgb_result.words) + 1, captioner.max_len - 1), grid, grid)
  np.testing.assert_allclose(rgb_result.attention.sum(axis=(1, 2)), 1,
                             rtol=1e-4)
  assert rgb_result.pixels.shape == rgb.shape  # Smaller than REPORT_SIZE.
  # The same search, whichever batch an image lands in.
  assert captioner.caption([rgb])[0].to_json() == rgb_result.to_json()
  assert captioner.caption([]) == []
