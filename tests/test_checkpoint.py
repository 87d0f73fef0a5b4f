"""Checkpoints (capjax.checkpoint) on a small pytree: what a user sees when
a save or a restore goes wrong, and what each job imports."""

import asyncio
import errno
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import types

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from capjax import checkpoint
from capjax.data.vocab import Vocab
from capjax.errors import UserError
import preload

# Not conftest's: the jobs these tests start import this module, and must
# import no more than a job would.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The state of the disk-full scenario: 256 KiB of random floats, which no
# compression shrinks.
_SHAPE = (256, 256)


def _config():
  from configs import test  # pylint: disable=g-import-not-at-top
  return test.get_config()


def _meta(hidden_dim=16, dropout=0.0):
  return {'model': {'decoder': {'hidden_dim': hidden_dim,
                                'dropout': dropout}},
          'vocab': {'size': 12, 'sha256': 'abc'}}


def _iterator(position=0):
  import grain  # pylint: disable=g-import-not-at-top
  iterator = iter(grain.MapDataset.range(10).to_iter_dataset())
  for _ in range(position):
    next(iterator)
  return iterator


def _state(value=1.0, leaves=1, shape=(4,)):
  return {'params': {f'w{i}': np.full(shape, value + i, np.float32)
                     for i in range(leaves)},
          'batch_stats': {'mean': np.full((2,), value, np.float32)},
          'step': np.int32(value)}


def _abstract(state):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                      state)


class _Shapes(types.SimpleNamespace):
  """A state's shapes as `load_weights` reads them (`TrainState`'s)."""

  def variables(self):
    return {'params': self.params, 'batch_stats': self.batch_stats}


def _save(directory, steps, leaves=1):
  """Checkpoints of `steps`, the state of step s filled with s."""
  ckpt = checkpoint.Checkpoints(str(directory), _config())
  iterator = _iterator()
  for step in steps:
    next(iterator)
    ckpt.save(step, _state(step, leaves), iterator, _meta())
  ckpt.close()


def _python(code, *args, new_interpreter=False):
  """Runs `code` in a process of its own, as a job would: forked from the
  preloaded process (tests/preload.py), or in a new interpreter where what
  it imports is the point."""
  env = dict(os.environ,
             PYTHONPATH=os.pathsep.join([REPO, os.path.join(REPO, 'tests')]))
  return (subprocess.run if new_interpreter else preload.run)(
      [sys.executable, '-c', code, *map(str, args)], cwd=REPO, env=env,
      text=True, capture_output=True, timeout=120, check=False)


# ------------------------------------------------------------- a full disk

def test_a_full_disk_is_one_line_naming_the_last_good_step(tmp_path,
                                                           monkeypatch):
  """Whichever call reports the failed write (a later save, wait or close)
  raises one line; other errors pass as they are."""
  directory = tmp_path / 'checkpoints'
  _save(directory, [1])
  ckpt = checkpoint.Checkpoints(str(directory), _config())
  ckpt.save(2, _state(2, shape=(1024,)), _iterator(2), _meta())
  ckpt.wait()
  shutil.rmtree(directory / '2')  # As if its write had failed.
  monkeypatch.setattr(shutil, 'disk_usage',
                      lambda _: types.SimpleNamespace(free=3 * 2**29))
  # The text tensorstore gives, and the error Python's own writes give.
  tensorstore = ValueError(
      'RESOURCE_EXHAUSTED: Error writing "params/w0/0" in OCDBT database at '
      f'local file "{directory}/2.orbax-checkpoint-tmp/state/": Failed to '
      'write 188758 bytes to file 4: No space left on device '
      "[os_error_code='28']")
  python = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
  for error in (tensorstore, python):
    monkeypatch.setattr(ckpt.manager, 'wait_until_finished', _raise(error))
    for call in (ckpt.wait, ckpt.close, lambda: ckpt.save(
        3, _state(3, shape=(1024,)), _iterator(3), _meta())):
      with pytest.raises(UserError) as raised:
        call()
      message = str(raised.value)
      assert '\n' not in message
      # The state saved last: 1024 + 2 floats and the step.
      assert message == (
          f'no space left for checkpoints in {directory}: a checkpoint needs '
          'about 4.0 KiB and 1.5 GiB are free. The last good checkpoint is '
          'step 1: free some space, then run again to resume from it')
  # Before the first step is complete, there is nothing to resume from.
  shutil.rmtree(directory / '1')
  with pytest.raises(UserError, match=(
      r'free\. No checkpoint is complete yet: free some space, then run '
      'again$')):
    ckpt.wait()
  monkeypatch.setattr(ckpt.manager, 'wait_until_finished',
                      _raise(ValueError('another error')))
  with pytest.raises(ValueError, match='another error'):
    ckpt.wait()
  monkeypatch.undo()
  ckpt.close()


