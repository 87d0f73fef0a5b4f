"""`python -m capjax.benchmark`: a smoke run that prints and writes figures."""

import json
import subprocess
import sys

from conftest import REPO


def test_benchmark_decode_and_score(tmp_path):
  out = tmp_path / 'bench.json'
  proc = subprocess.run(
      [sys.executable, '-m', 'capjax.benchmark', '--config=configs/test.py',
       '--what=decode,score', '--beams=1,2', '--batch=8', '--repeats=1',
       '--score_images=50', f'--json={out}'],
      cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads(out.read_text())
  assert [r['beam'] for r in results['decode']] == [1, 2]
  assert all(r['captions_per_second'] > 0 for r in results['decode'])
  assert results['score']['images'] == 50
  assert results['score']['metrics'] > 0
  assert 'beam 2:' in proc.stdout and 'CIDEr-D' in proc.stdout
