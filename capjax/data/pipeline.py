"""The grain input pipeline: data source -> batches of images and captions.

The source is the dataset's copy at the training resolution
(`capjax.data.resized`), or its original files (images still encoded, then
decoded here at reduced scale). Images stay uint8 all the way to the
device, where the model normalises them: a quarter of the bytes of float32
to copy between processes and to the device.

Training: source -> this process's shard -> seeded shuffle -> repeat ->
preprocess (decode/resize, pick and tokenise K captions) -> batch ->
iterator, with worker processes when `config.data.workers > 0`. The iterator
is checkpointable (`get_state` / `set_state`, or `grain.checkpoint` with
orbax), so training resumes mid-epoch exactly.

Evaluation: each process gets every `process_count`-th example, padded with
masked copies so that all processes run the same number of batches and the
split is covered exactly once.

A batch holds every caption of an image next to it (`[batch, K, len]`), so
the encoder runs once per image however many captions train on it.
"""

from collections.abc import Mapping, Sequence
import dataclasses
import functools

import grain
import jax
import ml_collections
import numpy as np

from capjax.data import datasets
from capjax.data import images
from capjax.data.vocab import PAD, Vocab
from capjax.errors import UserError

@dataclasses.dataclass(frozen=True)
class Preprocess:
  """One TFDS example -> model inputs. Picklable, for grain's workers."""

  vocab: Vocab
  image_size: int
  captions_per_image: int
  max_len: int
  references: int = 0  # R > 0: also every caption of the image, [R, L].
  # Image id -> the concept head's targets (`capjax.concepts.targets`).
  concepts: Mapping[int, dict[str, np.ndarray]] | None = None

  def __call__(self, example: dict, rng: np.random.Generator | None) -> dict:
    """With `rng`, K captions are sampled; without, the first K are taken.

    An image with fewer than K captions repeats some of them.
    """
    texts = [datasets.as_str(t) for t in example['captions']['text']]
    k = self.captions_per_image
    if rng is None:
      picks = [i % len(texts) for i in range(k)]
    elif len(texts) >= k:
      picks = rng.choice(len(texts), k, replace=False)
    else:
      picks = np.concatenate([rng.permutation(len(texts)),
                              rng.choice(len(texts), k - len(texts))])
    pad = example.get('_pad', False)  # Set by `eval_dataset`.
    if 'features' in example:  # From the feature cache: no image at all.
      out = {'features': example['features']}  # [h, w, C]
    else:
      out = {'image': pixels(example, self.image_size)}  # uint8 [S, S, 3]
    if self.references:
      # The first R in dataset order, then rows of <pad>: none.
      out['references'] = np.full((self.references, self.max_len), PAD,
                                  np.int32)
      kept = texts[:self.references]
      out['references'][:len(kept)] = self.vocab.encode_batch(kept,
                                                              self.max_len)
    if self.concepts is not None:
      out |= self.concepts[int(example['image/id'])]
    return out | {
        'captions': self.vocab.encode_batch(  # [K, L]
            [texts[i] for i in picks], self.max_len),
        'image/id': np.int64(-1 if pad else example['image/id']),
        'mask': np.bool_(not pad),
    }


def pixels(example: dict, image_size: int) -> np.ndarray:
  """An example's image as uint8 [S, S, 3], S = image_size."""
  image = example['image']
  if isinstance(image, bytes):  # Left encoded by the source.
    return images.decode_resized(image, image_size,
                                 str(example.get('image/filename', '')))
  return images.resize(np.asarray(image), image_size)


def _preprocess(config: ml_collections.ConfigDict, vocab: Vocab,
                references: int = 0, concepts=None) -> Preprocess:
  d = config.data
  return Preprocess(vocab, d.image_size, d.captions_per_image, d.max_len,
                    references, concepts)


def process_batch_size(config: ml_collections.ConfigDict,
                       process_count: int) -> int:
  """This process's share of the global `config.batch_size`."""
  if config.batch_size % process_count:
    raise UserError(f'--config.batch_size={config.batch_size} is not divisible '
                    f'by the number of processes ({process_count})')
  return config.batch_size // process_count


def _finish(ds: grain.MapDataset, config) -> grain.IterDataset:
  d = config.data
  it = ds.to_iter_dataset(grain.ReadOptions(
      num_threads=d.read_threads, prefetch_buffer_size=d.prefetch_buffer_size))
  if d.workers > 0:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=d.workers))
  return it


def train_dataset(config: ml_collections.ConfigDict, source: Sequence[dict],
                  vocab: Vocab, *, references: int = 0,
                  concepts: Mapping[int, dict[str, np.ndarray]] | None = None,
                  process_index: int | None = None,
                  process_count: int | None = None) -> grain.IterDataset:
  """Endless shuffled batches: this process's share of each global batch.

  Batches: `image` [b, S, S, 3] uint8 (or, from the feature cache,
  `features` [b, h, w, C]), `captions` [b, K, L] int32,
  `image/id` [b] int64, `mask` [b] bool (all true), with b the per-process
  batch size; with `references` R > 0 (what the objective asks for) also
  `references` [b, R, L], every caption of each image (up to R, then rows
  of <pad>); with `concepts` (image id -> `capjax.concepts.targets`) also
  those targets, [b, ...] each. Process p's batch i
  is rows p*b..(p+1)*b-1 of global batch i, so N processes train on exactly
  the batches one process would.
  """
  if process_index is None:
    process_index, process_count = jax.process_index(), jax.process_count()
  batch = process_batch_size(config, process_count)
  ds = grain.MapDataset.source(source)
  if len(ds) < config.batch_size:
    raise UserError(f'the training split has {len(ds)} examples, fewer than '
                    f'one batch ({config.batch_size}); lower '
                    '--config.batch_size')
  # One global order of examples (and of caption picks) whatever the number
  # of processes: every process shuffles alike, and takes its own contiguous
  # block of each global batch. Grain computes only the blocks it reads.
  ds = ds.shuffle(seed=config.seed).repeat()  # Reshuffled every epoch.
  ds = ds.random_map(_preprocess(config, vocab, references, concepts),
                     seed=config.seed)
  ds = ds.batch(batch, drop_remainder=True)[process_index::process_count]
  return _finish(ds, config)


def eval_dataset(config: ml_collections.ConfigDict, source: Sequence[dict],
                 vocab: Vocab, *, batch_size: int | None = None,
                 process_index: int | None = None,
                 process_count: int | None = None) -> grain.IterDataset:
  """One pass over `source`, padded; every process yields as many batches.

  Padding rows repeat the first example with `mask` false and `image/id` -1.
  Captions are the first K of each image, so evaluation is deterministic.
  """
  if process_index is None:
    process_index, process_count = jax.process_index(), jax.process_count()
  batch = batch_size or process_batch_size(config, process_count)
  n = len(source)
  if not n:
    raise UserError('the split to evaluate is empty; check the split names '
                    'of --config.evals and --config.decode.split')
  steps = -(-n // (batch * process_count))  # ceil
  full = grain.MapDataset.source(source)
  ds = full[process_index::process_count]
  pad = steps * batch - len(ds)
  if pad:
    ds = grain.MapDataset.concatenate([ds, full[:1].repeat(pad).map(_as_pad)])
  ds = ds.map(functools.partial(_preprocess(config, vocab), rng=None))
  return _finish(ds.batch(batch, drop_remainder=True), config)


def _as_pad(example: dict) -> dict:
  return dict(example, _pad=True)
