"""Every config field, with its default, unit and meaning.

The files in `configs/` start from `defaults()` and change what their setup
needs; `--config.FIELD=VALUE` overrides any field on the command line. The
config is locked, so a misspelt field is an error rather than a new field.
"""

from typing import Any

import ml_collections

from capjax.errors import UserError


EVALUATOR_TYPES = ('validation', 'decode_split')
# What a `validation` evaluator NAME logs, each as NAME_<metric>, and
# whether a higher value is better.
VALIDATION_METRICS = {
    'loss': False, 'cross_entropy': False, 'token_accuracy': True,
    'BLEU-1': True, 'BLEU-2': True, 'BLEU-3': True, 'BLEU-4': True,
    'ROUGE-L': True, 'CIDEr': True}


def validation(split: str = 'validation') -> ml_collections.ConfigDict:
  """A `validation` evaluator: loss, and captions of the same images
  decoded with beam_size and scored with BLEU, ROUGE-L and CIDEr-D; the
  one named `val` picks the best checkpoint by its CIDEr-D."""
  v = ml_collections.ConfigDict()
  v.type = 'validation'
  v.split = split  # A TFDS split spec.
  v.every_steps = 1_000
  v.num_batches = -1  # Batches of batch_size per evaluation; -1: all.
  v.beam_size = 1  # 1: greedy, the cheapest; see decode.* for the final test.
  v.num_samples = 4  # Captions shown in the logs.
  return v


def decode_split(split: str, every_steps: int = 0
                 ) -> ml_collections.ConfigDict:
  """A `decode_split` evaluator: every image of `split` decoded with the
  config.decode settings, results and metrics in WORKDIR/decode/."""
  e = ml_collections.ConfigDict()
  e.type = 'decode_split'
  e.split = split  # A TFDS split spec.
  e.every_steps = every_steps  # 0: once, after training.
  return e


