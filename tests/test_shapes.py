"""The embedded `shapes` dataset: scenes, captions, splits and the TFDS build."""

import re

import numpy as np
import tensorflow_datasets as tfds

from capjax.data import scenes
from capjax.data import shapes
from capjax.data import tokenizer

_COLOR_WORDS = set(scenes.COLORS)
_SHAPE_WORDS = {w: s for s, forms in scenes._SHAPE_WORDS.items()
                for f in forms for w in f}


def _scenes(split_index, n, novel=False, seed=0):
  return [scenes.make_scene(seed, split_index, i, 48, novel) for i in range(n)]


def test_scene_is_a_pure_function_of_seed_split_and_index():
  a = scenes.make_scene(3, 0, 17, 48, False)
  assert a == scenes.make_scene(3, 0, 17, 48, False)
  assert a.jpeg != scenes.make_scene(4, 0, 17, 48, False).jpeg
  assert a.jpeg != scenes.make_scene(3, 1, 17, 48, False).jpeg


def test_scene_contents():
  counts, kinds, colors = set(), set(), set()
  for scene in _scenes(0, 400):
    objs = scene.objects
    counts.add(len(objs))
    kinds |= {o.shape for o in objs}
    colors |= {o.color for o in objs}
    cells = [(o.row, o.col) for o in objs]
    assert len(set(cells)) == len(cells)  # One object per grid cell.
    assert len(scene.captions) == 5
    for (y0, x0, y1, x1), o in zip(scene.boxes, objs):
      # Each box lies inside its cell, so relations are unambiguous.
      assert o.col / 3 - 1e-6 <= x0 < x1 <= (o.col + 1) / 3 + 1e-6
      assert o.row / 3 - 1e-6 <= y0 < y1 <= (o.row + 1) / 3 + 1e-6
  assert counts == {1, 2, 3, 4}
  assert kinds == set(scenes.SHAPES) and len(kinds) >= 5
  assert colors == set(scenes.COLORS) and len(colors) >= 6


def test_objects_are_drawn_in_their_colour():
  for scene in _scenes(0, 30):
    image = tfds.core.lazy_imports.PIL_Image.open(
        __import__('io').BytesIO(scene.jpeg))
    pixels = np.asarray(image.convert('RGB')).astype(int)
    size = pixels.shape[0]
    for (y0, x0, y1, x1), o in zip(scene.boxes, scene.objects):
      cy, cx = int((y0 + y1) / 2 * size), int((x0 + x1) / 2 * size)
      # The centre of every shape kind is filled.
      got = pixels[cy - 1:cy + 2, cx - 1:cx + 2].reshape(-1, 3).mean(0)
      assert np.abs(got - scenes.COLORS[o.color]).max() < 45, (o, got)


def test_captions_only_state_true_words():
  for scene in _scenes(0, 300):
    colors = {o.color for o in scene.objects}
    kinds = {o.shape for o in scene.objects}
    for caption in scene.captions:
      words = tokenizer.tokenize(caption)
      assert set(words) & _COLOR_WORDS <= colors, caption
      nouns = {_SHAPE_WORDS[w] for w in words if w in _SHAPE_WORDS}
      nouns |= {'cross'} if 'plus' in words else set()
      assert nouns <= kinds, caption
      assert len(words) <= 25  # configs/shapes.py: max_len 27.
      if m := re.match(r'(?:there (?:is|are) )?(\w+) (?:shapes?|objects?)\b',
                       caption):
        assert m.group(1) == scenes._NUMBERS[len(scene.objects)], caption


