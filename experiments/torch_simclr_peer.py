"""The PyTorch side of experiments/bench_ssl.py's throughput comparison: the SimCLR train step in PyTorch.

    python experiments/torch_simclr_peer.py --images IMAGES.npy --spec SPEC.json --steps 20

IMAGES.npy: float32 [N, H, W, 3] in [0, 1], the batch (N images, two views each). SPEC.json: the
network, augmentation, loss and optimizer (the keys of `DEFAULTS`). One step, as lorank's jitted
step does it: two SimCLR views of the batch augmented as tensor ops (torchvision's RandomResizedCrop
sampling with its 10 tries and centre fallback, bilinear resampling, horizontal flip, ColorJitter
with its factors applied in a random order per image with probability `jitter_prob`, grayscale),
the network on each view (SmallConvNet: conv3x3-BN-ReLU layers of width x widths[i] channels,
stride 2 after the first, global average pooling; then Linear without bias - BN - ReLU - Linear),
NT-Xent over the 2N views, backward, SGD with momentum and weight decay. Prints one JSON line:
{"images_per_s", "param_count", "torch_version", "threads"}. Imports only torch, NumPy and the
standard library; meant to run in its own process.
"""

import argparse
import json
import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

DEFAULTS = {
    "width": 16, "widths": [1, 2, 4], "hidden": 256, "out": 64,  # SmallConvNet and its 2-layer projector
    "crop_area": [0.2, 1.0], "crop_aspect": [3 / 4, 4 / 3], "flip_prob": 0.5, "jitter_prob": 0.8,
    "brightness": 0.4, "contrast": 0.4, "saturation": 0.4, "hue": 0.1, "gray_prob": 0.2,
    "tau": 0.5, "lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4,
}
CROP_TRIES = 10


class SmallConvNet(nn.Module):
    def __init__(self, width: int, widths):
        super().__init__()
        layers, channels = [], 3
        for i, mult in enumerate(widths):
            layers += [nn.Conv2d(channels, width * mult, 3, stride=2 if i else 1, padding=1, bias=False),
                       nn.BatchNorm2d(width * mult, momentum=0.1, eps=1e-5), nn.ReLU(inplace=True)]
            channels = width * mult
        self.body = nn.Sequential(*layers)

    def forward(self, x):
        return self.body(x).mean(dim=(2, 3))


def projector(features: int, hidden: int, out: int) -> nn.Module:
    return nn.Sequential(nn.Linear(features, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, out))


def crop_boxes(n: int, height: int, width: int, area, aspect, gen) -> torch.Tensor:
    """torchvision's RandomResizedCrop boxes for n images: [n, 4] float (top, left, box height, box width)."""
    target = height * width * torch.empty(n, CROP_TRIES).uniform_(area[0], area[1], generator=gen)
    ratio = torch.exp(torch.empty(n, CROP_TRIES).uniform_(math.log(aspect[0]), math.log(aspect[1]), generator=gen))
    w = torch.round(torch.sqrt(target * ratio))
    h = torch.round(torch.sqrt(target / ratio))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.float().argmax(dim=1, keepdim=True)
    any_fit = fits.any(dim=1)
    bw, bh = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0]
    pos = torch.rand(n, 2, generator=gen)
    top = torch.minimum(torch.floor(pos[:, 0] * (height - bh + 1)), height - bh)
    left = torch.minimum(torch.floor(pos[:, 1] * (width - bw + 1)), width - bw)
    boxes = torch.stack([top, left, bh, bw], dim=1)
    fallback = torch.tensor([0.0, 0.0, height, width]).expand(n, 4)  # square images: the whole image
    return torch.where(any_fit[:, None], boxes, fallback)


def resized_crop_and_flip(x, boxes, flip):
    """Each box of x [N, C, H, W] resized bilinearly to H x W, mirrored where `flip` [N] is True."""
    n, _, height, width = x.shape
    top, left, bh, bw = boxes.unbind(1)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = bw / width * torch.where(flip, -1.0, 1.0)
    theta[:, 0, 2] = (2 * left + bw) / width - 1
    theta[:, 1, 1] = bh / height
    theta[:, 1, 2] = (2 * top + bh) / height - 1
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def gray(x):
    return (0.2989 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]).expand_as(x)