def _raise(error):
  def fail():
    raise error
  return fail


def _fill(root, leave):
  """Fills the filesystem of `root` but for `leave` bytes; returns the
  filler's path."""
  path = os.path.join(root, 'filler')
  with open(path, 'wb') as f:
    f.write(b'\0' * (shutil.disk_usage(root).free - leave))
  return path


def _in_a_small_tmpfs(tmp_path, size, *argv, timeout):
  """conftest's `in_a_tmpfs` at tmp_path/mnt: (the mount point, the run)."""
  # Imported here: the jobs these tests start import this module, and must
  # import no more than a job would.
  from conftest import in_a_tmpfs  # pylint: disable=g-import-not-at-top
  mount_point = tmp_path / 'mnt'
  return mount_point, in_a_tmpfs(mount_point, *argv, size=size,
                                 timeout=timeout)


def _disk_full_scenario(root):
  """Fills the filesystem of `root` after step 1, then saves step 2.

  Prints, as JSON, the error that reached the caller, and what a new
  `Checkpoints` restores once space is freed.
  """
  checkpoint.quiet_reported_failures()  # As the entry points do.
  directory = os.path.join(root, 'checkpoints')
  state = {'params': {'w': np.random.default_rng(0).random(_SHAPE,
                                                            np.float32)}}
  ckpt = checkpoint.Checkpoints(directory, _config())
  iterator = _iterator(1)
  ckpt.save(1, state, iterator, _meta())
  ckpt.wait()
  filler = _fill(root, leave=64 * 1024)
  message = None
  try:
    # Step 2's write fails in the background; the call after it reports it.
    next(iterator)
    ckpt.save(2, state, iterator, _meta())
    next(iterator)
    ckpt.save(3, state, iterator, _meta())
    ckpt.wait()
  except UserError as e:
    message = str(e)
  ckpt.close()  # Quiet once the error was reported.
  listing = sorted(os.listdir(directory))
  os.remove(filler)
  ckpt = checkpoint.Checkpoints(directory, _config())
  iterator = _iterator()
  restored, step = ckpt.restore(_abstract(state), _meta())
  ckpt.restore_data(step, iterator)
  position = int(next(iterator))
  # The resumed run writes step 2 again, over what is left of it.
  ckpt.save(2, restored, iterator, _meta())
  ckpt.close()
  print(json.dumps({
      'message': message, 'listing': listing, 'step': step,
      'same': bool(np.array_equal(restored['params']['w'],
                                  state['params']['w'])),
      'next': position, 'after': sorted(os.listdir(directory))}))


# What is free once the disk is full, in the message.
_SOME = r'[0-9.]+ (B|KiB)'


