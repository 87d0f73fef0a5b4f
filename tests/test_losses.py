"""The caption losses and their one normalisation."""

import jax.numpy as jnp
import numpy as np

from capjax import losses


def test_caption_losses():
  logits = jnp.zeros((2, 1, 3, 5))  # Uniform over 5 words.
  captions = jnp.array([[[1, 4, 2, 0]], [[1, 4, 4, 2]]])
  alphas = jnp.full((2, 1, 3, 2), 0.5)  # Two positions, half each.
  mask = jnp.array([True, False])  # The second image is padding.
  sums = losses.caption_losses(logits, captions, alphas, mask, 0.0)
  assert int(sums['tokens']) == 2 and int(sums['captions']) == 1
  np.testing.assert_allclose(sums['ce'], 2 * np.log(5), rtol=1e-6)
  # Two valid steps of 0.5 per position: sum_t alpha = 1, no penalty.
  np.testing.assert_allclose(sums['penalty'], 0.0, atol=1e-7)
  alphas = alphas.at[0, 0, :, 0].set(1.0).at[0, 0, :, 1].set(0.0)
  sums = losses.caption_losses(logits, captions, alphas, mask, 0.0)
  np.testing.assert_allclose(sums['penalty'], ((1 - 2) ** 2 + 1) / 2)


def test_caption_loss_divides_by_the_totals_given():
  sums = {'ce': 6.0, 'tokens': 3.0, 'penalty': 2.0, 'captions': 4.0}
  assert losses.caption_loss(sums, 0.5) == 6 / 3 + 0.5 * 2 / 4
  totals = {'tokens': 6.0, 'captions': 8.0}
  assert losses.caption_loss(sums, 0.5, totals) == 6 / 6 + 0.5 * 2 / 8