def adjust_hue(x, shift):
    """HSV hue of x [N, 3, H, W] rotated by shift [N] (fractions of the circle)."""
    r, g, b = x.unbind(1)
    maxc, _ = x.max(dim=1)
    minc, _ = x.min(dim=1)
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    h = torch.where(maxc == r, ((g - b) / safe) % 6, torch.where(maxc == g, (b - r) / safe + 2, (r - g) / safe + 4))
    h = torch.where(delta > 0, h / 6, torch.zeros_like(h))
    s = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)), torch.zeros_like(maxc))
    h = (h + shift[:, None, None]) % 1.0
    i = torch.floor(h * 6)
    f = h * 6 - i
    v = maxc
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    i = i.long() % 6
    out = torch.zeros_like(x)
    for k, rgb in enumerate(((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))):
        out = torch.where((i == k)[:, None], torch.stack(rgb, 1), out)
    return out.clamp(0, 1)


ADJUSTMENTS = (
    lambda x, f: (x * f[:, None, None, None]).clamp(0, 1),  # brightness
    lambda x, f: (f[:, None, None, None] * x + (1 - f[:, None, None, None])
                  * gray(x).mean(dim=(1, 2, 3), keepdim=True)).clamp(0, 1),  # contrast
    lambda x, f: (f[:, None, None, None] * x + (1 - f[:, None, None, None]) * gray(x)).clamp(0, 1),  # saturation
    adjust_hue,
)


def colour_jitter(x, spec, gen):
    """ColorJitter of x [M, 3, H, W]: the four adjustments in a random order per image (each image's
    adjustment at each position applied to the images that have it there)."""
    m = x.shape[0]
    factors = []
    for name in ("brightness", "contrast", "saturation"):
        s = spec[name]
        factors.append(torch.empty(m).uniform_(max(0.0, 1 - s), 1 + s, generator=gen))
    factors.append(torch.empty(m).uniform_(-spec["hue"], spec["hue"], generator=gen))
    order = torch.rand(m, 4, generator=gen).argsort(dim=1)
    for position in range(4):
        for k, fn in enumerate(ADJUSTMENTS):
            rows = (order[:, position] == k).nonzero()[:, 0]
            if len(rows):
                x[rows] = fn(x[rows], factors[k][rows])
    return x


def augment(x, spec, gen):
    """One SimCLR view of each image of x [N, 3, H, W] in [0, 1]."""
    n, _, height, width = x.shape
    boxes = crop_boxes(n, height, width, spec["crop_area"], spec["crop_aspect"], gen)
    flip = torch.rand(n, generator=gen) < spec["flip_prob"]
    x = resized_crop_and_flip(x, boxes, flip).clamp(0, 1)
    rows = (torch.rand(n, generator=gen) < spec["jitter_prob"]).nonzero()[:, 0]
    if len(rows):
        x[rows] = colour_jitter(x[rows], spec, gen)
    return torch.where((torch.rand(n, generator=gen) < spec["gray_prob"])[:, None, None, None], gray(x), x)


def nt_xent(z1, z2, tau):
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n = z1.shape[0]
    sim = z @ z.T / tau
    sim.fill_diagonal_(float("-inf"))
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])
    return F.cross_entropy(sim, targets)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", required=True)
    parser.add_argument("--spec", required=True, help="JSON file with the keys of DEFAULTS")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    with open(args.spec) as f:
        given = json.load(f)
    unknown = sorted(set(given) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown spec keys {unknown}; expected {sorted(DEFAULTS)}")
    spec = {**DEFAULTS, **given}
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    images = torch.from_numpy(np.load(args.images)).permute(0, 3, 1, 2).contiguous()
    model = nn.Sequential(SmallConvNet(spec["width"], spec["widths"]),
                          projector(spec["width"] * spec["widths"][-1], spec["hidden"], spec["out"]))
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=spec["lr"], momentum=spec["momentum"],
                          weight_decay=spec["weight_decay"])
    gen = torch.Generator().manual_seed(0)

    def step():
        v1, v2 = augment(images, spec, gen), augment(images, spec, gen)
        loss = nt_xent(model(v1), model(v2), spec["tau"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    for _ in range(2):  # warm-up (allocator, first-call dispatch)
        step()
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    elapsed = time.perf_counter() - start
    if not math.isfinite(float(loss)):
        raise FloatingPointError(f"the PyTorch SimCLR step produced a non-finite loss {float(loss)}")
    print(json.dumps({"images_per_s": len(images) * args.steps / elapsed,
                      "param_count": sum(p.numel() for p in model.parameters()),
                      "torch_version": torch.__version__, "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
