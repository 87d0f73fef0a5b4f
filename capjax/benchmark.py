"""Throughput benchmarks, on synthetic inputs so that no dataset is needed.

  python -m capjax.benchmark --config=configs/coco.py --what=train,decode \
      [--per_device_batch=32,64,128] [--steps=10] [--json=OUT]

  train   images/s and caption tokens/s of the jitted, data-parallel train
          step with the encoder (a) frozen and (b) fine-tuned, on a device-
          resident batch of random images and captions; the step's FLOPs
          from XLA's cost analysis and the model FLOPs utilisation (MFU)
          against the device's peak (`PEAK_FLOPS`); peak device memory.
  decode  captions/s of the jitted beam search for each --beams, on one
          batch of random images, the model from --workdir's latest
          checkpoint (else randomly initialised: its captions run to
          max_len, the slowest case).
  scst    the self-critical train step (config.scst: samples, baseline)
          against the cross-entropy step of the same model and batch, and
          the share of the step the on-device CIDEr-D reward takes (the
          reward alone, jitted, on one device's share of the batch).
  features  the frozen-encoder train and SCST steps from images and from
          the feature cache's batches (random features of the encoder's
          grid), their speed-up and XLA FLOP counts, and the size of
          COCO's cache at 7x7 and 14x14.
  input   images/s of the real input pipeline (TFDS + grain, JPEG decoding)
          with each --workers, from the copy at the training resolution
          and from the original files (--sources); on the config's dataset,
          or on --photos photo-like 640x480 JPEGs. Needs TFDS and grain.
          Run it under `taskset -c 0` for a per-core figure.
  checkpoint  seconds to save the config's train state (until written)
          and to restore it, with and without the checksums that verify
          every restored byte (capjax.checksums), alternating, on a
          temporary folder (--checkpoint_dir for another disk); and the
          checksum alone. Needs grain (the data position is saved too).
  score   seconds for BLEU-1..4, ROUGE-L and CIDEr-D (and the tokenisation
          before them) of --score_images images x 5 references of
          COCO-like captions, on one CPU core.

train, decode and scst need only jax, flax, optax, absl-py, numpy and
ml-collections: launch/gpu_benchmark.sh runs them on a bare GPU machine.
Compilation and a first warm-up run are excluded; each figure is the median
of --repeats device-synchronised runs.
"""

# pylint: disable=g-import-not-at-top,wrong-import-position
from capjax import garbage

if __name__ == '__main__':
  garbage.collect_rarely()  # Before the imports below (capjax/garbage.py).

from collections.abc import Callable
import functools
import json
import os
import shutil
import statistics
import tempfile
import time
from typing import Any

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from capjax import checkpoint
from capjax import decode
from capjax import files
from capjax import inference
from capjax import metrics
from capjax import models
from capjax import optimizer
from capjax import parallel
from capjax import state as state_lib
from capjax.metrics import bleu
from capjax.metrics import cider
from capjax.metrics import cider_jax
from capjax.metrics import rouge
from capjax.objectives import cross_entropy
from capjax.objectives import scst
from capjax.data.vocab import BOS, EOS, PAD
from capjax.errors import UserError
# pylint: enable=g-import-not-at-top,wrong-import-position

# Dense bfloat16 peak FLOP/s per device, by device kind (vendor data sheets),
# for MFU. Kinds not listed (CPUs) get no MFU.
PEAK_FLOPS = {
    'H100': 989e12, 'H200': 989e12, 'A100': 312e12, 'L4': 121e12,
    'TPU v4': 275e12, 'TPU v5 lite': 197e12, 'TPU v5e': 197e12,
    'TPU v5p': 459e12, 'TPU v6 lite': 918e12,
}

FLAGS = flags.FLAGS
flags.DEFINE_list('what', ['train', 'decode'], 'Benchmarks to run: train, '
                  'decode, scst, features, input, checkpoint, score.')
flags.DEFINE_list('per_device_batch', [], 'Train: images per device; '
                  "default: the config's batch_size over the devices.")
flags.DEFINE_integer('steps', 10, 'Train: steps per timed run.')
flags.DEFINE_integer('vocab_size', 10_000, 'Words of the random models '
                     '(COCO has about 10,000; shapes 69).')
