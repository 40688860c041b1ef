"""The LeWM world model (pure torch): ViT/CNN encoder, projectors, AdaLN-zero predictor.

Example:
    >>> from leworld.model import LeWMConfig, LeWorldModel
    >>> model = LeWorldModel(LeWMConfig(encoder="cnn", image_size=64))
    >>> sorted(model.parameter_counts())[:2]
    ['action_encoder', 'encoder']
"""

from .cnn import CNN
from .ensemble import ModelEnsemble
from .lewm import LeWMConfig, LeWorldModel, Projector
from .predictor import Predictor
from .vit import ViT

__all__ = ["CNN", "LeWMConfig", "LeWorldModel", "ModelEnsemble", "Predictor", "Projector", "ViT"]
