"""configs/coco.py with the Up-Down decoder (Anderson et al. 2018).

The top-down attention model of "Bottom-Up and Top-Down Attention for Image
Captioning and Visual Question Answering" (CVPR 2018, Sec. 3.2): an
attention LSTM fed the language LSTM's state, the mean image feature and
the word; a language LSTM fed the attended feature and the attention
LSTM's state. On the 7x7 grid of ResNet-101 features that configs/coco.py
encodes (the paper's "ResNet" baseline, Table 1), the paper reports CIDEr
105.4 with cross-entropy and 111.1 after CIDEr optimisation on the Karpathy
test split; its 111.1 -> 120.1 gain comes from bottom-up region features,
which capjax does not have.

What differs from configs/coco.py, and why:
  * LSTMs of 1,000 units, an attention layer of 512 and word embeddings of
    1,000 (Anderson et al. 2018, implementation details of the captioning
    model).
  * Dropout 0.5 on the language LSTM's output before the word logits, as
    ruotianluo/self-critical.pytorch's UpDown model (drop_prob_lm).
  * No doubly stochastic attention penalty: it is Show, Attend and Tell's
    (Xu et al. 2015), not part of Up-Down's loss.
  * Learning rate 5e-4, ruotianluo/self-critical.pytorch's for its
    attention models with Adam; the schedule (30 epochs, the encoder
    fine-tuned for the last 10) is configs/coco.py's.
"""

from configs import coco


def get_config():
  config = coco.get_config()
  m = config.model.decoder
  m.name = 'updown'
  m.embed_dim = 1_000
  m.hidden_dim = 1_000  # Each of the two LSTMs.
  m.attention_dim = 512
  m.dropout = 0.5
  config.train.attention_penalty = 0.0
  config.train.learning_rate = 5e-4
  return config
