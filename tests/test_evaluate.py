"""The evaluation jobs (capjax.evaluate): whole splits, results files,
sidecar; and the evaluators the training loop runs."""

import functools
import json
import os
import re
import shutil
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from capjax import checkpoint
from capjax import config as config_lib
from capjax import decode
from capjax import evaluate
from capjax import inference
from capjax import models
from capjax import train
from capjax import workdir as workdir_lib
from capjax.data import datasets
from capjax.data import pipeline
from capjax.data import prepare
from capjax.data import tokenizer
from capjax.errors import UserError
from capjax.metrics import objects as objects_lib
from configs import test as test_configs
import preload
from conftest import REPO
from test_checkpoint import change_bytes


def _config(shapes_data_dir):
  config = test_configs.get_config()
  config.data.data_dir = shapes_data_dir
  config.evals.val.num_batches = 1
  config.decode.batch_size = 16
  return config


@pytest.fixture(scope='module')
def trained(trained_workdir):
  """The shared workdir (checkpoints 3 and 6; configs/test.py, as `_config`
  but for the decode settings) and its final state."""
  config = workdir_lib.load_config(trained_workdir)
  vocab = workdir_lib.load_vocab(trained_workdir)
  predict = models.Predict(models.build_captioner(config.model, len(vocab)))
  state, step = workdir_lib.restore_trained(trained_workdir, config, vocab,
                                            predict)
  assert step == 6
  return trained_workdir, state


def _results(workdir, name):
  with open(os.path.join(workdir, 'decode', f'{name}.json')) as f:
    results = json.load(f)
  with open(os.path.join(workdir, 'decode', f'{name}_metrics.json')) as f:
    return results, json.load(f)


@pytest.mark.parametrize('kind', ['jit', 'pmap'])
def test_decode_covers_the_split_once_and_matches_one_device(
    shapes_data_dir, trained, tmp_path, kind):
  workdir, state = trained
  copy = str(tmp_path / 'run')
  shutil.copytree(workdir, copy)
  shutil.rmtree(os.path.join(copy, 'decode'), ignore_errors=True)
  config = _config(shapes_data_dir)
  config.parallel = kind
  config.decode.split = 'test_novel'
  metrics = evaluate.decode_checkpoint(config, copy)
  results, saved = _results(copy, 'test_novel_step6_beam3')

  data = prepare.prepare(config, copy)
  references = datasets.references(data.builder, 'test_novel')
  ids = [r['image_id'] for r in results]
  assert sorted(ids) == sorted(references) and len(ids) == len(set(ids))
  assert saved['metrics'] == metrics and saved['step'] == 6
  assert saved['images'] == len(references)
  assert set(metrics) == {'BLEU-1', 'BLEU-2', 'BLEU-3', 'BLEU-4', 'ROUGE-L',
                          'CIDEr', 'object_recall', 'novel_pair_recall',
                          'hallucination'}
  assert all(0 <= v <= 10 for v in metrics.values())
  # The object metrics of the captions written, against the split's objects
  # (every test_novel image holds a held-out pair).
  kind, objects, _ = datasets.objects(data.builder, 'test_novel')
  assert kind == 'shapes' and set(objects) == set(references)
  want = objects_lib.score_shapes(
      {r['image_id']: r['caption'] for r in results}, objects)
  for name in ('object_recall', 'novel_pair_recall', 'hallucination'):
    assert metrics[name] == want[name]
  assert saved['objects']['captions'] == len(references)
  assert saved['objects']['novel_objects'] >= len(references)

  # The same captions as the search on one device, image by image.
  predict = models.Predict(models.build_captioner(
      config.model, len(data.vocab)))
  search = jax.jit(functools.partial(
      decode.beam_search, predict, beam_size=config.decode.beam_size,
      max_len=config.data.max_len, ban_unk=True))
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  source = data.source('test_novel')
  batch = next(iter(pipeline.eval_dataset(config, source, data.vocab,
                                          batch_size=5)))
  tokens = np.asarray(search(variables, batch['image']).tokens[:, 0])
  by_id = {r['image_id']: r['caption'] for r in results}
  for i, row in zip(batch['image/id'], tokens):
    assert by_id[int(i)] == data.vocab.decode(row)
    assert by_id[int(i)] == ' '.join(tokenizer.tokenize(by_id[int(i)]))


def test_training_validates_with_cider_and_decodes_after(shapes_data_dir,
                                                         tmp_path):
  config = _config(shapes_data_dir)
  config.train.num_steps = 9
  config.train.keep_checkpoints = 1
  config.evals.test.every_steps = 0
  config.evals.again = config_lib.decode_split('validation')
  config.decode.beam_size = 2
  train.train_and_evaluate(config, str(tmp_path))
  for split in ('test', 'validation'):
    _, saved = _results(str(tmp_path), f'{split}_step9_beam2')
    assert saved['search']['beam_size'] == 2
    assert saved['images'] == 64  # The tiny build's eval splits.
  # The latest checkpoint and the best by validation CIDEr-D are kept.
  manager = ocp.CheckpointManager(tmp_path / 'checkpoints')
  cider = {s: manager.metrics(s)['val_CIDEr'] for s in manager.all_steps()}
  best = max(cider, key=cider.get)
  assert sorted(cider) == sorted({best, 9})
  assert all(v >= 0 for v in cider.values())


