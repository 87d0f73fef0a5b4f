"""ImageNet weights for the ResNet encoder, from the formats they ship in.

Two public sources, one per `ResNet` variant (see `capjax.models.resnet`):

  * Keras applications ResNet50/101/152 ('v1'; caffe input: BGR, ImageNet
    mean subtracted, no scaling): a `.keras` model, a whole-model `.h5`, the
    weights-only `.h5` files Keras applications download
    (`resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5`), or
    'keras:imagenet[:resnet101]', which has Keras download that file.
  * torchvision / timm ResNet-18 ... 152 ('v1.5'; RGB, ImageNet mean/std) as
    `.safetensors`, read with `safetensors.numpy`: no torch, no unpickling.
    `download_timm_resnet` fetches timm's from the Hugging Face hub into its
    cache; `TIMM_TAGS` names the checkpoint 'timm' picks for each depth.

`load_encoder_weights` is what training calls: it picks the importer from
`config.model.encoder.pretrained` and checks every array against the
encoder's own variables, so a wrong file is an error that names it, never a
silently random encoder. A download that fails is an error too, which names
the weights and how to pass a local copy. `fetch_encoder_weights` does the
same ahead of time (--mode=prepare), and `check_random_frozen` refuses a
frozen encoder left random.

Nothing here imports TensorFlow or Keras at module level (GPU machines may
lack them); only the paths that need a Keras model import it. Legacy `.h5`
weights are read with h5py alone.
"""

from collections.abc import Mapping
import os
import re
from typing import Any

from flax import traverse_util
import jax.numpy as jnp
import numpy as np

from capjax.errors import UserError
from capjax.models import resnet

# Flat variable path, e.g. ('params', 'stage1_block0', 'conv1', 'kernel').
Path = tuple[str, ...]
Variables = dict[str, Any]

# Depths Keras applications publish, by capjax arch.
KERAS_APPLICATIONS = {
    'resnet50': 'ResNet50',
    'resnet101': 'ResNet101',
    'resnet152': 'ResNet152',
}
# What 'timm' (no tag) downloads for each arch, from the hub's
# timm/<arch>.<tag>: the best ImageNet-1k top-1 at 224 px (in parentheses;
# pytorch-image-models' results/results-imagenet.csv) among weights trained on
# ImageNet-1k alone, in plain torchvision layout (not the resnet*d / *s / *c
# stems) and normalised with the ImageNet mean and std, as capjax feeds them.
# resnet34.ra4_e3600_r224_in1k (77.49%) expects mean and std 0.5 instead.
TIMM_TAGS = {
    'resnet18': 'a1_in1k',  # 71.50%; torchvision's tv_in1k: 69.75%.
    'resnet34': 'a1_in1k',  # 76.42%; tv_in1k: 73.30%.
    'resnet50': 'tv2_in1k',  # 80.85%; a1h_in1k: 80.65%, tv_in1k: 76.16%.
    # 81.95%, trained at 224 px as capjax's COCO config feeds it; torchvision's
    # tv2_in1k: 81.91% (trained at 176 px), tv_in1k: 77.40%.
    'resnet101': 'a1h_in1k',
    'resnet152': 'a1h_in1k',  # 82.82%; tv2_in1k: 82.29%.
}
TIMM_ARCHS = tuple(TIMM_TAGS)
_TIMM_FILE = 'model.safetensors'

_KERAS_BLOCK = re.compile(r'^conv(\d+)_block(\d+)_')
_TORCH_BLOCK = re.compile(r'^layer(\d+)\.(\d+)\.')
_KERAS_EXTENSIONS = ('.keras', '.h5', '.hdf5')
_TORCH_PICKLES = ('.pth', '.pt', '.bin', '.ckpt', '.pkl')

# Canonical order of a layer's weights, as get_weights() and legacy .h5 files
# list them (trainable first, then the BatchNorm moving statistics).
_KERAS_CONV = ('kernel', 'bias')
_KERAS_BN = ('gamma', 'beta', 'moving_mean', 'moving_variance')


