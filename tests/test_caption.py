"""Captioning users' images: the CLI (capjax.caption), the API it shares
(capjax.inference) and the HTML report (capjax.report), end to end."""

import io
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from capjax import inference
from capjax import workdir as workdir_lib
from capjax.data import scenes
import preload
from conftest import REPO, chromium, chromium_flags, imported_modules

GOOD = ['a.jpg', 'b.png', 'c.webp', 'd.bmp', 'e.gif', 'cmyk.jpg', 'deep.png',
        'rotated.jpg', 'huge.jpg', 'nested/f.JPEG']
BAD = {'empty.jpg': 'empty file (0 bytes)',
       'notes.jpg': 'cannot identify image file',
       'truncated.jpg': 'truncated'}


def _scene(index: int) -> Image.Image:
  return Image.open(io.BytesIO(scenes.make_scene(1, 2, index, 96,
                                                 False).jpeg)).convert('RGB')


@pytest.fixture(scope='module')
def photos(tmp_path_factory):
  """A folder of good images in every format, bad files and a text file."""
  root = tmp_path_factory.mktemp('photos')
  (root / 'nested').mkdir()
  for i, name in enumerate(['a.jpg', 'b.png', 'c.webp', 'd.bmp',
                            'nested/f.JPEG']):
    _scene(i).save(root / name, format=name.split('.')[-1].upper().replace(
        'JPG', 'JPEG'))
  _scene(5).save(root / 'e.gif', save_all=True,
                 append_images=[_scene(6)])  # Animated: the first frame.
  _scene(7).convert('CMYK').save(root / 'cmyk.jpg')
  grey = np.asarray(_scene(8).convert('L')).astype(np.uint16) * 257
  Image.fromarray(grey).save(root / 'deep.png')  # 16-bit greyscale.
  # Stored sideways with the EXIF tag that turns it upright (6: the viewer
  # rotates it 90 degrees clockwise).
  exif = Image.Exif()
  exif[0x0112] = 6
  _scene(9).transpose(Image.Transpose.ROTATE_90).save(root / 'rotated.jpg',
                                                      exif=exif)
  _scene(10).resize((6000, 4000)).save(root / 'huge.jpg', quality=60)
  (root / 'empty.jpg').write_bytes(b'')
  (root / 'notes.jpg').write_text('not an image')
  data = (root / 'a.jpg').read_bytes()
  (root / 'truncated.jpg').write_bytes(data[:len(data) // 2])
  (root / 'readme.txt').write_text('not looked at: not an image extension')
  return root


def _cli(*args):
  return preload.run([sys.executable, '-m', 'capjax.caption', *args],
                     cwd=REPO, capture_output=True, text=True, timeout=300,
                     check=False)


@pytest.fixture(scope='module')
def cli_run(trained_workdir, photos, tmp_path_factory):
  out = tmp_path_factory.mktemp('out')
  proc = _cli(f'--workdir={trained_workdir}', '--beam_size=3', str(photos),
              str(photos / 'missing.jpg'), f'--html={out / "report.html"}',
              '--attention')
  return proc, out / 'report.html'


def test_cli_one_line_per_file_and_exit_code(cli_run, photos):
  proc, _ = cli_run
  assert proc.returncode == 1, proc.stderr[-3000:]
  lines = [json.loads(l) for l in proc.stdout.splitlines()]
  by_name = {os.path.relpath(l['path'], photos): l for l in lines}
  assert len(lines) == len(GOOD) + len(BAD) + 1
  for name in GOOD:
    line = by_name[name]
    assert set(line) == {'path', 'caption', 'score', 'alternatives'}
    assert line['caption'] and len(line['alternatives']) == 2
    assert line['score'] >= line['alternatives'][0]['score']
  for name, reason in BAD.items():
    assert set(by_name[name]) == {'path', 'error'}
    assert reason in by_name[name]['error']
  assert by_name['missing.jpg']['error'] == 'no such file'
  assert proc.stderr.strip().splitlines()[-1] == (
      f'{len(GOOD)} of {len(lines)} images captioned, 4 failed')
  assert 'Traceback' not in proc.stderr


def test_api_agrees_with_cli_and_reads_images_upright(cli_run, trained_workdir,
                                                     photos):
  proc, _ = cli_run
  cli = {l['path']: l for l in map(json.loads, proc.stdout.splitlines())}
  captioner = inference.Captioner.from_workdir(trained_workdir, beam_size=3)
  paths = [str(photos / n) for n in GOOD]
  results = captioner.caption(paths, keep_pixels=True)
  for path, result in zip(paths, results):
    assert result.to_json() == cli[path]
  # The EXIF tag was applied: the pixels are those of the upright scene.
  # (Compared at 12x12 px, where the JPEG noise of the background averages
  # out and the shapes remain.)
  small = lambda image: np.asarray(image.resize((12, 12)), float)
  seen = small(Image.fromarray(results[GOOD.index('rotated.jpg')].pixels))
  upright = np.abs(seen - small(_scene(9))).mean()
  sideways = np.abs(seen - small(_scene(9).transpose(
      Image.Transpose.ROTATE_90))).mean()
  assert upright < sideways / 2
  # The huge image was decoded small (memory stays bounded).
  assert max(results[GOOD.index('huge.jpg')].pixels.shape) <= (
      inference.REPORT_SIZE)
  # Pixels in memory caption as their file does.
  pixels = np.asarray(Image.open(photos / 'b.png'))
  assert captioner.caption([pixels])[0].caption == results[1].caption


def test_all_good_exits_0_and_usage_errors_exit_2(trained_workdir, photos,
                                                  tmp_path):
  good = tmp_path / 'good'
  good.mkdir()
  shutil.copy(photos / 'a.jpg', good)
  output = tmp_path / 'captions.jsonl'
  proc = _cli(f'--workdir={trained_workdir}', str(good), f'--output={output}',
              '--include=square|squares')
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout == '' and len(output.read_text().splitlines()) == 1
  line = json.loads(output.read_text())
  assert line['satisfied'] and {'square', 'squares'} & set(
      line['caption'].split()), line
  (tmp_path / 'untrained').mkdir()
  cases = {
      'give the images or folders': [f'--workdir={trained_workdir}'],
      'has no config.json; train one first': [
          f'--workdir={tmp_path / "untrained"}', str(good)],
      'no image files': [f'--workdir={trained_workdir}',
                         str(tmp_path / 'untrained')],
      '--attention draws heatmaps into the --html report': [
          f'--workdir={trained_workdir}', '--attention', str(good)],
      'Unknown command line flag': [f'--workdir={trained_workdir}', '--beam=3'],
  }
  procs = {want: preload.Popen(
      [sys.executable, '-m', 'capjax.caption', *args], cwd=REPO, text=True,
      stdout=subprocess.PIPE, stderr=subprocess.PIPE)
           for want, args in cases.items()}  # Side by side: faster.
  for want, proc in procs.items():
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, (want, err[-2000:])
    assert want in err and 'Traceback' not in err, want


def test_a_usage_mistake_is_told_before_jax_is_imported(tmp_path):
  proc = subprocess.run(
      [sys.executable, '-X', 'importtime', '-m', 'capjax.caption',
       f'--workdir={tmp_path}', '--attention', str(tmp_path)],
      cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert proc.stderr.strip().splitlines()[-1].startswith(
      'capjax: error: --attention draws heatmaps'), proc.stderr[-3000:]
  imported = imported_modules(proc.stderr)
  assert 'absl.flags' in imported
  assert not {'jax', 'flax', 'orbax', 'tensorflow'} & imported


def test_an_output_that_cannot_be_written_is_one_line_before_captioning(
    trained_workdir, photos, tmp_path):
  (tmp_path / 'folder').mkdir()
  (tmp_path / 'file').write_text('')
  folder, file = tmp_path / 'folder', tmp_path / 'file'
  cases = {
      f'cannot write --output={folder}: {folder} is a directory. Give a '
      'file name': [f'--output={folder}'],
      f'cannot write --output={file}/c.jsonl: {file} is a file, not a '
      'folder. Choose another path': [f'--output={file / "c.jsonl"}'],
      f'cannot write --html={file}/r.html: {file} is a file, not a folder. '
      'Choose another path': [f'--html={file / "r.html"}'],
      # Into missing folders: they are made.
      None: [f'--output={tmp_path / "new" / "c.jsonl"}',
             f'--html={tmp_path / "new" / "report" / "r.html"}'],
  }
  procs = {want: preload.Popen(
      [sys.executable, '-m', 'capjax.caption', f'--workdir={trained_workdir}',
       str(photos / 'a.jpg'), *args], cwd=REPO, text=True,
      stdout=subprocess.PIPE, stderr=subprocess.PIPE)
           for want, args in cases.items()}  # Side by side: faster.
  for want, proc in procs.items():
    out, err = proc.communicate(timeout=300)
    if want is None:
      assert proc.returncode == 0, err[-2000:]
      continue
    assert proc.returncode == 2, (want, err[-2000:])
    assert err.strip().splitlines()[-1] == f'capjax: error: {want}'
    assert out == ''  # No image captioned.
  assert len((tmp_path / 'new' / 'c.jsonl').read_text().splitlines()) == 1
  assert (tmp_path / 'new' / 'report' / 'r.html').exists()
  assert sorted(os.listdir(tmp_path)) == ['file', 'folder', 'new']
  assert os.listdir(folder) == []


def test_html_report_has_every_image_and_attention(cli_run, trained_workdir):
  proc, report = cli_run
  page = report.read_text()
  lines = [json.loads(l) for l in proc.stdout.splitlines()]
  captioned = [l for l in lines if 'caption' in l]
  assert page.count('<img class="photo"') == len(captioned)
  for line in lines:
    assert line['path'] in page
  # A heatmap per word and for <eos>, unless the caption reached max_len.
  positions = workdir_lib.load_config(trained_workdir).data.max_len - 1
  words = sum(min(len(l['caption'].split()) + 1, positions)
              for l in captioned)
  assert len(re.findall(r'alt="attention for ', page)) == words
  # Self-contained: every image is a data URI, nothing is fetched.
  sources = re.findall(r'src="([^"]*)"', page)
  assert sources and all(s.startswith('data:image/jpeg;base64,')
                         for s in sources)


@pytest.mark.skipif(chromium() is None,
                    reason='no Chromium (Debian package chromium) to render '
                    'the report in')
def test_report_renders_in_headless_chromium(cli_run, tmp_path):
  _, report = cli_run
  flags = chromium_flags()
  # The DOM after loading, with a script that checks every image decoded.
  probe = tmp_path / 'probe.html'
  probe.write_text(report.read_text().replace(
      '</body>', '<script>window.onload = () => { document.body.dataset.ok = '
      '[...document.images].filter(i => i.complete && i.naturalWidth > 0)'
      '.length + "/" + document.images.length; };</script></body>'))
  dom = subprocess.run(
      [chromium(), *flags, '--virtual-time-budget=5000', '--dump-dom',
       probe.as_uri()], capture_output=True, text=True, timeout=120,
      check=False).stdout
  loaded, total = map(int, re.search(r'data-ok="(\d+)/(\d+)"', dom).groups())
  assert total > 0 and loaded == total
  # And a screenshot of the page itself: the photos are there in colour.
  shot = tmp_path / 'shot.png'
  subprocess.run([chromium(), *flags, '--window-size=1000,800',
                  f'--screenshot={shot}', report.as_uri()],
                 capture_output=True, timeout=120, check=True)
  pixels = np.asarray(Image.open(shot).convert('RGB'), float)
  assert pixels.std(axis=(0, 1)).max() > 20  # Not a blank page.

