"""ResNet image encoder (He et al. 2016) in both layouts of public weights.

The captioning model attends over the last convolutional feature grid of the
encoder (Xu et al. 2015, "Show, Attend and Tell", Sec. 3.1.1), so by default
`ResNet` returns that grid, `[batch, h, w, channels]`, rather than logits.

Two variants, because the public ImageNet weights come in two layouts:

  * 'v1.5' (torchvision, timm): a bottleneck block strides on its 3x3 conv,
    and convs have no bias (the BatchNorm after each conv has one).
  * 'v1' (Keras applications ResNet50/101/152, the paper's original block):
    a bottleneck block strides on its first 1x1 conv, and every conv has a
    bias.

Padding is explicit and symmetric everywhere (3 for the 7x7 stem, 1 for 3x3
convs and the max pool). Torchvision pads symmetrically, and Keras pads the
stem and the pool with `ZeroPadding2D` and its stride-1 3x3 convs with 'SAME'
(symmetric at stride 1). 'SAME' on a strided conv would pad only the bottom
and right of an even-sized input, shifting every window by one pixel, and
pretrained weights would no longer reproduce their published outputs.

Submodule names follow torchvision so that the weight importers in
`capjax.pretrained` read as a table: `conv_init`/`bn_init` are `conv1`/`bn1`,
`stage{s}_block{b}` is `layer{s}.{b}`, `proj_conv`/`proj_bn` are
`downsample.0`/`downsample.1`, and `head` is `fc`.
"""

from collections.abc import Callable, Sequence
import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from capjax.errors import UserError

VARIANTS = ('v1', 'v1.5')

# BatchNorm epsilons of the two weight sources. Keras applications build
# their ResNets with 1.001e-5; torch's BatchNorm2d default is 1e-5.
TORCH_BN_EPSILON = 1e-5
KERAS_BN_EPSILON = 1.001e-5

# Expansion of a bottleneck block: its output has 4x the channels of its
# 3x3 conv (He et al. 2016, Table 1).
_EXPANSION = 4

# He et al. (2015, "Delving Deep into Rectifiers") init, N(0, 2 / fan_out)
# as torchvision's kaiming_normal_, so that training from scratch behaves
# like theirs.
_CONV_INIT = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')

ModuleDef = Callable[..., nn.Module]


@dataclasses.dataclass(frozen=True)
class ArchSpec:
  """Depth and block type of a named ResNet."""
  stage_sizes: tuple[int, ...]
  bottleneck: bool
  width: int = 64


ARCHS: dict[str, ArchSpec] = {
    # Small enough for unit tests and CPU training on `shapes`: one
    # bottleneck block per stage, 8 channels wide (256 output channels).
    'resnet_tiny': ArchSpec((1, 1, 1, 1), bottleneck=True, width=8),
    # The `shapes` encoder, trained from scratch on a CPU: three stages of
    # basic blocks, so the grid is 1/16 of the image (4x4 at 64 px), fine
    # enough to tell apart the 3x3 layout of a scene.
    'resnet_small': ArchSpec((1, 1, 1), bottleneck=False, width=16),
    # The tests' encoder (configs/test.py): the stem and one basic block, an
    # 8x8 grid at 32 px. The least that is still a ResNet: a cold training
    # of configs/test.py takes 22% less CPU time than with resnet_small.
    'resnet_micro': ArchSpec((1,), bottleneck=False, width=16),
    'resnet18': ArchSpec((2, 2, 2, 2), bottleneck=False),
    'resnet34': ArchSpec((3, 4, 6, 3), bottleneck=False),
    'resnet50': ArchSpec((3, 4, 6, 3), bottleneck=True),
    'resnet101': ArchSpec((3, 4, 23, 3), bottleneck=True),
    'resnet152': ArchSpec((3, 8, 36, 3), bottleneck=True),
}


def arch_spec(arch: str) -> ArchSpec:
  """The `ArchSpec` of `arch`, or a `UserError` listing the known names."""
  if arch not in ARCHS:
    raise UserError(
        f'Unknown encoder arch {arch!r}: set --config.model.encoder.arch to '
        f'one of {", ".join(ARCHS)}.')
  return ARCHS[arch]


def feature_dim(arch: str) -> int:
  """Channels of the feature grid `arch` returns (512 or 2048 at width 64)."""
  spec = arch_spec(arch)
  # Each stage doubles the width: the last of four is 8x the stem's (64,
  # 128, 256, 512 at width 64).
  last = spec.width * 2**(len(spec.stage_sizes) - 1)
  return last * (_EXPANSION if spec.bottleneck else 1)


