"""The concept head: its concepts and targets from the dataset's objects, its
loss and predictions, and the captions its confident concepts constrain in
the decode job and the captioning API."""

import functools
import json
import os
import shutil
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from capjax import concepts as concepts_lib
from capjax import config as config_lib
from capjax import constrained
from capjax import evaluate
from capjax import inference
from capjax import models
from capjax import optimizer
from capjax import parallel
from capjax import state as state_lib
from capjax import train
from capjax.data import datasets
from capjax.data import images as images_lib
from capjax.data import scenes
from capjax.data import shapes
from capjax.data import vocab as vocab_lib
from capjax.errors import UserError
from capjax.metrics import objects as objects_lib
from capjax.models import captioner as captioner_lib
from capjax.models import concepts as head_lib
from capjax.objectives import cross_entropy
from configs import test as test_configs
from conftest import VOCAB_SIZE
from conftest import built_once
from conftest import random_batch
from conftest import step_config

PAIRS = concepts_lib.Concepts('pairs', tuple(scenes.COLORS_LIST),
                              scenes.SHAPES)


def _config(data_dir):
  config = test_configs.get_config()
  config.data.data_dir = data_dir
  config.model.concepts.head = True
  config.evals.val.num_batches = 1
  config.decode.batch_size = 16
  return config


@pytest.fixture(scope='module')
def headed(shapes_data_dir, tmp_path_factory):
  """A workdir of configs/test.py with the concept head, 6 steps."""
  folder = built_once(
      tmp_path_factory, 'concept_head',
      lambda f: train.train_and_evaluate(_config(shapes_data_dir),
                                         str(f / 'run')))
  return str(folder / 'run')


def test_concepts_and_targets_of_the_shapes_build(shapes_data_dir):
  builder = shapes.Shapes(config='tiny', data_dir=shapes_data_dir)
  concepts = concepts_lib.of_builder(builder)
  assert concepts == PAIRS and concepts.sizes == (6, 6)
  targets = concepts_lib.targets(builder, 'train', concepts)
  _, annotated, _ = datasets.objects(builder, 'train')
  assert targets.keys() == annotated.keys()
  for image_id, pairs in annotated.items():
    t, n = targets[image_id], len(pairs)
    assert [concepts.name(a * 6 + o) for a, o in zip(
        t['concepts/attribute'][:n], t['concepts/object'][:n])] == [
            f'{c} {s}' for c, s in pairs]
    assert (t['concepts/object'][n:] == concepts_lib.NONE).all()
    # Each object's centre inside the image, each in its own grid cell.
    centres = t['concepts/centre'][:n]
    assert ((0 < centres) & (centres < 1)).all()
    cells = {tuple(c) for c in np.floor(centres * 3).astype(int)}
    assert len(cells) == n


def test_concepts_file_round_trip_and_mismatch(tmp_path):
  path = str(tmp_path / concepts_lib.FILENAME)
  assert concepts_lib.load_or_save(path, PAIRS, write=True) == PAIRS
  assert concepts_lib.Concepts.load(path) == PAIRS
  other = concepts_lib.Concepts('labels', (), ('person', 'dog'))
  with pytest.raises(UserError, match='holds other concepts'):
    concepts_lib.load_or_save(path, other, write=True)
  (tmp_path / 'bad.json').write_text('{"format": "x"}')
  with pytest.raises(UserError, match='cannot read the concepts'):
    concepts_lib.Concepts.load(str(tmp_path / 'bad.json'))
  with pytest.raises(UserError, match='has no concepts.json'):
    concepts_lib.load(str(tmp_path / 'nowhere'))


