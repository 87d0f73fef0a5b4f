"""What the config-taking commands (capjax.main, capjax.tune) share: flag
parsing and config loading with mistakes as one line, and quieter logs."""

import logging as py_logging
import sys

from absl import flags
from ml_collections import config_flags

from capjax.errors import UserError


def load_config(flag: flags.FlagHolder):
  """The `--config` file, loaded (lazily, by the flag) with errors as one
  line."""
  path = config_flags.get_config_filename(flags.FLAGS[flag.name])
  try:
    config = flag.value
    config.keys()  # A file that failed to load left a stand-in that raises.
    return config
  except OSError as e:  # A missing or unreadable file.
    lines = [l for l in str(e).splitlines() if l.strip()]
    raise UserError(f'cannot load --config={path}: '
                    f'{lines[-1].strip() if lines else type(e).__name__}'
                    ) from None


def parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing, with config-override mistakes as one line, not a trace."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    sys.exit(f'capjax: error: {e}')
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    # ml_collections wraps the message of a misspelt field in a repr.
    message = str(e).strip('\'"').replace('\\n', ' ').replace("\\'", "'")
    sys.exit(f'capjax: error: bad --config override: {message}')
  except SyntaxError as e:
    sys.exit(f'capjax: error: --config file {e.filename}, line {e.lineno}: '
             f'{e.msg}')
  except Exception as e:  # pylint: disable=broad-exception-caught
    # get_config() of the --config file raised.
    sys.exit(f'capjax: error: the --config file failed to load: '
             f'{type(e).__name__}: {e}')


class QuietLibraries(py_logging.Filter):
  """Drops the INFO lines orbax and TFDS write for every save and read."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    return record.levelno >= py_logging.WARNING or not any(
        f'/{lib}/' in record.pathname
        for lib in ('orbax', 'tensorflow_datasets', 'grain'))
