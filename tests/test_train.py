"""The train step, its two data-parallel wrappers, and the training job."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from capjax import evaluate
from capjax import inference
from capjax import report
from capjax import train
from capjax.errors import UserError
import preload
from conftest import REPO
from conftest import coco_config
from conftest import coco_data_source
from conftest import saved_state
from conftest import tiny_coco_training
from conftest import torch_state_dict

def _params(workdir):
  """The newest checkpoint's parameters, read back from disk."""
  manager = ocp.CheckpointManager(os.path.join(workdir, 'checkpoints'))
  step = manager.latest_step()
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore()))
  manager.close()
  return step, restored['state']['params']


def _assert_same(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


def _copy(trained_workdir, tmp_path, config):
  """The shared 6-step run of configs/test.py (checkpoints 3 and 6), to
  change, and `config` set as it was trained: the resume and fallback
  tests train on from it."""
  shutil.copytree(trained_workdir, tmp_path, dirs_exist_ok=True)
  config.evals.val.num_batches = 1
  config.evals.test.every_steps = -1  # No final decode: not checked.


@pytest.mark.parametrize('decoder', ['updown', 'transformer'])
def test_resume_of_each_decoder_is_bit_exact(test_config, tmp_path, decoder):
  """As the next test does for show_attend_tell, on a run of its own: 4
  steps, cut back to step 2 and resumed to 4, against the straight run."""
  config = test_config
  config.model.decoder.name = decoder
  config.model.decoder.dropout = 0.1  # Its random streams resume too.
  config.train.num_steps, config.train.checkpoint_every_steps = 4, 2
  config.evals.val.every_steps = config.evals.test.every_steps = -1
  straight = train.train_and_evaluate(config, str(tmp_path / 'a'))
  shutil.copytree(tmp_path / 'a', tmp_path / 'b')
  shutil.rmtree(tmp_path / 'b' / 'checkpoints' / '4')
  resumed = train.train_and_evaluate(config, str(tmp_path / 'b'))
  assert int(resumed.step) == 4
  _assert_same(straight.params, resumed.params)
  _assert_same(jax.tree.leaves(straight.opt_state),
               jax.tree.leaves(resumed.opt_state))
  # The caption API: a caption, and its attention over the 8x8 grid for each
  # of its words and its <eos>; the HTML report draws it.
  image = np.random.default_rng(0).integers(0, 256, (40, 40, 3), np.uint8)
  result, = inference.Captioner.from_workdir(
      str(tmp_path / 'b'), beam_size=2).caption([image], attention=True,
                                                keep_pixels=True)
  words = result.caption.split()
  assert result.attention.shape[1:] == (8, 8)
  assert len(words) <= len(result.attention) <= len(words) + 1
  np.testing.assert_allclose(result.attention.sum((1, 2)), 1, rtol=1e-5)
  report.write_html([result], str(tmp_path / 'report.html'), title='t',
                    attention=True)
  assert (tmp_path / 'report.html').read_text().count('<img') > 1
  # The sidecar decodes the run's checkpoints, the last one included.
  sidecar = config.copy_and_resolve_references()
  sidecar.decode.split = 'validation'
  sidecar.decode.poll_seconds = sidecar.decode.timeout_seconds = 0
  evaluate.evaluate_continuously(sidecar, str(tmp_path / 'a'))
  assert os.path.exists(tmp_path / 'a' / 'decode' /
                        'validation_step4_beam3_metrics.json')
  # The checkpoints record the decoder: another one is refused in one line.
  config.model.decoder.name = 'show_attend_tell'
  with pytest.raises(UserError, match=f'belong to a model with the {decoder} '
                     "decoder, not the --config.model.decoder.name="
                     "'show_attend_tell'"):
    train.train_and_evaluate(config, str(tmp_path / 'b'))


def test_resume_is_bit_exact(test_config, trained_workdir, tmp_path):
  # The shared 6-step run, cut back to its step 3 and resumed to 6, against
  # its own step 6 (validation, which it ran and this does not, draws from
  # streams of its own and leaves the state as it is).
  _copy(trained_workdir, tmp_path / 'b', test_config)
  shutil.rmtree(tmp_path / 'b' / 'checkpoints' / '6')
  resumed = train.train_and_evaluate(test_config, str(tmp_path / 'b'))
  assert int(resumed.step) == 6
  straight = saved_state(trained_workdir, 6)
  _assert_same(straight['params'], resumed.params)
  # As orbax reads it back without a target, a tuple is a list and a named
  # tuple a dict: the same leaves, in the same order.
  _assert_same(jax.tree.leaves(straight['opt_state']),
               jax.tree.leaves(resumed.opt_state))
  assert _params(str(tmp_path / 'b'))[0] == 6

  # Another model in the same workdir: refused, and nothing is touched.
  test_config.model.decoder.hidden_dim = 24
  with pytest.raises(UserError, match='model.decoder.hidden_dim: 16 -> 24'):
    train.train_and_evaluate(test_config, str(tmp_path / 'b'))
  assert sorted(os.listdir(tmp_path / 'b' / 'checkpoints')) == ['3', '6']
  test_config.model.decoder.hidden_dim = 16

  # Settings the saved data position or optimizer state cannot continue
  # with: one line naming the field; every checkpoint stays as it is.
  test_config.train.num_steps = 9
  for field, value, saved in (('batch_size', 16, 8),
                              ('train.grad_accum_steps', 2, 1),
                              ('train.grad_clip_norm', 0.0, 5.0)):
    changed = test_config.copy_and_resolve_references()
    *parents, name = field.split('.')
    (changed[parents[0]] if parents else changed)[name] = value
    with pytest.raises(UserError, match=(
        rf'--config.{field}={value!r}, but .* trained with {saved!r}')):
      train.train_and_evaluate(changed, str(tmp_path / 'b'))
    assert sorted(os.listdir(tmp_path / 'b' / 'checkpoints')) == ['3', '6']
  # A clipping threshold of another size is the same optimizer state.
  test_config.train.grad_clip_norm = 1.0
  assert int(train.train_and_evaluate(test_config,
                                      str(tmp_path / 'b')).step) == 9


def test_corrupted_latest_falls_back_to_the_previous(test_config,
                                                     trained_workdir,
                                                     tmp_path):
  _copy(trained_workdir, tmp_path, test_config)
  ckpt = tmp_path / 'checkpoints'
  for path in (ckpt / '6' / 'state').rglob('*'):
    if path.is_file():
      path.write_bytes(b'garbage')
  test_config.train.num_steps = 7
  state = train.train_and_evaluate(test_config, str(tmp_path))
  assert int(state.step) == 7  # From step 3, not from scratch.
  # The unreadable step is set aside, not deleted, and step 6 is redone.
  assert sorted(os.listdir(ckpt)) == ['3', '6', '7', 'unreadable-6']
  assert (ckpt / 'unreadable-6' / 'state').is_dir()


def test_a_newest_step_without_metadata_is_skipped(test_config,
                                                  trained_workdir, tmp_path):
  _copy(trained_workdir, tmp_path, test_config)
  ckpt = tmp_path / 'checkpoints'
  shutil.rmtree(ckpt / '6' / 'meta')
  test_config.train.num_steps = 7
  state = train.train_and_evaluate(test_config, str(tmp_path))
  assert int(state.step) == 7  # From step 3.
  assert sorted(os.listdir(ckpt)) == ['3', '6', '7', 'unreadable-6']


def test_foreign_checkpoint_directory(test_config, tmp_path):
  (tmp_path / 'checkpoints' / '5' / 'model').mkdir(parents=True)
  (tmp_path / 'checkpoints' / '5' / 'model' / 'weights.bin').write_bytes(b'x')
  with pytest.raises(UserError, match='capjax did not write'):
    train.train_and_evaluate(test_config, str(tmp_path))
  assert (tmp_path / 'checkpoints' / '5' / 'model' / 'weights.bin').exists()


def _job(workdir, data_dir, steps):
  return preload.Popen(
      [sys.executable, '-m', 'capjax.main', '--config=configs/test.py',
       f'--workdir={workdir}', f'--config.data.data_dir={data_dir}',
       f'--config.train.num_steps={steps}', '--config.train.log_every_steps=1',
       # The cosine decay depends on num_steps, which differs between the
       # interrupted run and the reference; a constant rate does not.
       '--config.train.schedule=constant',
       '--config.train.checkpoint_every_steps=1000',
       '--config.evals.val.every_steps=1000'],
      cwd=REPO, text=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_sigterm_saves_and_resumes_exactly(shapes_data_dir, test_config,
                                          tmp_path):
  job = _job(tmp_path / 'run', shapes_data_dir, 1000)
  # Preempt once training is under way.
  lines = []
  deadline = time.time() + 240
  for line in job.stderr:
    lines.append(line)
    if '[3] train/loss' in line.replace('train/attention', 'train/loss'):
      break
    assert time.time() < deadline, ''.join(lines[-20:])
  job.send_signal(signal.SIGTERM)
  _, err = job.communicate(timeout=120)
  assert job.returncode == 0, err[-3000:]
  assert 'SIGTERM received: saved step' in err
  stopped, _ = _params(str(tmp_path / 'run'))
  assert 3 <= stopped < 1000
  # Resumed to two steps further, and the reference straight there: in this
  # process, as `_job` trains (its final decode, which leaves the state as
  # it is, left out).
  target = stopped + 2
  test_config.train.update(num_steps=target, log_every_steps=1,
                           schedule='constant', checkpoint_every_steps=1000)
  test_config.evals.val.every_steps = 1000
  test_config.evals.test.every_steps = -1
  train.train_and_evaluate(test_config, str(tmp_path / 'run'))
  train.train_and_evaluate(test_config, str(tmp_path / 'straight'))
  step_a, a = _params(str(tmp_path / 'run'))
  step_b, b = _params(str(tmp_path / 'straight'))
  assert step_a == step_b == target
  _assert_same(a, b)


def test_coco_config_trains_on_mock_data(tmp_path):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  # pylint: disable-next=g-import-not-at-top
  from safetensors import numpy as safetensors_numpy
  from capjax import pretrained  # pylint: disable=g-import-not-at-top
  config = tiny_coco_training(coco_config())
  # The config's ImageNet weights, as a local file of the tiny encoder's.
  weights = {k: v for k, v in torch_state_dict('resnet_tiny', 0).items()
             if not k.startswith('fc.')}
  safetensors_numpy.save_file(weights, str(tmp_path / 'tiny.safetensors'))
  config.model.encoder.pretrained = str(tmp_path / 'tiny.safetensors')
  with tfds.testing.mock_data(as_data_source_fn=coco_data_source):
    state = train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert int(state.step) == 2
  # The config's final test decode ran over the (mock) Karpathy test split.
  results = json.loads(
      (tmp_path / 'run' / 'decode' / 'test_step2_beam3.json').read_text())
  assert results and all(set(r) == {'image_id', 'caption'} for r in results)
  # 2 steps are within the COCO config's frozen phase: the encoder holds the
  # file's weights, untouched.
  assert config.train.encoder_from_step > 2 and not config.model.encoder.frozen
  loaded = pretrained.import_torch_resnet(weights, 'resnet_tiny')
  _assert_same(state.params['encoder'], loaded['params'])
  _assert_same(state.batch_stats['encoder'], loaded['batch_stats'])


def _moved(tree, before):
  """Per leaf: whether any of its values changed."""
  return jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != b)), tree,
                      before)