def test_a_really_full_disk_keeps_earlier_checkpoints(tmp_path):
  """A small tmpfs, filled up, as the user's disk would be: the real error
  of the real write, reported as one line, with nothing else on stderr."""
  mount_point, proc = _in_a_small_tmpfs(
      tmp_path, '2m', sys.executable, '-c',
      'import sys, test_checkpoint; '
      'test_checkpoint._disk_full_scenario(sys.argv[1])', tmp_path / 'mnt',
      timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.splitlines()[-1])
  message = result['message'] or ''
  assert re.fullmatch(
      f'no space left for checkpoints in {re.escape(str(mount_point))}/'
      rf'checkpoints: a checkpoint needs about 256\.0 KiB and {_SOME} are '
      r'free\. The last good checkpoint is step 1: free some space, then run '
      'again to resume from it', message), (message, proc.stderr[-3000:])
  # Not a line of orbax's or tensorstore's report of it.
  assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  assert 'RESOURCE_EXHAUSTED' not in proc.stderr, proc.stderr[-3000:]
  # Step 1 is intact and resumes exactly, data position included; what
  # was written of step 2 is not taken for a checkpoint, and is replaced
  # when the resumed run saves step 2.
  first, unfinished = result['listing']
  assert first == '1' and unfinished.startswith('2.orbax-checkpoint-tmp')
  assert result['step'] == 1 and result['same'] and result['next'] == 1
  assert result['after'] == ['1', '2']


def _train_on_a_full_disk(root, data_dir):
  """Trains 3 steps in `root`, fills its disk and trains on to step 6, then
  frees it and trains again; prints what each run left on stderr."""
  def train(steps):
    return subprocess.run(
        [sys.executable, '-m', 'capjax.main', '--config=configs/test.py',
         f'--workdir={root}/run', f'--config.data.data_dir={data_dir}',
         f'--config.train.num_steps={steps}'],
        cwd=REPO, text=True, capture_output=True, timeout=500, check=False)
  runs = [train(3)]
  # Room for the logs of steps 4 to 6, not for a checkpoint (170 KiB with
  # configs/test.py's resnet_micro, and orbax needs more while it writes).
  filler = _fill(root, leave=128 * 1024)
  runs.append(train(6))
  os.remove(filler)
  runs.append(train(6))
  print(json.dumps({
      'runs': [(r.returncode, r.stderr) for r in runs],
      'steps': sorted(os.listdir(os.path.join(root, 'run', 'checkpoints')))}))


@pytest.mark.slow
def test_training_on_a_full_disk_stops_with_one_line(shapes_data_dir,
                                                     tmp_path):
  mount_point, proc = _in_a_small_tmpfs(
      tmp_path, '16m', sys.executable, '-c',
      'import sys, test_checkpoint; '
      'test_checkpoint._train_on_a_full_disk(*sys.argv[1:])',
      tmp_path / 'mnt', shapes_data_dir, timeout=1500)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.splitlines()[-1])
  (first, _), (code, err), (again, again_err) = result['runs']
  assert first == 0 and again == 0, again_err[-3000:]
  assert code == 1
  assert re.fullmatch(
      'capjax: error: no space left for checkpoints in '
      f'{re.escape(str(mount_point))}/run/checkpoints: a checkpoint needs '
      rf'about [0-9.]+ (KiB|MiB) and {_SOME} are free\. The last good '
      'checkpoint is step 3: free some space, then run again to resume '
      'from it',
      err.strip().splitlines()[-1]), err[-3000:]
  assert 'Traceback' not in err and 'RESOURCE_EXHAUSTED' not in err, (
      err[-3000:])
  assert result['steps'] == ['3', '6']


# --------------------------------------------------- an unreadable newest step

_RESTORE = '''
import sys
from capjax import checkpoint
import test_checkpoint as t
checkpoint.quiet_reported_failures()  # As the entry points do.
ckpt = checkpoint.Checkpoints(sys.argv[1], t._config())
iterator = t._iterator()
state, step = ckpt.restore(t._abstract(t._state(0, leaves=40)), t._meta())
ckpt.restore_data(step, iterator)
ckpt.close()
print(step, float(state['params']['w0'][0]), next(iterator))
'''


def test_a_missing_manifest_falls_back_quietly(tmp_path):
  """tensorstore's callbacks for the other leaves find orbax's event loop
  closed; that is no news for the user."""
  directory = tmp_path / 'checkpoints'
  # Many leaves: their reads are in flight when the first one fails.
  _save(directory, [1, 2], leaves=40)
  (directory / '2' / 'state' / 'manifest.ocdbt').unlink()
  proc = _python(_RESTORE, directory)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.split() == ['1', '1.0', '1']
  assert 'Event loop is closed' not in proc.stderr, proc.stderr[-3000:]
  assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  assert 'Checkpoint 2 is unreadable' in proc.stderr
  assert sorted(os.listdir(directory)) == ['1', 'unreadable-2']


