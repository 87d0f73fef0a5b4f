"""The HTML report of captioned images (`capjax.caption --html`): one page.

Every image is embedded (a JPEG data URI), with its caption, score and the
other beams' captions; with attention, a strip of heatmaps, one per word,
shows where the model looked when it wrote that word, as Figure 2 of "Show,
Attend and Tell" (Xu et al. 2015) does: the attention over the feature grid,
upsampled smoothly to the image, brightens what was attended and darkens
the rest. Pillow draws it all, with no display.
"""

import base64
import html
import io
import os
from collections.abc import Sequence

import numpy as np
import PIL.Image

from capjax import files
from capjax.inference import Result

# Size of the heatmap tiles, and how dark what the model ignores becomes.
TILE = 112
_FLOOR = 0.25

_STYLE = """
body { font-family: sans-serif; margin: 2em; color: #222; }
.item { border-bottom: 1px solid #ddd; padding: 1em 0; display: flex;
        gap: 1.5em; flex-wrap: wrap; }
.item img.photo { max-width: 320px; height: auto; align-self: flex-start; }
.item > div { flex: 1; min-width: 320px; }
.caption { font-size: 1.2em; font-weight: bold; }
.score, .path { color: #777; font-size: 0.85em; }
.error { color: #b00; }
.words { display: flex; flex-wrap: wrap; gap: 4px; margin-top: 0.8em; }
.word { text-align: center; font-size: 0.85em; }
.word img { display: block; width: 112px; height: auto; }
ol { margin: 0.5em 0; padding-left: 1.4em; color: #555; }
"""


def _data_uri(pixels: np.ndarray, quality: int = 85) -> str:
  buffer = io.BytesIO()
  PIL.Image.fromarray(pixels).save(buffer, format='JPEG', quality=quality)
  return 'data:image/jpeg;base64,' + base64.b64encode(
      buffer.getvalue()).decode('ascii')


def heatmap(pixels: np.ndarray, attention: np.ndarray,
            width: int = TILE) -> np.ndarray:
  """`pixels` [H, W, 3] lit by `attention` [g, g]: uint8 [h, width, 3]."""
  image = PIL.Image.fromarray(pixels)
  height = max(1, round(pixels.shape[0] * width / pixels.shape[1]))
  image = image.resize((width, height), PIL.Image.Resampling.BILINEAR)
  weights = attention.astype(np.float32)
  weights = weights / max(float(weights.max()), 1e-12)
  # Bilinear upsampling of the grid, as the paper's figures do.
  weights = np.asarray(PIL.Image.fromarray(weights, mode='F').resize(
      (width, height), PIL.Image.Resampling.BILINEAR))
  lit = np.asarray(image, np.float32) * (
      _FLOOR + (1 - _FLOOR) * np.clip(weights, 0, 1))[..., None]
  return lit.round().astype(np.uint8)


def _item(result: Result, attention: bool) -> str:
  name = html.escape(result.path)
  if result.error is not None:
    return (f'<div class="item"><div><div class="path">{name}</div>'
            f'<div class="error">error: {html.escape(result.error)}</div>'
            '</div></div>')
  parts = [f'<div class="item"><img class="photo" alt="{name}" '
           f'src="{_data_uri(result.pixels)}"><div>',
           f'<div class="caption">{html.escape(result.caption)}</div>',
           f'<div class="score">score {result.score:.3f} &middot; {name}'
           '</div>']
  if result.alternatives:
    parts.append('<ol start="2">' + ''.join(
        f'<li>{html.escape(a["caption"])} <span class="score">'
        f'{a["score"]:.3f}</span></li>' for a in result.alternatives)
                 + '</ol>')
  if attention and result.attention is not None:
    words = result.words + ['<eos>']
    parts.append('<div class="words">' + ''.join(
        f'<div class="word"><img alt="attention for {html.escape(w)}" '
        f'src="{_data_uri(heatmap(result.pixels, a))}">{html.escape(w)}'
        '</div>' for w, a in zip(words, result.attention)) + '</div>')
  parts.append('</div></div>')
  return ''.join(parts)


def write_html(results: Sequence[Result], path: str, *, title: str,
               attention: bool = False) -> None:
  """Writes the page for `results` (captioned with keep_pixels=True)."""
  ok = sum(r.error is None for r in results)
  body = ''.join(_item(r, attention) for r in results)
  page = (f'<!DOCTYPE html>\n<html><head><meta charset="utf-8">'
          f'<title>{html.escape(title)}</title><style>{_STYLE}</style></head>'
          f'<body><h1>{html.escape(title)}</h1><p>{ok} of {len(results)} '
          f'images captioned.</p>{body}</body></html>\n')
  directory = os.path.dirname(os.path.abspath(path))
  with files.reporting(directory, 'the HTML report'):
    os.makedirs(directory, exist_ok=True)  # Its folder, when missing.
    files.write_text(path, page)
