"""The one exception type for mistakes a user can fix (config, files, flags)."""


class UserError(Exception):
  """Bad input. The message names the thing that is wrong and how to fix it.

  `capjax.main` prints it as one line and exits non-zero, without a traceback.
  """