class BasicBlock(nn.Module):
  """Two 3x3 convs and a shortcut (ResNet-18/34; He et al. 2016, Fig. 5 left).

  The first 3x3 conv strides in both variants; 'v1' differs only by conv
  biases (there are no Keras weights for this block).
  """
  filters: int
  strides: int
  variant: str
  conv: ModuleDef
  norm: ModuleDef

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    # x: [batch, h, w, c_in]
    s = (self.strides, self.strides)
    y = self.conv(self.filters, (3, 3), strides=s, padding=((1, 1), (1, 1)),
                  name='conv1')(x)
    y = nn.relu(self.norm(name='bn1')(y))
    y = self.conv(self.filters, (3, 3), padding=((1, 1), (1, 1)),
                  name='conv2')(y)
    y = self.norm(name='bn2')(y)
    # y: [batch, h / strides, w / strides, filters]
    shortcut = x
    if x.shape[-1] != self.filters or self.strides != 1:
      shortcut = self.conv(self.filters, (1, 1), strides=s,
                           padding=((0, 0), (0, 0)), name='proj_conv')(x)
      shortcut = self.norm(name='proj_bn')(shortcut)
    return nn.relu(y + shortcut)


class BottleneckBlock(nn.Module):
  """1x1 reduce, 3x3, 1x1 expand, and a shortcut (He et al. 2016, Fig. 5 right).

  'v1.5' strides on the 3x3 conv, 'v1' on the first 1x1 conv (see the module
  docstring).
  """
  filters: int
  strides: int
  variant: str
  conv: ModuleDef
  norm: ModuleDef

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    # x: [batch, h, w, c_in]
    s = (self.strides, self.strides)
    if self.variant == 'v1':
      stride_1x1, stride_3x3 = s, (1, 1)
    else:
      stride_1x1, stride_3x3 = (1, 1), s
    no_pad = ((0, 0), (0, 0))
    y = self.conv(self.filters, (1, 1), strides=stride_1x1, padding=no_pad,
                  name='conv1')(x)
    y = nn.relu(self.norm(name='bn1')(y))
    y = self.conv(self.filters, (3, 3), strides=stride_3x3,
                  padding=((1, 1), (1, 1)), name='conv2')(y)
    y = nn.relu(self.norm(name='bn2')(y))
    out_features = self.filters * _EXPANSION
    y = self.conv(out_features, (1, 1), padding=no_pad, name='conv3')(y)
    y = self.norm(name='bn3')(y)
    # y: [batch, h / strides, w / strides, 4 * filters]
    shortcut = x
    if x.shape[-1] != out_features or self.strides != 1:
      shortcut = self.conv(out_features, (1, 1), strides=s, padding=no_pad,
                           name='proj_conv')(x)
      shortcut = self.norm(name='proj_bn')(shortcut)
    return nn.relu(y + shortcut)


class ResNet(nn.Module):
  """ResNet v1 / v1.5 returning the last feature grid, or logits.

  Attributes:
    stage_sizes: blocks per stage, e.g. (3, 4, 6, 3) for ResNet-50.
    bottleneck: bottleneck blocks (ResNet-50 and deeper) or basic blocks.
    width: channels of the stem and of the first stage's 3x3 convs; stage s
      (from 0) is `width * 2**s` wide.
    variant: 'v1.5' (torchvision, timm) or 'v1' (Keras applications).
    num_classes: None returns the feature grid `[batch, h, w, channels]`;
      an int adds global average pooling and a Dense head giving
      `[batch, num_classes]` logits.
    dtype: compute dtype; parameters are always float32.
    bn_epsilon: BatchNorm epsilon (Keras weights expect 1.001e-5).
    bn_momentum: decay of the BatchNorm running averages (torch's 0.1
      momentum is 0.9 here).
  """
  stage_sizes: Sequence[int]
  bottleneck: bool
  width: int = 64
  variant: str = 'v1.5'
  num_classes: int | None = None
  dtype: Any = jnp.float32
  bn_epsilon: float = TORCH_BN_EPSILON
  bn_momentum: float = 0.9

  @nn.compact
  def __call__(self, x: jax.Array, train: bool,
               freeze_bn: bool = False) -> jax.Array:
    """Encodes images.

    Args:
      x: normalised images, `[batch, height, width, 3]`.
      train: training mode; BatchNorm then uses (and updates, when
        `batch_stats` is mutable) batch statistics, unless `freeze_bn`.
      freeze_bn: use the running averages even when training, as a frozen or
        fine-tuned pretrained encoder should with small caption batches.

    Returns:
      `[batch, height / 32, width / 32, feature_dim]` features, or
      `[batch, num_classes]` logits when `num_classes` is set.
    """
    if self.variant not in VARIANTS:
      raise UserError(
          f'Unknown ResNet variant {self.variant!r}: set '
          f'--config.model.encoder.variant to one of {", ".join(VARIANTS)}.')
    conv = functools.partial(
        nn.Conv, use_bias=self.variant == 'v1', dtype=self.dtype,
        param_dtype=jnp.float32, kernel_init=_CONV_INIT)
    norm = functools.partial(
        nn.BatchNorm, use_running_average=not train or freeze_bn,
        momentum=self.bn_momentum, epsilon=self.bn_epsilon, dtype=self.dtype,
        param_dtype=jnp.float32)
    block_cls = BottleneckBlock if self.bottleneck else BasicBlock

    x = jnp.asarray(x, self.dtype)
    # x: [batch, H, W, 3]
    x = conv(self.width, (7, 7), strides=(2, 2), padding=((3, 3), (3, 3)),
             name='conv_init')(x)
    x = nn.relu(norm(name='bn_init')(x))
    # x: [batch, H / 2, W / 2, width]
    # reduce_window pads with the max's identity, -inf, as torch's MaxPool2d
    # does; Keras pads with zeros, which is the same after the ReLU.
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    # x: [batch, H / 4, W / 4, width]
    for s, num_blocks in enumerate(self.stage_sizes):
      for b in range(num_blocks):
        x = block_cls(
            filters=self.width * 2**s,
            strides=2 if s > 0 and b == 0 else 1,
            variant=self.variant, conv=conv, norm=norm,
            name=f'stage{s + 1}_block{b}')(x)
    # x: [batch, H / 32, W / 32, feature_dim] (H / 16 with three stages)
    if self.num_classes is None:
      return x
    x = jnp.mean(x, axis=(1, 2))
    # x: [batch, feature_dim]
    return nn.Dense(self.num_classes, dtype=self.dtype,
                    param_dtype=jnp.float32, name='head')(x)


