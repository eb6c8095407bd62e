"""Non-contrastive self-supervised learning: BYOL / SimSiam with MLP, linear, DirectPred or DirectCopy predictors.

    python -m experiments.noncontrastive --config configs/noncontrastive.py:cpu --workdir runs/nc_cpu
    python -m experiments.noncontrastive --config configs/noncontrastive.py:cpu --config.ssl.predictor=none \
        --workdir runs/nc_no_predictor
    python -m experiments.noncontrastive --config configs/noncontrastive.py:cifar10_r18_e100_directpred \
        --config.data.source=tfds --config.data.tfds_data_dir=/data/tfds --workdir runs/dp_cifar10

Variants:
- `cpu`: the small ConvNet on a CIFAR-10 subset from the JPEG archive (experiments/bench_noncontrastive.py's
  shape: 16 px, a few minutes per method on 2 cores); `smoke`: seconds, used by the tests.
- The DirectPred paper's tables (Tian, Chen and Ganguli, ICML 2021), ResNet-18 with the CIFAR stem
  (CIFAR-10, 32 px) or the standard stem (STL-10, 96 px, trained on its unlabeled split, blur on), BYOL
  with EMA 0.996, SGD lr 0.03, momentum 0.9, weight decay 4e-4, batch 128 (the paper's settings), 100,
  300 or 500 epochs: `{cifar10,stl10}_r18_e{100,300,500}_{directpred,directpred_freq5,sgd_linear}`
  (DirectPred: rho 0.3, eps 0.01, linear 128 x 128 predictor written every step, or every 5 steps;
  sgd_linear: the same linear predictor trained by SGD). They need the dataset (tfds or the archive)
  and a GPU.
- `imagenet_r50_{mlp2,linear,directpred}`: the ImageNet comparison of predictors with ResNet-50 (tfds
  imagenet2012 prepared by the user); its epochs, batch and learning rate here are lorank's choices
  (the paper's ImageNet recipe was not available to check), set them for the run you reproduce.
"""

from ml_collections import ConfigDict

# variant -> experiment module that runs it; the tests run every smoke variant.
SMOKE_VARIANTS = {"smoke": "experiments.noncontrastive"}

PAPER_EPOCHS = (100, 300, 500)
PAPER_PREDICTORS = {  # variant suffix -> (predictor, freq)
    "directpred": ("directpred", 1),
    "directpred_freq5": ("directpred", 5),
    "sgd_linear": ("linear", 1),
}
IMAGES = {"cifar10": (50_000, 32), "stl10": (100_000, 96)}  # training images (STL-10: unlabeled split), size


def data_section() -> ConfigDict:
    """The `data` section of an image SSL run (configs/ssl.py shares it): `noncontrastive.load_data` reads it."""
    d = ConfigDict()
    d.source = "folder_tar"  # folder_tar (a class-per-folder archive), tfds, npz
    d.path = ""  # folder_tar / npz file (empty: the CIFAR-10 archive in $LORANK_DATA)
    d.tfds_name = "cifar10"  # tfds dataset (source tfds)
    d.tfds_data_dir = "~/tensorflow_datasets"  # where it is prepared
    d.train_split = "train"  # images trained on (STL-10: "unlabelled")
    d.probe_split = "train"  # labeled images the linear probe and kNN fit on
    d.test_split = "test"  # labeled images the probe is scored on
    d.train_per_class = 0  # folder_tar: at most this many training images per class (0: all)
    d.probe_per_class = 0  # folder_tar: probe-fit images per class (0: all)
    d.test_per_class = 0  # folder_tar: test images per class (0: all)
    d.max_train_images = 0  # tfds / npz: at most this many training images (0: all)
    d.max_probe_images = 0  # tfds / npz: probe-fit images (0: all)
    d.max_test_images = 0  # tfds / npz: test images (0: all)
    d.seed = 0  # seed of the per-epoch order of training images
    d.downsample = 1  # average-pool every image by this factor (CPU runs: 2, CIFAR's 32 px -> 16 px)
    return d


def augment_section() -> ConfigDict:
    """The `augment` section of an image SSL run (configs/ssl.py shares it): SimCLR's view pipeline."""
    d = ConfigDict()
    d.crop_area = (0.08, 1.0)  # random resized crop: area fraction range
    d.crop_aspect = (3 / 4, 4 / 3)  # aspect-ratio range
    d.flip_prob = 0.5  # horizontal flip probability
    d.jitter_prob = 0.8  # colour jitter probability
    d.brightness = 0.4  # colour jitter strengths
    d.contrast = 0.4  # "
    d.saturation = 0.4  # "
    d.hue = 0.1  # "
    d.gray_prob = 0.2  # random grayscale probability
    d.blur_prob = 0.0  # Gaussian blur probability (off on CIFAR; STL-10: 0.5)
    return d