def test_errors_of_reads_nobody_awaited_are_not_logged(caplog):
  """A damaged step fails each of orbax's concurrent reads; the restore
  reports the first, and asyncio would log the others' tracebacks."""
  checkpoint.quiet_reported_failures()  # As the entry points do.
  loop = asyncio.new_event_loop()
  with caplog.at_level('ERROR', logger='asyncio'):
    for text in ('DATA_LOSS: Error reading "params.w0/.zarray" '
                 "[tensorstore_spec='{}']", 'an error of something else'):
      loop.call_exception_handler({
          'message': 'Future exception was never retrieved',
          'exception': ValueError(text)})
  loop.close()
  assert 'an error of something else' in caplog.text
  assert 'DATA_LOSS' not in caplog.text


# ------------------------------------------------------ another model's steps

def test_another_models_checkpoint_is_named_by_each_reader(tmp_path):
  directory = tmp_path / 'checkpoints'
  _save(directory, [1])
  state = _state()
  other = _meta(hidden_dim=24)
  ckpt = checkpoint.Checkpoints(str(directory), _config())
  where = re.escape(str(directory))
  with pytest.raises(UserError, match=(
      rf'^the checkpoints in {where} belong to another model or vocabulary '
      r'\(model.decoder.hidden_dim: 16 -> 24\); use a new --workdir')):
    ckpt.restore(_abstract(state), other)
  with pytest.raises(UserError, match=(
      rf'^checkpoint 1 in {where} belongs to another model or vocabulary '
      r'\(model.decoder.hidden_dim: 16 -> 24\); decode with the config')):
    ckpt.restore_state(_abstract(state), other)
  ckpt.close()
  abstract = _Shapes(**_abstract(state))
  with pytest.raises(UserError, match=(
      rf'^--config.init_from={re.escape(str(tmp_path))} holds another model '
      r'or vocabulary \(model.decoder.hidden_dim: 16 -> 24\); start from a '
      'run')):
    checkpoint.load_weights(str(tmp_path), _config(), abstract, other)
  # A dropout rate leaves the parameters as they are.
  params, batch_stats, step = checkpoint.load_weights(
      str(tmp_path), _config(), abstract, _meta(dropout=0.3))
  assert step == 1
  np.testing.assert_array_equal(params['w0'], state['params']['w0'])
  np.testing.assert_array_equal(batch_stats['mean'],
                                state['batch_stats']['mean'])


def test_checkpoints_name_their_decoder_also_from_before_names(tmp_path):
  directory = tmp_path / 'checkpoints'
  _save(directory, [1])  # Its model record has no decoder name: an old run.
  config = _config()
  vocab = Vocab(['<pad>', '<bos>', '<eos>', '<unk>', 'a'])
  # Today's record of configs/test.py's model: a show_attend_tell decoder,
  # without the transformer's sizes, which it does not use.
  assert checkpoint.meta(config, vocab)['model']['decoder'] == {
      'name': 'show_attend_tell', 'embed_dim': 16, 'hidden_dim': 16,
      'attention_dim': 16, 'dropout': 0.5}
  ckpt = checkpoint.Checkpoints(str(directory), config)
  named = _meta()
  named['model']['decoder']['name'] = 'show_attend_tell'
  _, step = ckpt.restore(_abstract(_state()), named)
  assert step == 1
  # Another decoder: one line naming both.
  named['model']['decoder']['name'] = 'updown'
  with pytest.raises(UserError, match=(
      r'belong to a model with the show_attend_tell decoder, not the '
      r"--config.model.decoder.name='updown' asked for; use a new --workdir")):
    ckpt.restore(_abstract(_state()), named)
  ckpt.close()


