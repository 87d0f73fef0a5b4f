"""Decoding a whole split: COCO results files and the metrics papers report.

Each run writes, on process 0, in WORKDIR/decode/:

  <split>_step<STEP>.json          [{"image_id", "caption"}]: the COCO
                                   results format, the official caption
                                   evaluation's input
  <split>_step<STEP>_metrics.json  BLEU-1..4, METEOR, ROUGE-L, CIDEr-D,
                                   the object metrics where the dataset
                                   annotates objects, and how they were made

and logs the metrics as `<split>/<metric>`. Every image of the split is
decoded exactly once across all devices and processes: the batches are
padded and masked (`pipeline.eval_dataset`), and the padding rows dropped by
their mask. The search options are those of `config.decode`.
"""

from collections.abc import Callable
import dataclasses
import functools
import os
import time

import jax
import ml_collections
import numpy as np

from capjax import concepts as concepts_lib
from capjax import constrained
from capjax import files
from capjax import metrics as metrics_lib
from capjax import parallel
from capjax import workdir as workdir_lib
from capjax.data import pipeline
from capjax.errors import UserError
from capjax.evaluators import common
from capjax.metrics import objects as objects_lib


def _search(state, batch, phrase_table, *, predict, **options):
  """Per device: the best caption of each image of `batch`."""
  variables = state.variables()
  return common.search_rows(predict, variables, batch,
                            phrase_table=phrase_table, **options)


@functools.cache
def _compiled_search(par: parallel.Parallel, predict, max_len: int,
                     options: common.SearchOptions):
  # One wrapped (and so one compiled) search for every split decoded alike:
  # shapes' test and test_novel, a sidecar's every checkpoint.
  return par.map(functools.partial(_search, predict=predict, max_len=max_len,
                                   options=options))


class DecodeSplit:
  """The `decode_split` evaluator; `settings` is its `config.evals` entry
  (`split`, `every_steps`)."""

  def __init__(self, name: str, settings: ml_collections.ConfigDict, *,
               config: ml_collections.ConfigDict, par: parallel.Parallel,
               predict, data, workdir: str):
    self.name = name
    self.every_steps = settings.every_steps
    self.split = settings.split
    self._config = config
    self._par = par
    self._data = data
    self._workdir = workdir
    self.options = common.SearchOptions.of(config.decode)
    self._phrase_table = None
    if self.options.concepts:  # The phrases of the head's concepts.
      self._phrase_table = concepts_lib.phrase_table(
          concepts_lib.for_run(config, data.builder, workdir), data.vocab)
    self._constraints = None
    if self.options.constraints:  # Each image's phrases, from a file.
      self._constraints = constrained.load_constraints(
          self.options.constraints, data.vocab)
    self._search = _compiled_search(par, predict, config.data.max_len,
                                    self.options)

  def done(self, step: int) -> bool:
    """Whether the split was decoded and scored at `step` with these search
    options already (an end-of-run decode that a signal cut short is
    done again, those it finished are not)."""
    return os.path.exists(workdir_lib.decode_metrics_path(
        self._workdir, self.split, step, self.options.tag()))

  def captions(self, state, stop: Callable[[], bool] | None = None
               ) -> dict[int, str]:
    """Captions of every image of the split, by image id.

    `stop()`, asked after every batch (the same batches on every process),
    ends the decode with `common.Interrupted` when it says so.
    """
    batch_size = self._config.decode.batch_size or self._config.batch_size
    if batch_size % jax.device_count():
      raise UserError(f'--config.decode.batch_size={batch_size} is not '
                      f'divisible by the {jax.device_count()} devices')
    batches = pipeline.eval_dataset(
        self._config, self._data.source(self.split), self._data.vocab,
        batch_size=batch_size // jax.process_count())
    captions = {}
    for batch in batches:
      rows = {k: batch[k] for k in ('image', 'features', 'image/id', 'mask')
              if k in batch}
      if self._constraints is not None:
        phrases, none = self._constraints
        rows['phrases'] = np.stack([phrases.get(int(i), none)
                                    for i in batch['image/id']])
      out = self._par.fetch(self._search(state, self._par.put_batch(rows),
                                         self._phrase_table))
      captions.update(common.captions_of(out, self._data.vocab))
      if stop and stop():
        raise common.Interrupted(self.name)
    return captions

  def run(self, state, step: int, writer,
          stop: Callable[[], bool] | None = None) -> dict[str, float]:
    """Decodes the split, scores it and writes the results files; `stop`:
    see `captions` (nothing is written then)."""
    start = time.perf_counter()
    captions = self.captions(state, stop)
    seconds = time.perf_counter() - start
    info = {
        'split': self.split, 'step': step, 'images': len(captions),
        'search': dataclasses.asdict(self.options),
        'decode_seconds': round(seconds, 3),
        'captions_per_second': round(len(captions) / seconds, 1),
    }
    metrics = common.on_chief(functools.partial(self._score, captions, info))
    writer.write_scalars(step,
                         {f'{self.split}/{k}': v for k, v in metrics.items()})
    return metrics

  def _score(self, captions: dict[int, str], info: dict) -> dict[str, float]:
    """On process 0: the metrics, the results files and the table."""
    references = self._data.references(self.split)
    if set(captions) != set(references):  # The padding and masking's promise.
      raise UserError(f'decoded {len(captions)} of the {len(references)} '
                      f'images of {self.split}: its image ids are not unique')
    metrics = common.score_captions(references, captions,
                                    self._config.decode.meteor)
    if annotated := self._data.objects(self.split):
      # Which of the image's objects the captions name, and which they make
      # up (capjax.metrics.objects).
      kind, objects, names = annotated
      object_metrics, counts = objects_lib.score(kind, captions, objects,
                                                 names)
      metrics |= object_metrics
      info = dict(info, objects=counts)
    os.makedirs(workdir_lib.decode_dir(self._workdir), exist_ok=True)
    files.remove_leftovers(workdir_lib.decode_dir(self._workdir))
    where = (self._workdir, self.split, info['step'], self.options.tag())
    common.write_json(
        workdir_lib.decode_results_path(*where),
        [{'image_id': i, 'caption': captions[i]} for i in sorted(captions)])
    common.write_json(workdir_lib.decode_metrics_path(*where),
                      {'metrics': metrics, **info})
    print(table(metrics, info), flush=True)
    return metrics


def table(metrics: dict[str, float], info: dict) -> str:
  """The metrics of one decoded split, as printed."""
  return (f'{info["split"]} at step {info["step"]}, beam '
          f'{info["search"]["beam_size"]}, {info["captions_per_second"]:g} '
          f'captions/s:\n' + metrics_lib.format_table(metrics, info['images']))