flags.DEFINE_list('workers', ['0', '2'], 'Input: worker processes to try.')
flags.DEFINE_list('sources', ['copy', 'original', 'features'],
                  "Input: read the copy at the training resolution ('copy'), "
                  "the dataset's own files ('original'), and/or the feature "
                  "cache of a random frozen encoder ('features').")
flags.DEFINE_integer('photos', 0, 'Input: read this many photo-like 640x480 '
                     "JPEGs (capjax.data.photos) instead of the config's "
                     'dataset.')
flags.DEFINE_string('photos_dir', None, 'Input: where the --photos dataset '
                    'is written once and reused (default: a temporary '
                    'folder).')
flags.DEFINE_integer('input_batches', 20, 'Input: batches per timed run.')
flags.DEFINE_string('workdir', None, 'A training workdir whose vocabulary and '
                    'latest checkpoint the decode benchmark uses.')
flags.DEFINE_list('beams', ['1', '3', '5'], 'Beam sizes to decode with.')
flags.DEFINE_integer('batch', 0, 'Decode batch in images; 0: the '
                     "config's decode.batch_size or batch_size.")
flags.DEFINE_integer('repeats', 3, 'Timed runs per figure (the median).')
flags.DEFINE_integer('score_images', 5000, 'Images of the score benchmark '
                     '(5,000: the Karpathy test split).')
flags.DEFINE_string('checkpoint_dir', None, 'Checkpoint: where the timed '
                    'checkpoints are written (default: a temporary folder).')
flags.DEFINE_string('json', None, 'Also write the results to this file.')


def _median_seconds(fn, repeats: int) -> float:
  jax.block_until_ready(fn())  # Compiles and warms up.
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


@functools.cache
def _random_variables(predict, image_size: int, captions_per_image: int,
                      max_len: int) -> dict[str, Any]:
  """`predict.init`'s variables, drawn once per model and input shapes."""
  return jax.jit(predict.init)(
      jax.random.key(0),
      jnp.zeros((1, image_size, image_size, 3), jnp.uint8),  # [1, S, S, 3]
      jnp.zeros((1, captions_per_image, max_len), jnp.int32))  # [1, K, L]


def random_variables(config, predict) -> dict[str, Any]:
  """The random {'params', 'batch_stats'} that `state_lib.create` draws,
  on the default device. Never donate them: they are drawn once.

  A frozen and a fine-tuned encoder have the same weights (frozen only
  stops gradients), so every setup of one model (train, SCST, features,
  decode) shares one init: compiling it costs as much as some steps.
  """
  d = config.data
  return _random_variables(predict.frozen(), d.image_size,
                           d.captions_per_image, d.max_len)


def random_state(config, predict, par) -> state_lib.TrainState:
  """`state_lib.create(config, predict, None, jax.random.key(0))`, the same
  values, replicated over `par`'s devices; a copy, which steps may donate."""
  def fresh(variables):
    params = variables['params']
    return state_lib.fresh(params, variables['batch_stats'],
                           optimizer.make(config, params))
  return jax.jit(fresh, out_shardings=par.replicated)(jax.device_put(
      random_variables(config, predict), par.replicated, may_alias=False))


def _variables(config, workdir: str | None,
               vocab_size: int) -> tuple[Any, Any]:
  """(predict, variables): trained if `workdir` is given."""
  if workdir:
    trained = inference.load_trained(workdir)
    return models.Predict(models.build_captioner(
        trained.config.model, len(trained.vocab),
        trained.config.data.normalization,
        trained.concepts.sizes if trained.concepts else (0, 0),
        max_len=trained.config.data.max_len)), trained.variables
  predict = _predict(config, vocab_size)
  return predict, random_variables(config, predict)


def _predict(config, vocab_size: int) -> models.Predict:
  """The predict functions of config.model with `vocab_size` words."""
  return models.Predict(models.build_captioner(
      config.model, vocab_size, config.data.normalization,
      max_len=config.data.max_len))


