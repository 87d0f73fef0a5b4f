"""The HTML report of captioned images (capjax.report)."""

import re

import numpy as np

from capjax import report
from capjax.inference import Result


def test_heatmap_lights_what_was_attended():
  pixels = np.full((60, 120, 3), 200, np.uint8)  # [H, W, 3], wide.
  attention = np.array([[1.0, 0.0], [0.0, 0.0]])  # The top-left cell only.
  lit = report.heatmap(pixels, attention, width=40)
  assert lit.shape == (20, 40, 3) and lit.dtype == np.uint8
  # Bright where attended, darkened to the floor far from it.
  assert lit[0, 0, 0] > 190
  assert abs(int(lit[-1, -1, 0]) - round(200 * report._FLOOR)) <= 2


def _results():
  pixels = np.zeros((40, 30, 3), np.uint8)
  captioned = Result(path='photos/<b>.jpg', caption='a red square',
                     score=-1.5, alternatives=[{'caption': 'a square',
                                                'score': -2.25}],
                     attention=np.full((4, 2, 2), 0.25), pixels=pixels)
  return [captioned, Result(path='photos/gone.jpg', error='no such file')]


def test_page_has_every_image_escaped_and_a_heatmap_per_word(tmp_path):
  path = tmp_path / 'new' / 'report.html'  # Its folder is made.
  report.write_html(_results(), str(path), title='step <3>', attention=True)
  page = path.read_text()
  assert '<title>step &lt;3&gt;</title>' in page
  assert '1 of 2 images captioned' in page
  assert page.count('<img class="photo"') == 1
  assert 'photos/&lt;b&gt;.jpg' in page and '<b>.jpg' not in page
  assert 'score -1.500' in page and '<li>a square' in page
  assert 'error: no such file' in page
  # The three words and <eos>.
  assert re.findall(r'alt="attention for ([^"]*)"', page) == [
      'a', 'red', 'square', '&lt;eos&gt;']
  assert all(s.startswith('data:image/jpeg;base64,')
             for s in re.findall(r'src="([^"]*)"', page))
  report.write_html(_results(), str(path), title='t', attention=False)
  assert 'attention for' not in path.read_text()
