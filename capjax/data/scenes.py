"""Synthetic scenes of coloured shapes and true captions of them.

A scene holds 1-4 coloured shapes on a noisy background, each shape inside its
own cell of a 3x3 grid: two shapes in different columns never overlap
horizontally, so "left of" / "right of" (and likewise "above" / "below") are
always well defined. Captions come from a small grammar with synonyms and
varied word order that states counts, colours, shapes, sizes, positions and
relations.

Only numpy and Pillow here: the `shapes` builder renders in worker processes
that start quickly because they import nothing else.
"""

import dataclasses
import io

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ('circle', 'square', 'triangle', 'star', 'cross', 'diamond')
COLORS = {  # name -> RGB, vivid enough to stay distinct on any background.
    'red': (215, 35, 35),
    'green': (35, 160, 55),
    'blue': (40, 75, 220),
    'yellow': (240, 215, 30),
    'purple': (145, 50, 190),
    'orange': (245, 135, 20),
}
COLORS_LIST = list(COLORS)  # ClassLabel order in the TFDS features.
SIZES = ('small', 'large')
# One pair per colour and per shape, so train still shows every colour and
# every shape, just never these combinations.
HELD_OUT = frozenset({
    ('red', 'square'), ('green', 'triangle'), ('blue', 'star'),
    ('yellow', 'cross'), ('purple', 'diamond'), ('orange', 'circle'),
})

_GRID = 3
_MAX_OBJECTS = 4
# Fraction of a grid cell an object's bounding box spans, per size.
_SIZE_FRACTION = {'small': (0.45, 0.55), 'large': (0.78, 0.92)}

# Grammar. Each entry is a list of interchangeable words.
_SHAPE_WORDS = {
    'circle': [('circle', 'circles'), ('disk', 'disks')],
    'square': [('square', 'squares')],
    'triangle': [('triangle', 'triangles')],
    'star': [('star', 'stars')],
    'cross': [('cross', 'crosses'), ('plus sign', 'plus signs')],
    'diamond': [('diamond', 'diamonds')],
}
_SIZE_WORDS = {'small': ['small', 'little', 'tiny'], 'large': ['large', 'big']}
_NUMBERS = ['zero', 'one', 'two', 'three', 'four']
_THING = [('shape', 'shapes'), ('object', 'objects')]
_RELATIONS = {  # relation -> phrases; 'left' means "A is left of B".
    'left': ['to the left of', 'left of', 'on the left of'],
    'right': ['to the right of', 'right of', 'on the right of'],
    'above': ['above', 'over'],
    'below': ['below', 'under', 'beneath'],
}
_ROWS = ['top', 'middle', 'bottom']
_COLS = ['left', 'center', 'right']


@dataclasses.dataclass(frozen=True)
class Obj:
  shape: str
  color: str
  size: str
  row: int
  col: int



@dataclasses.dataclass(frozen=True)
class Scene:
  """One rendered image, its objects and five reference captions."""
  jpeg: bytes
  objects: list[Obj]
  boxes: list[tuple[float, float, float, float]]  # (ymin, xmin, ymax, xmax) in [0, 1]
  captions: list[str]


def make_scene(seed: int, split_index: int, index: int, image_size: int,
               novel: bool) -> Scene:
  """Scene number `index` of a split: a pure function of its arguments."""
  rng = np.random.default_rng([seed, split_index, index])
  objects = sample_scene(rng, novel=novel)
  image, boxes = render(rng, objects, image_size)
  # JPEG at 4:4:4: a fifth of the PNG size (the noise does not compress)
  # while the shapes keep crisp colours.
  jpeg = io.BytesIO()
  Image.fromarray(image).save(jpeg, format='JPEG', quality=90, subsampling=0)
  captions = [describe(rng, objects, style) for style in _caption_styles(rng)]
  return Scene(jpeg.getvalue(), objects, boxes, captions)


