"""Tests for capjax.data.images: any file users bring decodes to RGB."""

import io

import numpy as np
from PIL import Image
import pytest

from capjax.data import images

RED = (255, 0, 0)
BLUE = (0, 0, 255)


def _close(pixel, colour, tol=12):
  return np.all(np.abs(np.asarray(pixel, int) - np.asarray(colour)) <= tol)


def _check_rgb(pixels, height, width):
  assert pixels.dtype == np.uint8
  assert pixels.shape == (height, width, 3)


def test_jpeg(tmp_path):
  path = tmp_path / 'a.jpg'
  Image.new('RGB', (48, 32), RED).save(path, quality=95)
  pixels = images.load_rgb(path)
  _check_rgb(pixels, 32, 48)
  assert _close(pixels[16, 24], RED)


def test_png(tmp_path):
  path = tmp_path / 'a.png'
  array = np.random.default_rng(0).integers(0, 256, (32, 48, 3), np.uint8)
  Image.fromarray(array).save(path)
  np.testing.assert_array_equal(images.load_rgb(str(path)), array)


def test_grayscale(tmp_path):
  path = tmp_path / 'gray.png'
  Image.new('L', (48, 32), 77).save(path)
  pixels = images.load_rgb(path)
  _check_rgb(pixels, 32, 48)
  assert (pixels == 77).all()


def test_cmyk_jpeg(tmp_path):
  path = tmp_path / 'cmyk.jpg'
  # PIL writes CMYK JPEGs with an Adobe marker and inverted values, as
  # Photoshop does; reading must undo that, not show the negative.
  Image.new('CMYK', (48, 32), (0, 255, 255, 0)).save(path, quality=95)
  with Image.open(path) as image:
    assert image.mode == 'CMYK'
  pixels = images.load_rgb(path)
  _check_rgb(pixels, 32, 48)
  assert _close(pixels[16, 24], RED)


def test_rgba_transparent_becomes_white(tmp_path):
  path = tmp_path / 'rgba.png'
  array = np.zeros((32, 48, 4), np.uint8)
  array[:, :24] = (0, 0, 255, 255)  # Opaque blue on the left,
  array[:, 24:] = (0, 0, 0, 0)  # fully transparent black on the right.
  Image.fromarray(array, 'RGBA').save(path)
  pixels = images.load_rgb(path)
  _check_rgb(pixels, 32, 48)
  assert tuple(pixels[0, 0]) == BLUE
  assert tuple(pixels[0, 47]) == (255, 255, 255)


def test_la_half_transparent_blends_with_white():
  image = Image.fromarray(np.full((2, 2, 2), (0, 128), np.uint8), 'LA')
  pixel = np.asarray(images.to_rgb(image))[0, 0]
  assert np.all(np.abs(pixel.astype(int) - 127) <= 2)


def test_palette_with_transparency(tmp_path):
  path = tmp_path / 'palette.png'
  image = Image.new('P', (48, 32), 1)
  image.putpalette(list(RED) + list(BLUE) + [0] * 762)
  image.paste(0, (0, 0, 24, 32))  # Left half uses index 0, made transparent.
  image.save(path, transparency=0)
  pixels = images.load_rgb(path)
  _check_rgb(pixels, 32, 48)
  assert tuple(pixels[0, 0]) == (255, 255, 255)
  assert tuple(pixels[0, 47]) == BLUE


def test_palette_without_transparency(tmp_path):
  path = tmp_path / 'palette.gif'
  image = Image.new('P', (48, 32), 1)
  image.putpalette(list(RED) + list(BLUE) + [0] * 762)
  image.save(path)
  assert tuple(images.load_rgb(path)[5, 5]) == BLUE


def test_16bit_png_scales_range(tmp_path):
  path = tmp_path / 'deep.png'
  array = np.full((32, 48), 32768, np.uint16)
  array[0, 0] = 65535
  array[0, 1] = 0
  Image.fromarray(array).save(path)
  pixels = images.load_rgb(path)
  _check_rgb(pixels, 32, 48)
  # PIL's own convert('L') clips at 255 and would give all white here.
  assert tuple(pixels[10, 10]) == (128, 128, 128)
  assert tuple(pixels[0, 0]) == (255, 255, 255)
  assert tuple(pixels[0, 1]) == (0, 0, 0)


