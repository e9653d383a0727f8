"""remax: kMaX-DeepLab mask transformers trained with the ReMaX relaxations, in pure PyTorch."""

from remax.config import Config, get_config, list_presets

__version__ = "0.1.0"


def build_model(preset: str, **overrides):
    """Build a model preset (see :func:`remax.models.build_model`); nothing is downloaded unless
    ``backbone_pretrained=True`` is passed."""
    from remax.models import build_model as _build

    return _build(preset, **overrides)


__all__ = ["Config", "build_model", "get_config", "list_presets", "__version__"]