def _base() -> ConfigDict:
    c = ConfigDict()
    c.data = data_section()

    c.model = ConfigDict()
    c.model.backbone = "resnet18"  # resnet18, resnet50, small_convnet
    c.model.backbone_options = ConfigDict({"stem": "cifar"})  # keyword arguments of the backbone
    c.model.projector = "mlp2"  # mlp2 (Linear-BN-ReLU-Linear), linear, none
    c.model.projector_hidden = 4096  # projector hidden width (BYOL: 4096)
    c.model.projector_dim = 128  # projection dimension d (the DirectPred paper: 128)

    c.ssl = ConfigDict()
    c.ssl.method = "byol"  # byol (EMA target) or simsiam (the online network under stop-gradient)
    c.ssl.predictor = "directpred"  # mlp, linear, directpred, directcopy, none
    c.ssl.stop_gradient = True  # False: gradients flow through the targets (simsiam only; collapses)
    c.ssl.ema_rate = 0.996  # BYOL target EMA rate
    c.ssl.ema_schedule = "constant"  # constant (the paper's code) or cosine (BYOL's own code)
    c.ssl.target_init = "independent"  # the target's own random init (both public codes) or "copy"
    c.ssl.rho = 0.3  # DirectPred running-correlation rate
    c.ssl.eps = 0.01  # DirectPred / DirectCopy eps
    c.ssl.freq = 1  # write the predictor from F every freq steps (SGD between)
    c.ssl.centered = False  # F of centered projector outputs
    c.ssl.eps_inside_root = False  # DirectPred: sqrt(s / max s + eps) instead of sqrt(s / max s) + eps
    c.ssl.directcopy_normalize = True  # DirectCopy: F / ||F|| + eps I
    c.ssl.predictor_hidden = 4096  # mlp predictor hidden width (BYOL: 4096)

    c.augment = augment_section()

    c.train = ConfigDict()
    c.train.steps = 39_000  # optimizer steps (100 epochs of 50k images at batch 128)
    c.train.batch_size = 128  # images per step (global)
    c.train.grad_accum = 1  # micro-batches per step
    c.train.log_every = 100  # steps between progress lines and metric records
    c.train.eval_every = 3900  # steps between probe evaluations
    c.train.checkpoint_every = 3900  # steps between checkpoints
    c.train.keep_checkpoints = 2  # newest checkpoints kept
    c.train.seed = 0  # initialization and augmentation seed
    c.train.on_nonfinite = "stop"  # stop or skip a step with a non-finite loss or gradient

    c.optim = ConfigDict()
    c.optim.lr = 0.03  # SGD learning rate (the paper: 0.03)
    c.optim.momentum = 0.9  # SGD momentum
    c.optim.weight_decay = 4e-4  # weight decay (added to the gradient, as torch.optim.SGD)
    c.optim.warmup_steps = 0  # linear warmup steps
    c.optim.cosine = False  # per-step cosine decay after warmup (the paper: constant)

    c.eval = ConfigDict()
    c.eval.knn_k = (200, 20)  # kNN neighbours of the probe (weighted k=200, T=0.1 and k=20), at most the probe images
    c.eval.probe_batch = 256  # images per feature batch of the probe
    c.eval.align_every = 500  # steps between eigenspace-alignment records of linear predictors (cheap: eigh of F)

    c.mesh = ConfigDict()
    c.mesh.data = -1  # data-parallel ways (-1: all devices)
    c.mesh.fsdp = 1  # fully-sharded ways
    c.mesh.tensor = 1  # tensor-parallel ways
    return c


def paper(dataset: str, epochs: int, suffix: str) -> ConfigDict:
    c = _base()
    predictor, freq = PAPER_PREDICTORS[suffix]
    c.ssl.predictor, c.ssl.freq = predictor, freq
    images, size = IMAGES[dataset]
    c.train.steps = epochs * (images // c.train.batch_size)
    c.train.eval_every = c.train.checkpoint_every = 10 * (images // c.train.batch_size)
    if dataset == "stl10":
        c.data.source, c.data.tfds_name = "tfds", "stl10"
        c.data.train_split = "unlabelled"
        c.model.backbone_options = ConfigDict({"stem": "imagenet"})
        c.augment.blur_prob = 0.5
    return c


def imagenet(predictor: str) -> ConfigDict:
    c = _base()
    c.data.source, c.data.tfds_name = "tfds", "imagenet2012"
    c.data.test_split = "validation"
    c.model.backbone = "resnet50"
    c.model.backbone_options = ConfigDict({"stem": "imagenet"})
    c.model.projector_dim = 256
    c.ssl.predictor = {"mlp2": "mlp", "linear": "linear", "directpred": "directpred"}[predictor]
    c.train.batch_size = 256
    c.train.steps = 100 * (1_281_167 // 256)
    c.train.eval_every = c.train.checkpoint_every = 10 * (1_281_167 // 256)
    c.augment.blur_prob = 0.5
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
    c.ssl.predictor_hidden = 256
    c.augment.crop_area = (0.2, 1.0)
    c.train.steps = 1000
    c.train.batch_size = 128
    c.train.log_every = 50
    c.train.eval_every = 500
    c.train.checkpoint_every = 500
    c.eval.align_every = 50
    c.optim.lr = 0.05
    return c


def get_config(arg: str = "cpu") -> ConfigDict:
    if arg == "cpu":
        return cpu()
    if arg == "smoke":
        c = cpu()
        c.data.train_per_class = 40
        c.data.probe_per_class = 20
        c.data.test_per_class = 10
        c.model.backbone_options = ConfigDict({"width": 8})
        c.model.projector_hidden = 32
        c.model.projector_dim = 16
        c.ssl.predictor_hidden = 32
        c.train.steps = 24
        c.train.batch_size = 32
        c.train.log_every = 6
        c.train.eval_every = 12
        c.eval.align_every = 12
        c.train.checkpoint_every = 12
        return c
    for dataset in IMAGES:
        for epochs in PAPER_EPOCHS:
            for suffix in PAPER_PREDICTORS:
                if arg == f"{dataset}_r18_e{epochs}_{suffix}":
                    return paper(dataset, epochs, suffix)
    for predictor in ("mlp2", "linear", "directpred"):
        if arg == f"imagenet_r50_{predictor}":
            return imagenet(predictor)
    raise ValueError(f"unknown variant {arg!r} of configs/noncontrastive.py; expected cpu, smoke, "
                     f"{{cifar10,stl10}}_r18_e{{100,300,500}}_{{directpred,directpred_freq5,sgd_linear}} or "
                     f"imagenet_r50_{{mlp2,linear,directpred}}")
