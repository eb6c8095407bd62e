"""Contrastive self-supervised learning: SimCLR with any L_{phi,psi} or alpha-CL loss, and DirectCLR.

    python -m experiments.ssl --config configs/ssl.py:cpu --workdir runs/ssl_cpu
    python -m experiments.ssl --config configs/ssl.py:cpu --config.ssl.loss=direct --workdir runs/ssl_direct
    python -m experiments.ssl --config configs/ssl.py:cpu --config.optim.name=galore --workdir runs/ssl_galore
    python -m experiments.ssl --config configs/ssl.py:cifar10_r18_e100_direct --config.data.source=tfds \
        --config.data.tfds_data_dir=/data/tfds --workdir runs/acl_cifar10

Variants:
- `cpu`: the small ConvNet on a CIFAR-10 subset from the JPEG archive at 16 px (what
  experiments/bench_ssl.py trains for every method); `smoke`: seconds, used by the tests.
- alpha-CL tables (Tian, "Understanding Deep Contrastive Learning via Coordinate-wise Optimization",
  NeurIPS 2022): `{cifar10,stl10,cifar100}_{r18,r50}_e{100,300,500}_{quadratic,nce,backprop,r_h,r_gamma,r_s,direct}`.
  Settings of the public code (facebookresearch/luckmatters ssl/real-dataset: config/byol_config.yaml and its
  alpha-CL command): batch 128, projector 512-BN-ReLU-128, temperature tau 0.5, Adam lr 0.01 without weight
  decay, 100 epochs by default; direct p = 4 (the code's alpha_exponent 2 on d^2); SimCLR augmentations with
  blur on STL-10 (96 px, the standard stem, trained on its unlabeled split). gamma = 2 for r_gamma and the
  same tau for r_s are lorank's choices (the values behind the paper's table were not available to check).
  CIFAR uses the CIFAR stem (3x3 conv, stride 1, no max-pool). Warmup 10 epochs then a per-step cosine is
  lorank's schedule (the public SimCLR code's is effectively constant). They need the dataset (tfds or a
  class-per-folder archive) and a GPU.
- DirectCLR projector table (Jing, Vincent, LeCun and Tian, ICLR 2022): `imagenet_r50_proj_{mlp2,linear,none}`
  and `imagenet_r50_directclr` (ResNet-50, 100 epochs, LARS, batch 4096, d0 = 360 for DirectCLR; the learning
  rate 4.8 = 0.3 x batch / 256 and tau 0.1 are SimCLR's ImageNet recipe, lorank's choice where the paper's were
  not available to check), and CIFAR-10 ResNet-18 counterparts `cifar10_r18_proj_{mlp2,linear,none}`,
  `cifar10_r18_directclr` (d0 = 128 of 512).
"""

import pathlib

from ml_collections import ConfigDict

from lorank import config_files

# variant -> experiment module that runs it; the tests run every smoke variant.
SMOKE_VARIANTS = {"smoke": "experiments.ssl"}

DATASETS = {  # name -> (tfds name, training images, image size)
    "cifar10": ("cifar10", 50_000, 32),
    "stl10": ("stl10", 100_000, 96),
    "cifar100": ("cifar100", 50_000, 32),
}
BACKBONES = {"r18": "resnet18", "r50": "resnet50"}
EPOCHS = (100, 300, 500)
TABLE_LOSSES = {"quadratic": "quadratic", "nce": "infonce", "backprop": "backprop", "r_h": "r_H",
                "r_gamma": "r_gamma", "r_s": "r_s", "direct": "direct"}
PROJECTORS = ("mlp2", "linear", "none")


# the data and augment sections, the same as the non-contrastive runs'
_IMAGE_SSL = config_files.load_module(pathlib.Path(__file__).resolve().with_name("noncontrastive.py"))


