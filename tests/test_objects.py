"""Object recall, novel-pair recall and hallucination of captions."""

import collections
import itertools

import numpy as np
import pytest

from capjax.data import scenes
from capjax.data import tokenizer
from capjax.metrics import objects

_STYLES = ('list', 'count', 'relation', 'position')

COCO = (
    'person', 'bicycle', 'car', 'motorcycle', 'airplane', 'bus', 'train',
    'truck', 'boat', 'traffic light', 'fire hydrant', 'stop sign',
    'parking meter', 'bench', 'bird', 'cat', 'dog', 'horse', 'sheep', 'cow',
    'elephant', 'bear', 'zebra', 'giraffe', 'backpack', 'umbrella',
    'handbag', 'tie', 'suitcase', 'frisbee', 'skis', 'snowboard',
    'sports ball', 'kite', 'baseball bat', 'baseball glove', 'skateboard',
    'surfboard', 'tennis racket', 'bottle', 'wine glass', 'cup', 'fork',
    'knife', 'spoon', 'bowl', 'banana', 'apple', 'sandwich', 'orange',
    'broccoli', 'carrot', 'hot dog', 'pizza', 'donut', 'cake', 'chair',
    'couch', 'potted plant', 'bed', 'dining table', 'toilet', 'tv', 'laptop',
    'mouse', 'remote', 'keyboard', 'cell phone', 'microwave', 'oven',
    'toaster', 'sink', 'refrigerator', 'book', 'clock', 'vase', 'scissors',
    'teddy bear', 'hair drier', 'toothbrush',
)


def _pair(o):
  return (o.color, o.shape)


def _generated(n_seeds=150):
  """(objects, style, evaluator tokens) of generated captions."""
  out = []
  for seed, novel in itertools.product(range(n_seeds), (False, True)):
    rng = np.random.default_rng([seed, int(novel)])
    objs = scenes.sample_scene(rng, novel)
    for style in _STYLES:
      caption = scenes.describe(rng, objs, style)
      out.append((objs, style, ' '.join(tokenizer.tokenize(caption))))
  return out


@pytest.fixture(scope='module')
def generated():
  return _generated()


def test_parser_recovers_what_generated_captions_state(generated):
  styles_seen = collections.Counter()
  for objs, style, caption in generated:
    named = objects.named_pairs(caption)
    everything = [_pair(o) for o in objs]
    if style in ('list', 'count') or style == 'relation' and len(objs) == 1:
      # A full listing (a relation in a one-object scene falls back to one):
      # every object, with its multiplicity.
      assert collections.Counter(named) == collections.Counter(everything), (
          caption)
    elif style == 'relation':
      # "A <relation> B", for two distinct objects, in that order.
      possible = [[_pair(a), _pair(b)] for a, b in
                  itertools.permutations(objs, 2)]
      assert named in possible, caption
    else:  # 'position': one object, and maybe "and two other shapes".
      assert named in [[p] for p in everything], caption
      if len(objs) == 1:
        assert named == everything, caption
    styles_seen[style] += 1
  assert set(styles_seen) == set(_STYLES)


def test_generated_captions_recall_everything_and_hallucinate_nothing(
    generated):
  listings = {i: (objs, caption) for i, (objs, style, caption)
              in enumerate(generated) if style in ('list', 'count')}
  score = objects.score_shapes({i: c for i, (_, c) in listings.items()},
                               {i: o for i, (o, _) in listings.items()})
  assert score['object_recall'] == 1.0
  assert score['novel_pair_recall'] == 1.0
  assert score['hallucination'] == 0.0
  assert score['objects'] == sum(len(o) for o, _ in listings.values())
  assert score['novel_objects'] >= len(listings) // 2  # One per novel scene.
  # Every caption of every style is true of its image.
  every = objects.score_shapes({i: g[2] for i, g in enumerate(generated)},
                               {i: g[0] for i, g in enumerate(generated)})
  assert every['hallucination'] == 0.0
  assert every['captions'] == len(generated)
  assert 0.0 < every['object_recall'] < 1.0  # Relations name only two.