class _Collector:
  """Flat capjax variables plus, for error messages, where each came from."""

  def __init__(self, origin: str):
    self.origin = origin
    self.flat: dict[Path, np.ndarray] = {}
    self.sources: dict[Path, str] = {}

  def put(self, path: Path, value: Any, source: str) -> None:
    self.flat[path] = np.asarray(value, np.float32)
    self.sources[path] = source

  def variables(self) -> Variables:
    return traverse_util.unflatten_dict(self.flat)


def _describe(spec: resnet.ArchSpec) -> str:
  kind = 'bottleneck' if spec.bottleneck else 'basic'
  return (f'a ResNet with {list(spec.stage_sizes)} {kind} blocks, width '
          f'{spec.width}')


def _arch_of(spec: resnet.ArchSpec) -> str | None:
  """The capjax arch with this depth, block type and width, if any."""
  for name, known in resnet.ARCHS.items():
    if known == spec:
      return name
  return None


def _check_file(path: str) -> None:
  if not os.path.isfile(path):
    raise UserError(
        f'Pretrained weights file {path} does not exist: fix '
        '--config.model.encoder.pretrained, or set it to "" for random '
        'weights.')


def _first_line(error: Exception) -> str:
  lines = str(error).strip().splitlines()
  return lines[0] if lines else type(error).__name__


# ---------------------------------------------------------------------------
# Keras applications (variant 'v1').
# ---------------------------------------------------------------------------


def _import_keras() -> Any:
  try:
    import keras  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise UserError(
        'Keras weights need keras (pip install tensorflow), which this '
        'machine lacks: install it, or use a weights-only Keras .h5 file, '
        'which capjax reads with h5py alone.') from e
  return keras


def _keras_weight_name(name: str) -> str:
  """'conv1_conv/kernel:0' (tf.keras) or 'kernel' (Keras 3) -> 'kernel'."""
  return name.split('/')[-1].split(':')[0]


def _named_weights(names: list[str],
                   values: list[np.ndarray]) -> dict[str, np.ndarray]:
  """Names a layer's weights, by their names or else by the canonical order."""
  short = [_keras_weight_name(n) for n in names]
  canonical = {2: _KERAS_CONV, 4: _KERAS_BN}.get(len(values))
  if canonical and set(short) != set(canonical):
    short = list(canonical)  # Old files name weights e.g. 'conv1_W_1:0'.
  return dict(zip(short, values))


def _keras_model_weights(model: Any) -> dict[str, dict[str, np.ndarray]]:
  """Layer name -> weight name -> value, looking inside nested models."""
  out = {}
  pending = list(model.layers)
  while pending:
    layer = pending.pop(0)
    if hasattr(layer, 'layers'):  # A model used as a layer: its own layers.
      pending[:0] = list(layer.layers)
      continue
    values = layer.get_weights()
    if values:
      out[layer.name] = _named_weights([w.name for w in layer.weights],
                                       values)
  return out


def _h5_strings(attrs: Any, name: str) -> list[str]:
  """A string-list attribute, which Keras splits as name0, name1... if long."""
  if name in attrs:
    chunks = [attrs[name]]
  else:
    chunks = []
    while f'{name}{len(chunks)}' in attrs:
      chunks.append(attrs[f'{name}{len(chunks)}'])
  return [n.decode('utf8') if isinstance(n, bytes) else str(n)
          for chunk in chunks for n in chunk]


def _read_h5_weights(group: Any) -> dict[str, dict[str, np.ndarray]]:
  """Layer name -> weight name -> value from a legacy Keras weights group."""
  out = {}
  for layer_name in _h5_strings(group.attrs, 'layer_names'):
    layer = group[layer_name]
    names = _h5_strings(layer.attrs, 'weight_names')
    if names:
      out[layer_name] = _named_weights(names,
                                       [np.asarray(layer[n]) for n in names])
  return out