def defaults() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0  # Seeds shuffling, caption sampling, initialisation, dropout.
  config.batch_size = 64  # Global batch, in images (each with K captions).
  # Data parallelism: 'jit' (jax.jit over a device mesh, the form JAX
  # recommends) or 'pmap' (jax.pmap). Both run the same per-device step.
  config.parallel = 'jit'
  # Start a new run from another run's model weights (the optimizer and the
  # data order start afresh): a workdir (its best checkpoint by validation
  # CIDEr-D, else its latest) or one checkpoint, WORKDIR/checkpoints/STEP.
  # The model must have the same parameters and vocabulary. Once this
  # workdir has checkpoints of its own, it resumes from those instead.
  config.init_from = ''

  config.data = d = ml_collections.ConfigDict()
  d.name = 'shapes'  # 'shapes', 'coco_captions' or 'caption_files'.
  # TFDS builder config: shapes 'default' or 'tiny'; coco_captions '2014';
  # caption_files: a name you choose for your dataset.
  d.builder_config = ''
  # Where TFDS keeps prepared datasets; '' is TFDS's default
  # (~/tensorflow_datasets, or $TFDS_DATA_DIR when set).
  d.data_dir = ''
  # Build the dataset when it is missing. False for COCO, whose download is
  # large: prepare it once with --mode=prepare.
  d.prepare = True
  # caption_files only: the folder with your images and captions JSON
  # (a TFDS manual dir), the JSON inside it (COCO format or Karpathy's
  # dataset_*.json; 'split=file,split=file' for one COCO file per split) and
  # the images' folder relative to it.
  d.manual_dir = ''
  d.annotations = ''
  d.images = ''
  d.train_split = 'train'  # TFDS split spec: 'train+restval', 'train[:10%]'.
  d.image_size = 96  # Pixels; images are resized to image_size^2, not cropped.
  # Read a copy of the dataset already resized to image_size (JPEG, made once
  # in the TFDS data dir beside the dataset: by --mode=prepare, or on first
  # use when `prepare` is on). Decoding it costs a fraction of decoding the
  # originals, which is what keeps an accelerator fed. False reads the
  # originals, decoding JPEGs at reduced scale.
  d.resized_copy = True
  d.normalization = 'imagenet'  # 'imagenet' (mean/std, RGB) or 'caffe' (BGR).
  # The feature cache: with a frozen encoder, run it once per image and
  # train, validate, decode and run SCST from its stored features (in the
  # TFDS data dir, keyed by a fingerprint of the encoder's weights and
  # settings; made by --mode=cache_features, or before the job when
  # `prepare` is on). Not with an encoder that trains.
  d.features = ml_collections.ConfigDict()
  d.features.use = False
  # As stored: 'bfloat16' (half the disk of 'float32').
  d.features.dtype = 'bfloat16'
  d.features.batch_size = 0  # Images per encoder batch; 0: batch_size.
  d.captions_per_image = 5  # K: captions trained per image and batch row.
  d.max_len = 24  # Tokens per caption, <bos> and <eos> included.
  d.min_count = 5  # Words seen fewer times in train become <unk>.
  d.workers = 0  # Preprocessing processes; 0 preprocesses in threads here.
  d.read_threads = 8  # Threads reading and preprocessing examples.
  d.prefetch_buffer_size = 128  # Examples read ahead by those threads.

  config.model = m = ml_collections.ConfigDict()
  # Compute dtype ('bfloat16' on GPU/TPU); parameters are always float32.
  m.dtype = 'float32'
  m.encoder = e = ml_collections.ConfigDict()
  # 'resnet18', 'resnet34', 'resnet50', 'resnet101' or 'resnet152'; or the
  # small ones trained from scratch: 'resnet_small' (configs/shapes.py),
  # 'resnet_tiny' and 'resnet_micro' (configs/test.py, tests).
  e.arch = 'resnet50'
  # 'v1.5': stride on the 3x3 conv, no conv bias (torchvision, timm).
  # 'v1': stride on the first 1x1 conv, convs with bias (Keras applications).
  e.variant = 'v1.5'
  # Average-pool the feature grid to grid x grid (14 in Show, Attend and
  # Tell); 0 keeps the encoder's own grid (7x7 at 224 px).
  e.grid = 0
  # No gradient into the encoder (and no optimizer state for it).
  e.frozen = True
  # BatchNorm uses its running statistics in training too (always true for a
  # frozen encoder).
  e.freeze_bn = True
  # ImageNet weights: '' (random init); a file: .h5 / .keras from Keras
  # applications (variant 'v1', normalization 'caffe') or a torchvision/timm
  # .safetensors (variant 'v1.5'); or a download: 'keras:imagenet' (Keras
  # applications) or 'timm:TAG' from the Hugging Face hub ('timm' alone: the
  # best ImageNet-1k weights of the arch, capjax.pretrained.TIMM_TAGS), kept
  # in its cache; --mode=prepare fetches them ahead of training.
  e.pretrained = ''
  m.decoder = md = ml_collections.ConfigDict()
  # Which decoder reads the grid (capjax.models.decoders):
  # 'show_attend_tell' (the soft-attention LSTM of Xu et al. 2015),
  # 'updown' (the top-down attention LSTMs of Anderson et al. 2018) or
  # 'transformer' (an encoder-decoder Transformer over the grid).
  md.name = 'show_attend_tell'
  # The LSTM decoders' sizes (show_attend_tell, updown).
  md.embed_dim = 512  # Word embedding size.
  md.hidden_dim = 512  # LSTM state size.
  md.attention_dim = 512  # Size of the additive attention's hidden layer.
  # show_attend_tell: on the deep output layer's input (Xu et al. 2015);
  # updown: on the language LSTM's output; transformer: on every residual
  # branch and the embeddings (Vaswani et al. 2017).
  md.dropout = 0.5
  # The transformer's sizes.
  md.transformer = mt = ml_collections.ConfigDict()
  mt.encoder_layers = 3  # Self-attention layers over the grid positions.
  mt.layers = 3  # Decoder layers (masked self-attention, cross-attention).
  mt.model_dim = 512  # d_model.
  mt.heads = 8  # Attention heads, each of model_dim / heads.
  mt.mlp_dim = 2048  # d_ff, the feed-forward blocks' hidden size.
  # The word positions' embeddings: 'sinusoidal' (Vaswani et al. 2017) or
  # 'learned'.
  mt.positions = 'sinusoidal'
  # The concept head (capjax.models.concepts): from the encoder's grid, it
  # predicts what the image shows, trained with the captioner from the
  # dataset's object annotations (shapes: each object's colour and shape;
  # COCO: its categories). decode.concepts turns its confident predictions
  # into phrases the captions must contain.
  m.concepts = mc = ml_collections.ConfigDict()
  mc.head = False
  mc.hidden_dim = 128  # Its hidden layers' width.
  # Its object classifier reads the encoder's features of the image without
  # its hues (luma and chroma), so that it tells objects apart by their form
  # alone; its attribute classifier reads the colour image's. (Without, it
  # learns the objects of each colour: configs/shapes.py.) Needs images,
  # not the feature cache.
  mc.objects_without_hue = False

  config.train = t = ml_collections.ConfigDict()
  # 'cross_entropy' (teacher forcing on the reference captions) or 'scst'
  # (self-critical training of CIDEr-D, from a cross-entropy model: see
  # config.scst and config.init_from).
  t.objective = 'cross_entropy'
  t.num_steps = 100_000  # Training steps, each on one batch of batch_size images.
  t.learning_rate = 4e-4  # Peak learning rate of the decoder (AdamW).
  t.warmup_steps = 1_000  # Linear warm-up from 0 to the peak.
  t.schedule = 'cosine'  # After warm-up: 'cosine' (to 0), 'step' or 'constant'.
  t.step_every_steps = 20_000  # 'step' schedule: multiply by step_factor
  t.step_factor = 0.8  # every step_every_steps steps.
  t.weight_decay = 0.0  # AdamW's decoupled decay, on weight matrices only.
  t.b2 = 0.999  # Adam's second-moment decay.
  t.grad_clip_norm = 5.0  # Clip the global gradient norm (0: no clipping).
  # Average the gradients of this many batches per optimizer update; the
  # schedules below then count updates, not batches.
  t.grad_accum_steps = 1
  t.label_smoothing = 0.0  # Cross-entropy label smoothing.
  # lambda of the doubly stochastic attention penalty (Xu et al. 2015, eq. 14),
  # on the mean over positions rather than the sum, so that it does not
  # grow with the grid size.
  t.attention_penalty = 1.0
  # Weight of the concept head's loss (model.concepts.head) beside the
  # captions' cross-entropy.
  t.concept_weight = 1.0
  # A trainable encoder (model.encoder.frozen=False) starts learning at this
  # step (optimizer updates), with its own peak learning rate, warm-up and
  # decay, and its own AdamW started then. Before it, the steps run the
  # frozen model: no encoder backward pass, BatchNorm on running statistics.
  t.encoder_learning_rate = 1e-5
  t.encoder_from_step = 0
  # A fresh run refuses an encoder that is frozen (for good, or until
  # encoder_from_step) with random weights (pretrained=''): its features
  # would carry no more than noise. True allows it (tests, ablations).
  t.allow_random_frozen_encoder = False
  t.log_every_steps = 50  # Train metrics are fetched from the device this often.
  t.checkpoint_every_steps = 1_000
  t.keep_checkpoints = 3  # The latest N, plus the best by best_metric.
  # The checkpoint kept as the best (beside the latest N; what init_from=
  # WORKDIR starts from): <evaluator>_<metric> of a `validation` evaluator
  # (VALIDATION_METRICS; loss and cross_entropy count lower as better, the
  # rest higher). Steps that evaluator did not run on are never the best.
  t.best_metric = 'val_CIDEr'
  t.profile = False  # Capture a JAX profile of a few steps early on.
  # Resume a checkpoint written by another number of processes: model and
  # optimizer are restored, the data order starts afresh (a checkpoint's data
  # position only fits the process count that wrote it).
  t.discard_data_state = False

  # Self-critical sequence training (train.objective='scst';
  # capjax/objectives/scst.py).
  config.scst = s = ml_collections.ConfigDict()
  s.num_samples = 5  # Captions sampled per image and step.
  # 'greedy': the baseline is the reward of the arg-max caption (Rennie et
  # al. 2017); 'mean': the mean reward of the image's other samples (Luo
  # 2020; needs num_samples >= 2, and decodes no greedy caption).
  s.baseline = 'greedy'
  s.temperature = 1.0  # Of the sampling distribution.
  # <eos> is banned before this many words, in the samples and the baseline.
  s.min_words = 1
  # <eos> counts as a token of the reward's n-grams, so that captions which
  # stop mid-phrase ("... with a") match no reference's ending.
  s.eos = True
  s.ban_unk = True  # Never sample <unk>.
  # Weight of a cross-entropy term on the batch's captions added to the
  # SCST loss (0: pure SCST).
  s.ce_weight = 0.0
  # References per image the reward compares with (images with more keep
  # their first ones; COCO has 5 to 7). Document frequencies count them all.
  s.max_references = 5

  # Evaluators (capjax/evaluators/), by name, each with its `type`: each
  # runs every `every_steps` training steps and at the last step; 0 runs it
  # once, after training, with the final state; -1 never. Metrics are logged
  # as eval/<name>_<metric> (validation) and <split>/<metric> (decode_split).
  # A config file may add entries (`config.evals.NAME = decode_split(...)`);
  # the command line can change the fields of those there, e.g.
  # --config.evals.test.every_steps=0 --config.evals.test.split=test_novel.
  config.evals = ml_collections.ConfigDict()
  # Validation; the evaluator named `val` picks the best checkpoint.
  config.evals.val = validation('validation')
  # The final test: the whole split decoded with the decode.* settings,
  # results and metrics files in WORKDIR/decode/. Off here (not every
  # dataset has a test split); the COCO and shapes configs turn it on.
  config.evals.test = decode_split('test', every_steps=-1)

  # Decoding whole splits (--mode=decode, --mode=evaluate_continuously and
  # the decode_split evaluators): beam search, COCO-format results and
  # metrics in WORKDIR/decode/.
  config.decode = de = ml_collections.ConfigDict()
  de.split = 'test'  # The split --mode=decode decodes (a TFDS split spec).
  de.checkpoint_step = -1  # The checkpoint it decodes; -1: the latest.
  de.batch_size = 0  # Global batch in images; 0: batch_size.
  de.beam_size = 3  # Beams per image; 1 is greedy decoding.
  de.alpha = 0.0  # GNMT length penalty exponent (0: plain log-probability).
  de.ban_unk = True  # Never generate <unk>.
  de.ban_repeated_trigrams = False  # Never repeat a word trigram.
  # Constrained beam search (Anderson et al. 2017) on the concept head's
  # confident concepts: each caption must name every concept whose
  # probability is over concept_threshold (at most 4 an image; see
  # capjax.constrained). Needs model.concepts.head.
  de.concepts = False
  de.concept_threshold = 0.5
  # Or a JSON file of each image's phrases, {"image id": [phrase, or list of
  # alternative phrases, ...]}: the captions must contain them (at most 4
  # an image; images not in it are captioned freely).
  de.constraints = ''
  # METEOR: 'auto' (the official Java METEOR 1.5 when Java is installed, else
  # nltk's, reported as METEOR_nltk), 'java', 'nltk' or 'none'.
  de.meteor = 'auto'
  # --mode=evaluate_continuously: look for new checkpoints this often, and
  # stop after this long without one (or once the last step is decoded).
  de.poll_seconds = 60
  de.timeout_seconds = 3_600
  return config


