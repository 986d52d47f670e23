"""EMamba: the SiMBA architecture (Mamba token mixing + EinFFT channel mixing) as a PyTorch library.

``import emamba`` registers ``emamba_{tiny,s,b,l}`` and ``emamba_{s,b,l}_mlp`` with timm, so
``timm.create_model("emamba_s")`` works.
"""

from . import ops
from .models import EMamba, checkpoint_filter_fn

__version__ = "0.1.0"

__all__ = ["EMamba", "checkpoint_filter_fn", "ops", "__version__"]
