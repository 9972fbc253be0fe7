"""Int8 quantization by qwix, one set of rules for both uses: post-training (`post_training`,
``python -m jaxpar.compress --quantize int8``) and quantization-aware training (`aware`,
``train.py --qat int8``).

Weights get one scale per output channel (symmetric, absmax); dense layers multiply int8 weights
with float inputs. qwix 0.1.8 quantizes a convolution only together with its input (its
convolution requires the input type to equal the weight type), so convolutions also quantize their
inputs to int8: per example at run time, or with static scales when `activations` asks for
quantized inputs everywhere. A model trained with `aware` computes exactly what `post_training`
makes of its float weights (tests/test_compress.py): its checkpoints stay float32 and quantize
with no further loss.

qwix keeps each weight's logical axis names on its int8 values and its scales, so
`jaxpar.core.sharding.state_shardings` places them like the float weight and its output channels.
ViTs are refused (`unsupported`).
"""

import jax.numpy as jnp

QAT = ("int8",)  # what --qat offers


def unsupported(model: str) -> str | None:
    """Why qwix cannot quantize `model` here (a one-line error), or None."""
    if model.startswith("vit-"):
        return (
            f"{model} cannot be quantized to int8: qwix 0.1.8 quantizes a weight by replacing it "
            "in its module as the model runs, and a ViT's blocks run stacked in one lax.scan, "
            "whose per-layer slices it cannot replace; int8 works for the MLPs and ResNets"
        )
    return None


def rules(rule, activations: bool = False) -> list:
    """qwix rules (`rule`: ``qwix.QuantizationRule`` or ``qwix.QtRule``) for int8 weights, and
    int8 inputs with static scales if `activations`."""
    static = True if activations else None  # None: qwix's default under XLA, dynamic scales
    return [
        rule(
            op_names=("conv_general_dilated",),
            weight_qtype=jnp.int8,
            act_qtype=jnp.int8,
            act_static_scale=static,
        ),  # fmt: skip
        rule(
            weight_qtype=jnp.int8,
            act_qtype=jnp.int8 if activations else None,
            act_static_scale=static,
        ),  # fmt: skip
    ]


def post_training(model, calibration, activations: bool = False):
    """A copy of `model` (NNX, float weights) with int8 weights. Running it once on the
    `calibration` inputs quantizes the weights and, with `activations`, sets each layer input's
    static scale from that batch's ranges (its mean per-example absolute maximum)."""
    import qwix

    provider = qwix.PtqProvider(rules(qwix.QuantizationRule, activations))
    return qwix.quantize_model(model, provider, calibration)


def aware(model_fn, image_shape):
    """`model_fn` (``model_fn(rngs=...)``) for quantization-aware training: its models compute
    with their weights rounded to int8 as `post_training` rounds them, and gradients pass the
    rounding straight through to the float weights, which are what the optimizer and the
    checkpoints keep."""
    import qwix

    provider = qwix.QtProvider(rules(qwix.QtRule))

    def build(*, rngs):
        sample = jnp.zeros((1, *image_shape), jnp.float32)  # qwix runs a new model once
        return qwix.quantize_model(model_fn(rngs=rngs), provider, sample)

    return build