def test_phrases_name_each_concept_as_the_metrics_read_it():
  words = {w for c in scenes.COLORS for s in scenes.SHAPES
           for p in objects_lib.pair_phrases(c, s) for w in p.split()}
  vocab = vocab_lib.Vocab.build([' '.join(sorted(words - {'disks'}))], 1, {})
  table = concepts_lib.phrase_table(PAIRS, vocab)  # [36, A, L]
  assert table.shape == (36, 4, 3)  # 'yellow plus signs': 3 words.
  for concept in range(36):
    color, shape = PAIRS.name(concept).split()
    phrases = [vocab.decode(row[row != constrained.NO_TOKEN])
               for row in table[concept] if row[0] != constrained.NO_TOKEN]
    # Every form but the word the vocabulary lacks.
    assert phrases == [p for p in objects_lib.pair_phrases(color, shape)
                       if 'disks' not in p]
    for phrase in phrases:
      assert set(objects_lib.named_pairs(phrase)) == {(color, shape)}
  labels = concepts_lib.Concepts('labels', (), ('person', 'hot dog'))
  vocab = vocab_lib.Vocab.build(['person people hot dog dogs'], 1, {})
  table = concepts_lib.phrase_table(labels, vocab)  # 'persons' is no word.
  assert [vocab.decode(r[r >= 0]) for r in table.reshape(-1, table.shape[-1])
          if r[0] >= 0] == ['person', 'people', 'hot dog', 'hot dogs']
  assert objects_lib.category_phrases('person') == ['person', 'persons',
                                                    'people']


def test_position_targets_and_confident_concepts():
  batch = {'concepts/object': jnp.array([[2, 0, -1]]),
           'concepts/attribute': jnp.array([[1, 3, -1]]),
           'concepts/centre': jnp.array([[[0.1, 0.2], [0.9, 0.6], [0., 0.]]])}
  attribute, obj = head_lib.position_targets(batch, 4)  # A 2x2 grid.
  assert attribute.tolist() == [[2, 0, 0, 4]]
  assert obj.tolist() == [[3, 0, 0, 1]]
  logits = {'attribute': 9.0 * jax.nn.one_hot(attribute, 7),
            'object': 9.0 * jax.nn.one_hot(obj, 7)}
  ids = head_lib.confident(logits, threshold=0.5, k=4)
  # Concept ids are attribute * O + object: (1, 2) and (3, 0).
  assert sorted(ids[0].tolist()) == [-1, -1, 1 * 6 + 2, 3 * 6 + 0]
  # The same pair at two positions is one concept; a doubtful one none.
  logits['object'] = logits['object'].at[0, 1].set(
      logits['object'][0, 3]).at[0, 2, 0].set(2.2)  # P(object) 0.4
  logits['attribute'] = logits['attribute'].at[0, 1].set(
      logits['attribute'][0, 3])
  assert sorted(head_lib.confident(logits, threshold=0.5, k=4)[0].tolist()
                ) == [-1, -1, 1 * 6 + 2, 3 * 6 + 0]
  assert (head_lib.confident(logits, threshold=0.99999, k=4) == -1).all()
  # Labels: each category whose probability is over the threshold.
  labels = {'labels': jnp.array([[3.0, -3.0, 0.5]])}
  assert sorted(head_lib.confident(labels, threshold=0.6, k=2)[0].tolist()
                ) == [0, 2]
  assert head_lib.label_targets({'concepts/object': jnp.array([[2, 0, -1]])},
                                3).tolist() == [[1, 0, 1]]


def test_without_hue_keeps_form_and_drops_hue():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
  out = np.asarray(captioner_lib.without_hue(jnp.asarray(image)))
  assert out.shape == (5, 7, 3) and out.dtype == np.float32
  np.testing.assert_allclose(out[..., 0], image @ [0.299, 0.587, 0.114],
                             rtol=1e-5)
  # Another hue of every pixel (its channels rotated): the same chroma.
  rotated = np.asarray(captioner_lib.without_hue(jnp.asarray(
      image[..., [1, 2, 0]])))
  np.testing.assert_array_equal(rotated[..., 1:], out[..., 1:])
  red, blue = (np.asarray(captioner_lib.without_hue(jnp.array(c, jnp.uint8)))
               for c in ((215, 35, 35), (40, 75, 220)))  # scenes.COLORS
  assert red[1] == blue[1] == 180


