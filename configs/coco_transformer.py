"""configs/coco.py with the Transformer decoder (Vaswani et al. 2017).

An encoder-decoder Transformer over the 7x7 grid of ResNet-101 features, as
the field's Transformer captioning baselines use it (ruotianluo/
self-critical.pytorch's "transformer" model): self-attention layers over
the grid positions, then decoder layers of masked self-attention and
cross-attention to them.

What differs from configs/coco.py, and why:
  * 6 encoder and 6 decoder layers, d_model 512, 8 heads, feed-forward 2048
    and dropout 0.1: the base model of Vaswani et al. 2017 (Table 3),
    ruotianluo/self-critical.pytorch's transformer settings.
  * Pre-LayerNorm blocks (Xiong et al. 2020): stable with a short warm-up,
    where the original post-LN model needs its long one.
  * Sinusoidal word positions (Vaswani et al. 2017, Sec. 3.5); learned
    ones are --config.model.decoder.transformer.positions=learned.
  * No doubly stochastic attention penalty: it is Show, Attend and Tell's
    (Xu et al. 2015); the attention maps drawn are the last layer's
    cross-attention averaged over heads.
  * A peak learning rate of 2e-4 after 4,000 warm-up steps (Vaswani et al.
    2017 warm up for 4,000 steps; their schedule peaks at 7e-4 for d_model
    512). Not yet tuned on COCO: the cosine decay and the encoder's late
    fine-tuning are configs/coco.py's.
"""

from configs import coco


def get_config():
  config = coco.get_config()
  m = config.model.decoder
  m.name = 'transformer'
  m.dropout = 0.1
  t = m.transformer
  t.encoder_layers = 6
  t.layers = 6
  t.model_dim = 512
  t.heads = 8
  t.mlp_dim = 2_048
  t.positions = 'sinusoidal'
  config.train.attention_penalty = 0.0
  config.train.learning_rate = 2e-4
  config.train.warmup_steps = 4_000
  return config
