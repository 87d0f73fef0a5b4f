r"""Tuning configs/coco.py's decoder on its frozen-encoder phase.

  python -m capjax.tune --config=configs/coco.py --sweep=configs/sweeps/coco.py \
      --workdir=/shared/tune/coco --config.data.data_dir=/data/tensorflow_datasets
  # or, a SLURM array on one shared study:
  CONFIG=configs/coco.py SWEEP=configs/sweeps/coco.py WORKDIR=/shared/tune/coco \
      sbatch --array=0-7 launch/slurm_tune.sbatch

Each trial trains the decoder alone for 2,213 steps (5 epochs at batch 256;
more or fewer at the other batch sizes) over the
ImageNet encoder's cached features (`data.features`: the encoder runs once
over COCO for the whole study, not once per trial), and is validated on all
of val every epoch. Hyperband stops the weak trials after 1 or 3 epochs.
The best trial's config file is the full recipe (30 epochs, the encoder
fine-tuned from epoch 20) with the tuned values; the encoder's own rate is
not searched here, since the trials never train the encoder.
"""

from capjax.tuning.sweep import Sweep, categorical, log_uniform, uniform

# configs/coco.py's arithmetic: 113,287 training images.
EPOCH_STEPS_256 = 443


def get_sweep():
  return Sweep(
      space={
          'train.learning_rate': log_uniform(1e-4, 2e-3),  # Decoder's peak.
          'batch_size': categorical(128, 256, 512),
          'model.decoder.dropout': uniform(0.2, 0.6),
          'train.attention_penalty': log_uniform(0.1, 2.0),  # Xu's lambda.
          'train.label_smoothing': uniform(0.0, 0.2),
      },
      metric='val_CIDEr',  # Greedy CIDEr-D on val.
      direction='maximize',
      overrides={
          'model.encoder.frozen': True,
          'train.encoder_from_step': 0,
          'data.features.use': True,
          'train.num_steps': 5 * EPOCH_STEPS_256,
          'train.warmup_steps': EPOCH_STEPS_256,
          'train.checkpoint_every_steps': EPOCH_STEPS_256,
          'evals.val.every_steps': EPOCH_STEPS_256,
          'evals.val.num_batches': -1,  # All of val, whatever the batch.
          'evals.test.every_steps': -1,
      },
      trials=40,
      sampler='tpe',
      startup_trials=10,
      pruner='hyperband',
      enqueue=[{
          'train.learning_rate': 4e-4,
          'batch_size': 256,
          'model.decoder.dropout': 0.5,
          'train.attention_penalty': 1.0,
          'train.label_smoothing': 0.0,
      }],
      # Preemptible clusters: a silent worker's trial is retried after 5 min.
      heartbeat_seconds=60,
      grace_seconds=300,
  )
