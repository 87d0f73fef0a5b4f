"""The jobs' one road to the model: pure functions of (variables, inputs).

Training objectives, evaluators, beam search, sampling, the caption API,
the feature cache and the benchmark all run the captioner through a
`Predict` built on it, as big_vision's evaluators receive predict
functions; none names a method of the model. Each function takes the
variables first (`TrainState.variables()` builds them), so it can be
jitted, differentiated in the parameters, or run per device:

  predict = Predict(model)
  variables = predict.init(key, images, captions)
  features = predict.encode(variables, batch)            # [B, P, C]
  logits, alphas = predict.logits(variables, features, batch['captions'])
  decoding = predict.decoding(variables, features, k)    # search, sample
  carry, logits, alpha = decoding.step(decoding.carry, tokens)

A `Predict` is hashable (its model is), so it can be a static argument.
"""

from collections.abc import Callable
import dataclasses
from typing import Any

import jax

from capjax.models import captioner
from capjax.models import decoders

Array = jax.Array
Variables = dict[str, Any]

# step(carry, tokens [B, k]) -> (carry, logits [B, k, V], alpha [B, k, P]).
StepFn = Callable[[Any, Array], tuple[Any, Array, Array]]


@dataclasses.dataclass(frozen=True)
class Decoding:
  """A decoder bound to its variables and to a batch of encoded images.

  Attributes:
    carry: the initial carry of k hypotheses per image, leaves [B, k, ...].
    step: one step of every hypothesis (`StepFn`), evaluation mode.
    num_positions: P, the size of the attention maps.
    cache: the decoder's per-image cache, which `step` reads; another
      decoding of the same images can reuse it (`Predict.decoding`).
  """
  carry: Any
  step: StepFn
  num_positions: int
  cache: Any


@dataclasses.dataclass(frozen=True)
class Predict:
  """The predict functions of one `CaptionModel`."""
  model: captioner.CaptionModel

  # What the jobs may know of the model.

  @property
  def has_concepts(self) -> bool:
    """Whether the model has a concept head (config.model.concepts)."""
    return bool(self.model.concepts[1])

  @property
  def bn_trains(self) -> bool:
    """Whether training updates the encoder's BatchNorm statistics: a
    trainable encoder without freeze_bn. (From the model, not the config:
    the frozen phase of a fine-tuned encoder runs a frozen copy.)"""
    return not (self.model.frozen or self.model.freeze_bn)

  def frozen(self) -> 'Predict':
    """The same model with its encoder frozen (`CaptionModel.frozen`)."""
    return Predict(self.model.clone(frozen=True))

  def unrolled(self) -> 'Predict':
    """The same model with its decoder's loop over time unrolled: for
    XLA's cost analysis, which counts a loop's body once."""
    return Predict(self.model.clone(
        decoder=decoders.unrolled(self.model.decoder)))

  # The functions.

  def init(self, rng: Array, images: Array, captions: Array) -> Variables:
    """New variables, from example images [B, S, S, 3] and captions
    [B, K, L] (their shapes only matter)."""
    return self.model.init(rng, images, captions)

  def grid(self, variables: Variables, images: Array) -> Array:
    """Pixels [B, S, S, 3] -> the encoder's grid [B, h, w, C] (evaluation
    mode): what the feature cache stores."""
    return self.model.apply(variables, {'image': images},
                            method=self.model.encode, grid=True)

  def encode(self, variables: Variables, batch: dict[str, Array], *,
             concepts: bool = False) -> Any:
    """A batch's features [B, P, C] (from its pixels or cached features),
    evaluation mode; with `concepts`, (features, the concept head's
    logits)."""
    return self.model.apply(variables, batch, concepts=concepts,
                            method=self.model.encode)

  def logits(self, variables: Variables, features: Array, captions: Array, *,
             train: bool = False, rng: Array | None = None
             ) -> tuple[Array, Array]:
    """Teacher forcing: features [B, P, C], captions int [B, K, L] ->
    logits [B, K, L-1, V] and alphas [B, K, L-1, P], float32. With
    `train`, dropout draws from `rng`."""
    rngs = {'dropout': rng} if train else None
    return self.model.apply(variables, features, captions, train,
                            method=self.model.logits, rngs=rngs)

  def train_logits(self, variables: Variables, batch: dict[str, Array], *,
                   rng: Array) -> tuple[tuple[Any, ...], Variables]:
    """The training forward of a batch, in one application of the model
    (the encoder's BatchNorm statistics of this batch come back with it):
    ((logits, alphas) or, with a concept head, (logits, alphas, concept
    logits)), and the updated batch_stats ({} when they do not train)."""

    def forward(model, batch):
      if model.concept_head is None:
        features = model.encode(batch, True)
        return model.logits(features, batch['captions'], True)
      features, concepts = model.encode(batch, True, concepts=True)
      return (*model.logits(features, batch['captions'], True), concepts)

    return self.model.apply(
        variables, batch, method=forward, rngs={'dropout': rng},
        mutable=['batch_stats'] if self.bn_trains else [])

  def decoding(self, variables: Variables, features: Array, k: int, *,
               cache: Any = None) -> Decoding:
    """The decoder on features [B, P, C], for k hypotheses per image: its
    per-image cache is made once here (or is another decoding's `cache` of
    the same images) and read by every step."""
    model = self.model
    if cache is None:
      cache = model.apply(variables, features,
                          method=lambda m, f: m.decoder.prepare(f))
    carry = model.apply(variables, cache, k,
                        method=lambda m, c, k: m.decoder.initial_carry(c, k))

    def step(carry, tokens):
      return model.apply(variables, carry, tokens, cache,
                         method=lambda m, *a: m.decoder.step(*a))
    return Decoding(carry, step, features.shape[1], cache)
