"""Photo-like test images, for benchmarks and tests of the input path.

JPEG decoding time depends on content: flat synthetic scenes (the `shapes`
dataset) compress to a few KB and decode several times faster than a
photograph of the same size. What stands in for photographs here is the
"dead leaves" model of natural images (Matheron 1968; Lee, Mumford & Huang
2001): opaque, overlapping objects whose sizes follow a power law, which
reproduces the 1/f^2 power spectrum and the sharp occlusion edges of real
scenes. Each object gets a smooth shading and a fine texture, and the whole
image sensor noise, so the JPEG carries as much detail as a camera photo.
At 640x480 and quality 90 the files average about 150 KB, close to COCO's
(about 160 KB), and a full decode takes about as long as one of COCO's.
"""

import io
import json
import os

import numpy as np
from PIL import Image


def photo(rng: np.random.Generator, height: int = 480,
          width: int = 640) -> np.ndarray:
  """One photo-like uint8 [height, width, 3] image."""
  out = np.full((height, width, 3), 128, np.float32)
  covered = np.zeros((height, width), bool)
  scale = max(height, width)
  # Front to back: each new leaf fills only what is still uncovered, so the
  # loop can stop once the picture is full.
  for _ in range(600):
    # Radii with density ~ r^-3 between 1% and 60% of the frame (the
    # exponent that gives natural images' scale invariance).
    r_min, r_max = 0.01 * scale, 0.6 * scale
    radius = 1 / np.sqrt(rng.uniform(1 / r_max**2, 1 / r_min**2))
    cy, cx = rng.uniform(0, height), rng.uniform(0, width)
    # Only the leaf's bounding box is computed.
    y0, y1 = max(int(cy - radius), 0), min(int(cy + radius) + 1, height)
    x0, x1 = max(int(cx - radius), 0), min(int(cx + radius) + 1, width)
    if y0 >= y1 or x0 >= x1:
      continue
    dy = np.arange(y0, y1, dtype=np.float32)[:, None] - cy
    dx = np.arange(x0, x1, dtype=np.float32)[None, :] - cx
    aspect, angle = rng.uniform(0.5, 2.0), rng.uniform(0, np.pi)
    u = dx * np.cos(angle) + dy * np.sin(angle)
    v = -dx * np.sin(angle) + dy * np.cos(angle)
    new = ((u / radius)**2 + (v * aspect / radius)**2 <= 1) & ~covered[
        y0:y1, x0:x1]
    if not new.any():
      continue
    gradient = rng.normal(0, 60 / radius, 2)
    shade = (u * gradient[0] + v * gradient[1])[..., None]
    box = out[y0:y1, x0:x1]
    box[new] = (rng.uniform(0, 255, 3) + shade)[new]
    covered[y0:y1, x0:x1] |= new
    if covered.all():
      break
  # Fine texture (1/f noise) and sensor noise.
  noise = rng.standard_normal((height, width, 3)).astype(np.float32)
  spectrum = np.fft.rfft2(noise, axes=(0, 1))
  fy = np.fft.fftfreq(height)[:, None, None]
  fx = np.fft.rfftfreq(width)[None, :, None]
  spectrum /= np.maximum(np.sqrt(fy**2 + fx**2), 1 / scale)
  texture = np.fft.irfft2(spectrum, s=(height, width), axes=(0, 1))
  texture *= 16 / texture.std()
  out += texture + rng.normal(0, 6, out.shape)
  return np.clip(out, 0, 255).astype(np.uint8)


def jpeg(pixels: np.ndarray, quality: int = 90) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, 'JPEG', quality=quality)
  return buffer.getvalue()


def write_caption_files(folder: str, num_images: int, seed: int = 0,
                        height: int = 480, width: int = 640) -> str:
  """A `caption_files` dataset of photo-like JPEGs and a COCO-format JSON.

  Returns the JSON's file name (in `folder`); images are in `folder`/images.
  """
  rng = np.random.default_rng(seed)
  os.makedirs(os.path.join(folder, 'images'), exist_ok=True)
  images, annotations = [], []
  words = ['a', 'the', 'red', 'small', 'large', 'dog', 'cat', 'man', 'woman',
           'table', 'on', 'with', 'next', 'to', 'street', 'room', 'field']
  for i in range(num_images):
    name = f'{i:06d}.jpg'
    with open(os.path.join(folder, 'images', name), 'wb') as f:
      f.write(jpeg(photo(rng, height, width)))
    images.append({'id': i, 'file_name': name})
    for j in range(5):
      caption = ' '.join(rng.choice(words, rng.integers(6, 13)))
      annotations.append({'id': 5 * i + j, 'image_id': i,
                          'caption': caption.capitalize() + '.'})
  path = os.path.join(folder, 'captions.json')
  with open(path, 'w') as f:
    json.dump({'images': images, 'annotations': annotations}, f)
  return 'captions.json'