def test_every_word_of_the_grammar():
  for shape, forms in scenes._SHAPE_WORDS.items():
    for singular, plural in forms:
      for color in scenes.COLORS:
        assert objects.named_pairs(f'a {color} {singular}') == [
            (color, shape)]
        assert objects.named_pairs(f'three {color} {plural}') == [
            (color, shape)] * 3
        assert objects.named_pairs(f'{singular} that is {color}') == [
            (color, shape)]
      assert objects.named_pairs(f'a {singular}') == [(None, shape)]
  for size in itertools.chain(*scenes._SIZE_WORDS.values()):
    assert objects.named_pairs(f'a {size} red star') == [('red', 'star')]
    assert objects.named_pairs(f'a star that is {size} and red') == [
        ('red', 'star')]
  for n, word in enumerate(scenes._NUMBERS):
    assert objects.named_pairs(f'{word} blue stars') == [('blue', 'star')] * n


@pytest.mark.parametrize('caption, pairs', [
    ('a square that is large and red', [('red', 'square')]),
    ('two red squares', [('red', 'square')] * 2),
    ('three blue disks', [('blue', 'circle')] * 3),
    ('a green plus sign', [('green', 'cross')]),
    ('two tiny yellow plus signs', [('yellow', 'cross')] * 2),
    ('A Green Plus-Sign.', [('green', 'cross')]),
    # A colour binds to its own phrase's noun, never the next one's.
    ('a red circle and a square', [('red', 'circle'), (None, 'square')]),
    ('a red circle a square', [('red', 'circle'), (None, 'square')]),
    ('a red and a square', [(None, 'square')]),
    ('red a square', [(None, 'square')]),
    ('a circle that is red above a square',
     [('red', 'circle'), (None, 'square')]),
    ('a circle that is red and blue square',
     [('red', 'circle'), ('blue', 'square')]),
    ('a red square that is blue', [('red', 'square')]),
    ('a red blue square', [('blue', 'square')]),
    ('red squares', [('red', 'square')] * 2),
    ('zero red squares', []),
    ('a single big orange disk at the top', [('orange', 'circle')]),
    ('there are three shapes , a red square , two blue stars',
     [('red', 'square'), ('blue', 'star'), ('blue', 'star')]),
    ('three shapes red', []),
])
def test_hand_written_captions(caption, pairs):
  assert objects.named_pairs(caption) == pairs


@pytest.mark.parametrize('caption', [
    '', ' ', '...', 'red', 'two', 'that is', 'square that is', 'a a a a',
    'plus', 'sign plus', 'four four four', '\u00e9\u00e8 \U0001f600 \x00',
    'red red red and and that is is are which', 'the red the',
])
def test_garbage_does_not_raise(caption):
  for c, s in objects.named_pairs(caption):
    assert c is None or c in scenes.COLORS
    assert s in scenes.SHAPES
  objects.score_shapes({0: caption}, {0: [('red', 'circle')]})
  objects.score_coco({0: caption}, {0: ['dog']}, COCO)


def test_random_word_soup_does_not_raise():
  vocab = (list(scenes.COLORS) + list(scenes._NUMBERS) +
           [w for ws in scenes._SIZE_WORDS.values() for w in ws] +
           [w for fs in scenes._SHAPE_WORDS.values() for f in fs for p in f
            for w in p.split()] +
           ['a', 'an', 'and', 'that', 'is', 'are', 'which', 'the', 'of', ','])
  rng = np.random.default_rng(0)
  for _ in range(500):
    words = rng.choice(vocab, size=rng.integers(0, 15))
    for c, s in objects.named_pairs(' '.join(words)):
      assert c is None or c in scenes.COLORS
      assert s in scenes.SHAPES


def test_score_shapes_hallucination_and_recall():
  score = objects.score_shapes({'x': 'a red square'},
                               {'x': [('red', 'circle'), ('blue', 'square')]})
  assert score['hallucination'] == 1.0
  assert score['object_recall'] == 0.0
  assert score['objects'] == 2
  assert objects.hallucinated_pairs(
      'a red square and a red circle', [('red', 'circle')]) == [
          ('red', 'square')]
  # A bare shape is no hallucination, and recalls nothing.
  score = objects.score_shapes({'x': 'a red circle and a square'},
                               {'x': [('red', 'circle'), ('blue', 'star')]})
  assert score['hallucination'] == 0.0
  assert score['object_recall'] == 0.5


def test_score_shapes_counts():
  two = [('red', 'square'), ('red', 'square')]
  for caption in ('two red squares', 'a red square and a red square',
                  'two squares that are red'):
    assert objects.score_shapes({1: caption}, {1: two})['object_recall'] == 1
  assert objects.score_shapes({1: 'a red square'},
                              {1: two})['object_recall'] == 0.5
  # Naming a present pair too often is not a hallucination.
  score = objects.score_shapes({1: 'four red squares'},
                               {1: [('red', 'square')]})
  assert (score['object_recall'], score['hallucination']) == (1.0, 0.0)