# Fields that count something: a zero or a negative value is a mistake that
# would otherwise surface deep inside grain, PIL or XLA.
_POSITIVE = (
    'batch_size', 'data.image_size', 'data.captions_per_image',
    'data.read_threads', 'data.prefetch_buffer_size', 'train.num_steps',
    'train.grad_accum_steps', 'train.log_every_steps',
    'train.checkpoint_every_steps', 'train.keep_checkpoints',
    'decode.beam_size',
    'scst.num_samples', 'scst.max_references', 'model.decoder.embed_dim',
    'model.decoder.hidden_dim', 'model.decoder.attention_dim',
    'model.concepts.hidden_dim', 'model.decoder.transformer.layers', 'model.decoder.transformer.model_dim',
    'model.decoder.transformer.heads', 'model.decoder.transformer.mlp_dim',
)
_NOT_NEGATIVE = (
    'data.workers', 'data.min_count', 'model.encoder.grid',
    'model.decoder.transformer.encoder_layers',
    'data.features.batch_size',
    'train.warmup_steps', 'train.encoder_from_step',
    'decode.batch_size', 'decode.poll_seconds', 'decode.timeout_seconds',
)


# The config.model.decoder fields each decoder is made of (the others do not
# touch its parameters). Runs before decoders were chosen by name recorded
# no name: theirs is show_attend_tell.
_LSTM_FIELDS = ('name', 'embed_dim', 'hidden_dim', 'attention_dim', 'dropout')
DECODER_FIELDS = {
    'show_attend_tell': _LSTM_FIELDS,
    'updown': _LSTM_FIELDS,
    'transformer': ('name', 'dropout', 'transformer'),
}
OLDEST_DECODER = 'show_attend_tell'