def test_factorised_head_predicts_a_pair_it_never_saw():
  """Features that show colour and shape apart, as a trained encoder's
  would: the head, trained without (red, square), names it."""
  rng = np.random.default_rng(0)
  pairs = [(c, s) for c in range(6) for s in range(6) if (c, s) != (0, 1)]

  def features(pair_list):  # [B, P=4, C=12]: the object at position 0.
    x = rng.normal(0, 0.1, (len(pair_list), 4, 12)).astype(np.float32)
    for i, (c, s) in enumerate(pair_list):
      x[i, 0, c] += 1
      x[i, 0, 6 + s] += 1
    return x

  def batch(pair_list):
    n = len(pair_list)
    return {'concepts/attribute': np.array([[c, -1] for c, _ in pair_list]),
            'concepts/object': np.array([[s, -1] for _, s in pair_list]),
            'concepts/centre': np.tile([[0.1, 0.1], [0., 0.]], (n, 1, 1))}

  head = head_lib.ConceptHead(6, 6, hidden_dim=32)
  train_x = features(pairs * 8)
  params = head.init(jax.random.key(0), train_x)
  tx = optax.adam(1e-2)
  opt = tx.init(params)
  mask = np.ones(len(train_x), bool)

  @jax.jit
  def step(params, opt):
    loss = lambda p: head_lib.losses(head.apply(p, train_x),
                                     batch(pairs * 8), mask)['concept']
    grads = jax.grad(loss)(params)
    updates, opt = tx.update(grads, opt)
    return optax.apply_updates(params, updates), opt

  for _ in range(150):
    params, opt = step(params, opt)
  ids = head_lib.confident(head.apply(params, features([(0, 1)] * 4)),
                           threshold=0.5, k=4)
  assert (ids[:, 0] == 0 * 6 + 1).all() and (ids[:, 1:] == -1).all()


def test_the_train_step_adds_the_weighted_concept_loss(test_config):
  config = step_config(test_config)  # 8 devices, jit.
  config.model.concepts.head = True
  config.train.concept_weight = 2.0
  predict = models.Predict(models.build_captioner(config.model, VOCAB_SIZE,
                                                  concepts=(6, 6)))
  state = jax.jit(functools.partial(state_lib.create, config, predict,
                                    None))(jax.random.key(0))
  rng = np.random.default_rng(0)
  batch = random_batch(config) | {
      'concepts/attribute': rng.integers(-1, 6, (16, 4)),
      'concepts/object': rng.integers(-1, 6, (16, 4)),
      'concepts/centre': rng.uniform(0, 1, (16, 4, 2)).astype(np.float32)}
  par = parallel.Parallel(config)
  step = par.step(functools.partial(cross_entropy.train_step,
                                    predict=predict, config=config))
  _, metrics = step(par.put_state(state), par.put_batch(batch),
                    jax.random.key(1), optimizer.schedule_values(config))
  m = {k: float(v) for k, v in metrics.items()}
  np.testing.assert_allclose(
      m['loss'], m['cross_entropy'] + config.train.attention_penalty *
      m['attention_penalty'] + 2.0 * m['concept_loss'], rtol=1e-5)
  # Two 7-way classifiers at the start: about 2 ln 7 per position.
  assert 3.0 < m['concept_loss'] < 4.8 and 0 <= m['concept_accuracy'] <= 1


def test_training_saves_the_concepts_and_the_head(headed):
  assert concepts_lib.load(headed) == PAIRS
  params = inference.load_trained(headed).variables['params']
  assert set(params['concept_head']) == {
      'attribute_hidden', 'attribute', 'object_hidden', 'object'}


def test_decode_names_the_confident_concepts(headed, shapes_data_dir,
                                             tmp_path):
  copy = str(tmp_path / 'run')
  shutil.copytree(headed, copy)
  config = _config(shapes_data_dir)
  config.decode.concepts = True
  config.decode.concept_threshold = 0.3
  evaluate.decode_checkpoint(config, copy)
  with open(os.path.join(copy, 'decode',
                         'test_step6_beam3-concepts0.3_metrics.json')) as f:
    saved = json.load(f)
  assert saved['images'] == 64 and saved['search']['concepts'] is True
  assert 'object_recall' in saved['metrics']
  # With no concept confident enough, the plain beam search's captions.
  config.decode.concept_threshold = 0.9999
  evaluate.decode_checkpoint(config, copy)
  config.decode.concepts = False
  evaluate.decode_checkpoint(config, copy)
  unconstrained, plain = (
      _captions(copy, f'test_step6_{tag}')
      for tag in ('beam3-concepts0.9999', 'beam3'))
  assert unconstrained == plain
  assert _captions(copy, 'test_step6_beam3-concepts0.3') != plain
  # Phrases stored per image, in a file: those images' captions hold them.
  chosen = sorted(plain)[:5]
  path = tmp_path / 'wanted.json'
  path.write_text(json.dumps({str(i): [['square', 'squares']]
                              for i in chosen}))
  config.decode.constraints = str(path)
  evaluate.decode_checkpoint(config, copy)
  included = _captions(copy, 'test_step6_beam3-include-wanted')
  for i, caption in included.items():
    if i in chosen:
      assert {'square', 'squares'} & set(caption.split()), caption
    else:
      assert caption == plain[i]
  zebra = tmp_path / 'zebra.json'
  zebra.write_text(json.dumps({str(chosen[0]): ['a zebra']}))
  config.decode.constraints = str(zebra)
  with pytest.raises(UserError, match="constraints in .*zebra.json: the "
                     "word 'zebra'"):
    evaluate.decode_checkpoint(config, copy)


