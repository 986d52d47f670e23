"""Model families. Importing this module registers the vision models with timm."""

from .emamba import EMamba, checkpoint_filter_fn

__all__ = ["EMamba", "checkpoint_filter_fn"]
