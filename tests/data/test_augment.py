"""FrAug-style frequency augmentation of forecasting windows (``emamba.data.augment``)."""

from __future__ import annotations

import pytest
import torch

from emamba.data.augment import augment_batch, frequency_augment


def _series(batch=5, length=30, channels=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, length, channels, generator=generator, dtype=torch.float64)


@pytest.mark.parametrize("method", ["freq_mask", "freq_mix"])
def test_rate_zero_changes_nothing_and_the_mean_is_kept(method):
    series = _series()
    out = frequency_augment(series, method, 0.0)
    assert out.dtype == series.dtype and out.shape == series.shape
    torch.testing.assert_close(out, series, rtol=0, atol=1e-6)
    changed = frequency_augment(series, method, 0.7, torch.Generator().manual_seed(1))
    assert not torch.allclose(changed, series, atol=1e-3)
    torch.testing.assert_close(changed.mean(dim=1), series.mean(dim=1), rtol=0, atol=1e-6)


@pytest.mark.parametrize("length", [30, 31])
def test_full_mask_leaves_each_series_mean(length):
    series = _series(length=length)
    out = frequency_augment(series, "freq_mask", 1.0)
    torch.testing.assert_close(out, series.mean(dim=1, keepdim=True).expand_as(series), rtol=0, atol=1e-6)


def test_full_mix_takes_every_cycle_from_one_partner_window():
    """At rate 1 a window keeps its own mean and takes all its cycles from one partner window, variate by variate."""
    series = _series(batch=6)
    out = frequency_augment(series, "freq_mix", 1.0, torch.Generator().manual_seed(3))
    own_mean = series.mean(dim=1, keepdim=True)
    cycles = series - own_mean
    for i in range(series.shape[0]):
        partners = [j for j in range(series.shape[0])
                    if torch.allclose(out[i] - own_mean[i], cycles[j], atol=1e-5)]
        assert len(partners) == 1
    # The partners form a permutation of the batch.
    partners = [next(j for j in range(6) if torch.allclose(out[i] - own_mean[i], cycles[j], atol=1e-5))
                for i in range(6)]
    assert sorted(partners) == list(range(6))


def test_augment_batch_appends_one_consistent_copy():
    x, horizon = _series(batch=4, length=12), _series(batch=4, length=5, seed=1)
    label_len, pred_len = 6, 5
    y = torch.cat([x[:, -label_len:], horizon], dim=1)
    x_mark, y_mark = torch.randn(4, 12, 4), torch.randn(4, 11, 4)
    phase = torch.arange(4)
    torch.manual_seed(0)
    bx, by, bxm, bym, bphase = augment_batch((x, y, x_mark, y_mark, phase), pred_len, "freq_mask", 0.5)
    assert bx.shape == (8, 12, 3) and by.shape == (8, 11, 3)
    torch.testing.assert_close(bx[:4], x)
    torch.testing.assert_close(by[:4], y)
    torch.testing.assert_close(by[4:, :label_len], bx[4:, -label_len:])  # the copy is one series
    assert not torch.allclose(bx[4:], x, atol=1e-3)
    torch.testing.assert_close(bxm, torch.cat([x_mark, x_mark]))
    torch.testing.assert_close(bym, torch.cat([y_mark, y_mark]))
    assert bphase.tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    batch = (x, y, x_mark, y_mark)
    assert augment_batch(batch, pred_len, "none", 0.5) is batch


def test_bad_method_or_rate():
    with pytest.raises(ValueError, match="unknown augmentation"):
        frequency_augment(_series(), "time_warp", 0.5)
    with pytest.raises(ValueError, match="rate"):
        frequency_augment(_series(), "freq_mask", 1.5)
