"""The PyTorch side of experiments/bench_ssl.py's throughput comparison: one SimCLR train step in PyTorch.

    python experiments/torch_simclr_peer.py --images IMAGES.npy --steps 20 --width 16 --hidden 256 --out 64

The same network as lorank's SmallConvNet (conv3x3-BN-ReLU layers of width x (1, 2, 4), strides 1, 2,
2, global average pooling) and MLP projector (Linear without bias - BN - ReLU - Linear), the same
SimCLR augmentation of both views on the batch as tensor ops (random resized crop and flip by one
affine resampling per image, colour jitter in torchvision's order with probability p, grayscale),
NT-Xent over the 2N views, SGD with momentum. Prints one JSON line: {"images_per_s", "torch_version"}.
Imports only torch, NumPy and the standard library; runs in its own process.
"""

import argparse
import json
import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class SmallConvNet(nn.Module):
    def __init__(self, width: int, widths=(1, 2, 4)):
        super().__init__()
        layers, channels = [], 3
        for i, mult in enumerate(widths):
            layers += [nn.Conv2d(channels, width * mult, 3, stride=2 if i else 1, padding=1, bias=False),
                       nn.BatchNorm2d(width * mult), nn.ReLU()]
            channels = width * mult
        self.body = nn.Sequential(*layers)

    def forward(self, x):
        return self.body(x).mean(dim=(2, 3))


def projector(features: int, hidden: int, out: int) -> nn.Module:
    return nn.Sequential(nn.Linear(features, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(),
                         nn.Linear(hidden, out))


def _gray(x):
    return (0.2989 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]).expand_as(x)


def _hue_shift(x, shift):
    """HSV hue rotated by `shift` [N] (fractions of the circle)."""
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    maxc, _ = x.max(dim=1)
    minc, _ = x.min(dim=1)
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    h = torch.where(maxc == r, (g - b) / safe % 6, torch.where(maxc == g, (b - r) / safe + 2, (r - g) / safe + 4))
    h = torch.where(delta > 0, h / 6, torch.zeros_like(h))
    s = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)), torch.zeros_like(maxc))
    h = (h + shift[:, None, None]) % 1.0
    i = torch.floor(h * 6)
    f = h * 6 - i
    v = maxc
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    i = i.long() % 6
    choices = [torch.stack(c, 1) for c in ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))]
    out = torch.zeros_like(x)
    for k, c in enumerate(choices):
        out = torch.where((i == k)[:, None], c, out)
    return out


def augment(x, gen):
    """One SimCLR view of each image of x [N, 3, H, W] in [0, 1]."""
    n = x.shape[0]
    area = torch.empty(n).uniform_(0.2, 1.0, generator=gen)
    log_ratio = torch.empty(n).uniform_(math.log(3 / 4), math.log(4 / 3), generator=gen)
    ratio = torch.exp(log_ratio)
    sw, sh = torch.sqrt(area * ratio).clamp(max=1), torch.sqrt(area / ratio).clamp(max=1)
    cx = (torch.rand(n, generator=gen) * 2 - 1) * (1 - sw)
    cy = (torch.rand(n, generator=gen) * 2 - 1) * (1 - sh)
    flip = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sw * flip, cx, sh, cy
    x = F.grid_sample(x, F.affine_grid(theta, list(x.shape), align_corners=False), align_corners=False)
    jitter = (torch.rand(n, generator=gen) < 0.8)[:, None, None, None]
    b = torch.empty(n, 1, 1, 1).uniform_(0.6, 1.4, generator=gen)
    c = torch.empty(n, 1, 1, 1).uniform_(0.6, 1.4, generator=gen)
    s = torch.empty(n, 1, 1, 1).uniform_(0.6, 1.4, generator=gen)
    h = torch.empty(n).uniform_(-0.1, 0.1, generator=gen)
    y = (x * b).clamp(0, 1)
    y = (c * y + (1 - c) * _gray(y).mean(dim=(1, 2, 3), keepdim=True)).clamp(0, 1)
    y = (s * y + (1 - s) * _gray(y)).clamp(0, 1)
    y = _hue_shift(y, h).clamp(0, 1)
    x = torch.where(jitter, y, x)
    gray = (torch.rand(n, generator=gen) < 0.2)[:, None, None, None]
    return torch.where(gray, _gray(x), x)


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
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--out", type=int, default=64)
    parser.add_argument("--tau", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    images = torch.from_numpy(np.load(args.images)).permute(0, 3, 1, 2).contiguous()
    backbone = SmallConvNet(args.width)
    model = nn.Sequential(backbone, projector(args.width * 4, args.hidden, args.out))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(0)

    def step():
        v1, v2 = augment(images, gen), augment(images, gen)
        loss = nt_xent(model(v1), model(v2), args.tau)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    step()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    elapsed = time.perf_counter() - start
    print(json.dumps({"images_per_s": len(images) * args.steps / elapsed, "torch_version": torch.__version__}))


if __name__ == "__main__":
    main()
