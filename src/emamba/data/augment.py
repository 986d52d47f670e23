"""Frequency-domain augmentation of forecasting windows (FrAug, Chen et al. 2023).

A training window is the look-back ``x`` (B, seq_len, C) followed by its horizon; the two are augmented
*together*, as one series, so that the augmented look-back and horizon stay consistent (an augmentation of
the look-back alone would teach the model a wrong mapping). The augmented windows are appended to the batch:
the original windows are still seen every step.

* ``freq_mask``: each Fourier coefficient of each (window, variate) series is zeroed with probability
  ``rate``; the series loses those cycles, in the look-back and the horizon alike.
* ``freq_mix``: each coefficient is replaced, with probability ``rate``, by the same coefficient of another
  window of the batch (same variate), so that windows exchange cycles. Partners follow a uniformly random
  permutation of the batch, so about one window in B is its own partner and stays as it was (the sweep rows
  in docs/forecasting.md were made this way).

The zero frequency (each series' mean) is never touched: RevIN removes the level anyway, and masking it would
only shift windows up or down.
"""

from __future__ import annotations

from typing import Optional

import torch

#: ``--aug_method`` choices.
AUG_METHODS = ("none", "freq_mask", "freq_mix")


def _changed_coefficients(spectrum: torch.Tensor, rate: float, generator: Optional[torch.Generator]) -> torch.Tensor:
    """Bernoulli(rate) mask over a (B, F, C) spectrum, never set at frequency 0."""
    draw = torch.rand(spectrum.shape, generator=generator, device=spectrum.device)
    mask = draw < rate
    mask[:, 0] = False
    return mask


def frequency_augment(series: torch.Tensor, method: str, rate: float,
                      generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``method`` (``freq_mask`` or ``freq_mix``) applied to (B, T, C) ``series`` along T; same shape and dtype."""
    if method not in AUG_METHODS[1:]:
        raise ValueError(f"unknown augmentation {method!r}; expected one of {AUG_METHODS[1:]}")
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"augmentation rate must be in [0, 1], got {rate}")
    length = series.shape[1]
    spectrum = torch.fft.rfft(series.float(), dim=1)
    changed = _changed_coefficients(spectrum, rate, generator)
    if method == "freq_mask":
        replacement = torch.zeros_like(spectrum)
    else:
        partner = torch.randperm(series.shape[0], generator=generator, device=series.device)
        replacement = spectrum[partner]
    spectrum = torch.where(changed, replacement, spectrum)
    return torch.fft.irfft(spectrum, n=length, dim=1).to(series.dtype)


def augment_batch(batch, pred_len: int, method: str, rate: float, generator: Optional[torch.Generator] = None):
    """The loader ``batch`` (x, y, x_mark, y_mark[, cycle_index]) with an augmented copy of every window
    appended (2B windows). ``y``'s last ``pred_len`` steps are the horizon; its first steps (TSLib's
    ``label_len``, which overlap ``x``) are rebuilt from the augmented ``x``, so the copy stays one series.
    Time marks and cycle phases are those of the original window."""
    if method == "none":
        return batch
    batch_x, batch_y, *rest = batch
    seq_len = batch_x.shape[1]
    label_len = batch_y.shape[1] - pred_len
    joint = torch.cat([batch_x, batch_y[:, label_len:]], dim=1)
    augmented = frequency_augment(joint, method, rate, generator)
    aug_x = augmented[:, :seq_len]
    aug_y = augmented[:, seq_len - label_len :]
    return (torch.cat([batch_x, aug_x]), torch.cat([batch_y, aug_y]), *(torch.cat([t, t]) for t in rest))
