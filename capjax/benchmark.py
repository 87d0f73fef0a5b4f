"""Throughput benchmarks, on synthetic inputs so that no dataset is needed.

  python -m capjax.benchmark --config=configs/shapes.py --what=decode,score

  decode  captions/s of the jitted beam search for each --beams, on one
          batch of random images, the model from --workdir's latest
          checkpoint (else randomly initialised: its captions run to
          max_len, the slowest case).
  score   seconds for BLEU-1..4, ROUGE-L and CIDEr-D (and the tokenisation
          before them) of --score_images images x 5 references of
          COCO-like captions, on one CPU core.

Compilation and a first warm-up run are excluded; each figure is the median
of --repeats device-synchronised runs.
"""

import functools
import json
import statistics
import time
from typing import Any

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from capjax import decode
from capjax import models
from capjax.errors import UserError

FLAGS = flags.FLAGS
flags.DEFINE_list('what', ['decode', 'score'], 'Benchmarks to run.')
flags.DEFINE_string('workdir', None, 'A training workdir whose vocabulary and '
                    'latest checkpoint the decode benchmark uses.')
flags.DEFINE_list('beams', ['1', '3', '5'], 'Beam sizes to decode with.')
flags.DEFINE_integer('batch', 0, 'Decode batch in images; 0: the '
                     "config's decode.batch_size or batch_size.")
flags.DEFINE_integer('repeats', 5, 'Timed runs per figure (the median).')
flags.DEFINE_integer('score_images', 5000, 'Images of the score benchmark '
                     '(5,000: the Karpathy test split).')
flags.DEFINE_string('json', None, 'Also write the results to this file.')


def _median_seconds(fn, repeats: int) -> float:
  jax.block_until_ready(fn())  # Compiles and warms up.
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _variables(config, workdir: str | None) -> tuple[Any, Any, int]:
  """(model, variables, vocabulary size): trained if `workdir` is given."""
  if workdir:
    # pylint: disable-next=g-import-not-at-top
    from capjax import caption
    config, vocab, variables, _ = caption.load_trained(workdir)
    return (models.build_captioner(config.model, len(vocab)), variables,
            len(vocab))
  vocab_size = 10_000
  model = models.build_captioner(config.model, vocab_size)
  d = config.data
  variables = jax.jit(model.init)(
      jax.random.key(0), jnp.zeros((1, d.image_size, d.image_size, 3)),
      jnp.zeros((1, 1, d.max_len), jnp.int32))
  return model, variables, vocab_size


def bench_decode(config, workdir: str | None, beams: list[int], batch: int,
                 repeats: int) -> list[dict[str, Any]]:
  model, variables, _ = _variables(config, workdir)
  size = config.data.image_size
  images = jax.random.normal(jax.random.key(1), (batch, size, size, 3))
  rows = []
  for beam in beams:
    search = jax.jit(functools.partial(
        decode.beam_search, model, beam_size=beam,
        max_len=config.data.max_len, ban_unk=True))
    seconds = _median_seconds(lambda: search(variables, images).tokens,
                              repeats)
    rows.append({'beam': beam, 'batch': batch, 'seconds': seconds,
                 'captions_per_second': batch / seconds})
  return rows


def coco_like_captions(num_images: int, refs: int = 5,
                       seed: int = 0) -> tuple[dict, dict]:
  """(references, candidates) shaped like COCO's: a Zipf vocabulary of
  10,000 words, 8-16 words per caption, candidates sharing words with
  their references."""
  rng = np.random.default_rng(seed)
  words = np.array([f'w{i}' for i in range(10_000)])
  p = 1.0 / np.arange(1, len(words) + 1)
  p /= p.sum()

  def caption(topic):
    n = rng.integers(8, 17)
    mixed = np.where(rng.random(n) < 0.4, rng.choice(topic, n),
                     rng.choice(words, n, p=p))
    return 'A ' + ' '.join(mixed) + '.'

  references, candidates = {}, {}
  for i in range(num_images):
    topic = rng.choice(words, 6)
    references[i] = [caption(topic) for _ in range(refs)]
    candidates[i] = caption(topic)
  return references, candidates


def bench_score(num_images: int, repeats: int) -> dict[str, float]:
  # pylint: disable=g-import-not-at-top
  from capjax import metrics
  from capjax.metrics import bleu
  from capjax.metrics import cider
  from capjax.metrics import rouge
  # pylint: enable=g-import-not-at-top
  references, candidates = coco_like_captions(num_images)

  def timed(fn):
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      out = fn()
      times.append(time.perf_counter() - start)
    return statistics.median(times), out

  out = {'images': num_images}
  out['tokenize'], (_, refs, cands) = timed(
      lambda: metrics.tokenize_all(references, candidates))
  out['BLEU'], _ = timed(lambda: bleu.corpus_bleu(refs, cands))
  out['ROUGE-L'], _ = timed(lambda: rouge.corpus_rouge_l(refs, cands))
  out['CIDEr-D'], _ = timed(lambda: cider.corpus_cider(refs, cands))
  out['metrics'] = out['BLEU'] + out['ROUGE-L'] + out['CIDEr-D']
  try:  # The official scorers on the same tokens, for a ratio.
    # pylint: disable=g-import-not-at-top
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    # pylint: enable=g-import-not-at-top
  except ImportError:
    return out
  gts = {i: [' '.join(r) for r in rs] for i, rs in enumerate(refs)}
  res = {i: [' '.join(c)] for i, c in enumerate(cands)}
  out['official'] = sum(
      timed(lambda s=scorer: s.compute_score(gts, res, verbose=0)
            if isinstance(s, Bleu) else s.compute_score(gts, res))[0]
      for scorer in (Bleu(4), Rouge(), Cider()))
  return out


def main(argv):
  del argv
  try:
    run(FLAGS.config)
  except UserError as e:
    raise SystemExit(f'capjax: error: {e}') from None


def run(config) -> dict[str, Any]:
  results = {'device': str(jax.devices()[0].device_kind),
             'backend': jax.default_backend(), 'jax': jax.__version__}
  if 'decode' in FLAGS.what:
    batch = FLAGS.batch or config.decode.batch_size or config.batch_size
    results['decode'] = bench_decode(config, FLAGS.workdir,
                                     [int(b) for b in FLAGS.beams], batch,
                                     FLAGS.repeats)
    print(f'decode ({results["device"]}, batch {batch}, max_len '
          f'{config.data.max_len}):')
    for row in results['decode']:
      print(f'  beam {row["beam"]}: {row["captions_per_second"]:9.1f} '
            f'captions/s ({row["seconds"] * 1e3:.1f} ms per batch)')
  if 'score' in FLAGS.what:
    s = results['score'] = bench_score(FLAGS.score_images, FLAGS.repeats)
    print(f'score ({s["images"]} images x 5 references, one core):')
    for k in ('tokenize', 'BLEU', 'ROUGE-L', 'CIDEr-D', 'metrics'):
      print(f'  {k:<9} {s[k]:7.2f} s')
    if 'official' in s:
      print(f'  pycocoevalcap, the same three: {s["official"]:.2f} s '
            f'({s["official"] / s["metrics"]:.2f}x capjax\'s time)')
  if FLAGS.json:
    with open(FLAGS.json, 'w') as f:
      json.dump(results, f, indent=1)
  return results


if __name__ == '__main__':
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file('config', None, 'Config file.',
                                  lock_config=True)
  flags.mark_flags_as_required(['config'])
  app.run(main)