def model_record(model: dict[str, Any]) -> dict[str, Any]:
  """config.model as a dict (`to_dict()`, or a checkpoint's record of one)
  with the decoder's own fields only, and its name: what a checkpoint's
  parameters are only valid with."""
  decoder = dict(model.get('decoder', {}))
  decoder.setdefault('name', OLDEST_DECODER)
  keep = DECODER_FIELDS.get(decoder['name'], tuple(decoder))
  return dict(model, decoder={k: v for k, v in decoder.items() if k in keep})


def field(config: ml_collections.ConfigDict, name: str):
  """The value of a dotted field name, e.g. field(config, 'train.num_steps')."""
  for part in name.split('.'):
    config = config[part]
  return config


def _check_int(name: str, v, least: int) -> None:
  if not isinstance(v, int) or isinstance(v, bool) or v < least:
    raise UserError(f'--config.{name}={v!r} must be an integer >= {least}')


def check(config: ml_collections.ConfigDict) -> None:
  """Raises a one-line UserError for the first field with a value no job
  can use. (Names of datasets, archs, schedules and the like are checked
  where they are used, against the lists there.)"""
  # Here, not at the top: configs import this module, and need no metrics.
  from capjax.metrics import METEOR_MODES  # pylint: disable=g-import-not-at-top

  for name in _POSITIVE + _NOT_NEGATIVE:
    _check_int(name, field(config, name), 1 if name in _POSITIVE else 0)
  if config.data.max_len < 3:
    raise UserError(f'--config.data.max_len={config.data.max_len} must be >= 3'
                    ' (<bos>, a word, <eos>)')
  if config.model.decoder.name not in DECODER_FIELDS:
    raise UserError(f'unknown --config.model.decoder.name='
                    f'{config.model.decoder.name!r}; choose one of '
                    f'{", ".join(DECODER_FIELDS)}')
  if not 0 <= config.model.decoder.dropout < 1:
    raise UserError(f'--config.model.decoder.dropout='
                    f'{config.model.decoder.dropout} must be in [0, 1)')
  for name, entry in config.evals.items():
    _check_evaluator(f'evals.{name}', entry)
  best_metric(config)
  _check_features(config)
  if config.decode.concepts and not config.model.concepts.head:
    raise UserError('--config.decode.concepts=True needs the concept head: '
                    'set --config.model.concepts.head=True (and train it)')
  if config.decode.concepts and config.decode.constraints:
    raise UserError('--config.decode.concepts and --config.decode.constraints '
                    'both constrain the captions: choose one')
  if not 0 < config.decode.concept_threshold < 1:
    raise UserError(f'--config.decode.concept_threshold='
                    f'{config.decode.concept_threshold} must be in (0, 1)')
  if config.train.concept_weight < 0:
    raise UserError(f'--config.train.concept_weight='
                    f'{config.train.concept_weight} must be >= 0')
  if config.decode.meteor not in METEOR_MODES:
    raise UserError(f'unknown --config.decode.meteor={config.decode.meteor!r}'
                    f'; choose one of {", ".join(METEOR_MODES)}')


