"""The feature cache: a frozen encoder run once over every image a run reads.

  python -m capjax.main --config=CONFIG --workdir=DIR --mode=cache_features

computes the encoder's feature grid [h, w, C] of every image of the splits
the run uses (its train split, its evaluators' splits, `decode.split`),
jitted, batched and data-parallel over all devices and processes, and
process 0 stores them (`capjax.data.feature_cache`). With
`--config.data.features.use=True`, training, validation, the decode job, the
sidecar and SCST read those features and never run the encoder; they call
`attach` themselves, which makes what is missing when `data.prepare` is on.

The weights are those the run trains with: its newest checkpoint, else
`init_from`, else the pretrained weights; the cache's fingerprint hashes
them, so features of other weights are never read. Interrupted, a build
resumes at the first missing shard.
"""

import contextlib
import dataclasses
import functools

from absl import logging
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np

from capjax import files
from capjax import models
from capjax import parallel
from capjax import start as start_lib
from capjax import state as state_lib
from capjax.data import datasets
from capjax.data import feature_cache
from capjax.data import images
from capjax.data import pipeline
from capjax.data import prepare
from capjax.data import records
from capjax.data import resized
from capjax.errors import UserError
from capjax.evaluators import common


def splits(config: ml_collections.ConfigDict) -> list[str]:
  """The split names (not specs) whose images the run reads."""
  specs = [config.data.train_split, config.decode.split] + [
      e.split for e in config.evals.values() if e.every_steps >= 0]
  return list(dict.fromkeys(n for s in specs
                            for n in datasets.split_names(s)))



def cache_of(config: ml_collections.ConfigDict, data: prepare.Data,
             predict: models.Predict,
             state: state_lib.TrainState) -> feature_cache.Cache:
  """The cache of the features that `state`'s encoder gives `data`."""
  d, e = config.data, config.model.encoder
  variables = state.variables(only='encoder')
  size = d.image_size
  grid = jax.eval_shape(
      lambda v: predict.grid(v, np.zeros((1, size, size, 3), np.uint8)),
      variables)
  config_name = data.builder.builder_config
  return feature_cache.Cache(data.builder, {
      'dataset': data.builder.name,
      'builder_config': config_name.name if config_name else None,
      'version': str(data.builder.version),
      # The copy's JPEGs, or the originals decoded at reduced scale.
      'pixels': resized.FORMAT if d.resized_copy else 'original',
      'image_size': size, 'normalization': d.normalization,
      'arch': e.arch, 'variant': e.variant, 'grid': e.grid,
      'compute_dtype': config.model.dtype,
      'weights': feature_cache.weights_hash(jax.device_get(variables)),
      'shape': list(grid.shape[1:]), 'dtype': d.features.dtype,
  })


def _encode(variables, batch, *, predict, dtype):
  """Per device: images [b, S, S, 3] -> their grids [b, h, w, C]."""
  grid = predict.grid(variables, batch['image'])
  return grid.astype(dtype)


def build(config: ml_collections.ConfigDict, data: prepare.Data,
          predict: models.Predict,
          state: state_lib.TrainState, par: parallel.Parallel,
          names: list[str] | None = None,
          force: bool = False) -> feature_cache.Cache:
  """Makes the features of `names` (default: `splits(config)`) that are
  missing, on every process together; process 0 writes them.

  Without `force` (the job) or `data.prepare`, a missing split is an error.
  """
  names = splits(config) if names is None else names
  cache = cache_of(config, data, predict, state)
  chief = jax.process_index() == 0
  # A read-only or full data dir: one line, on process 0, which writes.
  with files.reporting(cache.folder, 'the feature cache'):
    with cache.lock() if chief else contextlib.nullcontext():
      _build(config, data, predict, state, par, cache, names, force)
  return cache


