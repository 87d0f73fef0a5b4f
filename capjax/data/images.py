"""Decode any image file a user may have into an RGB uint8 array.

Users bring their own photos: phone JPEGs rotated by an EXIF tag, CMYK
JPEGs from print workflows, PNGs with alpha or a palette, 16-bit scans,
animated GIFs, truncated downloads and files that are not images at all.
The model only ever sees uint8 [H, W, 3], so every path into it goes through
here, and every failure comes out as one exception type, `ImageError`, that
names the file, so that a dataset builder can skip and report it.
"""

from collections.abc import Callable
import io
import os
from typing import BinaryIO

import numpy as np
from PIL import Image
from PIL import ImageOps

# Where a transparent pixel ends up. White rather than black, because
# transparent regions of logos and cut-outs are meant to show the page.
_BACKGROUND = (255, 255, 255)

# Modes that carry an alpha channel, or that PIL can expand to RGBA through a
# `transparency` entry in `image.info` (a tRNS chunk, a GIF transparent index).
_ALPHA_MODES = frozenset({'RGBA', 'RGBa', 'LA', 'La', 'PA'})
_TRANSPARENCY_MODES = frozenset({'1', 'L', 'P', 'RGB'})
_SIXTEEN_BIT_MODES = frozenset({'I;16', 'I;16B', 'I;16L', 'I;16N'})
_ORIENTATION = 0x0112  # The EXIF tag.


class ImageError(Exception):
  """An image file that cannot be turned into pixels.

  Attributes:
    path: the file (or the name given with the bytes).
    reason: short text of what is wrong, e.g. 'cannot identify image file'.
  """

  def __init__(self, path: str | os.PathLike[str], reason: str):
    # Both go to Exception so that the error survives pickling across
    # processes (TFDS and grain may run us in workers).
    super().__init__(os.fspath(path), reason)
    self.path = os.fspath(path)
    self.reason = reason

  def __str__(self) -> str:
    return f'{self.path}: {self.reason}'


def _scale_to_uint8(values: np.ndarray, low: float, high: float) -> np.ndarray:
  """Maps [low, high] linearly onto [0, 255], rounding to nearest."""
  values = np.nan_to_num(values.astype(np.float64), nan=low)
  if high <= low:
    return np.zeros(values.shape, np.uint8)
  scaled = (np.clip(values, low, high) - low) * (255.0 / (high - low))
  return np.rint(scaled).astype(np.uint8)


def _wide_gray_to_l(image: Image.Image) -> Image.Image:
  """Integer or float grayscale to 8-bit 'L' without losing the range.

  `Image.convert('L')` clips these modes at 255, which turns a 16-bit scan
  into an all-white picture; scale the range the data actually has instead.
  """
  values = np.asarray(image)
  if image.mode in _SIXTEEN_BIT_MODES:
    low, high = 0, 65535
  elif image.mode == 'I':
    # 16-bit PNGs decode to 'I' as well; values outside 16 bits mean a true
    # 32-bit image, which has no fixed white level, so use its own range.
    low, high = int(values.min()), int(values.max())
    if low >= 0 and high <= 65535:
      low, high = 0, 65535
  else:  # 'F'
    finite = values[np.isfinite(values)]
    low = float(finite.min()) if finite.size else 0.0
    high = float(finite.max()) if finite.size else 1.0
    if low >= 0.0 and high <= 1.0:  # The usual [0, 1] float convention.
      low, high = 0.0, 1.0
  return Image.fromarray(_scale_to_uint8(values, low, high), mode='L')


def _composite_on_background(image: Image.Image) -> Image.Image:
  """Blends an image with alpha over `_BACKGROUND`."""
  rgba = image.convert('RGBA')
  out = Image.new('RGB', rgba.size, _BACKGROUND)
  out.paste(rgba, mask=rgba.getchannel('A'))
  return out


def to_rgb(image: Image.Image) -> Image.Image:
  """Returns `image` upright and in mode 'RGB'.

  Applies the EXIF orientation, takes the first frame of an animation,
  composites alpha onto white and scales 16-bit and float grayscale to 8 bits.

  Raises:
    ValueError: for a mode PIL cannot convert to RGB.
  """
  if getattr(image, 'n_frames', 1) > 1:
    image.seek(0)
  try:
    # Checked first because exif_transpose copies even upright images.
    if image.getexif().get(_ORIENTATION, 1) != 1:
      image = ImageOps.exif_transpose(image)
  except Exception:  # pylint: disable=broad-except
    # A malformed EXIF block must not cost an otherwise good picture; PIL
    # raises assorted types for it. The orientation is then unknown, and
    # showing the pixels as stored is the best left to do.
    pass

  mode = image.mode
  if mode == 'RGB' and 'transparency' not in image.info:
    return image
  if mode in _ALPHA_MODES:
    return _composite_on_background(image)
  if mode in _TRANSPARENCY_MODES and image.info.get('transparency') is not None:
    return _composite_on_background(image)
  if mode in _SIXTEEN_BIT_MODES or mode in ('I', 'F'):
    return _wide_gray_to_l(image).convert('RGB')
  # '1', 'L', 'P', 'CMYK', 'YCbCr', 'HSV' and 'RGB' with a stale
  # transparency entry: PIL's own conversion is right for all of these. PIL
  # has already undone the inversion of Adobe CMYK JPEGs when reading them.
  return image.convert('RGB')