def test_the_best_step_by_a_lower_is_better_metric_is_kept(tmp_path):
  config = _config()
  config.train.keep_checkpoints = 1
  config.train.best_metric = 'val_loss'
  ckpt = checkpoint.Checkpoints(str(tmp_path), config)
  iterator = _iterator()
  for step, loss in ((1, 3.0), (2, 1.0), (3, 2.0), (4, 5.0)):
    ckpt.save(step, _state(step), iterator, _meta(),
              {'val_loss': loss, 'val_CIDEr': 10.0 - step})
    ckpt.wait()
  ckpt.close()
  assert sorted(int(s) for s in os.listdir(tmp_path)) == [2, 4]


# ------------------------------------------------ bytes changed on the disk

def _save_random(directory, steps):
  """Steps whose one big leaf is random floats (stored uncompressed)."""
  ckpt = checkpoint.Checkpoints(str(directory), _config())
  iterator = _iterator()
  states = {}
  for step in steps:
    next(iterator)
    rng = np.random.default_rng(step)
    states[step] = {
        'params': {'w0': rng.standard_normal((256, 256)).astype(np.float32)},
        'batch_stats': {'mean': np.full((2,), step, np.float32)},
        'step': np.int32(step)}
    ckpt.save(step, states[step], iterator, _meta())
  ckpt.close()
  return states


def change_bytes(step_dir, every_file=False) -> None:
  """Inverts 8 bytes in the middle of a checkpoint step's largest array
  file (or of each), keeping its size: what a flaky disk or a bad copy
  does."""
  paths = sorted((p for p in pathlib.Path(step_dir, 'state').rglob('*')
                  if p.is_file() and p.parent.name == 'd'),
                 key=lambda p: p.stat().st_size)
  for path in paths if every_file else paths[-1:]:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 8] = bytes(255 - b for b in data[middle:middle + 8])
    path.write_bytes(bytes(data))


def test_changed_bytes_are_caught_by_every_restore(tmp_path, caplog):
  directory = tmp_path / 'checkpoints'
  states = _save_random(directory, [1, 2])
  change_bytes(directory / '2')
  abstract = _abstract(states[2])
  where = re.escape(str(directory))
  # The fault is real: orbax alone restores other values without a word.
  with ocp.CheckpointManager(str(directory)) as manager:
    silent = manager.restore(2, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract)))['state']
  assert not np.array_equal(silent['params']['w0'], states[2]['params']['w0'])

  # Jobs that only read: one line, naming the damaged step and the intact.
  ckpt = checkpoint.Checkpoints(str(directory), _config(), create=False)
  with pytest.raises(checkpoint.DamagedCheckpoint, match=(
      rf"^checkpoint 2 in {where} is damaged: 1 array differs from the "
      r"checksum saved with it \(\['params'\]\['w0'\]\); intact: 1; pick "
      r'one with --step=1$')):
    ckpt.restore_state(abstract, _meta(), step_flag='--step')
  state, step = ckpt.restore_state(abstract, _meta(), step=1)
  assert step == 1
  np.testing.assert_array_equal(state['params']['w0'],
                                states[1]['params']['w0'])
  ckpt.close()
  # init_from reads params and batch_stats only, and checks them too.
  with pytest.raises(checkpoint.DamagedCheckpoint, match=(
      rf'^--config.init_from=.*/2: checkpoint 2 in {where} is damaged: 1 '
      r"array differs .*; start from another of its steps \(1\)")):
    checkpoint.load_weights(
        str(directory / '2'), _config(),
        _Shapes(params=abstract['params'],
                batch_stats=abstract['batch_stats']), _meta())

  # Training sets the step aside and resumes from the one before.
  ckpt = checkpoint.Checkpoints(str(directory), _config())
  iterator = _iterator()
  with caplog.at_level('WARNING'):
    state, step = ckpt.restore(abstract, _meta())
    ckpt.restore_data(step, iterator)
  ckpt.close()
  assert step == 1 and next(iterator) == 1
  np.testing.assert_array_equal(state['params']['w0'],
                                states[1]['params']['w0'])
  assert "Checkpoint 2 is damaged: 1 array differs" in caplog.text
  assert sorted(os.listdir(directory)) == ['1', 'unreadable-2']