def _keras_to_capjax(layers: Mapping[str, Mapping[str, np.ndarray]],
                     origin: str) -> tuple[_Collector, str]:
  """Maps Keras ResNet layer weights onto a capjax 'v1' ResNet."""
  if 'conv1_conv' not in layers:
    if any('preact' in name for name in layers):
      raise UserError(
          f'{origin} is a Keras ResNetV2 (pre-activation), which capjax does '
          'not implement: use Keras ResNet50/101/152 weights.')
    raise UserError(
        f'{origin} has no layer conv1_conv, so it is not a Keras applications '
        'ResNet50/101/152: use one of those, or a torchvision/timm '
        '.safetensors file.')
  blocks: dict[int, int] = {}
  for name in layers:
    if match := _KERAS_BLOCK.match(name):
      stage, block = int(match[1]), int(match[2])
      blocks[stage] = max(blocks.get(stage, 0), block)
  # Keras numbers the stem conv1 and the four stages conv2 ... conv5.
  stem = np.asarray(layers['conv1_conv'].get('kernel', np.zeros(())))
  spec = resnet.ArchSpec(
      tuple(blocks.get(s, 0) for s in range(2, 6)), bottleneck=True,
      width=int(stem.shape[-1]) if stem.ndim == 4 else 0)
  arch = _arch_of(spec)
  if arch is None:
    raise UserError(
        f'{origin} holds {_describe(spec)}, which matches no capjax arch: use '
        'Keras ResNet50, ResNet101 or ResNet152 weights.')

  out = _Collector(origin)

  def take(layer: str, weight: str) -> np.ndarray:
    try:
      return layers[layer][weight]
    except KeyError:
      raise UserError(
          f'{origin} lacks weight {layer}/{weight}: the file is not a '
          'complete Keras ResNet; save the whole model again.') from None

  def conv(layer: str, module: Path) -> None:
    for weight in _KERAS_CONV:
      # Keras kernels are already [h, w, in, out], as flax's.
      out.put(('params', *module, weight), take(layer, weight),
              f'{layer}/{weight}')

  def bn(layer: str, module: Path) -> None:
    for weight, (collection, name) in zip(
        _KERAS_BN, [('params', 'scale'), ('params', 'bias'),
                    ('batch_stats', 'mean'), ('batch_stats', 'var')]):
      out.put((collection, *module, name), take(layer, weight),
              f'{layer}/{weight}')

  conv('conv1_conv', ('conv_init',))
  bn('conv1_bn', ('bn_init',))
  for s, num_blocks in enumerate(spec.stage_sizes, start=1):
    for b in range(num_blocks):
      prefix = f'conv{s + 1}_block{b + 1}'
      module = f'stage{s}_block{b}'
      for k in (1, 2, 3):
        conv(f'{prefix}_{k}_conv', (module, f'conv{k}'))
        bn(f'{prefix}_{k}_bn', (module, f'bn{k}'))
      # Keras's first block of every stage projects its shortcut ('_0').
      if b == 0:
        conv(f'{prefix}_0_conv', (module, 'proj_conv'))
        bn(f'{prefix}_0_bn', (module, 'proj_bn'))
  if 'predictions' in layers:  # include_top=True: the ImageNet classifier.
    out.put(('params', 'head', 'kernel'), take('predictions', 'kernel'),
            'predictions/kernel')
    out.put(('params', 'head', 'bias'), take('predictions', 'bias'),
            'predictions/bias')
  return out, arch


def import_keras_resnet(keras_model: Any) -> Variables:
  """capjax variables from a Keras applications ResNet50/101/152 model.

  They fit `resnet.build(arch, variant='v1')` (BatchNorm epsilon 1.001e-5)
  of the model's depth, with `num_classes=1000` when the model has its
  `predictions` layer (include_top=True); the head is left out otherwise.

  Args:
    keras_model: a Keras model holding the ResNet's layers (`conv1_conv`,
      `conv{s}_block{b}_{0,1,2,3}_{conv,bn}`), possibly nested.

  Returns:
    {'params': ..., 'batch_stats': ...} of float32 numpy arrays.
  """
  collector, _ = _keras_to_capjax(_keras_model_weights(keras_model),
                                  f'Keras model {keras_model.name!r}')
  return collector.variables()


