"""Flax NNX models. They name logical axes only; `jaxpar.sharding.RULES` maps them to the mesh."""

from models.mlp import MLP
from models.resnet import ResNet, ResNet8, ResNet18, ResNet34, ResNet50

MODELS = {
    "mlp": MLP,
    "resnet8": ResNet8,  # CIFAR-style ResNet-8 (3 stages of one basic block, width 16)
    "resnet18": ResNet18,
    "resnet34": ResNet34,
    "resnet50": ResNet50,
}

__all__ = ["MLP", "MODELS", "ResNet", "ResNet8", "ResNet18", "ResNet34", "ResNet50"]