def sample_scene(rng: np.random.Generator, novel: bool) -> list[Obj]:
  """1-4 objects in distinct grid cells.

  Outside `test_novel` no object has a held-out colour-shape pair; in it, at
  least one object has one.
  """
  n = int(rng.integers(1, _MAX_OBJECTS + 1))
  cells = rng.choice(_GRID * _GRID, size=n, replace=False)
  allowed = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in HELD_OUT]
  held_out = sorted(HELD_OUT)
  objects = []
  for k, cell in enumerate(cells):
    if novel and k == 0:
      color, shape = held_out[rng.integers(len(held_out))]
    elif novel:  # The others may be anything.
      color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
    else:
      color, shape = allowed[rng.integers(len(allowed))]
    objects.append(Obj(shape=str(shape), color=str(color),
                       size=SIZES[rng.integers(2)],
                       row=int(cell) // _GRID, col=int(cell) % _GRID))
  # Objects are listed in reading order, so captions and `objects` agree.
  return sorted(objects, key=lambda o: (o.row, o.col))


# ----------------------------------------------------------------------------
# Rendering.
# ----------------------------------------------------------------------------


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
  """A desaturated gradient with pixel noise: varied, but never a shape colour."""
  gray = rng.uniform(70, 190)
  tint = rng.uniform(-18, 18, size=3).astype(np.float32)
  slope = rng.uniform(-40, 40, size=2)
  ramp = np.linspace(-0.5, 0.5, size, dtype=np.float32)
  base = gray + slope[0] * ramp[:, None] + slope[1] * ramp[None, :]
  noise = rng.standard_normal((size, size, 3), dtype=np.float32)
  image = base[..., None] + tint + rng.uniform(3, 14) * noise
  return np.clip(image, 0, 255).astype(np.uint8)


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple]:
  if shape == 'triangle':
    angles = np.deg2rad([-90, 30, 150])
    return [(cx + r * np.cos(a), cy + r * np.sin(a)) for a in angles]
  if shape == 'diamond':
    return [(cx, cy - r), (cx + 0.75 * r, cy), (cx, cy + r), (cx - 0.75 * r, cy)]
  if shape == 'star':
    pts = []
    for k in range(10):
      rad = r if k % 2 == 0 else 0.45 * r
      a = np.deg2rad(-90 + 36 * k)
      pts.append((cx + rad * np.cos(a), cy + rad * np.sin(a)))
    return pts
  if shape == 'cross':
    w = 0.36 * r
    return [(cx - w, cy - r), (cx + w, cy - r), (cx + w, cy - w),
            (cx + r, cy - w), (cx + r, cy + w), (cx + w, cy + w),
            (cx + w, cy + r), (cx - w, cy + r), (cx - w, cy + w),
            (cx - r, cy + w), (cx - r, cy - w), (cx - w, cy - w)]
  raise ValueError(shape)


def render(rng: np.random.Generator, objects: list[Obj],
           size: int) -> tuple[np.ndarray, list[tuple[float, ...]]]:
  """The uint8 image and each object's normalised (ymin, xmin, ymax, xmax)."""
  # Shapes are drawn at twice the size and downsampled, for antialiased edges.
  scale = 2
  layer = Image.new('RGBA', (size * scale, size * scale), (0, 0, 0, 0))
  draw = ImageDraw.Draw(layer)
  cell = size * scale / _GRID
  boxes = []
  for o in objects:
    r = cell * rng.uniform(*_SIZE_FRACTION[o.size]) / 2
    # The whole object stays inside its cell.
    cx = (o.col + 0.5) * cell + rng.uniform(-1, 1) * (cell / 2 - r)
    cy = (o.row + 0.5) * cell + rng.uniform(-1, 1) * (cell / 2 - r)
    color = tuple(int(v) for v in
                  np.clip(np.array(COLORS[o.color]) + rng.integers(-15, 16, 3),
                          0, 255))
    if o.shape == 'circle':
      draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color + (255,))
    elif o.shape == 'square':
      s = 0.85 * r  # Same visual weight as the circle.
      draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=color + (255,))
    else:
      draw.polygon(_polygon(o.shape, cx, cy, r), fill=color + (255,))
    full = size * scale
    boxes.append((max(cy - r, 0) / full, max(cx - r, 0) / full,
                  min(cy + r, full) / full, min(cx + r, full) / full))
  layer = layer.resize((size, size), Image.Resampling.BOX)
  image = Image.fromarray(_background(rng, size), 'RGB').convert('RGBA')
  return np.asarray(Image.alpha_composite(image, layer).convert('RGB')), boxes


# ----------------------------------------------------------------------------
# Captions.
# ----------------------------------------------------------------------------


def _pick(rng: np.random.Generator, options):
  return options[int(rng.integers(len(options)))]


def _noun(rng, shape: str, plural: bool = False) -> str:
  return _pick(rng, _SHAPE_WORDS[shape])[int(plural)]


def _article(word: str) -> str:
  return 'an' if word[0] in 'aeiou' else 'a'