def _keras_source(path_or_name: str) -> tuple[_Collector, str]:
  """Reads Keras ResNet weights from a file or 'keras:imagenet[:arch]'."""
  if path_or_name.startswith('keras:'):
    parts = path_or_name.split(':')
    arch = parts[2] if len(parts) == 3 else 'resnet50'
    if parts[1] != 'imagenet' or len(parts) > 3 or (
        arch not in KERAS_APPLICATIONS):
      raise UserError(
          f'Unknown Keras weights {path_or_name!r}: use keras:imagenet, '
          'keras:imagenet:resnet101 or keras:imagenet:resnet152.')
    keras = _import_keras()
    # Keras downloads resnet{N}_weights_tf_dim_ordering_tf_kernels_notop.h5
    # from Google's storage into ~/.keras/models/ on first use.
    application = getattr(keras.applications, KERAS_APPLICATIONS[arch])
    model = application(weights='imagenet', include_top=False)
    return _keras_to_capjax(_keras_model_weights(model), path_or_name)

  _check_file(path_or_name)
  if path_or_name.endswith('.keras'):
    return _keras_whole_model(path_or_name)
  if not path_or_name.endswith(('.h5', '.hdf5')):
    raise UserError(
        f'{path_or_name} is not a Keras file: use a .keras or .h5 file, or '
        'keras:imagenet.')
  try:
    import h5py  # pylint: disable=g-import-not-at-top
  except ImportError:
    return _keras_whole_model(path_or_name)  # Keras brings h5py with it.
  try:
    with h5py.File(path_or_name, 'r') as f:
      group = f
      # model.save('x.h5') nests the weights under 'model_weights', next to
      # the 'model_config' that makes it a whole model.
      if 'layer_names' not in f.attrs and 'model_weights' in f:
        group = f['model_weights']
      if _h5_strings(group.attrs, 'layer_names'):
        layers = _read_h5_weights(group)
        # Read directly unless the ResNet is nested inside a bigger model,
        # whose layers only Keras can unpack.
        if 'conv1_conv' in layers or 'model_config' not in f.attrs:
          return _keras_to_capjax(layers, path_or_name)
      elif 'model_config' not in f.attrs:
        raise UserError(
            f'{path_or_name} is neither a Keras model nor legacy Keras '
            'weights (Keras 3 .weights.h5 files do not record layer names): '
            'save the model with model.save("x.keras") or model.save("x.h5").')
  except OSError as e:
    raise UserError(
        f'{path_or_name} is not a readable HDF5 file ({_first_line(e)}): '
        'download it again.') from e
  return _keras_whole_model(path_or_name)


def _keras_whole_model(path: str) -> tuple[_Collector, str]:
  keras = _import_keras()
  try:
    model = keras.models.load_model(path, compile=False)
  except Exception as e:  # pylint: disable=broad-exception-caught
    raise UserError(
        f'Keras cannot load {path} ({_first_line(e)}): save the model again '
        'with model.save().') from e
  return _keras_to_capjax(_keras_model_weights(model), path)


def load_keras_resnet(path_or_name: str) -> tuple[Variables, str]:
  """Loads Keras applications ResNet weights.

  Args:
    path_or_name: 'keras:imagenet' (ResNet50) or 'keras:imagenet:resnet101'
      / ':resnet152', which Keras downloads (no top, into ~/.keras/models/);
      a `.keras` model; or an `.h5` file, either a whole model
      (`model.save('x.h5')`) or weights only, as Keras applications ship them
      (`resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5`). Weights-only
      files are read with h5py, without building a Keras model.

  Returns:
    (variables, arch): variables for `resnet.build(arch, variant='v1')`, with
    the 'head' params when the weights include the classifier.
  """
  collector, arch = _keras_source(path_or_name)
  return collector.variables(), arch


# ---------------------------------------------------------------------------
# torchvision / timm (variant 'v1.5').
# ---------------------------------------------------------------------------


def _torch_spec(state_dict: Mapping[str, Any], origin: str) -> resnet.ArchSpec:
  """Depth, block type and width of a torchvision-layout state dict."""
  if 'conv1.weight' not in state_dict:
    raise UserError(
        f'{origin} has no conv1.weight, so it is not a torchvision/timm '
        'ResNet: use one of those, or Keras ResNet weights.')
  blocks: dict[int, int] = {}
  bottleneck = False
  for key in state_dict:
    if match := _TORCH_BLOCK.match(key):
      stage, block = int(match[1]), int(match[2])
      blocks[stage] = max(blocks.get(stage, -1), block)
      bottleneck |= key.startswith(f'{match[0]}conv3.')
  return resnet.ArchSpec(
      tuple(blocks.get(s, -1) + 1 for s in range(1, 5)), bottleneck,
      width=int(np.shape(state_dict['conv1.weight'])[0]))


