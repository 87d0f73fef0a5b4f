"""The evaluation jobs: decode and score a split with saved checkpoints.

  python -m capjax.main --config=CONFIG --workdir=DIR --mode=decode
  python -m capjax.main --config=CONFIG --workdir=DIR \
      --mode=evaluate_continuously     # a sidecar to a training job

Both run the `decode_split` evaluator (`capjax.evaluators.DecodeSplit`) on
`config.decode.split`: COCO results and metrics files in DIR/decode/, and
the metrics in the TensorBoard logs there.
"""

import os
import time

from absl import logging
import jax
import ml_collections

from capjax import cache_features
from capjax import checkpoint as checkpoint_lib
from capjax import concepts as concepts_lib
from capjax import config as config_lib
from capjax import evaluators
from capjax.evaluators import common as evaluators_common
from capjax import models
from capjax import parallel
from capjax import workdir as workdir_lib
from capjax.data import prepare


class _Job:
  """What the evaluation jobs share: data, model, evaluator, writer."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    self.config = config
    self.workdir = workdir
    self.data = prepare.prepare(config, workdir)
    self.par = parallel.Parallel(config)
    concepts = concepts_lib.for_run(config, self.data.builder, workdir)
    self.predict = models.Predict(models.build_captioner(
        config.model, len(self.data.vocab), config.data.normalization,
        concepts.sizes if concepts else (0, 0), max_len=config.data.max_len))
    self.checkpoints = checkpoint_lib.Checkpoints(
        workdir_lib.checkpoints_dir(workdir), config, create=False)
    self._evaluators = {}  # By feature cache folder (None: images).
    # Here, not at the top: clu's writers import TensorFlow (3 s), which a
    # job stopped by a mistake in its data or workdir does without.
    from clu import metric_writers  # pylint: disable=g-import-not-at-top
    self.writer = metric_writers.create_default_writer(
        workdir_lib.decode_dir(workdir),
        just_logging=jax.process_index() != 0)

  def evaluate(self, step: int | None) -> tuple[int, dict[str, float]]:
    state, step = workdir_lib.restore_trained(
        self.workdir, self.config, self.data.vocab, self.predict,
        self.par.replicated, step)
    metrics = self.evaluator(state).run(self.par.put_state(state), step,
                                        self.writer)
    self.writer.flush()
    return step, metrics

  def evaluator(self, state) -> evaluators.DecodeSplit:
    """The split's decoder, reading the features of `state`'s encoder when
    the feature cache is used (one per cache: a frozen encoder's)."""
    data = cache_features.attach(self.config, self.data, self.predict,
                                 state, self.par)
    key = data.features and data.features.folder
    if key not in self._evaluators:
      self._evaluators[key] = evaluators.DecodeSplit(
          'decode', config_lib.decode_split(self.config.decode.split),
          config=self.config, par=self.par, predict=self.predict, data=data,
          workdir=self.workdir)
    return self._evaluators[key]

  def done(self, step: int) -> bool:
    """Whether `step` has been decoded and scored already."""
    return os.path.exists(workdir_lib.decode_metrics_path(
        self.workdir, self.config.decode.split, step,
        evaluators_common.SearchOptions.of(self.config.decode).tag()))

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
  de = config.decode
  job = _Job(config, workdir)
  last_new = time.monotonic()
  latest = -1
  try:
    while True:
      # Every process decodes the step process 0 sees, or none.
      newest = evaluators_common.on_chief(
          lambda: max(job.checkpoints.steps(), default=-1))
      if newest > latest:
        latest, last_new = newest, time.monotonic()
        if not evaluators_common.on_chief(
            lambda: job.done(latest)):
          try:
            job.evaluate(latest)
          except FileNotFoundError:  # Deleted by the trainer's policy.
            logging.warning('Checkpoint %d went away; waiting for the next.',
                            latest)
          except checkpoint_lib.DamagedCheckpoint as e:
            # The trainer goes on writing steps: wait for an intact one.
            logging.warning('%s; waiting for the next.',
                            str(e).split('; ', 1)[0])
        if latest >= config.train.num_steps:
          logging.info('Decoded the last step (%d); done.', latest)
          return
      elif time.monotonic() - last_new > de.timeout_seconds:
        logging.info('No new checkpoint for %d s; stopping.',
                     de.timeout_seconds)
        return
      else:
        time.sleep(de.poll_seconds)
  finally:
    job.close()