def test_relations_are_true():
  rel_re = re.compile(r'(to the left of|to the right of|on the left of|'
                      r'on the right of|left of|right of|above|over|below|'
                      r'under|beneath)')
  checked = 0
  for scene in _scenes(0, 300):
    objs = scene.objects
    for caption in scene.captions:
      parts = rel_re.split(caption)
      if len(parts) != 3 or ' and ' in caption:
        continue
      (left_text, rel, right_text) = parts
      def matches(text):
        return [o for o in objs if o.color in text and any(
            w in text for f in scenes._SHAPE_WORDS[o.shape] for w in f)]
      a_opts, b_opts = matches(left_text), matches(right_text)
      assert a_opts and b_opts, caption
      ok = False
      for a in a_opts:
        for b in b_opts:
          if a is b:
            continue
          ok |= {'left': a.col < b.col, 'right': a.col > b.col,
                 'above': a.row < b.row, 'over': a.row < b.row,
                 'below': a.row > b.row, 'under': a.row > b.row,
                 'beneath': a.row > b.row}[rel.split()[-2] if 'of' in rel
                                           else rel]
      assert ok, caption
      checked += 1
  assert checked > 100


def test_novel_split_holds_out_its_colour_shape_pairs():
  for scene in _scenes(0, 1000) + _scenes(1, 200) + _scenes(2, 200):
    assert not {(o.color, o.shape) for o in scene.objects} & scenes.HELD_OUT
  for scene in _scenes(3, 300, novel=True):
    assert {(o.color, o.shape) for o in scene.objects} & scenes.HELD_OUT
  # Held-out pairs still leave every colour and shape to learn from.
  assert {c for c, _ in scenes.HELD_OUT} == set(scenes.COLORS)
  assert {s for _, s in scenes.HELD_OUT} == set(scenes.SHAPES)


def test_default_config_sizes():
  default = shapes.Shapes.builder_configs['default']
  assert (default.num_train, default.num_eval) == (20_000, 1_000)


def test_tiny_build(shapes_data_dir, tmp_path):
  builder = shapes.Shapes(config='tiny', data_dir=shapes_data_dir)
  assert builder.info.file_format == tfds.core.FileFormat.ARRAY_RECORD
  assert {s: builder.info.splits[s].num_examples for s in shapes.SPLITS} == {
      'train': 256, 'validation': 64, 'test': 64, 'test_novel': 64}
  source = tfds.data_source('shapes/tiny', split='test_novel',
                            data_dir=shapes_data_dir)
  ids = set()
  for i in range(len(source)):
    ex = source[i]
    assert ex['image'].dtype == np.uint8 and ex['image'].shape == (96, 96, 3)
    assert len(ex['captions']['text']) == 5
    ids.add(int(ex['image/id']))
    pairs = {(scenes.COLORS_LIST[c], scenes.SHAPES[s]) for c, s in zip(
        ex['objects']['color'], ex['objects']['shape'])}
    assert pairs & scenes.HELD_OUT
  assert len(ids) == 64
  # Rebuilding elsewhere gives the same bytes: the build is deterministic.
  again = shapes.Shapes(config='tiny', data_dir=str(tmp_path))
  again.download_and_prepare()
  a = builder.as_data_source('validation')
  b = again.as_data_source('validation')
  for i in range(0, 64, 7):
    assert a[i]['image/id'] == b[i]['image/id']
    np.testing.assert_array_equal(a[i]['image'], b[i]['image'])
    assert a[i]['captions']['text'] == b[i]['captions']['text']


def test_parallel_build_equals_the_scenes(tmp_path):
  """Big splits render in worker processes; the result must not change."""
  config = shapes.ShapesConfig(name='par', num_train=shapes._MIN_PARALLEL,
                               num_eval=4, image_size=32, seed=5)
  builder = shapes.Shapes(config=config, data_dir=str(tmp_path))
  builder.download_and_prepare()
  source = builder.as_data_source('train')
  assert len(source) == shapes._MIN_PARALLEL
  for i in (0, 777, len(source) - 1):
    ex = source[i]
    scene = scenes.make_scene(5, 0, int(ex['image/id']), 32, False)
    assert [t.decode() for t in ex['captions']['text']] == scene.captions
    assert list(ex['objects']['shape']) == [
        scenes.SHAPES.index(o.shape) for o in scene.objects]