def _encoder_adam(state):
  """The encoder's (ConditionallyMaskState, ScaleByAdamState)."""
  _, partition = state.opt_state  # chain(clip_by_global_norm, partition)
  masked = partition.inner_states['encoder'].inner_state
  return masked, masked.inner_state[0]


def test_frozen_phase_then_fine_tuning(test_config, tmp_path):
  """Until train.encoder_from_step the job runs the frozen model's step (no
  encoder backward pass); then the encoder trains, its AdamW fresh."""
  config = test_config
  config.model.encoder.frozen = False
  config.model.encoder.freeze_bn = False  # So BatchNorm would move, if run.
  # 4 images per device: BatchNorm over one image's small feature grid
  # would normalise it to about 0, and pass little gradient to the encoder.
  config.batch_size = 32
  config.train.encoder_from_step = 2
  config.train.allow_random_frozen_encoder = True  # Random, frozen 2 steps.
  config.evals.val.every_steps = -1
  config.evals.test.every_steps = -1
  workdir = str(tmp_path / 'run')
  config.train.num_steps = 0
  initial = jax.tree.map(np.asarray, train.train_and_evaluate(config, workdir))
  config.train.num_steps = 2
  frozen = train.train_and_evaluate(config, workdir)
  # The encoder, BatchNorm statistics included, bit for bit; its AdamW has
  # counted the steps but not started.
  _assert_same(frozen.params['encoder'], initial.params['encoder'])
  _assert_same(frozen.batch_stats['encoder'], initial.batch_stats['encoder'])
  assert any(jax.tree.leaves(_moved(frozen.params['decoder'],
                                    initial.params['decoder'])))
  mask, adam = _encoder_adam(frozen)
  assert int(mask.step) == 2 and int(adam.count) == 0
  assert all(not np.any(m) for m in jax.tree.leaves(adam.mu))

  config.train.num_steps = 4  # Resumes at step 2: fine-tuning.
  tuned = train.train_and_evaluate(config, workdir)
  mask, adam = _encoder_adam(tuned)
  assert int(mask.step) == 4 and int(adam.count) == 2
  assert all(jax.tree.leaves(_moved(tuned.params['encoder'],
                                    initial.params['encoder'])))
  assert all(jax.tree.leaves(_moved(tuned.batch_stats['encoder'],
                                    initial.batch_stats['encoder'])))


def test_pmap_job_trains_evaluates_and_checkpoints(test_config, tmp_path):
  test_config.parallel = 'pmap'
  test_config.evals.test.every_steps = -1  # Validation is what is checked.
  test_config.train.num_steps = 3
  state = train.train_and_evaluate(test_config, str(tmp_path))
  assert int(state.step) == 3
  step, params = _params(str(tmp_path))
  assert step == 3
  _assert_same(params, state.params)
  # TensorBoard summaries, with the eval metrics among them.
  from tensorboard.backend.event_processing import event_file_loader  # pylint: disable=g-import-not-at-top
  events, = [f for f in os.listdir(tmp_path) if 'events' in f]
  tags = {v.tag for e in event_file_loader.EventFileLoader(
      str(tmp_path / events)).Load() for v in e.summary.value}
  assert {'train/loss', 'train/learning_rate', 'eval/val_loss',
          'eval/val_CIDEr', 'eval/val_BLEU-4', 'eval/samples'} <= tags
