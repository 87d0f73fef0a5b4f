"""What every training objective gives the loop."""

from collections.abc import Callable
import dataclasses
from typing import Any, Protocol

from capjax.data.vocab import Vocab


class Data(Protocol):
  """What an objective may read of the prepared dataset (`prepare.Data`)."""
  vocab: Vocab

  def references(self, split: str) -> dict[int, list[str]]:
    ...


@dataclasses.dataclass(frozen=True)
class Objective:
  """A training objective, as the loop runs it.

  Attributes:
    step: `step(state, batch, rng, schedule, *constants, predict=, config=,
      tx=None) -> (state, metrics)`, written for the batch one device sees,
      with the collectives of `capjax.parallel`; metrics are reduced over
      devices. `predict` is the model's `models.Predict`; `schedule` is
      `optimizer.schedule_values(config)` (an input, so that runs that
      differ only in it share one compiled step); `tx(schedule)`, if given,
      is the optax transformation to use instead of `optimizer.make`'s.
    constants: arrays every step reads and none changes (a lookup table),
      placed on the devices once.
    references: R > 0: the batches must carry `references` [b, R, L], every
      caption of each image (up to R).
    needs_init_from: a fresh run must start from another run's model
      (`--config.init_from`).
  """
  step: Callable[..., tuple[Any, dict[str, Any]]]
  constants: tuple[Any, ...] = ()
  references: int = 0
  needs_init_from: bool = False
