"""Decode any image file a user may have into an RGB uint8 array.

Users bring their own photos: phone JPEGs rotated by an EXIF tag, CMYK
JPEGs from print workflows, PNGs with alpha or a palette, 16-bit scans,
animated GIFs, truncated downloads and files that are not images at all.
The model only ever sees uint8 [H, W, 3], so every path into it goes through
here, and every failure comes out as one exception type, `ImageError`, that
names the file, so that a dataset builder can skip and report it.
"""

import collections
from collections.abc import Callable, Iterable, Iterator
import concurrent.futures
import io
import os
from typing import BinaryIO, TypeVar

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
            max_size: int | None, min_size: int | None = None) -> np.ndarray:
  """The shared body of `load_rgb` and `load_rgb_bytes`."""
  if max_size is not None and (not isinstance(max_size, int) or max_size < 1):
    raise ValueError(
        f'max_size must be a positive int or None, got {max_size!r}')
  try:
    with open_image() as image:
      if image.format == 'JPEG' and min_size is not None:
        # Let libjpeg decode at 1/2, 1/4 or 1/8 scale, in the DCT domain,
        # as long as both sides stay at least min_size: a 50-megapixel photo
        # then costs about as much as a small one, and the caller's resize
        # does the final step.
        image.draft(None, (min_size, min_size))
      elif image.format == 'JPEG' and max_size is not None:
        # The same, keeping the longer side at least max_size. draft()
        # never goes below the requested size, so the resize below still
        # does the final step.
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


def load_rgb(path: str | os.PathLike[str], max_size: int | None = None,
             min_size: int | None = None) -> np.ndarray:
  """Reads an image file as uint8 [H, W, 3].

  Args:
    path: any format PIL reads (JPEG, PNG, GIF, WebP, BMP, TIFF, ...).
    max_size: if set, images whose longer side exceeds it are shrunk to that
      length with the aspect ratio kept. Smaller images are never enlarged.
    min_size: if set, a JPEG may be decoded at 1/2, 1/4 or 1/8 scale (in the
      DCT domain, much faster) as long as both sides stay >= min_size: for
      callers that resize to min_size^2 next.

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
  return _decode(lambda: Image.open(name), name, max_size, min_size)


def load_rgb_bytes(data: bytes, name: str, max_size: int | None = None,
                   min_size: int | None = None) -> np.ndarray:
  """Like `load_rgb`, for an encoded image already in memory.

  Args:
    data: the encoded file contents.
    name: what error messages call the image (a path, a URL, an upload).
    max_size, min_size: as for `load_rgb`.
  """
  if not data:
    raise ImageError(name, 'empty file (0 bytes)')
  stream: BinaryIO = io.BytesIO(data)
  return _decode(lambda: Image.open(stream), name, max_size, min_size)


def resize(image: np.ndarray, size: int) -> np.ndarray:
  """Any decoded image -> uint8 [size, size, 3], whole image, no crop.

  No crop because a caption may mention anything in the frame. Pillow's
  bilinear filter widens with the scale factor, so downscaling is antialiased.
  """
  if image.ndim == 2:
    image = image[..., None]
  if image.shape[-1] == 1:
    image = np.repeat(image, 3, axis=-1)
  image = image[..., :3]
  if image.shape[:2] != (size, size):
    image = np.asarray(Image.fromarray(image).resize(
        (size, size), Image.Resampling.BILINEAR))
  return image


def decode_resized(data: bytes, size: int, name: str = '<bytes>'
                   ) -> np.ndarray:
  """An encoded image -> uint8 [size, size, 3], as `resize` of its pixels.

  A JPEG is decoded at reduced scale in the DCT domain (libjpeg-turbo's
  1/2, 1/4, 1/8 scaling, through simplejpeg) to the smallest size that is
  still at least `size` in both directions, so a 640x480 photo for 224 px
  costs a quarter of a full decode; the bilinear resize does the rest.
  Anything simplejpeg cannot decode (other formats, CMYK, EXIF-rotated
  photos) goes through `load_rgb_bytes`, with Pillow's own reduced decode.
  """
  # Here, not at the top: inference and the benchmark import this module,
  # and a bare GPU machine (launch/gpu_benchmark.sh) has Pillow but not
  # simplejpeg. Only building and reading copies decode through it.
  import simplejpeg  # pylint: disable=g-import-not-at-top
  try:
    header = simplejpeg.decode_jpeg_header(data)
  except ValueError:
    header = None
  if header is not None and header[2] in ('Gray', 'YCbCr', 'RGB') and (
      not _rotated(data)):
    pixels = simplejpeg.decode_jpeg(data, colorspace='RGB', min_height=size,
                                    min_width=size)
  else:
    pixels = load_rgb_bytes(data, name, min_size=size)
  return resize(pixels, size)


def _rotated(data: bytes) -> bool:
  """Whether a JPEG's EXIF (in its first 64 KB) asks for a rotation."""
  if b'Exif' not in data[:65536]:
    return False
  with Image.open(io.BytesIO(data)) as image:
    return image.getexif().get(_ORIENTATION, 1) != 1


def encode_jpeg(pixels: np.ndarray, quality: int) -> bytes:
  """uint8 [H, W, 3] RGB -> JPEG, colour at full resolution (4:4:4).

  A resized copy keeps the colour detail its original had: a 640x480
  camera JPEG (4:2:0) has 320x240 colour samples, more than a 224 px image
  has pixels, and small coloured objects (shapes' at 32-64 px) lose their
  colour at the edges with 4:2:0. At 224 px 4:2:0 would decode 34% faster
  and be 36% smaller; 4:4:4 still meets the input path's target.
  """
  # Imported here for the reason given in decode_resized.
  import simplejpeg  # pylint: disable=g-import-not-at-top
  return simplejpeg.encode_jpeg(np.ascontiguousarray(pixels), quality=quality,
                                colorspace='RGB', colorsubsampling='444')


_In = TypeVar('_In')
_Out = TypeVar('_Out')


def ordered_map(fn: Callable[[_In], _Out], items: Iterable[_In],
                workers: int | None = None) -> Iterator[tuple[_In, _Out]]:
  """Yields (item, fn(item)) in order, computing ahead on a thread pool.

  Pillow and simplejpeg release the GIL while decoding, resizing and
  encoding, so threads give real parallelism. At most a few results per
  worker are held, so the memory used stays flat however many images there
  are.
  """
  workers = workers or min(16, os.cpu_count() or 1)
  pool = concurrent.futures.ThreadPoolExecutor(workers)
  pending: collections.deque[tuple[_In, concurrent.futures.Future[_Out]]]
  pending = collections.deque()
  try:
    for item in items:
      pending.append((item, pool.submit(fn, item)))
      if len(pending) >= 4 * workers:
        item, future = pending.popleft()
        yield item, future.result()
    while pending:
      item, future = pending.popleft()
      yield item, future.result()
  finally:
    pool.shutdown(wait=True, cancel_futures=True)
