"""ResNet / SmallConvNet backbones: torchvision's parameter counts (eval_shape only), feature shapes,
BatchNorm statistics against a NumPy float64 reference, refused shapes and fields, the family."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lorank.models import resnet as R

# torchvision resnet18 / resnet50 (11,689,512 / 25,557,032) without fc (512 * 1000 + 1000 / 2048 * 1000 + 1000)
TORCHVISION = {"resnet18": 11_176_512, "resnet50": 23_508_032}
STEM_DIFFERENCE = 7 * 7 * 3 * 64 - 3 * 3 * 3 * 64  # the CIFAR stem's 3x3 conv instead of the 7x7


def abstract_variables(model, shape):
    return jax.eval_shape(lambda k: nn.unbox(model.init(k, jnp.zeros(shape), train=False)), jax.random.key(0))


def init(model, x):
    return jax.jit(lambda k: nn.unbox(model.init(k, x, train=False)))(jax.random.key(0))


def apply(model, variables, x, train):
    """model.apply jitted; in train mode (features, batch_stats updates)."""
    if train:
        return jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(variables, x)
    return jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_parameter_counts_are_torchvision(name):
    imagenet = abstract_variables(R.backbone(name, stem="imagenet"), (1, 224, 224, 3))
    assert R.param_count(imagenet["params"]) == TORCHVISION[name]
    cifar = abstract_variables(R.backbone(name), (1, 32, 32, 3))
    assert R.param_count(cifar["params"]) == TORCHVISION[name] - STEM_DIFFERENCE
    out = jax.eval_shape(lambda v: R.backbone(name, stem="imagenet").apply(v, jnp.zeros((2, 96, 96, 3)), train=False),
                         imagenet)
    assert out.shape == (2, R.feature_dim(name)) == (2, {"resnet18": 512, "resnet50": 2048}[name])
    assert out.dtype == jnp.float32


def test_feature_shapes_of_small_instances():
    model = R.backbone("resnet18", width=4)
    feats = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((2, 8, 8, 3)), train=False),
                           abstract_variables(model, (2, 8, 8, 3)))
    assert feats.shape == (2, 32) == (2, R.feature_dim("resnet18", width=4))
    assert R.feature_dim("resnet50", width=2) == 64
    abstract = abstract_variables(R.backbone("resnet50", width=2, stem="imagenet"), (2, 32, 32, 3))
    assert jax.eval_shape(lambda v: R.backbone("resnet50", width=2, stem="imagenet").apply(
        v, jnp.zeros((2, 32, 32, 3)), train=False), abstract).shape == (2, 64)
    assert R.feature_dim("small_convnet", width=8, widths=(1, 2)) == 16


def _conv3x3_same(x, k):
    """NumPy float64 reference: stride-1 3x3 convolution with zero padding 1. [N,H,W,C] x [3,3,C,O]."""
    n, h, w, _ = x.shape
    p = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    return sum(p[:, i:i + h, j:j + w] @ k[i, j] for i in range(3) for j in range(3))


def test_batch_norm_statistics_update_in_train_mode_and_are_used_in_eval_mode():
    rng = np.random.default_rng(1)
    x = rng.random((4, 8, 8, 3), dtype=np.float32)
    model = R.SmallConvNet(width=4, widths=(1, 2))
    variables = init(model, x)
    stats0 = variables["batch_stats"]
    np.testing.assert_array_equal(stats0["bn1"]["mean"], 0.0)
    np.testing.assert_array_equal(stats0["bn1"]["var"], 1.0)
    train_feats, updates = apply(model, variables, x, train=True)
    # running averages with PyTorch's momentum 0.1 of the batch's mean and (unbiased) variance of conv1's output
    y = _conv3x3_same(x.astype(np.float64), np.asarray(variables["params"]["conv1"]["kernel"], np.float64))
    mean, var = y.mean(axis=(0, 1, 2)), y.var(axis=(0, 1, 2))
    np.testing.assert_allclose(updates["batch_stats"]["bn1"]["mean"], 0.1 * mean, rtol=1e-4, atol=1e-6)
    flax_var = 0.9 + 0.1 * var  # flax averages the biased batch variance
    np.testing.assert_allclose(updates["batch_stats"]["bn1"]["var"], flax_var, rtol=1e-4)
    # eval mode reads the running statistics: new statistics change the output, and rows are independent
    new = {**variables, **updates}
    eval_old, eval_new = apply(model, variables, x, False), apply(model, new, x, False)
    assert not np.allclose(eval_old, eval_new)
    np.testing.assert_allclose(apply(model, new, x[:2], False), eval_new[:2], rtol=1e-5, atol=1e-6)
    # train mode normalizes by the batch: a different batch changes the features of the same rows
    part, _ = apply(model, variables, x[:2], True)
    assert not np.allclose(part, train_feats[:2], atol=1e-4)


def test_resnet_batch_norm_updates_every_layer():
    x = np.random.default_rng(2).random((2, 8, 8, 3), dtype=np.float32)
    model = R.backbone("resnet18", width=2, stage_sizes=(1, 1, 1, 1))
    variables = init(model, x)
    feats, updates = apply(model, variables, x, True)
    assert feats.shape == (2, 16) and np.isfinite(feats).all()
    changed = jax.tree.map(lambda a, b: not np.allclose(a, b), variables["batch_stats"], updates["batch_stats"])
    assert all(jax.tree.leaves(changed))
    assert "downsample_conv" in variables["params"]["layer2_0"] and "downsample_conv" not in variables["params"][
        "layer1_0"]


@pytest.mark.parametrize("name,kw,shape", [
    ("resnet18", {}, (8, 8, 3)),
    ("resnet18", {}, (2, 8, 8, 1)),
    ("resnet18", {}, (2, 4, 8, 3)),
    ("resnet50", {"stem": "imagenet"}, (2, 16, 16, 3)),
    ("small_convnet", {}, (2, 2, 2, 3)),
    ("small_convnet", {"in_channels": 1}, (2, 8, 8, 3)),
])
def test_bad_image_shapes_are_refused_before_compute(name, kw, shape):
    model = R.backbone(name, **kw)
    with pytest.raises(ValueError, match=str(shape).replace("(", r"\(").replace(")", r"\)")):
        abstract_variables(model, shape)


def test_bad_names_and_fields_are_named():
    with pytest.raises(ValueError, match="resnet34"):
        R.backbone("resnet34")
    with pytest.raises(ValueError, match="stem"):
        R.backbone("resnet18", stem="tiny")
    with pytest.raises(ValueError, match="depth"):
        R.backbone("small_convnet", depth=3)
    with pytest.raises(ValueError, match="width"):
        R.feature_dim("resnet50", width=0)
    with pytest.raises(ValueError, match="widths"):
        R.backbone("small_convnet", widths=())


def test_family_projects_block_convolutions():
    params = abstract_variables(R.backbone("resnet18", width=2), (1, 8, 8, 3))["params"]
    mask = R.FAMILY.galore_mask(params)
    assert mask["layer1_0"]["conv1"]["kernel"] and mask["layer4_1"]["conv2"]["kernel"]
    assert not mask["conv1"]["kernel"] and not mask["layer2_0"]["downsample_conv"]["kernel"]
    assert not mask["layer1_0"]["bn1"]["scale"]
    assert R.layer_kind(("layer1_0", "conv1", "kernel")) == "conv"
    assert R.layer_kind(("conv1", "kernel")) == "stem"
    assert R.layer_kind(("layer2_0", "downsample_conv", "kernel")) == "shortcut"
    assert R.layer_kind(("bn1", "scale")) is None
    axes = R.conv_matrix_axes(params)
    assert axes["layer1_0"]["conv1"]["kernel"].resolve(4, "k") == ((0, 1, 2), (3,))