def test_a_damaged_step_with_no_intact_one_says_so(tmp_path):
  directory = tmp_path / 'checkpoints'
  states = _save_random(directory, [1])
  # Truncated, as a copy cut short: tensorstore's error, shortened.
  path = max((directory / '1' / 'state').rglob('d/*'),
             key=lambda p: p.stat().st_size)
  path.write_bytes(path.read_bytes()[:1000])
  ckpt = checkpoint.Checkpoints(str(directory), _config(), create=False)
  with pytest.raises(checkpoint.DamagedCheckpoint) as raised:
    ckpt.restore_state(_abstract(states[1]), _meta())
  ckpt.close()
  message = str(raised.value)
  assert '\n' not in message and len(message) < 500, message
  assert re.match(rf'^checkpoint 1 in {re.escape(str(directory))} is '
                  r'unreadable \(.+\); no other step is intact: train again$',
                  message), message


def test_a_garbage_data_position_falls_back_to_the_step_before(tmp_path):
  directory = tmp_path / 'checkpoints'
  _save(directory, [1, 2])
  (directory / '2' / 'data' / 'process_0-of-1.json').write_text('{garbage')
  ckpt = checkpoint.Checkpoints(str(directory), _config())
  iterator = _iterator()
  state, step = ckpt.restore(_abstract(_state()), _meta())
  ckpt.restore_data(step, iterator)
  ckpt.close()
  assert (step, float(state['params']['w0'][0]), next(iterator)) == (1, 1, 1)
  assert sorted(os.listdir(directory)) == ['1', 'unreadable-2']
  # Step 2 written again, and damaged again: set aside beside the first.
  _save(directory, [2])
  (directory / '2' / 'data' / 'process_0-of-1.json').write_text('{garbage')
  ckpt = checkpoint.Checkpoints(str(directory), _config())
  assert ckpt.restore(_abstract(_state()), _meta())[1] == 1
  ckpt.close()
  assert sorted(os.listdir(directory)) == ['1', 'unreadable-2',
                                           'unreadable-2.1']


def test_steps_without_checksums_restore_unverified(tmp_path, caplog,
                                                    monkeypatch):
  """As an earlier capjax wrote them; one warning, however many restores."""
  directory = tmp_path / 'checkpoints'
  _save(directory, [1])
  shutil.rmtree(directory / '1' / 'checksums')
  monkeypatch.setattr(checkpoint, '_warned_unverified', False)
  ckpt = checkpoint.Checkpoints(str(directory), _config(), create=False)
  with caplog.at_level('WARNING'):
    for _ in range(2):
      state, step = ckpt.restore_state(_abstract(_state()), _meta())
  ckpt.close()
  assert (step, float(state['params']['w0'][0])) == (1, 1.0)
  assert caplog.text.count('restore unverified') == 1


# ----------------------------------------------------------------- imports

def test_restoring_a_state_imports_no_input_pipeline(tmp_path):
  """Captioning loads a trained state: grain and TFDS are not needed."""
  directory = tmp_path / 'checkpoints'
  _save(directory, [1, 2])
  proc = _python('''
import sys
from capjax import checkpoint
import test_checkpoint as t
assert 'grain' not in sys.modules
ckpt = checkpoint.Checkpoints(sys.argv[1], t._config(), create=False)
state, step = ckpt.restore_state(t._abstract(t._state()), t._meta())
ckpt.close()
print(step, float(state['params']['w0'][0]))
print(sorted(m for m in ('grain', 'tensorflow_datasets', 'tensorflow')
             if m in sys.modules))
# Process-wide hooks are the entry points' to install, not a library's.
print(sys.unraisablehook is sys.__unraisablehook__)
''', directory, new_interpreter=True)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.splitlines() == ['2 2.0', '[]', 'True']


def test_small_replicated_arrays_are_copied_to_the_host_whole():
  """orbax's handler of jax.Array, as capjax registers it: replicated
  arrays under 1 MiB a replica are not split into one slice per replica
  (each slice a dispatched op, compiled at a process's first save)."""
  handler = ocp.type_handlers.get_type_handler(jax.Array)
  # pylint: disable-next=protected-access
  assert handler._min_slice_bytes_for_replica_parallel == (
      checkpoint._MIN_REPLICA_SLICE_BYTES)