def test_evaluate_continuously_decodes_new_checkpoints(shapes_data_dir,
                                                       trained, tmp_path):
  workdir, _ = trained
  copy = tmp_path / 'run'
  shutil.copytree(workdir, copy)
  shutil.rmtree(copy / 'decode', ignore_errors=True)
  config = _config(shapes_data_dir)
  config.decode.split = 'validation'
  config.decode.poll_seconds = 0
  config.decode.timeout_seconds = 0
  # Only step 3 yet: decoded, then no new checkpoint comes.
  shutil.move(copy / 'checkpoints' / '6', tmp_path / 'later')
  config.train.num_steps = 6
  evaluate.evaluate_continuously(config, str(copy))
  assert sorted(f for f in os.listdir(copy / 'decode') if 'events' not in f
                ) == ['validation_step3_beam3.json',
                      'validation_step3_beam3_metrics.json']
  # Step 6 lands: decoded, and the sidecar stops at the last step without
  # redoing step 3.
  os.utime(copy / 'decode' / 'validation_step3_beam3.json', (0, 0))
  shutil.move(tmp_path / 'later', copy / 'checkpoints' / '6')
  config.decode.timeout_seconds = 600
  evaluate.evaluate_continuously(config, str(copy))
  assert (copy / 'decode' / 'validation_step6_beam3_metrics.json').exists()
  assert os.path.getmtime(
      copy / 'decode' / 'validation_step3_beam3.json') == 0
  # The decode job at another beam size writes beside them; the same
  # settings again replace their own files.
  config.decode.checkpoint_step = 3
  config.decode.beam_size = 1
  evaluate.decode_checkpoint(config, str(copy))
  assert (copy / 'decode' / 'validation_step3_beam1_metrics.json').exists()
  assert os.path.getmtime(
      copy / 'decode' / 'validation_step3_beam3.json') == 0
  config.decode.beam_size = 3
  evaluate.decode_checkpoint(config, str(copy))
  assert os.path.getmtime(
      copy / 'decode' / 'validation_step3_beam3.json') > 0


def test_decode_errors(shapes_data_dir, trained, tmp_path):
  config = _config(shapes_data_dir)
  with pytest.raises(UserError, match='no checkpoint in .* train first'):
    evaluate.decode_checkpoint(config, str(tmp_path / 'empty'))
  copy = str(tmp_path / 'run')  # The job writes its logs into the workdir.
  shutil.copytree(trained[0], copy)
  config.decode.checkpoint_step = 4
  with pytest.raises(UserError, match='no checkpoint of step 4 .* 3, 6'):
    evaluate.decode_checkpoint(config, copy)
  config.decode.checkpoint_step = -1
  config.decode.batch_size = 12
  with pytest.raises(UserError, match='not divisible by the 8 devices'):
    evaluate.decode_checkpoint(config, copy)


def test_a_damaged_checkpoint_is_one_line_for_every_reader(
    shapes_data_dir, trained, tmp_path, caplog):
  """The newest step's bytes changed on disk: the decode job and the
  captioner name it and the intact step; the sidecar skips it."""
  copy = tmp_path / 'run'
  shutil.copytree(trained[0], copy)
  # Every file: the model's arrays among them (decoding reads no others).
  change_bytes(copy / 'checkpoints' / '6', every_file=True)
  proc = preload.run(
      [sys.executable, '-m', 'capjax.main', '--config=configs/test.py',
       f'--workdir={copy}', f'--config.data.data_dir={shapes_data_dir}',
       '--mode=decode'], cwd=REPO, text=True, capture_output=True,
      timeout=300, check=False)
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  last = proc.stderr.strip().splitlines()[-1]
  # Unreadable (its index damaged too) or damaged (an array): either way
  # one line, with the step to use instead.
  assert re.fullmatch(
      f'capjax: error: checkpoint 6 in {re.escape(str(copy))}/checkpoints is '
      r'(damaged: .+|unreadable \(.+\)); intact: 3; pick one with '
      '--config.decode.checkpoint_step=3', last), last
  checkpoint.quiet_reported_failures()  # As capjax.caption does.
  with pytest.raises(UserError, match=r'checkpoint 6 .*; intact: 3; pick one '
                     r'with --step=3$'):
    inference.load_trained(str(copy))
  assert inference.load_trained(str(copy), step=3).step == 3
  config = _config(shapes_data_dir)
  config.decode.split = 'validation'
  with caplog.at_level('WARNING'):
    evaluate.evaluate_continuously(config, str(copy))
  assert 'checkpoint 6 in' in caplog.text and 'waiting for the next' in (
      caplog.text)
  assert not os.path.exists(workdir_lib.decode_metrics_path(
      str(copy), 'validation', 6, 'beam3'))
