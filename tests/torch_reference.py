"""PyTorch reference networks with torchvision's module names (torchvision itself does not install
beside this project's CPU build of torch): the ResNets of ``torchvision.models.resnet`` and the
ViT of ``torchvision.models.vision_transformer``, written from their published structure. Their
``state_dict()`` keys are torchvision's, so `jaxpar.models.pytorch` reads them as it reads real
files.
"""

import torch
from torch import nn


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin, width, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, width, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.downsample = _downsample(cin, width, stride)

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu(y + (self.downsample(x) if self.downsample is not None else x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin, width, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, width * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(width * 4)
        self.relu = nn.ReLU()
        self.downsample = _downsample(cin, width * 4, stride)

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + (self.downsample(x) if self.downsample is not None else x))


def _downsample(cin, cout, stride):
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


class ResNet(nn.Module):
    """torchvision's ResNet; ``small_stem`` is jaxpar's for images of at most 32 pixels (3x3
    stride-1 convolution, no max pooling), for the CIFAR-style ResNet-8."""

    def __init__(self, block, stage_sizes, classes, channels=3, width=64, small_stem=False):
        super().__init__()
        k, stride = (3, 1) if small_stem else (7, 2)
        self.conv1 = nn.Conv2d(channels, width, k, stride, k // 2, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.maxpool = nn.Identity() if small_stem else nn.MaxPool2d(3, 2, 1)
        cin = width
        for i, n in enumerate(stage_sizes):
            blocks = []
            for j in range(n):
                blocks.append(block(cin, width * 2**i, 2 if i > 0 and j == 0 else 1))
                cin = width * 2**i * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.stages = len(stage_sizes)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(self.stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.fc(x.mean((2, 3)))


class EncoderBlock(nn.Module):
    def __init__(self, width, heads, mlp_dim):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=1e-6)
        self.self_attention = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(
            nn.Linear(width, mlp_dim), nn.GELU(), nn.Dropout(0.0), nn.Linear(mlp_dim, width),
            nn.Dropout(0.0),
        )  # fmt: skip

    def forward(self, x):
        y = self.ln_1(x)
        x = x + self.self_attention(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class Encoder(nn.Module):
    def __init__(self, tokens, width, depth, heads, mlp_dim):
        super().__init__()
        self.pos_embedding = nn.Parameter(torch.randn(1, tokens, width) * 0.02)
        self.layers = nn.Sequential()
        for i in range(depth):
            self.layers.add_module(f"encoder_layer_{i}", EncoderBlock(width, heads, mlp_dim))
        self.ln = nn.LayerNorm(width, eps=1e-6)

    def forward(self, x):
        return self.ln(self.layers(x + self.pos_embedding))


class ViT(nn.Module):
    """torchvision's VisionTransformer (class token, learned position embeddings)."""

    def __init__(self, image, patch, width, depth, heads, mlp_dim, classes, channels=3):
        super().__init__()
        self.conv_proj = nn.Conv2d(channels, width, patch, patch)
        self.class_token = nn.Parameter(torch.randn(1, 1, width) * 0.02)
        self.encoder = Encoder((image // patch) ** 2 + 1, width, depth, heads, mlp_dim)
        self.heads = nn.Sequential()
        self.heads.add_module("head", nn.Linear(width, classes))

    def forward(self, x):
        x = self.conv_proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.heads(self.encoder(x)[:, 0])


def randomize(net: nn.Module, seed: int) -> nn.Module:
    """Every parameter and BatchNorm statistic random (not the initialisation's ones and zeros),
    so a mapping that swaps or drops any of them shows; evaluation mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in net.state_dict().items():
            if name.endswith("num_batches_tracked"):
                continue
            scales = (
                "running_var",
                "bn1.weight",
                "bn2.weight",
                "bn3.weight",
                "downsample.1.weight",
            )
            if name.endswith(scales):  # positive, around 1
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            else:
                fan_in = t[0].numel() if t.ndim > 1 else 1
                t.copy_(torch.randn(t.shape, generator=g) / fan_in**0.5)
    return net.eval()


def resnet(name: str, classes: int, channels: int = 3, small_stem: bool = False) -> ResNet:
    block, sizes, width = {
        "resnet8": (BasicBlock, (1, 1, 1), 16),
        "resnet18": (BasicBlock, (2, 2, 2, 2), 64),
        "resnet50": (Bottleneck, (3, 4, 6, 3), 64),
    }[name]
    return ResNet(block, sizes, classes, channels, width, small_stem)


def timm_names(state: dict) -> dict:
    """torchvision ViT names -> timm's (``vit_base_patch16_224``); the tensors are the same."""
    out = {}
    for k, v in state.items():
        k = k.replace("conv_proj", "patch_embed.proj").replace("class_token", "cls_token")
        k = k.replace("encoder.pos_embedding", "pos_embed").replace("encoder.ln", "norm")
        k = k.replace("heads.head", "head").replace("encoder.layers.encoder_layer_", "blocks.")
        k = k.replace("ln_1", "norm1").replace("ln_2", "norm2").replace("mlp.0", "mlp.fc1")
        k = k.replace("mlp.3", "mlp.fc2").replace("self_attention.out_proj", "attn.proj")
        k = k.replace("self_attention.in_proj_", "attn.qkv.")
        out[k] = v
    return out