def validation_metrics(config: ml_collections.ConfigDict) -> list[str]:
  """The metrics the training job's validation logs at every evaluation,
  as the loop returns them: <evaluator>_<metric>."""
  return [f'{name}_{metric}' for name, e in config.evals.items()
          if e.type == 'validation' and e.every_steps > 0
          for metric in VALIDATION_METRICS]


def best_metric(config: ml_collections.ConfigDict) -> tuple[str, bool]:
  """(train.best_metric, whether higher is better); a one-line UserError if
  no validation evaluator of the config can log it."""
  name = config.train.best_metric
  evaluator, _, metric = name.rpartition('_')
  entry = config.evals.get(evaluator)
  if (entry is None or entry.get('type') != 'validation' or
      metric not in VALIDATION_METRICS):
    choices = [f'{n}_{m}' for n, e in config.evals.items()
               if e.type == 'validation' for m in VALIDATION_METRICS]
    raise UserError(
        f'--config.train.best_metric={name!r} is not a metric of a '
        f'validation evaluator in config.evals; choose one of '
        f'{", ".join(choices) or "none (add a validation evaluator)"}')
  return name, VALIDATION_METRICS[metric]


def _check_features(config: ml_collections.ConfigDict) -> None:
  f = config.data.features
  if f.dtype not in ('bfloat16', 'float32'):
    raise UserError(f'--config.data.features.dtype={f.dtype!r}: choose '
                    "'bfloat16' or 'float32'")
  if not f.use:
    return
  if config.model.concepts.head and config.model.concepts.objects_without_hue:
    raise UserError('--config.model.concepts.objects_without_hue=True '
                    'encodes each image without its hues too, and '
                    '--config.data.features.use=True stores the colour '
                    'features only: turn one of them off')
  e, t = config.model.encoder, config.train
  if not e.frozen or t.encoder_from_step:
    how = ('--config.model.encoder.frozen=False' if not e.frozen else
           f'--config.train.encoder_from_step={t.encoder_from_step}')
    raise UserError(
        f'--config.data.features.use=True stores the features of a frozen '
        f'encoder, and {how} trains it: turn one of them off')


def _check_evaluator(prefix: str, entry: ml_collections.ConfigDict) -> None:
  kind = entry.get('type')
  if kind not in EVALUATOR_TYPES:
    raise UserError(f'--config.{prefix}.type={kind!r} is not an evaluator; '
                    f'choose one of {", ".join(EVALUATOR_TYPES)}')
  least = {'every_steps': -1, 'num_batches': -1, 'beam_size': 1,
           'num_samples': 0}
  for key, low in least.items():
    if key in entry:
      _check_int(f'{prefix}.{key}', entry[key], low)
  if entry.get('num_batches') == 0:
    raise UserError(f'--config.{prefix}.num_batches=0 would validate nothing: '
                    'give -1 (all) or a count, or turn it off with '
                    f'--config.{prefix}.every_steps=-1')
  if not entry.get('split'):
    raise UserError(f'--config.{prefix}.split is empty: name a split')