def _captions(workdir, name):
  with open(os.path.join(workdir, 'decode', f'{name}.json')) as f:
    return {r['image_id']: r['caption'] for r in json.load(f)}


def test_the_api_names_the_confident_concepts(headed, shapes_data_dir):
  builder = shapes.Shapes(config='tiny', data_dir=shapes_data_dir)
  source = datasets.data_source(builder, 'test')
  images = [np.asarray(source[i]['image']) for i in range(4)]
  plain = inference.Captioner.from_workdir(
      headed, beam_size=3).caption(images)
  results = inference.Captioner.from_workdir(
      headed, beam_size=3, use_concepts=True,
      concept_threshold=0.3).caption(images)
  for r in results:
    assert r.concepts and r.to_json()['concepts'] == r.concepts
    named = set(objects_lib.named_pairs(r.caption))
    # `satisfied` is the truth about the caption. (This 6-step model can
    # rarely meet its random concepts; test_constrained shows the search
    # meets what can be met.)
    assert r.satisfied == all(tuple(c.split()) in named for c in r.concepts)
  # The concepts are the head's own on the captioner's input.
  trained = inference.load_trained(headed)
  predict = models.Predict(models.build_captioner(
      trained.config.model, len(trained.vocab),
      concepts=trained.concepts.sizes))
  pixels = np.stack([images_lib.resize(im, 32) for im in images])
  _, logits = predict.encode(trained.variables, {'image': pixels},
                             concepts=True)
  ids = head_lib.confident(logits, threshold=0.3, k=4)
  assert [r.concepts for r in results] == [
      [trained.concepts.name(c) for c in row if c >= 0] for row in ids]
  none = inference.Captioner.from_workdir(
      headed, beam_size=3, use_concepts=True,
      concept_threshold=0.9999).caption(images)
  for a, b in zip(plain, none):
    assert b.concepts == [] and b.caption == a.caption


def test_mistakes_are_one_line(headed, trained_workdir, shapes_data_dir,
                               tmp_path):
  config = _config(shapes_data_dir)
  config.decode.concepts = True
  config.decode.constraints = 'wanted.json'
  with pytest.raises(UserError, match='choose one'):
    config_lib.check(config)
  config.decode.constraints = ''
  config.model.concepts.objects_without_hue = True
  config.model.encoder.frozen = True
  config.data.features.use = True
  with pytest.raises(UserError, match='features.use=True stores the colour'):
    config_lib.check(config)
  config.data.features.use = False
  config.model.concepts.head = False
  with pytest.raises(UserError, match='decode.concepts=True needs the '
                     'concept head'):
    config_lib.check(config)
  config.model.concepts.head = True  # On data without object annotations:
  bare = types.SimpleNamespace(name='caption_files',
                               info=types.SimpleNamespace(features={}))
  with pytest.raises(UserError, match='caption_files does not'):
    concepts_lib.for_run(config, bare, str(tmp_path))
  with pytest.raises(UserError, match='has no concept head'):
    inference.Captioner.from_workdir(trained_workdir, use_concepts=True)
  with pytest.raises(UserError, match='not both'):
    inference.Captioner.from_workdir(headed, use_concepts=True,
                                     include=['square'])
  copy = tmp_path / 'copy'
  shutil.copytree(headed, copy)
  os.remove(copy / concepts_lib.FILENAME)
  with pytest.raises(UserError, match='has no concepts.json'):
    inference.Captioner.from_workdir(str(copy))
  # A run without the head, resumed with it: refused, and nothing written.
  plain = tmp_path / 'plain'
  shutil.copytree(trained_workdir, plain)
  with pytest.raises(UserError, match=r'belong to another model .*'
                     r'model\.concepts\.head: False -> True'):
    train.train_and_evaluate(_config(shapes_data_dir), str(plain))
  assert not (plain / concepts_lib.FILENAME).exists()
