"""A study's results: the table, the best trial's config file, the plots.

  WORKDIR/results.md      every trial, best first: parameters, objective,
                          steps trained, state, workdir
  WORKDIR/best_config.py  the config of the best complete trial, at full
                          length (without the sweep's overrides), ready for
                          `python -m capjax.main --config=...`
  WORKDIR/plots/          optimisation history, intermediate values,
                          parallel coordinates and parameter importances,
                          as .png and .html
"""

import json
import os
import textwrap
import warnings

from absl import logging
import ml_collections
import optuna

from capjax import config as config_lib
from capjax import files
from capjax.tuning import sweep as sweep_lib
from capjax.tuning import trial as trial_lib

State = optuna.trial.TrialState
TABLE = 'results.md'
BEST_CONFIG = 'best_config.py'
PLOTS = 'plots'


def _number(value) -> str:
  if isinstance(value, float):
    return f'{value:.4g}'
  return str(value)


def _steps(t: optuna.trial.FrozenTrial):
  steps = t.user_attrs.get('steps')
  if steps is None and t.intermediate_values:
    steps = max(t.intermediate_values)
  return steps


def _state(t: optuna.trial.FrozenTrial, retries: dict[int, int]) -> str:
  if t.number in retries:
    return f'interrupted; retried as {retries[t.number]}'
  if t.state == State.FAIL and 'error' in t.user_attrs:
    return f'failed: {t.user_attrs["error"]}'
  return t.state.name.lower()


def _sort_key(t: optuna.trial.FrozenTrial, sign: float):
  """Complete trials by objective, then pruned ones by their last report,
  then the rest by number."""
  if t.state == State.COMPLETE:
    return (0, -sign * t.value, t.number)
  if t.state == State.PRUNED and t.intermediate_values:
    return (1, -sign * t.intermediate_values[max(t.intermediate_values)],
            t.number)
  return (2, 0, t.number)


def table(study: optuna.Study, root: str) -> str:
  """Every trial as a Markdown table, best first."""
  trials = study.get_trials(deepcopy=False)
  retries = {}
  for t in trials:
    history = t.system_attrs.get('retry_history', ())
    if history:
      retries[history[-1]] = t.number
  names = sorted({k for t in trials for k in t.params})
  sign = 1.0 if study.direction == optuna.study.StudyDirection.MAXIMIZE else -1.0
  metric = study.user_attrs.get('capjax', {}).get('objective', ['objective'])[0]
  head = ['trial', *names, metric, 'steps', 'state', 'workdir']
  rows = []
  for t in sorted(trials, key=lambda t: _sort_key(t, sign)):
    workdir = t.user_attrs.get('workdir', '')
    rows.append([
        str(t.number), *(_number(t.params[n]) if n in t.params else '-'
                         for n in names),
        _number(t.value) if t.value is not None else '-',
        _number(_steps(t)) if _steps(t) is not None else '-',
        _state(t, retries).replace('|', '/'),
        os.path.relpath(workdir, root) if workdir else '-',
    ])
  lines = ['| ' + ' | '.join(head) + ' |',
           '|' + '---|' * len(head)]
  lines += ['| ' + ' | '.join(r) + ' |' for r in rows]
  return '\n'.join(lines) + '\n'


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
  complete = study.get_trials(deepcopy=False, states=(State.COMPLETE,))
  if not complete:
    return None
  return study.best_trial


def _subtree(tree: dict, path: str) -> dict:
  for part in path.split('.'):
    tree = tree[part]
  return tree


def config_file(config: ml_collections.ConfigDict, docstring: str,
                tuned: set[str]) -> str:
  """`config` as a config file: the fields that differ from
  `capjax.config.defaults()`, each set in `get_config()`."""
  # Both through JSON, as the study stores configs.
  ours = json.loads(config.to_json_best_effort())
  defaults = sweep_lib.flatten(
      json.loads(config_lib.defaults().to_json_best_effort()))
  known = {'.'.join(k.split('.')[:i]) for k in defaults
           for i in range(1, k.count('.') + 2)}
  lines, added = [], set()
  for key, value in sweep_lib.flatten(ours).items():
    if key in defaults:
      if value != defaults[key] or key in tuned:
        note = '  # Tuned.' if key in tuned else ''
        lines.append(f'  config.{key} = {value!r}{note}')
      continue
    parts = key.split('.')
    new = next('.'.join(parts[:i]) for i in range(1, len(parts) + 1)
               if '.'.join(parts[:i]) not in known)
    if new not in added:
      added.add(new)
      lines.append(f'  config.{new} = ml_collections.ConfigDict('
                   f'{_subtree(ours, new)!r})')
  imports = 'import ml_collections\n\n' if added else ''
  return (f'"""{docstring}"""\n\n{imports}'
          'from capjax import config as config_lib\n\n\n'
          'def get_config():\n  config = config_lib.defaults()\n'
          + '\n'.join(lines) + '\n  return config\n')