def bench_decode(config, workdir: str | None, beams: list[int], batch: int,
                 repeats: int, vocab_size: int) -> list[dict[str, Any]]:
  predict, variables = _variables(config, workdir, vocab_size)
  size = config.data.image_size
  images = jax.random.randint(jax.random.key(1), (batch, size, size, 3), 0,
                              256).astype(jnp.uint8)  # pixels, as fed
  rows = []
  for beam in beams:
    search = jax.jit(functools.partial(
        decode.beam_search, predict, beam_size=beam,
        max_len=config.data.max_len, ban_unk=True))
    seconds = _median_seconds(lambda: search(variables, images).tokens,
                              repeats)
    rows.append({'beam': beam, 'batch': batch, 'seconds': seconds,
                 'captions_per_second': batch / seconds})
  return rows


def peak_flops(device_kind: str) -> float | None:
  for name, flops in PEAK_FLOPS.items():
    if name.lower() in device_kind.lower():
      return flops
  return None


def synthetic_batch(config, batch: int, vocab_size: int,
                    seed: int = 0) -> tuple[dict[str, np.ndarray], int]:
  """A training batch of random images and captions of random lengths
  (half to all of max_len), and its number of target tokens."""
  rng = np.random.default_rng(seed)
  d = config.data
  k, length = d.captions_per_image, d.max_len
  lengths = rng.integers(max(3, length // 2), length + 1, (batch, k))
  captions = rng.integers(4, vocab_size, (batch, k, length)).astype(np.int32)
  position = np.arange(length)
  captions[..., 0] = BOS
  captions = np.where(position == lengths[..., None] - 1, EOS, captions)
  captions = np.where(position >= lengths[..., None], PAD, captions)
  return {
      'image': rng.integers(  # uint8 pixels, as the input pipeline sends
          0, 256, (batch, d.image_size, d.image_size, 3), dtype=np.uint8),
      'captions': captions.astype(np.int32),
      'image/id': np.arange(batch, dtype=np.int64),
      'mask': np.ones((batch,), bool),
  }, int((lengths - 1).sum())


def as_features(config, predict, host_batch: dict[str, np.ndarray],
                seed: int = 0) -> dict[str, np.ndarray]:
  """`host_batch` as the feature cache sends it: random features [B, h, w,
  C] in `data.features.dtype` in place of the images."""
  images = host_batch['image']
  variables = jax.eval_shape(
      lambda: predict.init(jax.random.key(0), images[:1],
                           host_batch['captions'][:1]))
  grid = jax.eval_shape(lambda v: predict.grid(v, images[:1]), variables)
  dtype = jnp.dtype(config.data.features.dtype)  # bfloat16 or float32
  rng = np.random.default_rng(seed)
  features = rng.random((len(images),) + grid.shape[1:], np.float32)
  batch = {k: v for k, v in host_batch.items() if k != 'image'}
  return batch | {'features': features.astype(dtype)}


def step_flops(par, train_step, predict, config, *args) -> float | None:
  """FLOPs per device of one train step, as XLA counts them.

  XLA's cost analysis counts the body of a loop once, whatever its trip
  count, so the step is counted with the decoder's scan unrolled: lowered
  only, never compiled or run.
  """
  unrolled = par.step(functools.partial(
      train_step, predict=predict.unrolled(), config=config),
                      constant_argnums=(3,))
  cost = unrolled.lower(*args).cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return (cost or {}).get('flops')  # Per device: the program is per device.


# What this run has measured, by the config and arguments: the features
# benchmark's image steps of a frozen encoder are the train and scst
# benchmarks' own, each a step to compile and time.
_measured: dict[str, dict[str, Any]] = {}


def _once(config, args: tuple[Any, ...],
          measure: Callable[[], dict[str, Any]]) -> dict[str, Any]:
  """`measure()`, or what it gave for the same config and args before."""
  key = config.to_json_best_effort(sort_keys=True) + repr(args)
  if key not in _measured:
    _measured[key] = measure()
  return dict(_measured[key])


def bench_train(config, per_device_batch: int, frozen: bool, steps: int,
                repeats: int, vocab_size: int,
                features: bool = False) -> dict[str, Any]:
  """One train setup: throughput, FLOPs, MFU and memory; with `features`,
  the frozen encoder's step from the feature cache's batches."""
  config = config.copy_and_resolve_references()
  config.unlock()
  config.model.encoder.frozen = frozen
  # The fine-tuning phase's step, encoder update included, from the start.
  config.train.encoder_from_step = 0
  config.batch_size = per_device_batch * jax.device_count()
  args = (per_device_batch, steps, repeats, vocab_size, features)
  return _once(config, ('train',) + args, lambda: _train(config, *args))


def _train(config, per_device_batch: int, steps: int, repeats: int,
           vocab_size: int, features: bool) -> dict[str, Any]:
  predict = _predict(config, vocab_size)
  par = parallel.Parallel(config)
  state = random_state(config, predict, par)
  step = par.step(functools.partial(cross_entropy.train_step,
                                    predict=predict, config=config),
                  constant_argnums=(3,))
  host_batch, tokens = synthetic_batch(config, config.batch_size, vocab_size)
  if features:
    host_batch = as_features(config, predict, host_batch)
  batch = par.put_batch(host_batch)
  rng = jax.random.key(1)
  schedule = par.put_constant(optimizer.schedule_values(config))
  state = par.put_state(state)
  flops = step_flops(par, cross_entropy.train_step, predict, config,
                     state, batch, rng, schedule)

  def run():
    nonlocal state
    for _ in range(steps):
      state, _ = step(state, batch, rng, schedule)
    return state

  seconds = _median_seconds(run, repeats) / steps
  device = jax.local_devices()[0]
  peak = peak_flops(device.device_kind)
  memory = (device.memory_stats() or {}).get('peak_bytes_in_use')
  return {
      'encoder': 'frozen' if config.model.encoder.frozen else 'fine-tuned',
      'input': 'features' if features else 'images',
      'per_device_batch': per_device_batch, 'devices': jax.device_count(),
      'step_seconds': seconds,
      'images_per_second': config.batch_size / seconds,
      'tokens_per_second': tokens / seconds,
      'gflop_per_step_per_device': flops / 1e9 if flops else None,
      'gflop_per_image': flops / 1e9 / per_device_batch if flops else None,
      'mfu': flops / seconds / peak if flops and peak else None,
      'peak_memory_gib': memory / 2**30 if memory else None,
  }


def bench_scst(config, per_device_batch: int, steps: int, repeats: int,
               vocab_size: int, features: bool = False) -> dict[str, Any]:
  """Seconds per SCST step and per cross-entropy step, and the reward's;
  with `features`, from the feature cache's batches."""
  config = config.copy_and_resolve_references()
  config.unlock()
  config.batch_size = per_device_batch * jax.device_count()
  args = (per_device_batch, steps, repeats, vocab_size, features)
  return _once(config, ('scst',) + args, lambda: _scst(config, *args))


def _scst(config, per_device_batch: int, steps: int, repeats: int,
          vocab_size: int, features: bool) -> dict[str, Any]:
  s = config.scst
  predict = _predict(config, vocab_size)
  par = parallel.Parallel(config)
  host_batch, _ = synthetic_batch(config, config.batch_size, vocab_size)
  host_batch['references'] = synthetic_batch(  # [B, R, L]
      _with_k(config, s.max_references), config.batch_size, vocab_size,
      seed=1)[0]['captions']
  if features:
    host_batch = as_features(config, predict, host_batch)
  # Document frequencies of 5,000 images' references, COCO's test size.
  corpus = synthetic_batch(_with_k(config, s.max_references), 5_000,
                           vocab_size, seed=2)[0]['captions'][..., 1:]
  table = cider_jax.DocumentFrequencies.build(
      corpus.reshape(-1, corpus.shape[-1]),
      np.repeat(np.arange(5_000), s.max_references), eos=s.eos)
  batch = par.put_batch(host_batch)
  rng = jax.random.key(1)
  schedule = par.put_constant(optimizer.schedule_values(config))
  out = {'input': 'features' if features else 'images',
         'per_device_batch': per_device_batch, 'samples': s.num_samples,
         'baseline': s.baseline, 'devices': jax.device_count()}
  for name, fn, extra in (
      ('cross_entropy', cross_entropy.train_step, ()),
      ('scst', scst.train_step, (par.put_constant(table),))):
    state = random_state(config, predict, par)
    step = par.step(functools.partial(fn, predict=predict, config=config),
                    constant_argnums=tuple(range(3, 4 + len(extra))))
    state = par.put_state(state)

    def run(step=step, extra=extra):
      nonlocal state
      for _ in range(steps):
        state, _ = step(state, batch, rng, schedule, *extra)
      return state

    out[f'{name}_step_seconds'] = _median_seconds(run, repeats) / steps
  # The reward alone, on one device's share: what each device computes.
  b = per_device_batch
  k = s.num_samples + (s.baseline == 'greedy')
  candidates = jnp.asarray(synthetic_batch(
      _with_k(config, k), b, vocab_size, seed=3)[0]['captions'][..., 1:])
  reward = jax.jit(functools.partial(cider_jax.cider_d, eos=s.eos))
  refs = jnp.asarray(host_batch['references'][:b, :, 1:])
  device_table = jax.device_put(table, jax.local_devices()[0])
  out['reward_seconds'] = _median_seconds(
      lambda: reward(candidates, refs, device_table), repeats)
  out['reward_fraction'] = out['reward_seconds'] / out['scst_step_seconds']
  out['scst_over_cross_entropy'] = (out['scst_step_seconds'] /
                                    out['cross_entropy_step_seconds'])
  return out


def bench_features(config) -> dict[str, Any]:
  """The frozen-encoder train and SCST steps from images and from the
  feature cache's features, and what the cache of COCO takes."""
  batch = (int(FLAGS.per_device_batch[0]) if FLAGS.per_device_batch else
           max(1, config.batch_size // jax.device_count()))
  config = config.copy_and_resolve_references()
  config.unlock()
  config.model.encoder.frozen = True
  out = {'per_device_batch': batch, 'dtype': config.data.features.dtype}
  for source in ('images', 'features'):
    out[f'train_{source}'] = bench_train(
        config, batch, True, FLAGS.steps, FLAGS.repeats, FLAGS.vocab_size,
        features=source == 'features')
    out[f'scst_{source}'] = bench_scst(
        config, batch, FLAGS.steps, FLAGS.repeats, FLAGS.vocab_size,
        features=source == 'features')
  images, features = out['train_images'], out['train_features']
  out['train_speedup'] = images['step_seconds'] / features['step_seconds']
  out['scst_speedup'] = (out['scst_images']['scst_step_seconds'] /
                         out['scst_features']['scst_step_seconds'])
  if images['gflop_per_step_per_device'] and features[
      'gflop_per_step_per_device']:
    out['flop_ratio'] = (images['gflop_per_step_per_device'] /
                         features['gflop_per_step_per_device'])
  # On paper: the cache of COCO's 123,287 images (Karpathy train + restval
  # + val + test) at the grids of 224 and 448 px.
  channels = models.resnet.feature_dim(config.model.encoder.arch)
  itemsize = jnp.dtype(config.data.features.dtype).itemsize
  out['coco_cache_gb'] = {
      f'{g}x{g}': g * g * channels * itemsize * 123_287 / 1e9
      for g in (7, 14)}
  print(f'features ({jax.devices()[0].device_kind} x{jax.device_count()}, '
        f'{config.model.encoder.arch}, {config.data.image_size} px, '
        f'batch/dev {batch}, frozen encoder, features in '
        f'{config.data.features.dtype}):')
  print('  step            images ms   features ms   speed-up   GFLOP/step '
        'images -> features')
  fmt = lambda v: f'{v:.1f}' if v else '-'
  print(f'  cross-entropy {images["step_seconds"] * 1e3:>11.1f} '
        f'{features["step_seconds"] * 1e3:>13.1f} '
        f'{out["train_speedup"]:>9.2f}x   '
        f'{fmt(images["gflop_per_step_per_device"])} -> '
        f'{fmt(features["gflop_per_step_per_device"])}')
  print(f'  scst          '
        f'{out["scst_images"]["scst_step_seconds"] * 1e3:>11.1f} '
        f'{out["scst_features"]["scst_step_seconds"] * 1e3:>13.1f} '
        f'{out["scst_speedup"]:>9.2f}x')
  print('  COCO cache (123,287 images, ' + ', '.join(
      f'{k}: {v:.1f} GB' for k, v in out['coco_cache_gb'].items()) + ')')
  return out


def _with_k(config, k: int):
  """`config` with k captions per image (for synthetic batches)."""
  config = config.copy_and_resolve_references()
  config.unlock()
  config.data.captions_per_image = k
  return config


def photo_dataset(config, num_photos: int, folder: str | None = None):
  """`config` reading a `caption_files` dataset of photo-like 640x480 JPEGs.

  JPEG decoding time depends on content, so the input benchmark reads
  photo-like images (`capjax.data.photos`) rather than flat synthetic
  scenes. Written once to `folder` (default: a temporary folder named by
  the count) and reused.
  """
  # pylint: disable-next=g-import-not-at-top
  from capjax.data import photos
  folder = folder or os.path.join(tempfile.gettempdir(),
                                  f'capjax-bench-photos-{num_photos}')
  annotations = os.path.join(folder, 'captions.json')
  if not os.path.exists(annotations):
    photos.write_caption_files(folder, num_photos)
  config = config.copy_and_resolve_references()
  config.unlock()
  d = config.data
  d.name, d.builder_config = 'caption_files', f'photos{num_photos}'
  d.manual_dir, d.annotations, d.images = folder, 'captions.json', 'images'
  d.data_dir = os.path.join(folder, 'tfds')
  d.train_split = 'train'
  # The photos have one split; the evaluators, which never run here, must
  # still name a split the dataset has.
  for evaluator in config.evals.values():
    evaluator.split = 'train'
  d.prepare, d.min_count = True, 1
  return config


def bench_input(config, workdir: str | None, workers: list[int],
                sources: list[str], batches: int,
                repeats: int) -> list[dict[str, Any]]:
  """Images/s of the training input pipeline on the real dataset.

  sources: 'copy' reads the copy at the training resolution
  (`capjax.data.resized`; its one-off build is timed too), 'original' the
  dataset's own files, decoded at reduced scale, 'features' the feature
  cache of a random frozen encoder (built from the copy, timed too).
  """
  # The data libraries (TFDS, grain) are optional where only JAX is, and
  # only this benchmark needs them.
  # pylint: disable=g-import-not-at-top
  from capjax import cache_features
  from capjax.data import datasets
  from capjax.data import pipeline
  from capjax.data import prepare
  from capjax.data import resized
  # pylint: enable=g-import-not-at-top
  if workdir is None:  # The vocabulary's, removed with it.
    with tempfile.TemporaryDirectory(prefix='capjax-bench-') as temporary:
      return bench_input(config, temporary, workers, sources, batches,
                         repeats)
  config = config.copy_and_resolve_references()
  config.unlock()
  config.data.resized_copy = False
  data = prepare.prepare(config, workdir)
  split = config.data.train_split
  rows = []
  for kind in sources:
    d = config.data.copy_and_resolve_references()
    d.resized_copy = kind in ('copy', 'features')
    row = {'source': kind}
    names = datasets.split_names(split)
    if d.resized_copy and resized.missing(data.builder, names, d.image_size):
      start = time.perf_counter()
      prepare.build_copy(data.builder, names, d.image_size)
      row['copy_seconds'] = time.perf_counter() - start
    kind_data = prepare.Data(data.builder, data.vocab, d)
    if kind == 'features':
      c = config.copy_and_resolve_references()
      c.data = d
      c.model.encoder.frozen = True
      predict = _predict(c, len(data.vocab))
      par = parallel.Parallel(c)
      state = random_state(c, predict, par)
      start = time.perf_counter()
      cache = cache_features.build(c, kind_data, predict, state, par, names,
                                   force=True)
      row['cache_seconds'] = time.perf_counter() - start
      kind_data = prepare.Data(data.builder, data.vocab, d, features=cache)
    source = kind_data.source(split)
    if kind == 'copy':
      row['copy_bytes_per_image'] = resized.size_on_disk(
          data.builder, names, d.image_size) / len(source)
    if kind == 'features':
      row['features_bytes_per_image'] = cache.size_on_disk(names) / len(
          source)
    for n in workers:
      c = config.copy_and_resolve_references()
      c.data.workers = n
      it = iter(pipeline.train_dataset(c, source, data.vocab))
      next(it)  # Starts the threads and workers.
      seconds = _median_seconds(
          lambda: [next(it) for _ in range(batches)][-1]['captions'],
          repeats)
      rows.append(dict(row, workers=n, cores=_cores(),
                       images_per_second=batches * c.batch_size / seconds))
  return rows


def _cores() -> int:
  """The cores this process may run on (taskset narrows them)."""
  return len(os.sched_getaffinity(0))


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


def bench_checkpoint(config, repeats: int, vocab_size: int,
                     folder: str | None) -> dict[str, Any]:
  """Save and restore seconds of the config's state, checksums on and off."""
  # pylint: disable=g-import-not-at-top
  import grain  # The data position is part of every checkpoint.
  from capjax import checksums
  # pylint: enable=g-import-not-at-top
  predict = _predict(config, vocab_size)
  par = parallel.Parallel(config)
  state = random_state(config, predict, par)
  abstract = state_lib.abstract(config, predict, par.replicated)
  meta = {'model': config.model.to_dict()}
  iterator = iter(grain.MapDataset.range(10).to_iter_dataset())
  times = {(what, on): [] for what in ('save', 'restore')
           for on in (False, True)}
  with tempfile.TemporaryDirectory(dir=folder) as tmp:
    for round_ in range(repeats + 1):  # Round 0 compiles and warms up.
      for on in (False, True):
        directory = os.path.join(tmp, f'{round_}-{on}')
        ckpt = checkpoint.Checkpoints(directory, config, checksums=on)
        start = time.perf_counter()
        ckpt.save(1, state, iterator, meta)
        ckpt.wait()
        saved = time.perf_counter()
        jax.block_until_ready(ckpt.restore(abstract, meta))
        restored = time.perf_counter()
        ckpt.close()
        shutil.rmtree(directory)
        if round_:
          times['save', on].append(saved - start)
          times['restore', on].append(restored - saved)
  out = {f'{what}_seconds' + ('_checksums' if on else ''):
         statistics.median(v) for (what, on), v in times.items()}
  out['checksum_seconds'] = _median_seconds(
      lambda: checksums.tree(state), repeats)
  out['state_bytes'] = sum(x.nbytes for x in jax.tree.leaves(state))
  out['leaves'] = len(jax.tree.leaves(state))
  return out


def main(argv):
  del argv
  checkpoint.quiet_reported_failures()
  try:
    run(FLAGS.config)
  except UserError as e:
    raise SystemExit(f'capjax: error: {e}') from None


def run(config) -> dict[str, Any]:
  if FLAGS.json:  # Written at the end: a wrong path is told now.
    files.check_output(FLAGS.json, f'--json={FLAGS.json}')
  # Synthetic batches have no concepts to learn: these benchmarks time the
  # captioner, without the concept head (a small MLP on the encoder's grid).
  config = config.copy_and_resolve_references()
  config.model.concepts.head = config.decode.concepts = False
  results = {'device': str(jax.devices()[0].device_kind),
             'devices': jax.device_count(), 'backend': jax.default_backend(),
             'jax': jax.__version__, 'dtype': config.model.dtype,
             'vocab_size': FLAGS.vocab_size}
  if 'train' in FLAGS.what:
    batches = [int(b) for b in FLAGS.per_device_batch] or [
        max(1, config.batch_size // jax.device_count())]
    results['train'] = [
        bench_train(config, b, frozen, FLAGS.steps, FLAGS.repeats,
                    FLAGS.vocab_size)
        for b in batches for frozen in (True, False)]
    print(f'train ({results["device"]} x{jax.device_count()}, '
          f'{config.model.dtype}, {config.model.encoder.arch}, '
          f'{config.data.image_size} px, K={config.data.captions_per_image}):')
    print('  encoder     batch/dev   images/s   tokens/s   ms/step  '
          'GFLOP/step/dev    MFU  peak GiB')
    fmt = lambda v, f: format(v, f) if v is not None else '-'
    for r in results['train']:
      print(f'  {r["encoder"]:<10} {r["per_device_batch"]:>9} '
            f'{r["images_per_second"]:>10.1f} {r["tokens_per_second"]:>10.0f} '
            f'{r["step_seconds"] * 1e3:>9.1f} '
            f'{fmt(r["gflop_per_step_per_device"], ".1f"):>15} '
            f'{fmt(r["mfu"] and 100 * r["mfu"], ".1f"):>6} '
            f'{fmt(r["peak_memory_gib"], ".2f"):>9}')
  if 'features' in FLAGS.what:
    results['features'] = bench_features(config)
  if 'decode' in FLAGS.what:
    batch = FLAGS.batch or config.decode.batch_size or config.batch_size
    results['decode'] = bench_decode(config, FLAGS.workdir,
                                     [int(b) for b in FLAGS.beams], batch,
                                     FLAGS.repeats, FLAGS.vocab_size)
    print(f'decode ({results["device"]}, batch {batch}, max_len '
          f'{config.data.max_len}):')
    for row in results['decode']:
      print(f'  beam {row["beam"]}: {row["captions_per_second"]:9.1f} '
            f'captions/s ({row["seconds"] * 1e3:.1f} ms per batch)')
  if 'scst' in FLAGS.what:
    batches = [int(b) for b in FLAGS.per_device_batch] or [
        max(1, config.batch_size // jax.device_count())]
    results['scst'] = [bench_scst(config, b, FLAGS.steps, FLAGS.repeats,
                                  FLAGS.vocab_size) for b in batches]
    print(f'scst ({results["device"]} x{jax.device_count()}, '
          f'{config.model.dtype}, encoder frozen='
          f'{config.model.encoder.frozen}):')
    print('  batch/dev  samples  baseline   CE ms/step  SCST ms/step  '
          'SCST/CE  reward ms  reward share')
    for r in results['scst']:
      print(f'  {r["per_device_batch"]:>9} {r["samples"]:>8} '
            f'{r["baseline"]:>9} '
            f'{r["cross_entropy_step_seconds"] * 1e3:>12.1f} '
            f'{r["scst_step_seconds"] * 1e3:>13.1f} '
            f'{r["scst_over_cross_entropy"]:>8.2f} '
            f'{r["reward_seconds"] * 1e3:>10.2f} '
            f'{100 * r["reward_fraction"]:>12.1f}%')
  if 'input' in FLAGS.what:
    input_config = config
    if FLAGS.photos:
      input_config = photo_dataset(config, FLAGS.photos, FLAGS.photos_dir)
    results['input'] = bench_input(input_config, FLAGS.workdir,
                                   [int(w) for w in FLAGS.workers],
                                   FLAGS.sources, FLAGS.input_batches,
                                   FLAGS.repeats)
    print(f'input ({input_config.data.name}, {config.data.image_size} px, '
          f'batch {config.batch_size}, {_cores()} cores):')
    for r in results['input']:
      extra = ''
      if 'copy_seconds' in r:
        extra += f'  (copy made in {r["copy_seconds"]:.1f} s)'
      if 'cache_seconds' in r:
        extra += f'  (cache made in {r["cache_seconds"]:.1f} s)'
      for k in ('copy_bytes_per_image', 'features_bytes_per_image'):
        if k in r:
          extra += f'  {r[k] / 1e3:.1f} KB/image'
      print(f'  {r["source"]:<8} {r["workers"]} workers: '
            f'{r["images_per_second"]:9.1f} images/s{extra}')
  if 'checkpoint' in FLAGS.what:
    c = results['checkpoint'] = bench_checkpoint(
        config, FLAGS.repeats, FLAGS.vocab_size, FLAGS.checkpoint_dir)
    print(f'checkpoint ({config.model.encoder.arch}, '
          f'{c["state_bytes"] / 2**20:.0f} MiB in {c["leaves"]} arrays):')
    for what in ('save', 'restore'):
      plain, checked = c[f'{what}_seconds'], c[f'{what}_seconds_checksums']
      print(f'  {what:<8} {plain:7.2f} s, with checksums {checked:7.2f} s '
            f'({100 * (checked / plain - 1):+.1f}%)')
    print(f'  the checksums alone: {c["checksum_seconds"]:.3f} s')
  if 'score' in FLAGS.what:
    s = results['score'] = bench_score(FLAGS.score_images, FLAGS.repeats)
    print(f'score ({s["images"]} images x 5 references, one core):')
    for k in ('tokenize', 'BLEU', 'ROUGE-L', 'CIDEr-D', 'metrics'):
      print(f'  {k:<9} {s[k]:7.2f} s')
    if 'official' in s:
      print(f'  pycocoevalcap, the same three: {s["official"]:.2f} s '
            f'({s["official"] / s["metrics"]:.2f}x capjax\'s time)')
  if FLAGS.json:
    files.write_text(FLAGS.json, json.dumps(results, indent=1))
  return results


if __name__ == '__main__':
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file('config', None, 'Config file.',
                                  lock_config=True)
  flags.mark_flags_as_required(['config'])
  app.run(main)
