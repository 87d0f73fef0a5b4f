"""What a training run starts from: its data, model, optimizer, objective and
first state (the newest checkpoint, else `init_from`'s weights, else the
pretrained or random ones).

Training starts here, and so does the feature cache's job, which must
encode with the very weights training will use.
"""

import dataclasses
import functools
import os
import shutil

from absl import logging
import jax
import ml_collections

from capjax import checkpoint as checkpoint_lib
from capjax import concepts as concepts_lib
from capjax import models
from capjax import objectives
from capjax import optimizer
from capjax import parallel
from capjax import pretrained
from capjax import state as state_lib
from capjax import workdir as workdir_lib
from capjax.data import prepare
from capjax.errors import UserError


@dataclasses.dataclass
class Start:
  """A run's parts, and its first state (canonical form) and step."""
  data: prepare.Data
  par: parallel.Parallel
  objective: objectives.Objective
  predict: models.Predict  # The one road to the model.
  meta: dict
  checkpoints: checkpoint_lib.Checkpoints
  state: state_lib.TrainState
  step: int  # 0, or the step of the checkpoint restored.
  step_rng: jax.Array  # What the train steps fold the step into.
  # What the concept head predicts (config.model.concepts.head), else None.
  concepts: concepts_lib.Concepts | None = None


def _copy_vocab(source_workdir: str, workdir: str) -> None:
  """A run started from another one's weights needs its token ids."""
  source = workdir_lib.vocab_path(source_workdir)
  target = workdir_lib.vocab_path(workdir)
  if os.path.exists(source) and not os.path.exists(target):
    os.makedirs(workdir, exist_ok=True)
    shutil.copyfile(source, target)


def start(config: ml_collections.ConfigDict, workdir: str) -> Start:
  """Prepares the data and restores (or makes) the state of a run.

  Close `checkpoints` when done.
  """
  t = config.train
  objectives.check(config)
  pretrained.check_random_frozen(config)
  if config.init_from and jax.process_index() == 0:
    _copy_vocab(checkpoint_lib.locate(config.init_from)[0], workdir)
  data = prepare.prepare(config, workdir)
  par = parallel.Parallel(config)
  objective = objectives.make(config, data)
  concepts = concepts_lib.for_run(config, data.builder, workdir)
  predict = models.Predict(models.build_captioner(
      config.model, len(data.vocab), config.data.normalization,
      concepts.sizes if concepts else (0, 0), max_len=config.data.max_len))
  init_rng, step_rng = jax.random.split(jax.random.key(config.seed))
  # Traced once: its output shapes are what a checkpoint restores into, and
  # a fresh run compiles the same trace.
  init = jax.jit(functools.partial(state_lib.create, config, predict, None),
                 out_shardings=par.replicated).trace(init_rng)
  abstract = init.out_info
  tx = optimizer.make(config, abstract.params)
  meta = checkpoint_lib.meta(config, data.vocab)
  checkpoints = checkpoint_lib.Checkpoints(
      workdir_lib.checkpoints_dir(workdir), config)
  restored = checkpoints.restore(abstract, meta)
  if restored:
    state, step = restored
  elif config.init_from:
    step = 0
    params, batch_stats, _ = checkpoint_lib.load_weights(
        config.init_from, config, abstract, meta)
    state = jax.jit(functools.partial(state_lib.fresh, tx=tx),
                    out_shardings=par.replicated)(params, batch_stats)
  elif objective.needs_init_from:
    raise UserError(f'--config.train.objective={t.objective} starts from a '
                    'cross-entropy model: set --config.init_from to its '
                    'workdir')
  else:
    step = 0
    encoder_weights = None
    if config.model.encoder.pretrained:
      # The ResNet's own variables, as the weight files hold them.
      encoder_abstract = {k: v['encoder'] for k, v in
                          abstract.variables(only='encoder').items()}
      encoder_weights = pretrained.load_encoder_weights(
          config.model.encoder, encoder_abstract)
    logging.info('Initialising the model (compiling its initialiser).')
    if encoder_weights is None:
      state = init.lower().compile()(init_rng)
    else:
      state = jax.jit(functools.partial(state_lib.create, config, predict, tx),
                      out_shardings=par.replicated)(init_rng, encoder_weights)
  if concepts:
    # Once the checkpoints are known to be this model's: a run refused
    # above leaves the workdir as it found it.
    concepts_lib.save_for_run(workdir, concepts)
  return Start(data=data, par=par, objective=objective, predict=predict,
               meta=meta, checkpoints=checkpoints, state=state, step=step,
               step_rng=step_rng, concepts=concepts)
