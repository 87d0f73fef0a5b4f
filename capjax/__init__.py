"""capjax: image captioning in JAX/Flax."""

__version__ = '0.1.0'


def __getattr__(name):
  # `capjax.Captioner` without importing JAX for every `import capjax`.
  if name == 'Captioner':
    from capjax.caption import Captioner  # pylint: disable=g-import-not-at-top
    return Captioner
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