@pytest.mark.parametrize('mode', ['1', 'L', 'LA', 'P', 'I', 'F', 'CMYK',
                                  'YCbCr', 'RGBA', 'I;16'])
def test_to_rgb_every_mode(mode):
  out = images.to_rgb(Image.new(mode, (5, 3)))
  assert out.mode == 'RGB'
  assert out.size == (5, 3)


def test_exif_rotated_jpeg(tmp_path):
  path = tmp_path / 'phone.jpg'
  array = np.zeros((32, 48, 3), np.uint8)  # Landscape, as the sensor saw it.
  array[:16, :16] = RED  # Top-left corner red.
  exif = Image.Exif()
  exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display.
  Image.fromarray(array).save(path, exif=exif, quality=95)
  pixels = images.load_rgb(path)
  _check_rgb(pixels, 48, 32)  # Now portrait.
  # Turned clockwise, the top-left corner becomes the top-right one.
  assert _close(pixels[4, 28], RED, tol=30)
  assert _close(pixels[4, 3], (0, 0, 0), tol=30)
  assert _close(pixels[44, 28], (0, 0, 0), tol=30)


def test_animated_gif_first_frame(tmp_path):
  path = tmp_path / 'anim.gif'
  frames = [Image.new('RGB', (8, 8), colour) for colour in (RED, BLUE)]
  frames[0].save(path, save_all=True, append_images=frames[1:], duration=100)
  assert _close(images.load_rgb(path)[4, 4], RED, tol=4)


def test_one_pixel(tmp_path):
  path = tmp_path / 'dot.png'
  Image.new('RGB', (1, 1), BLUE).save(path)
  pixels = images.load_rgb(path, max_size=64)
  _check_rgb(pixels, 1, 1)
  assert tuple(pixels[0, 0]) == BLUE


@pytest.mark.parametrize('suffix', ['png', 'jpg'])
def test_very_wide_is_downscaled_keeping_aspect(tmp_path, suffix):
  path = tmp_path / f'wide.{suffix}'
  Image.new('RGB', (10000, 30), RED).save(path)
  pixels = images.load_rgb(path, max_size=1000)
  _check_rgb(pixels, 3, 1000)
  assert _close(pixels[1, 500], RED)
  _check_rgb(images.load_rgb(path), 30, 10000)


def test_never_upscales(tmp_path):
  path = tmp_path / 'small.png'
  Image.new('RGB', (48, 32), RED).save(path)
  _check_rgb(images.load_rgb(path, max_size=1000), 32, 48)
  _check_rgb(images.load_rgb(path, max_size=24), 16, 24)


def _error(path, **kwargs) -> images.ImageError:
  with pytest.raises(images.ImageError) as info:
    images.load_rgb(path, **kwargs)
  assert info.value.path == str(path)
  assert str(path) in str(info.value)
  return info.value


def test_empty_file(tmp_path):
  path = tmp_path / 'empty.jpg'
  path.write_bytes(b'')
  assert 'empty' in _error(path).reason


def test_text_named_jpg(tmp_path):
  path = tmp_path / 'notes.jpg'
  path.write_text('not an image at all\n')
  error = _error(path)
  assert str(error) == f'{path}: cannot identify image file'


def test_truncated_jpeg(tmp_path):
  path = tmp_path / 'cut.jpg'
  array = np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)
  Image.fromarray(array).save(path, quality=90)
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 2])
  assert 'truncated' in _error(path).reason


def test_missing_file(tmp_path):
  assert _error(tmp_path / 'nowhere.jpg').reason == 'no such file'


def test_decompression_bomb(tmp_path, monkeypatch):
  path = tmp_path / 'bomb.png'
  Image.new('RGB', (48, 32)).save(path)
  monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', 100)
  assert 'too many pixels' in _error(path).reason


def test_load_rgb_bytes():
  buffer = io.BytesIO()
  Image.new('RGB', (48, 32), RED).save(buffer, format='PNG')
  pixels = images.load_rgb_bytes(buffer.getvalue(), 'upload.png', max_size=24)
  _check_rgb(pixels, 16, 24)
  with pytest.raises(images.ImageError, match='^upload.png: cannot identify'):
    images.load_rgb_bytes(b'garbage', 'upload.png')
  with pytest.raises(images.ImageError, match='empty'):
    images.load_rgb_bytes(b'', 'upload.png')
