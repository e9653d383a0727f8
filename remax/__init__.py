"""remax: kMaX-DeepLab mask transformers trained with the ReMaX relaxations, in pure PyTorch."""

from remax.config import Config, get_config, list_presets

__version__ = "0.1.0"


def build_model(preset: str, **overrides):
    """Build a model preset (see :func:`remax.models.build_model`); nothing is downloaded unless
    ``backbone_pretrained=True`` is passed."""
    from remax.models import build_model as _build

    return _build(preset, **overrides)


def from_pretrained(name_or_path, device="cpu", **kwargs):
    """The bare inference model of a model folder, a Hugging Face Hub id (``org/name``, needs ``remax[hub]``) or a
    checkpoint file (see :func:`remax.hub.from_pretrained`); safetensors + JSON, no code is executed."""
    from remax.hub import from_pretrained as _from_pretrained

    return _from_pretrained(name_or_path, device=device, **kwargs)


__all__ = ["Config", "build_model", "from_pretrained", "get_config", "list_presets", "__version__"]