def test_score_shapes_takes_every_form_of_objects():
  caption = {7: 'a red square and a green disk'}
  truth = [('red', 'square'), ('green', 'circle')]
  forms = [
      truth,
      [{'color': c, 'shape': s, 'size': 'small'} for c, s in truth],
      [scenes.Obj(shape=s, color=c, size='small', row=0, col=i)
       for i, (c, s) in enumerate(truth)],
      {'color': np.array([scenes.COLORS_LIST.index(c) for c, _ in truth]),
       'shape': np.array([scenes.SHAPES.index(s) for _, s in truth])},
      {'color': [c.encode() for c, _ in truth],
       'shape': [s.encode() for _, s in truth]},
  ]
  for form in forms:
    assert objects.score_shapes(caption, {7: form})['object_recall'] == 1.0
  with pytest.raises(ValueError, match='same image ids'):
    objects.score_shapes(caption, {8: truth})


def test_novel_pair_recall_counts_only_held_out_pairs():
  assert ('red', 'square') in scenes.HELD_OUT
  assert ('blue', 'square') not in scenes.HELD_OUT
  image = [('red', 'square'), ('blue', 'square'), ('blue', 'circle')]
  score = objects.score_shapes({0: 'a blue square and a blue disk'},
                               {0: image})
  assert score['novel_objects'] == 1
  assert score['novel_pair_recall'] == 0.0
  assert score['object_recall'] == pytest.approx(2 / 3)
  score = objects.score_shapes({0: 'a red square'}, {0: image})
  assert (score['novel_pair_recall'], score['recalled_novel_objects']) == (
      1.0, 1)
  assert score['object_recall'] == pytest.approx(1 / 3)
  # No novel objects: 0.0, and a count of 0 that says why.
  score = objects.score_shapes({0: 'a blue square'}, {0: [('blue', 'square')]})
  assert (score['novel_pair_recall'], score['novel_objects']) == (0.0, 0)
  empty = objects.score_shapes({}, {})
  assert (empty['object_recall'], empty['hallucination'],
          empty['captions']) == (0.0, 0.0, 0)


def test_coco_mentions():
  assert objects.coco_mentions('two people riding horses', COCO) == [
      'person', 'horse']
  assert objects.coco_mentions('a traffic light', COCO) == ['traffic light']
  assert objects.coco_mentions('a hot dog and a dog', COCO) == [
      'hot dog', 'dog']
  assert objects.coco_mentions('Teddy bears, two mice, knives and skis.',
                               COCO) == ['teddy bear', 'mouse', 'knife',
                                         'skis']
  assert objects.coco_mentions('a man on a ski with sheep', COCO) == [
      'skis', 'sheep']
  assert objects.coco_mentions(
      'wine glasses on benches by the buses and couches', COCO) == [
          'wine glass', 'bench', 'bus', 'couch']
  assert objects.coco_mentions('three cell phones and a lady', COCO) == [
      'cell phone']
  assert objects.coco_mentions('', COCO) == []


def test_score_coco():
  score = objects.score_coco({1: 'two people riding horses'},
                             {1: ['person', 'horse', 'person']}, COCO)
  assert (score['object_recall'], score['hallucination'],
          score['chair_i']) == (1.0, 0.0, 0.0)
  assert score['objects'] == 2  # Each category once per image.
  score = objects.score_coco({1: 'a dog on a couch'}, {1: ['cat', 'couch']},
                             COCO)
  assert score['hallucination'] == 1.0
  assert score['chair_i'] == 0.5
  assert score['object_recall'] == 0.5
  # Labels as indices, as TFDS gives them; several images.
  score = objects.score_coco(
      {1: 'a traffic light', 2: 'a cat and a dog', 3: 'a street'},
      {1: [COCO.index('traffic light')], 2: [COCO.index('cat')], 3: []},
      COCO)
  assert (score['captions'], score['hallucinated_captions']) == (3, 1)
  assert (score['mentions'], score['hallucinated_mentions']) == (3, 1)
  assert score['object_recall'] == 1.0
  with pytest.raises(ValueError, match='same image ids'):
    objects.score_coco({1: 'a cat'}, {2: ['cat']}, COCO)
