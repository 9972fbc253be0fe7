"""Flax NNX models: the MLPs, ResNets, ViTs, RBMs (``rbm:H``) and DBNs (``dbn:A-B``), by name
in `MODELS` (a user's own as ``module:attribute``). They name logical axes only;
`jaxpar.core.sharding.RULES` maps them to the mesh.
`jaxpar.models.pytorch` maps PyTorch's names and layouts (torchvision, timm) onto them.

This package imports, from the rest of jaxpar, only `jaxpar.core` (errors, the registry, and
activation sharding constraints by logical axis).
"""

from functools import partial

from jaxpar.core.registry import Registry
from jaxpar.models.dbn import DBN, layer_sizes
from jaxpar.models.mlp import MLP, TwoNN
from jaxpar.models.rbm import RBM, hidden_units
from jaxpar.models.resnet import ResNet, ResNet8, ResNet18, ResNet34, ResNet50
from jaxpar.models.vit import ViT, ViTBase, ViTLite, ViTSmall, ViTTiny

MODELS = Registry(
    {
        "mlp": MLP,
        "2nn": TwoNN,  # the FedAvg paper's MLP: 2 hidden layers of 200, ReLU
        "resnet8": ResNet8,  # CIFAR-style ResNet-8 (3 stages of one basic block, width 16)
        "resnet18": ResNet18,
        "resnet34": ResNet34,
        "resnet50": ResNet50,
        "vit-tiny": ViTTiny,  # width 192, depth 12, 3 heads, MLP 768
        "vit-lite": ViTLite,  # width 256, depth 7, 4 heads, MLP 512
        "vit-small": ViTSmall,  # width 384, depth 12, 6 heads, MLP 1536
        "vit-base": ViTBase,  # width 768, depth 12, 12 heads, MLP 3072
    },
    sized={
        "rbm": lambda name: partial(RBM, hidden=hidden_units(name)),  # rbm:H, H hidden units
        "dbn": lambda name: partial(DBN, sizes=layer_sizes(name)),  # dbn:A-B-C, sigmoid layers
    },
)

# Defaults of the training flags per model family where the seed's (SGD, lr 0.01, constant) do
# not suit: flags given on the command line win. ViTs: AdamW with linear warmup, then cosine.
RECIPES = {
    "vit": {
        "optimizer": "adamw",
        "lr": 1e-3,
        "weight_decay": 0.05,
        "schedule": "cosine",
        "warmup_steps": 50,
    },
    # RBMs: scikit-learn's BernoulliRBM's plain SGD at 0.06 (with momentum 0.9, the seed's, the
    # embedded digits' test pseudo-log-likelihood was -23.7 against -20.9; docs/rbm.md).
    "rbm": {"lr": 0.06, "momentum": 0.0},
    # DBNs' fine-tuning: sigmoid layers learn slowly at the seed's 0.01 (27% on the digits after
    # 10 epochs from pretraining; 95% at 0.1, with the seed's momentum 0.9).
    "dbn": {"lr": 0.1},
}


# What each model family computes, numbered: a checkpoint resumes only into the revision that
# trained it (its manifest's "revision"; manifests without one are revision 1).
REVISIONS = {
    "resnet": (2, "symmetric (PyTorch) padding; revision 1 padded stride-2 layers SAME"),
    "vit": (2, "exact GELU (as PyTorch and timm); revision 1 used the tanh approximation"),
}


def revision(model: str) -> int:
    """The revision of `model`'s family (`REVISIONS`); 1 for families never changed.

    >>> revision("resnet18"), revision("mlp")
    (2, 1)
    """
    return REVISIONS.get(model.rstrip("0123456789").split("-")[0], (1,))[0]


def recipe_for(model: str) -> dict:
    """The flag defaults of `model`'s family (`RECIPES`), or {}.

    >>> recipe_for("vit-lite")["optimizer"], recipe_for("mlp"), recipe_for("rbm:500")["lr"]
    ('adamw', {}, 0.06)
    """
    return RECIPES.get(model.split("-")[0].split(":")[0], {})


__all__ = [
    "DBN",
    "MLP",
    "RBM",
    "TwoNN",
    "MODELS",
    "RECIPES",
    "recipe_for",
    "REVISIONS",
    "revision",
    "ResNet",
    "ResNet8",
    "ResNet18",
    "ResNet34",
    "ResNet50",
]
__all__ += ["ViT", "ViTBase", "ViTLite", "ViTSmall", "ViTTiny"]