def _target_size(size: tuple[int, int], max_size: int | None
                 ) -> tuple[int, int]:
  """(width, height) with the longer side at most `max_size`; never larger."""
  width, height = size
  if max_size is None or max(width, height) <= max_size:
    return width, height
  scale = max_size / max(width, height)
  return max(1, round(width * scale)), max(1, round(height * scale))


def _decode(open_image: Callable[[], Image.Image], name: str,
            max_size: int | None) -> np.ndarray:
  """The shared body of `load_rgb` and `load_rgb_bytes`."""
  if max_size is not None and (not isinstance(max_size, int) or max_size < 1):
    raise ValueError(
        f'max_size must be a positive int or None, got {max_size!r}')
  try:
    with open_image() as image:
      if image.format == 'JPEG' and max_size is not None:
        # Let libjpeg decode at 1/2, 1/4 or 1/8 scale: a 50-megapixel photo
        # then costs about as much as a small one. draft() never goes below
        # the requested size, so the resize below still does the final step.
        image.draft(None, _target_size(image.size, max_size))
      # Decode everything now: a truncated file fails here, inside the
      # try, and not later inside some numpy call.
      image.load()
      rgb = to_rgb(image)
      target = _target_size(rgb.size, max_size)
      if target != rgb.size:
        # reducing_gap shrinks by an integer factor first, which makes very
        # large reductions fast at no visible cost in quality.
        rgb = rgb.resize(target, Image.Resampling.LANCZOS, reducing_gap=3.0)
      pixels = np.asarray(rgb, dtype=np.uint8)
  except ImageError:
    raise
  except FileNotFoundError:
    raise ImageError(name, 'no such file') from None
  except IsADirectoryError:
    raise ImageError(name, 'is a directory, not an image file') from None
  except PermissionError:
    raise ImageError(name, 'permission denied') from None
  except Image.UnidentifiedImageError:
    raise ImageError(name, 'cannot identify image file') from None
  except Image.DecompressionBombError as e:
    raise ImageError(name, f'too many pixels to decode safely ({e})') from None
  except Exception as e:  # pylint: disable=broad-except
    # PIL's format plugins report corrupt data as OSError, SyntaxError,
    # ValueError, EOFError, struct.error and more; callers need one type.
    reason = str(e) or type(e).__name__
    if not isinstance(e, OSError):
      reason = f'{type(e).__name__}: {reason}'
    raise ImageError(name, reason) from e
  if pixels.ndim != 3 or pixels.shape[2] != 3:  # Guards the contract above.
    raise ImageError(name, f'decoded to shape {pixels.shape}, not [H, W, 3]')
  return pixels


def load_rgb(path: str | os.PathLike[str],
             max_size: int | None = None) -> np.ndarray:
  """Reads an image file as uint8 [H, W, 3].

  Args:
    path: any format PIL reads (JPEG, PNG, GIF, WebP, BMP, TIFF, ...).
    max_size: if set, images whose longer side exceeds it are shrunk to that
      length with the aspect ratio kept. Smaller images are never enlarged.

  Returns:
    The pixels, upright (EXIF orientation applied), alpha composited on white.

  Raises:
    ImageError: the file is missing, empty, not an image, truncated or too
      large to decode safely.
  """
  name = os.fspath(path)
  try:
    empty = os.path.getsize(name) == 0
  except OSError:
    empty = False  # Let the open below report what is wrong.
  if empty:
    raise ImageError(name, 'empty file (0 bytes)')
  return _decode(lambda: Image.open(name), name, max_size)


def load_rgb_bytes(data: bytes, name: str,
                   max_size: int | None = None) -> np.ndarray:
  """Like `load_rgb`, for an encoded image already in memory.

  Args:
    data: the encoded file contents.
    name: what error messages call the image (a path, a URL, an upload).
    max_size: as for `load_rgb`.
  """
  if not data:
    raise ImageError(name, 'empty file (0 bytes)')
  stream: BinaryIO = io.BytesIO(data)
  return _decode(lambda: Image.open(stream), name, max_size)
