"""MS COCO 2014 with the Karpathy splits, set up as the literature trains it.

Train on train+restval (113,287 images), validate on val, report on test
(5,000 images each). Prepare the data and the ImageNet weights once with
`--mode=prepare`.

The setup the papers report, with the reasons for what differs:
  * Encoder: ResNet-101 (He et al. 2016) with ImageNet weights, as in Rennie
    et al. 2017. timm's resnet101.a1h_in1k: 81.95% ImageNet top-1 at 224 px,
    the best ImageNet-1k ResNet-101 that loads into capjax's ResNet v1.5
    (torchvision's own tv2_in1k: 81.91%, trained at 176 px; see
    capjax.pretrained.TIMM_TAGS and the README).
  * 224 px images, whose 7x7 grid of 2048-d ResNet-101 features is what the
    decoder attends over: the grid of Rennie et al. 2017's attention models.
    Xu et al. 2015's 14x14 grid came from VGG at 224 px; ResNet-101 gives it
    at 448 px, four times the encoder's FLOPs per image.
  * Decoder: soft attention and an LSTM of 512, dropout 0.5 and the doubly
    stochastic attention penalty with lambda = 1 (Xu et al. 2015).
  * The encoder frozen first, as Xu et al. kept theirs, then fine-tuned with
    its own learning rate: sgrvinod's PyTorch tutorial recipe of Show, Attend
    and Tell (decoder 4e-4, encoder 1e-4 when fine-tuning, gradients clipped
    at 5).
  * Beam 3 on the Karpathy test split.
"""

from capjax import config as config_lib

# Training images of train+restval, for the arithmetic in epochs below.
TRAIN_IMAGES = 113_287


def get_config():
  config = config_lib.defaults()
  config.batch_size = 256  # Images; x5 captions each.
  d = config.data
  d.name = 'coco_captions'
  d.builder_config = '2014'  # The only coco_captions config: Karpathy splits.
  d.prepare = False  # ~20 GB download: prepare explicitly, once.
  d.train_split = 'train+restval'
  d.image_size = 224  # ResNet-101's 7x7 grid; its weights' training size.
  d.normalization = 'imagenet'  # What timm's weights were trained with.
  d.max_len = 18  # 16 words + <bos>/<eos> covers ~98% of COCO captions.
  d.min_count = 5  # As in Karpathy & Li; ~10,000 words.
  d.workers = 16  # JPEG decoding of 224 px images needs processes on a GPU host.

  m = config.model
  m.encoder.arch = 'resnet101'
  m.encoder.variant = 'v1.5'  # torchvision / timm layout.
  m.encoder.pretrained = 'timm:a1h_in1k'
  m.encoder.grid = 0  # The encoder's own 7x7 grid: 49 positions.
  m.encoder.frozen = False  # Fine-tuned from train.encoder_from_step.
  m.encoder.freeze_bn = True  # Fine-tuning keeps ImageNet's BatchNorm stats.
  m.decoder.embed_dim = 512
  m.decoder.hidden_dim = 512  # The LSTM.
  m.decoder.attention_dim = 512
  m.decoder.dropout = 0.5

  t = config.train
  # 113,287 / 256 = 442.5 steps per epoch: 30 epochs are 13,276 steps. (The
  # default 100,000 steps would be 226 epochs.)
  steps_per_epoch = TRAIN_IMAGES / config.batch_size
  t.num_steps = round(30 * steps_per_epoch)
  t.learning_rate = 4e-4  # The decoder's peak.
  t.warmup_steps = 1_000  # 2.3 epochs, for each part from its first step.
  t.schedule = 'cosine'
  t.grad_clip_norm = 5.0
  t.attention_penalty = 1.0  # lambda.
  # The encoder joins after 20 epochs (8,851 steps), at a quarter of the
  # decoder's rate, for the last 10.
  t.encoder_from_step = round(20 * steps_per_epoch)
  t.encoder_learning_rate = 1e-4
  t.checkpoint_every_steps = 1_000

  # Validation: loss, and greedy captions of 20 batches (5,120 images: all
  # of val) scored with CIDEr-D, which picks the best checkpoint.
  config.evals.val.split = 'val'
  config.evals.val.num_batches = 20
  config.evals.val.every_steps = 1_000  # 2.3 epochs.
  # The papers' test: beam 3 on the Karpathy test split, after training too.
  config.decode.split = 'test'
  config.decode.beam_size = 3
  config.decode.batch_size = 1_024
  config.evals.test.every_steps = 0
  return config
