r"""Tuning the Transformer decoder on the embedded default, a short study:

  python -m capjax.tune --config=configs/shapes.py \
      --config.model.decoder.name=transformer \
      --sweep=configs/sweeps/shapes_transformer.py \
      --workdir=runs/tune-shapes-transformer --workers=2

The trials are configs/sweeps/shapes.py's shortened runs (600 steps,
validated every 150 on all 1,000 validation images, median pruning from
step 300 on), over what a Transformer is thought sensitive to: its
learning rate and warm-up, dropout, and whether Show, Attend and Tell's
attention penalty suits it. The first trial is configs/shapes.py's own
values; the second, the usual Transformer choices (a lower learning rate,
dropout 0.1 as Vaswani et al. 2017, no attention penalty). On 2 CPU cores
(README, "The three decoders on the embedded default") the first was best.
"""

from capjax.tuning.sweep import Sweep, categorical, log_uniform, uniform

from configs.sweeps import shapes


def get_sweep():
  sweep = shapes.get_sweep()
  return Sweep(
      space={
          'train.learning_rate': log_uniform(3e-4, 3e-3),
          'train.warmup_steps': categorical(100, 300),
          'model.decoder.dropout': uniform(0.0, 0.3),
          'train.attention_penalty': categorical(0.0, 0.1),
      },
      metric=sweep.metric,
      direction=sweep.direction,
      overrides=sweep.overrides,
      trials=8,
      sampler='tpe',
      startup_trials=4,
      pruner='median',
      pruner_startup_trials=3,
      pruner_warmup_steps=sweep.pruner_warmup_steps,
      enqueue=[
          {'train.learning_rate': 3e-3, 'train.warmup_steps': 100,
           'model.decoder.dropout': 0.0, 'train.attention_penalty': 0.1},
          {'train.learning_rate': 1e-3, 'train.warmup_steps': 100,
           'model.decoder.dropout': 0.1, 'train.attention_penalty': 0.0},
      ],
  )