def _phrase(rng, o: Obj, size_prob: float = 0.75, clause: bool = False) -> str:
  """"a large red circle", "a red circle", or with `clause` sometimes
  "a circle that is large and red" (kept out of long listings)."""
  size = _pick(rng, _SIZE_WORDS[o.size]) if rng.random() < size_prob else None
  noun = _noun(rng, o.shape)
  if clause and rng.random() < 0.2:
    words = f'{noun} that is {f"{size} and " if size else ""}{o.color}'
  else:
    words = f'{f"{size} " if size else ""}{o.color} {noun}'
  return f'{_article(words)} {words}'


def _groups(objects: list[Obj]) -> list[list[Obj]]:
  """Objects grouped by (colour, shape), in order of first appearance."""
  groups: dict[tuple[str, str], list[Obj]] = {}
  for o in objects:
    groups.setdefault((o.color, o.shape), []).append(o)
  return list(groups.values())


def _group_phrase(rng, group: list[Obj], size_prob: float) -> str:
  if len(group) == 1:
    return _phrase(rng, group[0], size_prob)
  sizes = {o.size for o in group}
  size = (f'{_pick(rng, _SIZE_WORDS[sizes.pop()])} '
          if len(sizes) == 1 and rng.random() < size_prob else '')
  o = group[0]
  return f'{_NUMBERS[len(group)]} {size}{o.color} {_noun(rng, o.shape, True)}'


def _join(parts: list[str]) -> str:
  if len(parts) == 1:
    return parts[0]
  return ', '.join(parts[:-1]) + ' and ' + parts[-1]


def _relation_pairs(objects: list[Obj]) -> list[tuple[Obj, str, Obj]]:
  """Every true (A, relation, B) between objects in different cells."""
  pairs = []
  for a in objects:
    for b in objects:
      if a is b:
        continue
      if a.col < b.col:
        pairs.append((a, 'left', b))
      if a.col > b.col:
        pairs.append((a, 'right', b))
      if a.row < b.row:
        pairs.append((a, 'above', b))
      if a.row > b.row:
        pairs.append((a, 'below', b))
  return pairs


def _position(o: Obj) -> str:
  if (o.row, o.col) == (1, 1):
    return 'in the center'
  if o.row == 1:
    return f'on the {_COLS[o.col]}'
  if o.col == 1:
    return f'at the {_ROWS[o.row]}'
  return f'in the {_ROWS[o.row]} {_COLS[o.col]} corner'


def _caption_styles(rng: np.random.Generator) -> list[str]:
  """Five caption styles: always a full listing, then a varied mix."""
  others = ['list', 'count', 'relation', 'relation', 'position']
  return ['list'] + [str(s) for s in rng.choice(others, size=4, replace=True)]


def describe(rng: np.random.Generator, objects: list[Obj], style: str) -> str:
  """One caption of `objects` in `style` ('list', 'count', 'relation', ...).

  A style that cannot apply (a relation in a one-object scene) falls back to
  a listing, so every caption is true of the image.
  """
  n = len(objects)
  if style == 'relation' and n > 1:
    a, rel, b = _pick(rng, _relation_pairs(objects))
    text = (f'{_phrase(rng, a, clause=True)} {_pick(rng, _RELATIONS[rel])} '
            f'{_phrase(rng, b, clause=True)}')
    return _pick(rng, ['{}', '{}', 'there is {}', 'an image with {}']).format(
        text)
  if style == 'position':
    o = _pick(rng, objects)
    phrase, where = _phrase(rng, o, clause=True), _position(o)
    if n > 1:
      others = _pick(rng, _THING)[int(n > 2)]
      return f'{phrase} {where} and {_NUMBERS[n - 1]} other {others}'
    return _pick(rng, [f'{phrase} {where}',
                       f'a single {phrase.split(" ", 1)[1]} {where}',
                       f'{where} there is {phrase}'])
  # Sizes are mentioned less in long listings, to keep captions short.
  size_prob = 0.75 if n < 3 else 0.5
  listing = _join([_group_phrase(rng, g, size_prob) for g in _groups(objects)])
  is_are = 'is' if n == 1 else 'are'
  if style == 'count':
    thing = _pick(rng, _THING)[int(n > 1)]
    return _pick(rng, [f'{_NUMBERS[n]} {thing} : {listing}',
                       f'there {is_are} {_NUMBERS[n]} {thing} , {listing}'])
  return _pick(rng, ['{}', '{}', 'a picture of {}', 'an image with {}',
                     f'there {is_are} {{}}']).format(listing)