def _torch_to_capjax(state_dict: Mapping[str, Any], arch: str,
                     origin: str) -> _Collector:
  """Maps a torchvision-layout state dict onto a capjax 'v1.5' ResNet."""
  spec = resnet.arch_spec(arch)
  if state_dict and all(k.startswith('module.') for k in state_dict):
    # Saved from a DataParallel / DistributedDataParallel wrapper.
    state_dict = {k[len('module.'):]: v for k, v in state_dict.items()}
  found = _torch_spec(state_dict, origin)
  if found != spec:
    found_arch = _arch_of(found)
    holds = f'a {found_arch}' if found_arch else _describe(found)
    raise UserError(
        f'{origin} holds {holds} but the encoder arch is {arch}: set '
        f'--config.model.encoder.arch={found_arch or "..."} or use {arch} '
        'weights.')

  out = _Collector(origin)
  used = set()

  def take(key: str, ndim: int) -> np.ndarray:
    if key not in state_dict:
      raise UserError(
          f'{origin} lacks {key}: the state dict is not a complete '
          f'torchvision {arch}; export it again.')
    value = np.asarray(state_dict[key])
    if value.ndim != ndim:
      raise UserError(
          f'{origin}: {key} has shape {tuple(value.shape)}, expected '
          f'{ndim} dimensions; export the state dict again.')
    used.add(key)
    return value

  def conv(key: str, module: Path) -> None:
    # torch: [out, in, h, w]; flax: [h, w, in, out].
    kernel = take(f'{key}.weight', 4).transpose(2, 3, 1, 0)
    out.put(('params', *module, 'kernel'), kernel, f'{key}.weight')

  def bn(key: str, module: Path) -> None:
    for name, (collection, flax_name) in {
        'weight': ('params', 'scale'), 'bias': ('params', 'bias'),
        'running_mean': ('batch_stats', 'mean'),
        'running_var': ('batch_stats', 'var')}.items():
      out.put((collection, *module, flax_name), take(f'{key}.{name}', 1),
              f'{key}.{name}')

  conv('conv1', ('conv_init',))
  bn('bn1', ('bn_init',))
  convs = (1, 2, 3) if spec.bottleneck else (1, 2)
  for s, num_blocks in enumerate(spec.stage_sizes, start=1):
    for b in range(num_blocks):
      prefix = f'layer{s}.{b}'
      module = f'stage{s}_block{b}'
      for k in convs:
        conv(f'{prefix}.conv{k}', (module, f'conv{k}'))
        bn(f'{prefix}.bn{k}', (module, f'bn{k}'))
      # As in `resnet`: the first block of a stage projects its shortcut when
      # it strides (stages 2-4) or widens (a bottleneck's first stage).
      if b == 0 and (s > 1 or spec.bottleneck):
        conv(f'{prefix}.downsample.0', (module, 'proj_conv'))
        bn(f'{prefix}.downsample.1', (module, 'proj_bn'))
  if 'fc.weight' in state_dict:
    # torch Linear: [out, in]; flax Dense: [in, out].
    out.put(('params', 'head', 'kernel'), take('fc.weight', 2).T, 'fc.weight')
    out.put(('params', 'head', 'bias'), take('fc.bias', 1), 'fc.bias')

  unused = sorted(k for k in state_dict
                  if k not in used and not k.endswith('num_batches_tracked'))
  if unused:
    raise UserError(
        f'{origin} has {len(unused)} arrays a torchvision {arch} does not, '
        f'e.g. {", ".join(unused[:3])}: use plain torchvision/timm ResNet '
        'weights.')
  return out


