"""The decode job: captions for a whole split, and the metrics papers report.

  python -m capjax.main --config=CONFIG --workdir=DIR --mode=decode
  python -m capjax.main --config=CONFIG --workdir=DIR \
      --mode=evaluate_continuously     # a sidecar to a training job

Each decoded checkpoint gives, in DIR/decode/:

  <split>_step<STEP>.json          [{"image_id", "caption"}]: the COCO
                                   results format, the official caption
                                   evaluation's input
  <split>_step<STEP>_metrics.json  BLEU-1..4, METEOR, ROUGE-L, CIDEr-D and
                                   how they were made

and the metrics go to the TensorBoard logs in DIR/decode. Every image of the
split is decoded exactly once across all devices and processes: the batches
are padded and masked (`pipeline.eval_dataset`), and the padding rows are
dropped by their mask.
"""

import dataclasses
import functools
import json
import os
import time
from typing import Any

from absl import logging
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np

from capjax import decode
from capjax import metrics as metrics_lib
from capjax import models
from capjax import parallel
from capjax.data import datasets
from capjax.data import pipeline
from capjax.data import prepare as prepare_lib
from capjax.errors import UserError


@dataclasses.dataclass(frozen=True)
class SearchOptions:
  """How captions are searched for; see `decode.search`."""
  beam_size: int = 1
  alpha: float = 0.0
  ban_unk: bool = True
  ban_repeated_trigrams: bool = False

  def __post_init__(self):
    if self.beam_size < 1:
      raise UserError(f'beam_size={self.beam_size} must be >= 1')

  @classmethod
  def of(cls, section: ml_collections.ConfigDict) -> 'SearchOptions':
    """The options in `config.decode`."""
    return cls(**{f.name: section[f.name] for f in dataclasses.fields(cls)})


def _search(state, batch, *, model, max_len: int, options: SearchOptions):
  """Per device: the best caption of each image of `batch`."""
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  out = decode.beam_search(model, variables, batch['image'], max_len=max_len,
                           mask=batch['mask'], **dataclasses.asdict(options))
  # The ids and the mask travel with the captions, so that rows and ids
  # match whatever order the devices' shards are gathered in.
  return {'tokens': out.tokens[:, 0],  # [b, T]
          'image/id': batch['image/id'], 'mask': batch['mask']}