def _base() -> ConfigDict:
    c = ConfigDict()
    c.data = _IMAGE_SSL.data_section()

    c.model = ConfigDict()
    c.model.backbone = "resnet18"  # resnet18, resnet50, small_convnet
    c.model.backbone_options = ConfigDict({"stem": "cifar"})  # keyword arguments of the backbone
    c.model.projector = "mlp2"  # mlp2 (Linear-BN-ReLU-Linear), linear, none
    c.model.projector_hidden = 512  # projector hidden width (SimCLR on CIFAR: 512)
    c.model.projector_dim = 128  # projection dimension

    c.ssl = ConfigDict()
    c.ssl.loss = "infonce"  # a loss of lorank.contrastive.LOSS_NAMES (family or alpha-CL)
    c.ssl.tau = 0.5  # temperature
    c.ssl.eps = None  # None: the loss's default (InfoNCE: 1, the NT-Xent form; alpha rows: mass 1)
    c.ssl.p = 4.0  # alpha-CL-direct exponent (> 1)
    c.ssl.gamma = 2.0  # alpha-CL-r_gamma exponent (> 1)
    c.ssl.c = None  # Coria et al.'s sigmoid slope (None: 1)
    c.ssl.normalize = True  # L2-normalize the embeddings
    c.ssl.negatives = "both_views"  # both_views (2N - 2 per anchor) or one_view (N - 1)
    c.ssl.directclr_dim = 0  # > 0: DirectCLR on the first d0 backbone features (projector "none")

    c.augment = _IMAGE_SSL.augment_section()

    c.train = ConfigDict()
    c.train.steps = 39_000  # optimizer steps (100 epochs of 50k images at batch 128)
    c.train.batch_size = 128  # images per step (global; every other image of both views is a negative)
    c.train.grad_accum = 1  # micro-batches per step (each micro-batch contrasts only its own images)
    c.train.log_every = 100  # steps between progress lines and metric records
    c.train.eval_every = 3900  # steps between probe and spectrum evaluations
    c.train.checkpoint_every = 3900  # steps between checkpoints
    c.train.keep_checkpoints = 2  # newest checkpoints kept
    c.train.seed = 0  # initialization and augmentation seed
    c.train.on_nonfinite = "stop"  # stop or skip a step with a non-finite loss or gradient

    c.optim = ConfigDict()
    c.optim.name = "adamw"  # sgdw (SGD + momentum + weight decay), adamw, lars, galore (GaLore-Adam on conv kernels)
    c.optim.lr = 0.01  # peak learning rate of every method but GaLore's
    c.optim.galore_lr = 0.01  # peak learning rate of galore
    c.optim.warmup_steps = 3900  # linear warmup steps from 0
    c.optim.min_lr_ratio = 0.0  # cosine decays to lr * min_lr_ratio at the last step
    c.optim.b1 = 0.9  # Adam beta1; momentum of sgdw and lars
    c.optim.b2 = 0.999  # Adam beta2
    c.optim.eps = 1e-8  # Adam epsilon
    c.optim.weight_decay = 0.0  # weight decay on kernels (not BatchNorm parameters or biases)
    c.optim.trust_coefficient = 0.001  # LARS trust coefficient
    c.optim.clip_norm = 0.0  # global-norm gradient clipping; 0 disables
    c.optim.block_size = 256  # values per quantization block of 8-bit states
    c.optim.rank = 16  # GaLore rank of the [kh * kw * cin, cout] conv-kernel matrices
    c.optim.update_proj_gap = 200  # GaLore: steps between SVD refreshes of the projection
    c.optim.galore_scale = 1.0  # GaLore: scale of the projected-back update
    c.optim.proj_type = "std"  # GaLore: projection side (std, reverse_std, left, right, full)
    c.optim.svd = "exact"  # GaLore: exact or randomized top-r singular vectors

    c.eval = ConfigDict()
    c.eval.knn_k = (200, 20)  # kNN neighbours (weighted k=200, T=0.1 and k=20), at most the probe images
    c.eval.probe_batch = 256  # images per feature batch of the probe and the spectra

    c.mesh = ConfigDict()
    c.mesh.data = -1  # data-parallel ways (-1: all devices)
    c.mesh.fsdp = 1  # fully-sharded ways
    c.mesh.tensor = 1  # tensor-parallel ways
    return c


def _epochs(c: ConfigDict, images: int, epochs: int, warmup_epochs: int = 10) -> None:
    per_epoch = images // c.train.batch_size
    c.train.steps = epochs * per_epoch
    c.train.eval_every = c.train.checkpoint_every = 10 * per_epoch
    c.optim.warmup_steps = warmup_epochs * per_epoch