def import_torch_resnet(state_dict: Mapping[str, np.ndarray],
                        arch: str) -> Variables:
  """capjax variables from a torchvision/timm ResNet state dict.

  They fit `resnet.build(arch)` ('v1.5', BatchNorm epsilon 1e-5, as torch),
  with `num_classes=1000` when the state dict has `fc.*`.

  Args:
    state_dict: torchvision names (`conv1.weight`, `bn1.running_var`,
      `layer3.5.conv2.weight`, `layer2.0.downsample.1.bias`, `fc.weight`) to
      numpy arrays; `num_batches_tracked` entries are ignored.
    arch: the capjax arch the state dict must have, e.g. 'resnet50'.

  Returns:
    {'params': ..., 'batch_stats': ...} of float32 numpy arrays.
  """
  return _torch_to_capjax(state_dict, arch, 'state dict').variables()


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
  _check_file(path)
  from safetensors import numpy as safetensors_numpy  # pylint: disable=g-import-not-at-top
  try:
    return safetensors_numpy.load_file(path)
  except Exception as e:  # pylint: disable=broad-exception-caught
    raise UserError(
        f'{path} is not a readable float32/float16 safetensors file '
        f'({_first_line(e)}): download it again.') from e


def load_safetensors(path: str, arch: str) -> Variables:
  """Loads torchvision/timm ResNet weights from a `.safetensors` file.

  Read with `safetensors.numpy`: no torch, and nothing is unpickled.
  """
  return _torch_to_capjax(_read_safetensors(path), arch, path).variables()


def timm_repo(arch: str, tag: str | None = None) -> str:
  """The hub repository of timm's `arch` weights: 'timm/<arch>.<tag>'.

  `tag` None is the arch's entry in `TIMM_TAGS`.
  """
  if arch not in TIMM_TAGS:
    raise UserError(
        f'timm has no ImageNet weights for {arch}: set '
        f'--config.model.encoder.arch to one of {", ".join(TIMM_ARCHS)}.')
  return f'timm/{arch}.{tag or TIMM_TAGS[arch]}'


def _local_file_hint(repo: str) -> str:
  return (f'download https://huggingface.co/{repo}/resolve/main/{_TIMM_FILE} '
          'and pass it with --config.model.encoder.pretrained=PATH'
          '.safetensors')


def download_timm_resnet(arch: str, tag: str | None = None) -> str:
  """timm's `<arch>.<tag>` weights from the Hugging Face hub: a local file.

  Downloaded once into the hub's standard cache ($HF_HUB_CACHE, by default
  ~/.cache/huggingface/hub) and read from there afterwards, also offline
  (HF_HUB_OFFLINE=1).

  Args:
    arch: 'resnet18' ... 'resnet152'.
    tag: e.g. 'a1h_in1k' (timm's "ResNet strikes back" recipe, Wightman et
      al. 2021), 'tv2_in1k' (torchvision's second recipe) or 'tv_in1k'
      (torchvision's original weights); None: the arch's `TIMM_TAGS` entry.

  Returns:
    The path of `model.safetensors` in the cache, for `load_safetensors` or
    --config.model.encoder.pretrained.

  Raises:
    UserError: one line naming the repository, the file's URL and how to
      pass a local copy, when the weights are neither cached nor reachable.
  """
  repo = timm_repo(arch, tag)
  try:
    import huggingface_hub  # pylint: disable=g-import-not-at-top
    from huggingface_hub import errors  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise UserError(
        f'Downloading the ImageNet weights {repo} needs huggingface_hub (pip '
        f'install huggingface_hub), or {_local_file_hint(repo)}.') from None
  try:
    return huggingface_hub.hf_hub_download(repo, _TIMM_FILE)
  except (errors.RepositoryNotFoundError, errors.RevisionNotFoundError,
          errors.RemoteEntryNotFoundError) as e:
    raise UserError(
        f'The Hugging Face hub has no ImageNet weights {repo} '
        f'({_first_line(e)}): check the tag of '
        '--config.model.encoder.pretrained (timm alone picks '
        f'{TIMM_TAGS[arch]}), or {_local_file_hint(repo)}.') from None
  except Exception as e:  # pylint: disable=broad-exception-caught
    cache = huggingface_hub.constants.HF_HUB_CACHE
    if huggingface_hub.constants.HF_HUB_OFFLINE:
      reason = f'HF_HUB_OFFLINE is set and they are not in the cache {cache}'
    elif isinstance(e, errors.LocalEntryNotFoundError):
      reason = f'the hub is unreachable and they are not in the cache {cache}'
    else:
      reason = _first_line(e)
    raise UserError(
        f'Cannot get the ImageNet weights {repo} ({reason}): run '
        '--mode=prepare where the hub is reachable, with the same cache, or '
        f'{_local_file_hint(repo)}.') from None


