"""Small models and offline data sets for the any-network Laplace examples (scikit-learn's digits
and diabetes) and a ResNet-18-shaped network with BatchNorm (no torchvision dependency)."""

from .data import diabetes_loaders, digits_loaders, synthetic_images
from .models import MLP, ResNet18ish, SmallCNN, train

__all__ = [
    "MLP",
    "ResNet18ish",
    "SmallCNN",
    "diabetes_loaders",
    "digits_loaders",
    "synthetic_images",
    "train",
]