def _dataset(c: ConfigDict, dataset: str) -> int:
    tfds_name, images, _ = DATASETS[dataset]
    c.data.tfds_name = tfds_name
    if dataset != "cifar10":
        c.data.source = "tfds"
    if dataset == "stl10":
        c.data.train_split = "unlabelled"
        c.model.backbone_options = ConfigDict({"stem": "imagenet"})
        c.augment.blur_prob = 0.5
    return images


def table(dataset: str, backbone: str, epochs: int, loss: str) -> ConfigDict:
    c = _base()
    images = _dataset(c, dataset)
    c.model.backbone = BACKBONES[backbone]
    c.ssl.loss = TABLE_LOSSES[loss]
    _epochs(c, images, epochs)
    return c


def projector_table(dataset: str, projector: str, directclr: bool) -> ConfigDict:
    c = _base()
    if dataset == "imagenet":
        c.data.source, c.data.tfds_name, c.data.test_split = "tfds", "imagenet2012", "validation"
        c.model.backbone = "resnet50"
        c.model.backbone_options = ConfigDict({"stem": "imagenet"})
        c.model.projector_hidden, c.model.projector_dim = 2048, 128
        c.train.batch_size = 4096
        c.ssl.tau = 0.1
        c.optim.name, c.optim.lr, c.optim.weight_decay = "lars", 4.8, 1e-6
        c.augment.blur_prob = 0.5
        _epochs(c, 1_281_167, 100)
        d0 = 360
    else:
        c.optim.name, c.optim.lr, c.optim.weight_decay = "sgdw", 0.06, 5e-4
        _epochs(c, 50_000, 100)
        d0 = 128
    c.model.projector = "none" if directclr else projector
    c.ssl.directclr_dim = d0 if directclr else 0
    return c


def cpu() -> ConfigDict:
    c = _base()
    c.data.train_per_class = 1000
    c.data.probe_per_class = 500
    c.data.test_per_class = 200
    c.data.downsample = 2
    c.model.backbone = "small_convnet"
    c.model.backbone_options = ConfigDict({"width": 16})
    c.model.projector_hidden = 256
    c.model.projector_dim = 64
    c.augment.crop_area = (0.2, 1.0)
    c.train.steps = 1500
    c.train.batch_size = 128
    c.train.log_every = 50
    c.train.eval_every = 500
    c.train.checkpoint_every = 500
    c.optim.name = "adamw"
    c.optim.lr = 2e-3
    c.optim.warmup_steps = 100
    c.optim.weight_decay = 1e-4
    return c


def smoke() -> ConfigDict:
    c = cpu()
    c.data.train_per_class = 200
    c.data.probe_per_class = 60
    c.data.test_per_class = 40
    c.model.backbone_options = ConfigDict({"width": 8})
    c.model.projector_hidden = 32
    c.model.projector_dim = 16
    c.train.steps = 160
    c.train.batch_size = 64
    c.train.log_every = 40
    c.train.eval_every = 160
    c.train.checkpoint_every = 160
    c.optim.lr = 4e-3
    c.optim.warmup_steps = 16
    c.eval.knn_k = (20, 5)
    return c


def get_config(arg: str = "cpu") -> ConfigDict:
    if arg == "cpu":
        return cpu()
    if arg == "smoke":
        return smoke()
    for dataset in DATASETS:
        for short, _ in BACKBONES.items():
            for epochs in EPOCHS:
                for loss in TABLE_LOSSES:
                    if arg == f"{dataset}_{short}_e{epochs}_{loss}":
                        return table(dataset, short, epochs, loss)
    for dataset, backbone in (("imagenet", "r50"), ("cifar10", "r18")):
        for projector in PROJECTORS:
            if arg == f"{dataset}_{backbone}_proj_{projector}":
                return projector_table(dataset, projector, False)
        if arg == f"{dataset}_{backbone}_directclr":
            return projector_table(dataset, "none", True)
    raise ValueError(f"unknown variant {arg!r} of configs/ssl.py; expected cpu, smoke, "
                     f"{{cifar10,stl10,cifar100}}_{{r18,r50}}_e{{100,300,500}}_{{{','.join(TABLE_LOSSES)}}}, "
                     "{imagenet_r50,cifar10_r18}_proj_{mlp2,linear,none} or {imagenet_r50,cifar10_r18}_directclr")