def _build(config, data, predict, state, par, cache, names, force) -> None:
  d = config.data
  chief = jax.process_index() == 0
  todo = common.on_chief(lambda: cache.missing(names))
  if not todo:
    return
  if not (force or d.prepare):
    if damage := common.on_chief(lambda: cache.damaged(todo)):
      raise UserError(
          f'the feature cache is damaged: {damage}. Make it again with '
          '--mode=cache_features (or set --config.data.prepare=True to make '
          'it now)')
    others = cache.others()
    raise UserError(
        f'no features of {", ".join(todo)} for this encoder in '
        f'{cache.folder}' + (
            f' (the {len(others)} other caches there are of other weights '
            'or settings, and are not read)' if others else '') +
        ': make them with --mode=cache_features (or set '
        '--config.data.prepare=True to make them now)')
  batch_size = d.features.batch_size or config.batch_size
  if batch_size % jax.device_count():
    raise UserError(f'--config.data.features.batch_size={batch_size} is not '
                    f'divisible by the {jax.device_count()} devices')
  encode = par.map(functools.partial(
      _encode, predict=predict, dtype=feature_cache.DTYPES[d.features.dtype]))
  variables = par.put_state(state.variables(only='encoder'))
  local = batch_size // jax.process_count()
  first = jax.process_index() * local
  total = sum(datasets.num_examples(data.builder, s) for s in todo)
  progress = records.Progress(cache.folder, total) if chief else None
  logging.info('Encoding %s (%d images) with %s into %s.', ', '.join(todo),
               total, config.model.encoder.arch, cache.folder)
  pixels_of = dataclasses.replace(data, features=None)  # The images.
  for split in todo:
    images_of = pixels_of.source(split)
    about = datasets.without_images(data.builder, split)  # Ids, captions.

    def shard_records(indices, images_of=images_of, about=about):
      for start in range(0, len(indices), batch_size):
        rows = list(indices[start:start + batch_size])
        real = len(rows)
        rows += rows[-1:] * (batch_size - real)  # The last batch, padded.
        pixels = [x for _, x in images.ordered_map(
            lambda i: pipeline.pixels(images_of[i], d.image_size),
            rows[first:first + local])]
        grids = par.fetch(encode(variables, par.put_batch(
            {'image': np.stack(pixels)})))  # [batch_size, h, w, C]
        if chief:
          for i, grid in zip(rows[:real], grids):
            example = about[i]
            yield feature_cache.encode_record(
                grid, example['image/id'],
                [datasets.as_str(t) for t in example['captions']['text']])

    shards = common.on_chief(lambda: cache.missing_shards(split))
    if chief:
      cache.write(split, shard_records, progress)
    else:  # Computes its share of what process 0 writes.
      for shard in shards:
        for _ in shard_records(cache.shard_indices(split, shard)):
          pass
  # The others read what process 0 wrote only once it is complete.
  multihost_utils.sync_global_devices('capjax feature cache')
  size = cache.size_on_disk(names)
  logging.info('Feature cache %s: %s, %.3f GB.', cache.folder,
               ', '.join(names), size / 1e9)


def attach(config: ml_collections.ConfigDict, data: prepare.Data,
           predict: models.Predict,
           state: state_lib.TrainState,
           par: parallel.Parallel) -> prepare.Data:
  """`data` reading the feature cache of `state`'s encoder, when
  `config.data.features.use` asks for it (made first where missing)."""
  if not config.data.features.use:
    return data
  return dataclasses.replace(data,
                             features=build(config, data, predict, state,
                                            par))


def run(config: ml_collections.ConfigDict, workdir: str) -> None:
  """--mode=cache_features: with the weights training starts (or resumes)
  from, for every split the run reads."""
  s = start_lib.start(config, workdir)
  try:
    cache = build(config, s.data, s.predict, s.state, s.par, force=True)
  finally:
    s.checkpoints.close()
  size = cache.size_on_disk(splits(config))
  print(f'Feature cache of {", ".join(splits(config))}: {cache.folder} '
        f'({size / 1e9:.3f} GB)', flush=True)
