r"""Tuning the embedded default, configs/shapes.py, in about 20 minutes on
2 CPU cores:

  python -m capjax.tune --config=configs/shapes.py \
      --sweep=configs/sweeps/shapes.py --workdir=runs/tune-shapes --workers=2

Each trial is a shortened run (600 steps, a quarter of the 2,200; the
cosine decay ends at step 600), validated every 150 steps on all 1,000
validation images; the median pruner stops a trial whose greedy CIDEr-D
is below the median of the earlier trials' at the same step, from step 300
on. The first trial is the shipped config's values, measured on the same
terms as the others.
"""

from capjax.tuning.sweep import Sweep, categorical, log_uniform, uniform


def get_sweep():
  return Sweep(
      space={
          # The decoder's peak learning rate and the encoder's (shapes trains
          # its encoder from scratch, with the same 3e-3 by default).
          'train.learning_rate': log_uniform(1e-3, 1e-2),
          'train.encoder_learning_rate': log_uniform(1e-3, 1e-2),
          'batch_size': categorical(32, 64, 128),
          'model.decoder.dropout': uniform(0.0, 0.3),
          # Xu et al.'s lambda; the default 0.1 is light (16 positions).
          'train.attention_penalty': log_uniform(0.01, 1.0),
      },
      metric='val_CIDEr',  # Validation's greedy CIDEr-D.
      direction='maximize',
      overrides={
          'train.num_steps': 600,
          'train.checkpoint_every_steps': 150,
          'evals.val.every_steps': 150,
          'evals.val.num_batches': -1,  # All 1,000 images, whatever the batch.
          'evals.val.num_samples': 0,
          # No final test decodes: the study compares validation only.
          'evals.test.every_steps': -1,
          'evals.test_novel.every_steps': -1,
      },
      trials=20,
      sampler='tpe',
      startup_trials=8,  # Random trials before TPE models the results.
      pruner='median',
      pruner_startup_trials=4,
      pruner_warmup_steps=300,  # Steps 150 favour big batches: no pruning.
      enqueue=[{
          'train.learning_rate': 3e-3,
          'train.encoder_learning_rate': 3e-3,
          'batch_size': 64,
          'model.decoder.dropout': 0.0,
          'train.attention_penalty': 0.1,
      }],
  )
