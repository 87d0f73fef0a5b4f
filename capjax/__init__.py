"""capjax: image captioning in JAX/Flax."""

__version__ = '0.1.0'


def __getattr__(name):
  # `capjax.Captioner` without importing JAX for every `import capjax`: a
  # lazy attribute (PEP 562), so the import is here on purpose.
  if name == 'Captioner':
    from capjax import inference  # pylint: disable=g-import-not-at-top
    return inference.Captioner
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
