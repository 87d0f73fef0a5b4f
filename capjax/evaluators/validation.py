"""Validation during training: loss, decoded captions, their metrics.

For the first `num_batches` batches of the split (padded and masked, so
every process runs as many): the teacher-forced loss of the batch's
captions, and a caption decoded for each image with `beam_size`, scored
against the image's references with BLEU, ROUGE-L and CIDEr-D (no METEOR:
its Java start-up would cost more than the rest). The encoder runs once
per batch for both. One of them, `train.best_metric` (`val_CIDEr`), picks
the best checkpoint.
"""

from collections.abc import Callable
import functools

from absl import logging
import jax
import ml_collections
import numpy as np

from capjax import config as config_lib
from capjax import losses
from capjax import parallel
from capjax.data import pipeline
from capjax.evaluators import common

# What `run` returns and logs, each as <evaluator name>_<metric>.
METRICS = tuple(config_lib.VALIDATION_METRICS)


def _validate(state, batch, *, predict, config, options):
  """Per device: the loss sums of `batch` and its decoded captions."""
  variables = state.variables()
  features = predict.encode(variables, batch)  # [b, P, C]
  logits, alphas = predict.logits(variables, features, batch['captions'])
  sums = losses.caption_losses(logits, batch['captions'], alphas,
                               batch['mask'], config.train.label_smoothing)
  rows = common.search_rows(predict, variables, batch,
                            max_len=config.data.max_len, options=options,
                            features=features)
  # One row of sums per device, added up on the host.
  return rows | {'sums': jax.tree.map(lambda x: x[None], sums)}


class Validation:
  """The `validation` evaluator; `settings` is its `config.evals` entry."""

  def __init__(self, name: str, settings: ml_collections.ConfigDict, *,
               config: ml_collections.ConfigDict, par: parallel.Parallel,
               predict, data, workdir: str):
    del workdir  # Validation writes no files.
    self.name = name
    self.every_steps = settings.every_steps
    self.split = settings.split
    self.num_batches = settings.num_batches
    self.num_samples = settings.num_samples
    self._config = config
    self._par = par
    self._data = data
    self._source = data.source(self.split)
    # Scoring happens on process 0 alone, so only it reads the references.
    self._references = (data.references(self.split)
                        if jax.process_index() == 0 else None)
    # The captioner's own captions, unconstrained: what training improves.
    options = common.SearchOptions.of(config.decode,
                                      beam_size=settings.beam_size,
                                      concepts=False, constraints='')
    self._step = par.map(functools.partial(
        _validate, predict=predict, config=config, options=options))

  def done(self, step: int) -> bool:
    """Validation writes no files: never done before it runs."""
    del step
    return False

  def run(self, state, step: int, writer,
          stop: Callable[[], bool] | None = None) -> dict[str, float]:
    """The metrics (`<name>_loss`, `<name>_CIDEr`, ...), logged at `step`.

    `stop()`, asked after every batch (the same batches on every process),
    ends it with `common.Interrupted`, nothing logged, when it says so.
    """
    vocab = self._data.vocab
    totals, captions = None, {}
    batches = pipeline.eval_dataset(self._config, self._source, vocab)
    for i, batch in enumerate(batches):
      if i == self.num_batches:
        break
      out = self._par.fetch(self._step(state, self._par.put_batch(batch)))
      sums = jax.tree.map(lambda x: np.sum(x, 0), out.pop('sums'))
      totals = sums if totals is None else jax.tree.map(np.add, totals, sums)
      captions.update(common.captions_of(out, vocab))
      if stop and stop():
        raise common.Interrupted(self.name)
    penalty = self._config.train.attention_penalty
    metrics = {
        'loss': float(losses.caption_loss(totals, penalty)),
        'cross_entropy': float(totals['ce'] / totals['tokens']),
        'token_accuracy': float(totals['correct'] / totals['tokens']),
    }
    metrics |= common.on_chief(lambda: common.score_captions(
        self._references, captions, meteor='none'))
    metrics = {f'{self.name}_{k}': v for k, v in metrics.items()}
    writer.write_scalars(step, {f'eval/{k}': v for k, v in metrics.items()})
    if jax.process_index() == 0:
      self._log_samples(step, captions, writer)
    return metrics

  def _log_samples(self, step: int, captions: dict[int, str], writer) -> None:
    samples = [f'image {i}: {captions[i]}\n'
               f'reference: {self._references[i][0]}'
               for i in list(captions)[:self.num_samples]]
    if samples:
      writer.write_texts(step, {'eval/samples': '\n\n'.join(samples)})
      for line in samples:
        logging.info('Sample: %s', line.replace('\n', ' | '))