def saved_config(study: optuna.Study) -> tuple[ml_collections.ConfigDict,
                                               dict]:
  """The config the study was created from (before the sweep's
  overrides), and the overrides."""
  record = study.user_attrs['capjax']
  config = config_lib.defaults()
  config.update(record['config'])
  return config, record['overrides']


def write_best_config(study: optuna.Study,
                      best: optuna.trial.FrozenTrial | None,
                      root: str) -> str | None:
  """Writes the config of `best`, the best complete trial; its path, or
  None when no trial has completed."""
  if best is None:
    return None
  config, overrides = saved_config(study)
  config = sweep_lib.apply(config, best.params)
  metric, direction = study.user_attrs['capjax']['objective']
  values = ', '.join(f'{k}={_number(v)}' for k, v in best.params.items())
  left = ', '.join(f'{k}={_number(v)}' for k, v in overrides.items())
  paragraphs = [
      f'The best trial of the tuning study in {root}: trial {best.number}, '
      f'{metric} = {best.value:.4f} ({direction}).',
      f'Tuned: {values}.',
      f'The trials also set {left}, which this config leaves out: it trains '
      'at full length.' if left else '',
      f'Trained in {best.user_attrs.get("workdir", "?")}.']
  doc = '\n\n'.join(textwrap.fill(p, 76) for p in paragraphs if p) + '\n'

  path = os.path.join(root, BEST_CONFIG)
  files.write_text(path, config_file(config, doc, set(best.params)))
  return path


def write_plots(study: optuna.Study, root: str) -> list[str]:
  """The plots Optuna can draw of the study so far, .png and .html; a plot
  it cannot draw yet (e.g. importances of fewer than two trials) is
  skipped with a log line."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')  # Files only, no display.
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  from optuna import visualization  # pylint: disable=g-import-not-at-top
  from optuna.visualization import matplotlib as visualization_mpl  # pylint: disable=g-import-not-at-top

  folder = os.path.join(root, PLOTS)
  os.makedirs(folder, exist_ok=True)
  files.remove_leftovers(folder)
  written = []
  for name in ('optimization_history', 'intermediate_values',
               'parallel_coordinate', 'param_importances'):
    try:
      with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # "experimental" notices.
        figure = getattr(visualization, f'plot_{name}')(study)
        axes = getattr(visualization_mpl, f'plot_{name}')(study)
    except (ValueError, RuntimeError, ZeroDivisionError) as e:
      logging.info('Plot %s skipped: %s', name, e)
      continue
    # Written whole, then renamed: the workers of a SLURM array may all
    # write the results at once.
    html = os.path.join(folder, f'{name}.html')
    with files.atomic_path(html) as tmp:
      # plotly.min.js once beside the pages: they open offline.
      figure.write_html(tmp, include_plotlyjs='directory')
    png = os.path.join(folder, f'{name}.png')
    fig = getattr(axes, 'figure', None) or axes.flat[0].figure
    try:
      fig.set_size_inches(9, 5.5)
      fig.tight_layout()
      with files.atomic_path(png) as tmp:
        fig.savefig(tmp, format='png', dpi=110)
    finally:
      plt.close(fig)
    written += [png, html]
  return written


def report(study: optuna.Study, root: str) -> str:
  """Writes the table, the best config and the plots; returns the text to
  print."""
  text = table(study, root)
  files.remove_leftovers(root)
  files.write_text(os.path.join(root, TABLE), text)
  best = best_trial(study)
  path = write_best_config(study, best, root)
  plots = write_plots(study, root)
  lines = [text]
  if best is not None:
    lines.append(f'Best: trial {best.number}, {best.value:.4f}; its config: '
                 f'{path}')
  else:
    lines.append('No trial has completed yet: no best config.')
  if plots:
    lines.append(f'Plots: {os.path.join(root, PLOTS)}/')
  lines.append(f'Trials: {os.path.join(root, trial_lib.TRIALS)}/')
  return '\n'.join(lines)