def build(arch: str, **kwargs: Any) -> ResNet:
  """The ResNet named `arch`; `kwargs` set the other `ResNet` fields.

  Unless given, `bn_epsilon` follows the variant: Keras's 1.001e-5 for 'v1'
  (whose weights come from Keras), torch's 1e-5 for 'v1.5'.
  """
  spec = arch_spec(arch)
  variant = kwargs.get('variant', 'v1.5')
  if variant not in VARIANTS:
    raise UserError(
        f'Unknown ResNet variant {variant!r}: set '
        f'--config.model.encoder.variant to one of {", ".join(VARIANTS)}.')
  kwargs.setdefault(
      'bn_epsilon', KERAS_BN_EPSILON if variant == 'v1' else TORCH_BN_EPSILON)
  return ResNet(stage_sizes=spec.stage_sizes, bottleneck=spec.bottleneck,
                width=spec.width, **kwargs)


def _bin_matrix(size: int, grid: int) -> np.ndarray:
  """`[grid, size]` averaging weights of torch's AdaptiveAvgPool bins.

  Bin i covers [floor(i * size / grid), ceil((i + 1) * size / grid)), so
  bins overlap by a pixel when `size` is not a multiple of `grid`.
  """
  weights = np.zeros((grid, size), np.float32)
  for i in range(grid):
    start = (i * size) // grid
    end = -(-((i + 1) * size) // grid)
    weights[i, start:end] = 1.0 / (end - start)
  return weights


def pool_grid(features: jax.Array, grid: int) -> jax.Array:
  """Adaptive average pooling to `grid` x `grid`, as torch's AdaptiveAvgPool2d.

  Show, Attend and Tell attends over a 14x14 grid; this brings any encoder
  grid to that size.

  Args:
    features: `[batch, h, w, channels]`.
    grid: output side; 0 returns `features` unchanged.

  Returns:
    `[batch, grid, grid, channels]`.
  """
  if grid == 0:
    return features
  if grid < 0:
    raise UserError(
        f'--config.model.encoder.grid={grid} is negative: use 0 (keep the '
        "encoder's grid) or a positive size such as 14.")
  batch, h, w, channels = features.shape
  if h % grid == 0 and w % grid == 0:
    # Equal, disjoint bins: a plain mean, exact in any dtype.
    x = features.reshape(batch, grid, h // grid, grid, w // grid, channels)
    return jnp.mean(x, axis=(2, 4)).astype(features.dtype)
  rows = jnp.asarray(_bin_matrix(h, grid))  # [grid, h]
  cols = jnp.asarray(_bin_matrix(w, grid))  # [grid, w]
  # HIGHEST: no reduced-precision (TF32) matmul for float32 features on GPU.
  pooled = jnp.einsum('ih,bhwc,jw->bijc', rows, features.astype(jnp.float32),
                      cols, precision=jax.lax.Precision.HIGHEST)
  return pooled.astype(features.dtype)
