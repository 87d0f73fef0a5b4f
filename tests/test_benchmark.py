"""`python -m capjax.benchmark`: a smoke run of every part, on CPU."""

import json
import os
import subprocess
import sys

import pytest

import preload
from conftest import REPO


def test_benchmark_smoke_run(shapes_data_dir, tmp_path):
  out = tmp_path / 'bench.json'
  # A vocabulary of 100 words, not COCO's 10,000, and captions of 12
  # tokens, for quick steps (the FLOP count traces the decoder unrolled
  # over them); and a frozen encoder, so that the scst benchmark's setup is
  # the features benchmark's image one, which the run measures once (the
  # train benchmark sets the encoder both ways itself).
  proc = preload.run(
      [sys.executable, '-m', 'capjax.benchmark', '--config=configs/test.py',
       f'--config.data.data_dir={shapes_data_dir}',
       '--config.model.encoder.frozen=True', '--config.data.max_len=12',
       '--vocab_size=100',
       '--what=train,decode,scst,features,input,score',
       '--per_device_batch=1',
       '--steps=1',
       '--beams=1,2', '--batch=8', '--workers=0', '--input_batches=2',
       '--repeats=1', '--score_images=50',
       f'--json={out}'],
      cwd=REPO, capture_output=True, text=True, timeout=400, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads(out.read_text())
  assert results['devices'] == 8  # The tests' simulated CPU devices.
  train = {r['encoder']: r for r in results['train']}
  assert set(train) == {'frozen', 'fine-tuned'}
  for r in train.values():
    assert r['images_per_second'] > 0 and r['tokens_per_second'] > 0
  # XLA's count: fine-tuning adds the encoder's backward pass.
  assert (train['fine-tuned']['gflop_per_step_per_device'] >
          train['frozen']['gflop_per_step_per_device'] > 0)
  assert train['frozen']['mfu'] is None  # No peak known for a CPU.
  assert [r['beam'] for r in results['decode']] == [1, 2]
  assert all(r['captions_per_second'] > 0 for r in results['decode'])
  scst = results['scst'][0]
  assert scst['scst_step_seconds'] > 0
  assert scst['cross_entropy_step_seconds'] > 0
  assert 0 < scst['reward_fraction'] < 1
  inputs = {r['source']: r for r in results['input']}
  assert set(inputs) == {'copy', 'original', 'features'}
  assert inputs['features']['features_bytes_per_image'] > 0
  assert all(r['images_per_second'] > 0 for r in inputs.values())
  assert inputs['copy']['copy_bytes_per_image'] > 0
  assert results['score']['images'] == 50 and results['score']['metrics'] > 0
  features = results['features']
  assert features['train_features']['input'] == 'features'
  assert features['train_images']['input'] == 'images'
  # XLA's count: the features skip the encoder's forward pass.
  assert (features['train_images']['gflop_per_step_per_device'] >
          features['train_features']['gflop_per_step_per_device'] > 0)
  assert features['train_speedup'] > 0 and features['scst_speedup'] > 0
  assert features['coco_cache_gb']['14x14'] == pytest.approx(
      4 * features['coco_cache_gb']['7x7'])
  assert 'fine-tuned' in proc.stdout and 'beam 2:' in proc.stdout
  assert 'reward share' in proc.stdout


def test_input_benchmark_on_photos(tmp_path):
  out = tmp_path / 'bench.json'
  temp = tmp_path / 'temp'
  temp.mkdir()
  proc = subprocess.run(
      [sys.executable, '-m', 'capjax.benchmark', '--config=configs/test.py',
       '--what=input', '--photos=12', f'--photos_dir={tmp_path / "photos"}',
       '--workers=0', '--input_batches=1', '--repeats=1', f'--json={out}'],
      cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
      env=dict(os.environ, TMPDIR=str(temp)))
  assert proc.returncode == 0, proc.stderr[-3000:]
  # Its workdir (the vocabulary) went with it.
  assert not [p for p in os.listdir(temp) if p.startswith('capjax-bench-')]
  rows = {r['source']: r for r in json.loads(out.read_text())['input']}
  # The copy was made (and timed) from 640x480 photos, at 32 px.
  assert rows['copy']['copy_seconds'] > 0
  assert rows['copy']['copy_bytes_per_image'] > 0
  assert rows['original']['images_per_second'] > 0
  assert len(list((tmp_path / 'photos' / 'images').iterdir())) == 12