# ---------------------------------------------------------------------------
# The training job's entry point.
# ---------------------------------------------------------------------------


def _fill(target: Mapping[str, Any], loaded: _Collector) -> Variables:
  """`loaded` in `target`'s tree, after checking every key and shape."""
  origin = loaded.origin
  flat_target = traverse_util.flatten_dict(target)
  out = {}
  for path, leaf in flat_target.items():
    if path[0] not in ('params', 'batch_stats'):
      out[path] = leaf
      continue
    name = '/'.join(path)
    if path not in loaded.flat:
      if path[1] == 'head':
        raise UserError(
            f'{origin} has no classifier for params/head: build the encoder '
            'with num_classes=None.')
      raise UserError(
          f'{origin} has no weights for {name}: use weights of the same arch.')
    value = loaded.flat[path]
    if tuple(value.shape) != tuple(leaf.shape):
      raise UserError(
          f'{origin}: {loaded.sources[path]} ({name}) has shape '
          f'{tuple(value.shape)} but the encoder expects {tuple(leaf.shape)}: '
          'use weights of the same arch and width.')
    out[path] = jnp.asarray(value, leaf.dtype)
  # A classifier the feature encoder does not use is fine; anything else
  # means the file and the encoder disagree on the architecture.
  extra = sorted('/'.join(p) for p in loaded.flat
                 if p not in flat_target and p[1] != 'head')
  if extra:
    raise UserError(
        f'{origin} has weights the encoder lacks, e.g. {", ".join(extra[:3])}'
        ': check --config.model.encoder.arch and variant.')
  return traverse_util.unflatten_dict(out)


def _depth_mismatch(pretrained: str, found: str, arch: str) -> UserError:
  return UserError(
      f'{pretrained} holds a {found} but --config.model.encoder.arch={arch}: '
      f'set --config.model.encoder.arch={found} or use {arch} weights.')