class BatchDecoder:
  """Decodes batches and splits, one compiled search per batch shape."""

  def __init__(self, config: ml_collections.ConfigDict, par: parallel.Parallel,
               model, data: prepare_lib.Data, options: SearchOptions):
    self.config = config
    self.par = par
    self.data = data
    self.options = options
    self._search = par.map(functools.partial(
        _search, model=model, max_len=config.data.max_len, options=options))

  def batch(self, state, batch: dict[str, np.ndarray]) -> dict[int, str]:
    """Captions of the real images of one process-local batch, by image id,
    gathered from every process."""
    rows = {k: batch[k] for k in ('image', 'image/id', 'mask')}
    out = self.par.fetch(self._search(state, self.par.put_batch(rows)))
    vocab = self.data.vocab
    return {int(i): vocab.decode(tokens) for tokens, i, real
            in zip(out['tokens'], out['image/id'], out['mask']) if real}

  def split(self, state, split: str) -> dict[int, str]:
    """Captions of every image of `split`, by image id."""
    batch_size = self.config.decode.batch_size or self.config.batch_size
    if batch_size % jax.device_count():
      raise UserError(f'--config.decode.batch_size={batch_size} is not '
                      f'divisible by the {jax.device_count()} devices')
    source = self.data.source(split)
    batches = pipeline.eval_dataset(
        self.config, source, self.data.vocab,
        batch_size=batch_size // jax.process_count())
    captions = {}
    for batch in batches:
      captions.update(self.batch(state, batch))
    return captions


def score(references: dict[int, list[str]], captions: dict[int, str],
          meteor: str) -> dict[str, float]:
  """Metrics of `captions` against the references of the same images."""
  missing = set(captions) - set(references)
  if missing:
    raise UserError(f'{len(missing)} decoded image ids have no references, '
                    f'e.g. {sorted(missing)[:3]}')
  return metrics_lib.score({i: references[i] for i in captions}, captions,
                           meteor=meteor)


def evaluate_split(decoder: BatchDecoder, state, step: int, split: str,
                   workdir: str, writer) -> dict[str, float]:
  """Decodes `split`, scores it, writes the results files; the metrics."""
  start = time.perf_counter()
  captions = decoder.split(state, split)
  seconds = time.perf_counter() - start
  references = datasets.references(decoder.data.builder, split)
  if set(captions) != set(references):  # The padding and masking's promise.
    raise RuntimeError(f'decoded {len(captions)} of {len(references)} images')
  metrics = score(references, captions, decoder.config.decode.meteor)
  name = f'{split}_step{step}'
  info = {
      'split': split, 'step': step, 'images': len(captions),
      'search': dataclasses.asdict(decoder.options),
      'decode_seconds': round(seconds, 3),
      'captions_per_second': round(len(captions) / seconds, 1),
  }
  if jax.process_index() == 0:
    directory = os.path.join(workdir, 'decode')
    os.makedirs(directory, exist_ok=True)
    results = [{'image_id': i, 'caption': captions[i]}
               for i in sorted(captions)]
    _write_json(os.path.join(directory, f'{name}.json'), results)
    _write_json(os.path.join(directory, f'{name}_metrics.json'),
                {'metrics': metrics, **info})
    print(table(metrics, info), flush=True)
  writer.write_scalars(step, {f'{split}/{k}': v for k, v in metrics.items()})
  return metrics


def table(metrics: dict[str, float], info: dict[str, Any]) -> str:
  return (f'{info["split"]} at step {info["step"]}, beam '
          f'{info["search"]["beam_size"]}, {info["captions_per_second"]:g} '
          f'captions/s:\n' + metrics_lib.format_table(metrics, info['images']))


def _agree(value):
  """Process 0's `value`, on every process."""
  if jax.process_count() == 1:
    return value
  return multihost_utils.broadcast_one_to_all(np.asarray(value)).item()


def _write_json(path: str, value: Any) -> None:
  # Written whole, then renamed: a reader never sees half a file.
  with open(path + '.tmp', 'w') as f:
    json.dump(value, f, indent=1)
  os.replace(path + '.tmp', path)


# ----------------------------------------------------------------------------
# The jobs.
# ----------------------------------------------------------------------------


class _Job:
  """What the decode jobs share: data, model, checkpoints, writer."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    # pylint: disable=g-import-not-at-top
    from clu import metric_writers
    from capjax import checkpoint as checkpoint_lib
    from capjax import state as state_lib
    # pylint: enable=g-import-not-at-top
    self.config = config
    self.workdir = workdir
    self.data = prepare_lib.prepare(config, workdir)
    self.par = parallel.Parallel(config)
    model = models.build_captioner(config.model, len(self.data.vocab),
                                 config.data.normalization)
    self.abstract = state_lib.abstract(config, model, self.par.replicated)
    self.meta = checkpoint_lib.meta(config, self.data.vocab)
    self.checkpoints = checkpoint_lib.Checkpoints(
        os.path.join(os.path.abspath(workdir), 'checkpoints'), config,
        create=False)
    self.decoder = BatchDecoder(config, self.par, model, self.data,
                               SearchOptions.of(config.decode))
    self.writer = metric_writers.create_default_writer(
        os.path.join(workdir, 'decode'),
        just_logging=jax.process_index() != 0)

  def evaluate(self, step: int | None) -> tuple[int, dict[str, float]]:
    state, step = self.checkpoints.restore_state(self.abstract, self.meta,
                                                 step)
    metrics = evaluate_split(self.decoder, self.par.put_state(state), step,
                             self.config.decode.split, self.workdir,
                             self.writer)
    self.writer.flush()
    return step, metrics

  def done(self, step: int) -> bool:
    name = f'{self.config.decode.split}_step{step}_metrics.json'
    return os.path.exists(os.path.join(self.workdir, 'decode', name))

  def close(self):
    self.checkpoints.close()
    self.writer.close()


def decode_checkpoint(config: ml_collections.ConfigDict,
                      workdir: str) -> dict[str, float]:
  """--mode=decode: one checkpoint (decode.checkpoint_step, or the latest)."""
  step = config.decode.checkpoint_step
  job = _Job(config, workdir)
  try:
    return job.evaluate(None if step < 0 else step)[1]
  finally:
    job.close()


def evaluate_continuously(config: ml_collections.ConfigDict,
                          workdir: str) -> None:
  """--mode=evaluate_continuously: decodes each new checkpoint as it lands.

  Checkpoints already decoded (their metrics file exists) are skipped, so a
  restarted sidecar goes on where it was; when it falls behind, it decodes
  the newest checkpoint and skips the ones in between. It stops after
  decoding the last training step, or after decode.timeout_seconds without a
  new checkpoint.
  """
  dc = config.decode
  job = _Job(config, workdir)
  last_new = time.monotonic()
  latest = -1
  try:
    while True:
      # Every process decodes the step process 0 sees, or none.
      newest = _agree(max(job.checkpoints.steps(), default=-1))
      if newest > latest:
        latest, last_new = newest, time.monotonic()
        if not _agree(job.done(latest)):
          try:
            job.evaluate(latest)
          except FileNotFoundError:  # Deleted by the trainer's policy.
            logging.warning('Checkpoint %d went away; waiting for the next.',
                            latest)
        if latest >= config.train.num_steps:
          logging.info('Decoded the last step (%d); done.', latest)
          return
      elif time.monotonic() - last_new > dc.timeout_seconds:
        logging.info('No new checkpoint for %d s; stopping.',
                     dc.timeout_seconds)
        return
      else:
        time.sleep(dc.poll_seconds)
  finally:
    job.close()
