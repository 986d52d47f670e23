"""Model families. Importing this module registers the vision models with timm."""

from .emamba import EMamba, checkpoint_filter_fn
from .forecasting import EMambaTS

__all__ = ["EMamba", "EMambaTS", "checkpoint_filter_fn"]