def load_encoder_weights(encoder_config: Any,
                         target_variables: Mapping[str, Any]) -> Variables:
  """The pretrained encoder variables `config.model.encoder` asks for.

  Args:
    encoder_config: `config.model.encoder` (uses `arch`, `variant` and
      `pretrained`). `pretrained` is '' (random init: `target_variables`
      comes back unchanged); 'keras:imagenet' (the Keras download, at the
      depth of `arch`; 'keras:imagenet:resnet101' names one); 'timm' or
      'timm:<tag>' (a Hugging Face download, see `download_timm_resnet`); or
      a `.keras`, `.h5` or `.safetensors` file.
    target_variables: the encoder's variables as `ResNet.init` makes them
      (or `jax.eval_shape` of it): {'params': ..., 'batch_stats': ...}.

  Returns:
    Pretrained variables with the tree, shapes and dtypes of
    `target_variables`.

  Raises:
    UserError: missing or unreadable file, unknown format, a depth or variant
      that does not match the config, a missing array or a shape mismatch.
  """
  pretrained = encoder_config.pretrained
  if not pretrained:
    return target_variables
  arch, variant = encoder_config.arch, encoder_config.variant

  is_download = pretrained.startswith('keras:') or pretrained == 'timm' or (
      pretrained.startswith('timm:'))
  if pretrained.startswith('keras:') or pretrained.endswith(_KERAS_EXTENSIONS):
    source, want_variant = 'Keras', 'v1'
  elif is_download or pretrained.endswith('.safetensors'):
    source, want_variant = 'torchvision/timm', 'v1.5'
  elif pretrained.endswith(_TORCH_PICKLES):
    raise UserError(
        f'{pretrained} is a torch pickle, which capjax does not unpickle: '
        'convert it with safetensors.torch.save_file(model.state_dict(), '
        '"model.safetensors") and use that file.')
  else:
    raise UserError(
        f'Unknown pretrained weights {pretrained!r}: use a .keras, .h5 or '
        '.safetensors file, keras:imagenet, timm, or "" for random weights.')

  # All checked before reading anything, so that a mistake fails before a
  # download.
  if not is_download:
    _check_file(pretrained)
  if variant != want_variant:
    normalization = 'caffe' if want_variant == 'v1' else 'imagenet'
    raise UserError(
        f'{pretrained} holds {source} weights, which need the {want_variant} '
        f'ResNet: set --config.model.encoder.variant={want_variant} and '
        f'--config.data.normalization={normalization}.')
  if pretrained == 'keras:imagenet':
    # The Keras download of the config's depth.
    if arch not in KERAS_APPLICATIONS:
      raise UserError(
          f'Keras publishes no {arch} weights: set '
          '--config.model.encoder.arch to one of '
          f'{", ".join(KERAS_APPLICATIONS)}, or use torchvision/timm weights '
          'with variant v1.5.')
    pretrained = f'keras:imagenet:{arch}'

  if source == 'Keras':
    named = pretrained.removeprefix('keras:imagenet:')
    if named in KERAS_APPLICATIONS and named != arch:
      raise _depth_mismatch(pretrained, named, arch)  # Before the download.
    collector, found = _keras_source(pretrained)
    if found != arch:
      raise _depth_mismatch(pretrained, found, arch)
  else:
    if is_download:
      tag = pretrained.partition(':')[2] or None
      path, origin = download_timm_resnet(arch, tag), timm_repo(arch, tag)
    else:
      path = origin = pretrained
    # The importer checks the depth against arch itself.
    collector = _torch_to_capjax(_read_safetensors(path), arch, origin)
  return _fill(target_variables, collector)


def encoder_variables_shape(encoder_config: Any) -> Variables:
  """The encoder's {'params', 'batch_stats'} as shapes and dtypes: no compute.

  The same tree as the captioner's encoder part (`load_encoder_weights`'
  target); the ResNet's variables do not depend on the image size.
  """
  # pylint: disable-next=g-import-not-at-top
  import jax
  model = resnet.build(encoder_config.arch, variant=encoder_config.variant)
  return jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))


def fetch_encoder_weights(config: Any) -> str | None:
  """Downloads (or finds cached) and checks the weights a fresh run loads.

  What --mode=prepare does after the data, so that a machine with internet
  (a cluster's login node) readies everything for training offline. Runs
  starting from another run's weights (config.init_from) load none.

  Returns:
    What was checked (a file, or a download's name), or None.

  Raises:
    UserError: as `load_encoder_weights`.
  """
  encoder = config.model.encoder
  if config.init_from or not encoder.pretrained:
    return None
  load_encoder_weights(encoder, encoder_variables_shape(encoder))
  return encoder.pretrained


def check_random_frozen(config: Any) -> None:
  """Refuses to train a frozen encoder that has random weights.

  Frozen, a random ResNet's features stay random: the decoder learns from
  noise, and days of accelerator time give a useless captioner. A fine-tuned
  encoder frozen until train.encoder_from_step counts, as the decoder spends
  that phase on random features. Runs from another run's weights
  (config.init_from; self-critical training always is one) are not fresh.

  Raises:
    UserError: unless config.train.allow_random_frozen_encoder says so.
  """
  e, t = config.model.encoder, config.train
  if (e.pretrained or config.init_from or t.objective == 'scst' or
      t.allow_random_frozen_encoder):
    return
  if e.frozen:
    frozen = 'frozen'
  elif t.encoder_from_step > 0:
    frozen = f'frozen until step {t.encoder_from_step}'
  else:
    return
  raise UserError(
      f'the encoder is {frozen} and has random weights: set '
      '--config.model.encoder.pretrained to ImageNet weights (e.g. timm, or '
      'a .safetensors file), or --config.train.allow_random_frozen_encoder='
      'True to train on random features')
