"""`python -m capjax.main` end to end, as a user runs it."""

import json
import os
import shutil
import subprocess
import sys

import pytest

import preload
from conftest import REPO


def _main(*args, new_interpreter=False):
  """The job, forked from the preloaded process (tests/preload.py) or, as
  a user starts it, in a new interpreter."""
  return (subprocess.Popen if new_interpreter else preload.Popen)(
      [sys.executable, '-m', 'capjax.main', *args], cwd=REPO, text=True,
      stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_main_trains(shapes_data_dir, tmp_path):
  workdir = tmp_path / 'run'
  proc = _main('--config=configs/test.py', f'--workdir={workdir}',
               f'--config.data.data_dir={shapes_data_dir}',
               '--config.evals.test.every_steps=0',
               '--config.evals.test.split=test_novel',
               # NLTK's METEOR: the official one starts a JVM, 9 s of CPU
               # (test_the_decode_job_scores_with_the_official_meteor).
               '--config.decode.meteor=nltk', new_interpreter=True)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  vocab = json.loads((workdir / 'vocab.json').read_text())
  assert vocab['source']['dataset'] == 'shapes'
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['3', '6']
  assert ' eval/val_CIDEr=' in err and 'Sample: image ' in err
  assert err.strip().endswith(f'logs (TensorBoard) in {workdir}.')
  # The final test table, on stdout.
  assert out.startswith('test_novel at step 6, beam 3, ')
  assert 'CIDEr' in out and 'METEOR_nltk' in out and '(64 images scored)' in out

  # The decode job on an earlier checkpoint.
  proc = _main('--config=configs/test.py', f'--workdir={workdir}',
               f'--config.data.data_dir={shapes_data_dir}', '--mode=decode',
               '--config.decode.checkpoint_step=3')
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  assert out.startswith('test at step 3, beam 3, ')
  results = json.loads((workdir / 'decode' / 'test_step3_beam3.json').read_text())
  assert len(results) == 64 and set(results[0]) == {'image_id', 'caption'}


@pytest.mark.slow  # The JVM loads METEOR's paraphrase table: 9 s of CPU.
def test_the_decode_job_scores_with_the_official_meteor(
    trained_workdir, shapes_data_dir, tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(trained_workdir, workdir)
  proc = _main('--config=configs/test.py', f'--workdir={workdir}',
               f'--config.data.data_dir={shapes_data_dir}', '--mode=decode',
               '--config.decode.meteor=java')
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  assert out.startswith('test at step 6, beam 3, '), out
  assert 'METEOR' in out and 'METEOR_nltk' not in out, out
  metrics = json.loads(
      (workdir / 'decode' / 'test_step6_beam3_metrics.json').read_text())
  assert 0 < metrics['metrics']['METEOR'] < 1, metrics


def test_bad_input_is_one_line_and_nothing_is_lost(shapes_data_dir, tmp_path):
  workdir = tmp_path / 'run'
  workdir.mkdir()
  (workdir / 'vocab.json').write_text('{"format": "capjax.vocab/1", '
                                      '"source": {"dataset": "other"}, '
                                      '"words": ["<pad>", "<bos>", "<eos>", '
                                      '"<unk>"]}')
  (tmp_path / 'mine').mkdir()
  (tmp_path / 'mine' / 'captions.json').write_text('')
  base = ['--config=configs/test.py', f'--workdir={workdir}',
          f'--config.data.data_dir={shapes_data_dir}']
  cases = {
      'bad --config override: \'batchsize\' Did you mean "batch_size"':
          base + ['--config.batchsize=3'],
      "unknown dataset --config.data.name='flickr'":
          base + ['--config.data.name=flickr'],
      'data dir --config.data.data_dir=/no/such/dir does not exist':
          base + ['--config.data.data_dir=/no/such/dir',
                  '--config.data.prepare=False'],
      "shapes has no split 'valid'": base + ['--config.evals.val.split=valid'],
      "--config.evals.val.type='validate' is not an evaluator":
          base + ['--config.evals.val.type=validate'],
      'vocab.json was built from other data': base,
      'captions.json is empty': [
          '--config=configs/caption_files.py', f'--workdir={workdir}',
          f'--config.data.data_dir={tmp_path / "tfds"}',
          f'--config.data.manual_dir={tmp_path / "mine"}',
          '--config.data.annotations=captions.json'],
  }
  # One after the other: one trainer at a time holds the workdir.
  for want, args in cases.items():
    proc = _main(*args)
    _, err = proc.communicate(timeout=300)
    last = err.strip().splitlines()[-1]
    assert proc.returncode != 0, want
    assert last.startswith('capjax: error: ') and want in last, (want, err)
    assert 'Traceback' not in err, err
  # Only the (released, empty) lock file is new.
  assert sorted(os.listdir(workdir)) == ['train.lock', 'vocab.json']
  assert (workdir / 'train.lock').read_text() == ''
  assert 'other' in (workdir / 'vocab.json').read_text()


@pytest.mark.parametrize('args, message', [
    (['--config=configs/missing.py'],
     "cannot load --config=configs/missing.py: [Errno 2] No such file"),
    (['--config=BAD/syntax.py'], "syntax.py, line 2: '(' was never closed"),
    (['--config=BAD/raises.py'],
     'the --config file failed to load: ZeroDivisionError'),
    (['--config=configs/test.py', '--config.batch_size=0'],
     '--config.batch_size=0 must be an integer >= 1'),
    (['--config=configs/test.py', '--config.batch_size=-8'],
     '--config.batch_size=-8 must be an integer >= 1'),
    (['--config=configs/test.py', '--config.data.image_size=0'],
     '--config.data.image_size=0 must be an integer >= 1'),
    (['--config=configs/test.py', '--config.decode.meteor=java8'],
     "unknown --config.decode.meteor='java8'"),
])
def test_config_mistakes_are_one_line(args, message, tmp_path):
  (tmp_path / 'syntax.py').write_text('def get_config():\n  return (\n')
  (tmp_path / 'raises.py').write_text('def get_config():\n  return 1 / 0\n')
  args = [a.replace('BAD', str(tmp_path)) for a in args]
  workdir = tmp_path / 'run'
  proc = _main(*args, f'--workdir={workdir}')
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 1
  last = err.strip().splitlines()[-1]
  assert last.startswith('capjax: error: ') and message in last, err[-2000:]
  assert 'Traceback' not in err
  assert not workdir.exists()  # Nothing written before the check.
