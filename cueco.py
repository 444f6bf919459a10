"""CueCo: Cluster Contrast for unsupervised visual representation learning, in one file.

CueCo (arXiv:2507.12359, ICIP 2025) learns image features without labels. Two copies of a ResNet-18 see
two random views of every image. The query network encoder_q learns by gradient descent; the key network
encoder_k is its moving average, theta_k <- m theta_k + (1 - m) theta_q, and a FIFO queue holds its last K
keys. For the query q of one view and the key k+ of the other view of the same image:

  contrastive loss, separates instances (InfoNCE, as in MoCo):
      L_con = -log( exp(q.k+ / T) / (exp(q.k+ / T) + sum_{j=1..K} exp(q.queue_j / T)) )
  clustering loss, pulls each cluster together (OUR formulation: the paper publishes none):
      Q(k) = Sinkhorn(k.C / eps)     soft assignment of the keys to K_c centroids C, equal sizes per batch
      L_clu = -sum_c Q(k+)_c log softmax(q.C / tau)_c
  L = L_con(q1, k2) + L_con(q2, k1) + lambda * (L_clu(q1, k2) + L_clu(q2, k1))

Ours, not the paper's: all of L_clu (centroids C inside the encoder, so the key network carries a slow copy;
SwAV's Sinkhorn equipartition, not CoKe's minimal cluster size; K_c = 100, tau = 0.1, eps = 0.05) and
lambda = 1 ramped up from 0 over the first half of training; lambda = 0 is MoCo-v2. The rest follows the
MoCo CIFAR-10 notebook (facebookresearch/moco). The method is sections 2-6 (augmentation, backbone,
query/key model, losses, training); then 7 evaluation, 8 clustering metrics and t-SNE, 9 figures, 10 data
sets, 11 plumbing, 12 main. Results, and the commands that measured them: README.md.

    python cueco.py --dataset cifar10                      # the paper's setting: one GPU, 800 epochs
    python cueco.py --dataset cifar10 --width 16 --limit-train 5000 --limit-test 2000 --epochs 20 \\
        --batch-size 256 --eval-every 5                    # a laptop CPU: minutes, see README.md
    torchrun --nproc_per_node=4 cueco.py --dataset folder --data-dir imagenet100 --image-size 224
"""
import argparse
import collections
import json
import math
import os
import pickle
import random
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision.transforms import v2

# ============================================ 1. Configuration ==============================================
class CueCoError(Exception):
    """A problem with the user's input or machine: one line on stderr, exit status 2, no traceback."""

# A preset is a named set of defaults; a flag given on the command line wins over it. "paper" is the
# parser's own defaults (the MoCo CIFAR-10 notebook's recipe, 800 epochs: a GPU's job). "laptop" trains a
# narrow network for a few epochs, most of them on smaller views (progressive resizing, ours): all 50,000
# CIFAR-10 images in about the time of 8 full-size epochs (README.md). auto: paper on CUDA, else laptop.
PRESETS = {"paper": {},
           "laptop": {"width": 16, "batch_size": 256, "epochs": 18, "res_schedule": "0.5:12,0.75:4",
                      "eval_every": 6}}

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cueco.py", description="CueCo self-supervised learning, one file",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--preset", default="auto", choices=["auto", "paper", "laptop"],
      help="named defaults (flags given win): auto = paper on a CUDA GPU, laptop elsewhere")
    a("--dataset", default="cifar10", help="cifar10 | cifar100 | stl10 | folder (train/, test/ or val/)")
    a("--data-dir", default=None, help="where the data set is or is downloaded to [data/<dataset>]")
    a("--image-size", type=int, default=0, help="0 = the data's own (32 CIFAR, 96 STL, 224 large images)")
    a("--class-list", default=None, help="file of class folder names to keep (e.g. ImageNet-100)")
    a("--limit-train", type=int, default=0, help="N class-balanced training images (0 = all)")
    a("--limit-test", type=int, default=0, help="N class-balanced test images (0 = all)")
    a("--memory-gb", type=float, default=4.0, help="largest training set kept in memory (else a loader)")
    a("--num-workers", type=int, default=min(8, os.cpu_count() or 1), help="DataLoader workers")
    a("--width", type=int, default=64, help="base channels of the ResNet-18 (64 = standard)")
    a("--dim", type=int, default=128, help="embedding dimension D")
    a("--bn-splits", type=int, default=8, help="split batch-norm groups in the global batch")
    a("--queue-size", type=int, default=4096, help="K, keys in the queue")
    a("--temperature", type=float, default=0.1, help="T of the contrastive loss")
    a("--momentum", type=float, default=0.99, help="m of the key network's moving average")
    a("--num-clusters", type=int, default=100, help="K_c, centroids C of the clustering loss (ours)")
    a("--lambda-clu", type=float, default=1.0, help="lambda, weight of the clustering loss; 0 = MoCo-v2")
    a("--clu-temperature", type=float, default=0.1, help="tau of the clustering softmax (ours)")
    a("--sinkhorn-eps", type=float, default=0.05, help="eps of the balanced assignment (ours)")
    a("--clu-warmup", type=float, default=0.5, help="fraction of the epochs over which lambda ramps up")
    a("--epochs", type=int, default=800, help="0 = evaluate the untrained network")
    a("--res-schedule", default="", help="FRACTION:EPOCHS,...: the first epochs' views at a fraction of the "
      "image size (progressive resizing, ours), the rest at full size")
    a("--batch-size", type=int, default=512, help="global batch size")
    a("--lr", type=float, default=0.06, help="SGD learning rate at batch 512 (scaled linearly)")
    a("--weight-decay", type=float, default=5e-4)
    a("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
      help="auto: bf16 where native (CUDA >= 8.0, bf16 CPUs), fp16 on older GPUs, else fp32 "
           "(fp16 on a CPU: for tests only, its convolution backward is ~250x slower than bf16)")
    a("--compile", action="store_true", help="torch.compile the query and key networks")
    a("--eval-every", type=int, default=10, help="kNN monitor every N epochs (0 = at the end only)")
    a("--save-minutes", type=float, default=1.0, help="checkpoint after each epoch that ends this long "
      "after the last checkpoint, and at the end: at most an epoch or a minute of work is lost")
    a("--tsne-points", type=int, default=2000, help="test images in the t-SNE figure (0 = none)")
    a("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    a("--seed", type=int, default=0)
    a("--log-every", type=int, default=20, help="steps between progress lines")
    a("--out", default=None, help="checkpoint.pt and metrics.json go here [runs/<data>]")
    a("--figures-dir", default="figures")
    a("--resume", default=None, help="checkpoint.pt to continue from; its settings are the defaults")
    return p

def resolve_preset(args) -> str:
    """--preset auto: the paper's setting on a CUDA GPU, the laptop preset on a CPU or Apple's MPS."""
    if args.preset != "auto":
        return args.preset
    gpu = args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
    return "paper" if gpu else "laptop"

def describe_preset(args) -> str:
    if args.preset == "paper":
        return "preset paper: the MoCo CIFAR-10 notebook's recipe, 800 epochs at width 64"
    values = " ".join(f"--{k.replace('_', '-')} {getattr(args, k)}" for k in PRESETS[args.preset])
    return (f"preset {args.preset}: {values} (a flag you give wins); the paper's setting, 800 epochs at "
            f"width 64 (hours on a GPU, weeks without): --preset paper")

def parse_args(argv=None) -> argparse.Namespace:
    """The flags, and the checks that would otherwise fail late; with --resume, its settings are defaults."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.resume:   # the checkpoint's settings, its resolved preset included, become the defaults
        saved = load_checkpoint(args.resume)["args"]
        parser.set_defaults(**{k: v for k, v in saved.items() if k != "resume"})
    else:
        parser.set_defaults(**PRESETS[resolve_preset(args)])
    args = parser.parse_args(argv)
    args.preset = resolve_preset(args)
    args.data_dir = args.data_dir or os.path.join("data", args.dataset)
    args.out = args.out or os.path.join("runs", data_name(args))
    if args.dataset not in ("cifar10", "cifar100", "stl10", "folder"):
        raise CueCoError(f"unknown data set '{args.dataset}': choose cifar10, cifar100, stl10 or folder")
    rules = [("batch_size width dim queue_size num_clusters bn_splits log_every lr temperature "
              "clu_temperature sinkhorn_eps", "> 0", lambda v: v > 0),
             ("epochs limit_train limit_test eval_every num_workers image_size tsne_points lambda_clu "
              "weight_decay memory_gb save_minutes", ">= 0", lambda v: v >= 0),
             ("momentum", "in [0, 1)", lambda v: 0 <= v < 1),
             ("clu_warmup", "in [0, 1]", lambda v: 0 <= v <= 1)]
    for names, what, ok in rules:
        for name in names.split():
            if not ok(getattr(args, name)):
                raise CueCoError(f"--{name.replace('_', '-')} must be {what}, got {getattr(args, name)}")
    try:
        stages = [(float(f), int(n)) for f, n in (s.split(":") for s in args.res_schedule.split(",") if s)]
        assert all(0 < f <= 1 and n >= 0 for f, n in stages)
    except (ValueError, AssertionError):
        raise CueCoError(f"--res-schedule must be FRACTION:EPOCHS,... with fractions in (0, 1], e.g. "
                         f"0.5:12,0.75:4; got '{args.res_schedule}'") from None
    if args.queue_size < 2 * args.batch_size:
        raise CueCoError(f"--queue-size ({args.queue_size}) must hold one step's keys (2 x --batch-size)")
    for flag, path in (("--out", args.out), ("--figures-dir", args.figures_dir)):   # now, not after training
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as e:
            raise CueCoError(f"{flag} {path} cannot be created ({e.strerror})") from None
        if not os.access(path, os.W_OK):
            raise CueCoError(f"{flag} {path} is not writable")
    return args

# ===== 2. Augmentation: MoCo-v2's recipe per image (the specification), then a whole batch at once =====
def norm_stats(size: int):
    """Per-channel mean and std: CIFAR's for small images (CIFAR, STL-10), ImageNet's for large ones."""
    if size <= 64:
        return (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
    return (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

def mocov2_transform(size: int) -> v2.Compose:
    """The MoCo-v2 recipe per image, in torchvision: the specification that `augment` reproduces, and the
    loader path's transform. Blur belongs to the ImageNet recipe only (the CIFAR notebook drops it)."""
    mean, std = norm_stats(size)
    tfs = [v2.ToImage(), v2.RandomResizedCrop(size, scale=(0.2, 1.0), antialias=True),
           v2.RandomHorizontalFlip(), v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
           v2.RandomGrayscale(p=0.2)]
    if size > 64:
        tfs.append(v2.RandomApply([v2.GaussianBlur(blur_kernel(size), (0.1, 2.0))], p=0.5))
    return v2.Compose(tfs + [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])

def augment(x: torch.Tensor, size: int, g: torch.Generator | None, rng: random.Random):
    """One random view of every image of a batch: uint8 [B, 3, H, W] -> normalised float [B, 3, size, size],
    on x's device, from the distribution of `mocov2_transform` (the tests compare the two). g draws the
    per-image parameters on x's device, rng the per-batch ones (jitter order, blur width) on the host."""
    b, H, W = x.shape[0], x.shape[2], x.shape[3]
    u = lambda *shape: torch.rand(*shape, device=x.device, generator=g)              # noqa: E731
    x = x.float() / 255                                                              # x: [B, 3, H, W]
    # Random resized crop, torchvision's rule: 10 tries of area ~ U(0.2, 1) * H * W and log-aspect ~
    # U(log 3/4, log 4/3); the first box that fits wins, else the whole image.
    area = H * W * (0.2 + 0.8 * u(b, 10))                                            # area: [B, 10]
    aspect = torch.exp(math.log(3 / 4) + math.log(16 / 9) * u(b, 10))                # aspect: [B, 10]
    w, h = (area * aspect).sqrt().round(), (area / aspect).sqrt().round()            # [B, 10]
    fits = (w <= W) & (h <= H)
    first = fits.float().argmax(1, keepdim=True)                                     # first: [B, 1]
    w = torch.where(fits.any(1), w.gather(1, first)[:, 0], float(W))                 # w: [B]
    h = torch.where(fits.any(1), h.gather(1, first)[:, 0], float(H))                 # h: [B]
    top, left = (u(b) * (H - h + 1)).floor(), (u(b) * (W - w + 1)).floor()           # [B] each
    # crop + resize + horizontal flip (p = 0.5) as one bilinear resampling through an affine grid
    flip = torch.where(u(b) < 0.5, -1.0, 1.0)                                        # flip: [B]
    theta = torch.zeros(b, 2, 3, device=x.device)                                    # theta: [B, 2, 3]
    theta[:, 0, 0], theta[:, 0, 2] = w / W * flip, (2 * left + w) / W - 1
    theta[:, 1, 1], theta[:, 1, 2] = h / H, (2 * top + h) / H - 1
    grid = F.affine_grid(theta, [b, 3, size, size], align_corners=False)             # grid: [B, S, S, 2]
    # no sample beyond the outermost pixel centres: zero padding then never counts, the same output as
    # padding_mode="border", which Apple's MPS lacks before torch 2.13
    grid = torch.stack([grid[..., 0].clamp(-1 + 1 / W, 1 - 1 / W),                   # x: columns
                        grid[..., 1].clamp(-1 + 1 / H, 1 - 1 / H)], dim=-1)          # y: rows
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    # Colour jitter (brightness, contrast, saturation 0.4, hue 0.1) with p = 0.8, else the identity factors;
    # the order of the four operations is drawn per batch (each image's order is still uniformly random).
    on = (u(b) < 0.8).float()                                                        # on: [B]
    bright, contrast, sat = ((1 + on * (2 * u(b) - 1) * 0.4).view(b, 1, 1, 1) for _ in range(3))
    hue = (on * (2 * u(b) - 1) * 0.1).view(b, 1, 1)                                  # hue: [B, 1, 1]
    for op in rng.sample(range(4), 4):
        if op == 0:
            x = (bright * x).clamp(0, 1)
        elif op == 1:
            x = (contrast * x + (1 - contrast) * grayscale(x).mean((1, 2, 3), keepdim=True)).clamp(0, 1)
        elif op == 2:
            x = (sat * x + (1 - sat) * grayscale(x)).clamp(0, 1)
        else:
            x = shift_hue(x, hue)
    x = torch.where(u(b).view(b, 1, 1, 1) < 0.2, grayscale(x).expand_as(x), x)       # grayscale, p = 0.2
    if H > 64:   # the recipe of the images' own size (smaller views: see --res-schedule); blur with p = 0.5, sigma ~ U(0.1, 2) drawn per batch, like the jitter order
        sigma = rng.uniform(0.1, 2.0)
        blurred = v2.functional.gaussian_blur(x, [blur_kernel(size)] * 2, [sigma, sigma])
        x = torch.where(u(b).view(b, 1, 1, 1) < 0.5, blurred, x)
    return normalize(x, H)                                                           # [B, 3, S, S]

def normalize(x: torch.Tensor, size: int) -> torch.Tensor:
    mean, std = norm_stats(size)
    return torch.stack([(x[:, c] - mean[c]) / std[c] for c in range(3)], dim=1)      # [B, 3, S, S]

def grayscale(x: torch.Tensor) -> torch.Tensor:
    return (0.2989 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)       # [B, 1, H, W]

def shift_hue(x: torch.Tensor, hue: torch.Tensor) -> torch.Tensor:
    """Rotate the hue of RGB images x [B, 3, H, W] in [0, 1] by hue [B, 1, 1] turns, through HSV."""
    r, g, b = x.unbind(1)                                                            # [B, H, W] each
    v, delta = x.max(1).values, x.max(1).values - x.min(1).values                    # [B, H, W]
    d = delta.clamp_min(1e-8)
    h = torch.where(v == r, (g - b) / d % 6, torch.where(v == g, (b - r) / d + 2, (r - g) / d + 4)) / 6
    h = (torch.where(delta > 0, h, 0.0) + hue) % 1                                   # h: [B, H, W]
    k = torch.stack([5 + 6 * h, 3 + 6 * h, 1 + 6 * h], dim=1) % 6                    # k: [B, 3, H, W]
    s = (delta / v.clamp_min(1e-8))[:, None]                                         # s: [B, 1, H, W]
    return v[:, None] * (1 - s * torch.minimum(k, 4 - k).clamp(0, 1))                # [B, 3, H, W]

def blur_kernel(size: int) -> int:
    return max(3, int(0.1 * size) // 2 * 2 + 1)        # odd, about 10% of the image (MoCo-v2: 23 at 224)

# ============================== 3. Backbone: ResNet-18 with split batch norm ================================
class SplitBatchNorm(nn.BatchNorm2d):
    """Batch norm with statistics from `num_splits` groups of the batch, as if each were on its own GPU (the
    MoCo CIFAR-10 notebook's trick). With the key batch shuffled, a query and its positive key are normalised
    with statistics of different images; otherwise the network finds the positive key through the batch
    statistics instead of the image content (the "BN leak"), a shortcut that costs MoCo ~4 points on CIFAR."""
    def __init__(self, num_features: int, num_splits: int):
        super().__init__(num_features)
        self.num_splits = num_splits
    def forward(self, x):
        (n, c, h, w), s = x.shape, self.num_splits
        if not self.training or s == 1 or n % s:
            return super().forward(x)
        # fold the groups into the channels, [N, C, H, W] -> [N/s, C*s, H, W] (a view, no copy, in PyTorch's
        # default layout): group j holds samples j, j+s, j+2s, ..., strided as the ranks of torchrun share
        mean_run, var_run = self.running_mean.repeat(s), self.running_var.repeat(s)
        y = F.batch_norm(x.reshape(n // s, c * s, h, w), mean_run, var_run, self.weight.repeat(s),
                         self.bias.repeat(s), True, self.momentum, self.eps).reshape(n, c, h, w)
        self.running_mean.copy_(mean_run.view(s, c).mean(0))   # the groups' running statistics, averaged
        self.running_var.copy_(var_run.view(s, c).mean(0))
        self.num_batches_tracked += 1
        return y

class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, bn):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), bn(c_out)
        self.conv2, self.bn2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False), bn(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), bn(c_out))
    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))

class ResNet18(nn.Module):
    """ResNet-18 -> [N, 8 * width]; the CIFAR stem (3x3 conv, no max-pool) keeps 32-px images full size."""
    def __init__(self, width: int = 64, cifar_stem: bool = True, bn_splits: int = 1):
        super().__init__()
        bn = (lambda c: SplitBatchNorm(c, bn_splits)) if bn_splits > 1 else nn.BatchNorm2d
        if cifar_stem:
            self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), bn(width), nn.ReLU())
        else:
            self.stem = nn.Sequential(nn.Conv2d(3, width, 7, 2, 3, bias=False), bn(width), nn.ReLU(),
                                      nn.MaxPool2d(3, 2, 1))
        blocks, c_in = [], width
        for i, c_out in enumerate([width, 2 * width, 4 * width, 8 * width]):
            blocks += [BasicBlock(c_in, c_out, 1 if i == 0 else 2, bn), BasicBlock(c_out, c_out, 1, bn)]
            c_in = c_out
        self.layers, self.out_dim = nn.Sequential(*blocks), c_in
    def forward(self, x):
        return torch.flatten(F.adaptive_avg_pool2d(self.layers(self.stem(x)), 1), 1)    # [N, 8*width]

# ============= 4. The query/key model: encoder_q, its momentum copy encoder_k, and the queue ================
class Encoder(nn.Module):
    """Backbone -> MLP head -> unit-length embedding z [N, D], and its cosines with the centroids C, which
    live here (ours) so that keys and the centroids that assign them come from the same slow key network."""
    def __init__(self, width: int, dim: int, num_clusters: int, cifar_stem: bool, bn_splits: int):
        super().__init__()
        self.backbone = ResNet18(width, cifar_stem, bn_splits)
        f = self.backbone.out_dim
        self.projector = nn.Sequential(nn.Linear(f, f), nn.ReLU(), nn.Linear(f, dim))   # MoCo-v2's head
        self.C = nn.Parameter(F.normalize(torch.randn(num_clusters, dim), dim=1))        # C: [K_c, D]
    def forward(self, x):
        h = self.projector(self.backbone(x))                                         # h: [N, D]
        with torch.autocast(x.device.type, enabled=False):   # cosines in float32, whatever the autocast
            z = F.normalize(h.float(), dim=1)                                        # z: [N, D]
            return z, z @ F.normalize(self.C.float(), dim=1).t()                     # z.C: [N, K_c]

class CueCo(nn.Module):
    def __init__(self, width=64, dim=128, num_clusters=100, queue_size=4096, cifar_stem=True, bn_splits=8):
        super().__init__()
        self.encoder_q = Encoder(width, dim, num_clusters, cifar_stem, bn_splits)
        self.encoder_k = Encoder(width, dim, num_clusters, cifar_stem, bn_splits)
        self.encoder_k.load_state_dict(self.encoder_q.state_dict())
        self.encoder_k.requires_grad_(False)   # the key network learns only through the momentum update
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, dim), dim=1))     # queue: [K, D]
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
    @torch.no_grad()
    def momentum_update(self, m: float):
        """theta_k <- m theta_k + (1 - m) theta_q, centroids included: a large m keeps the keys in the queue,
        made over the last few hundred steps, comparable. BN running statistics stay the key network's own."""
        # theta_k + (1 - m) (theta_q - theta_k), over all tensors in a few fused kernels
        torch._foreach_lerp_(list(self.encoder_k.parameters()), list(self.encoder_q.parameters()), 1 - m)
    @torch.no_grad()
    def keys(self, x: torch.Tensor, shuffle: bool = True):
        """Keys [n, D] and cosines [n, K_c] of this process's images x [n, 3, S, S], encoded in a random order
        of the whole (global) batch, so that a key meets other images in its BN group than its query did.
        Under torchrun, as MoCo does: gather all images, rank 0's permutation, each rank encodes a slice."""
        if not shuffle:
            return self.encoder_k(x)
        rank, world = rank_and_world()
        x_all = all_gather(x)                                                      # x_all: [n*world, 3, S, S]
        idx = torch.randperm(len(x_all), device=x.device)                          # idx: [n*world]
        if world > 1:
            dist.broadcast(idx, 0)
        k, s = self.encoder_k(x_all[idx.view(world, -1)[rank]])                    # k: [n, D], s: [n, K_c]
        mine = torch.argsort(idx).view(world, -1)[rank]   # where this rank's images went: [n]
        return all_gather(k)[mine], all_gather(s)[mine]
    @torch.no_grad()
    def enqueue(self, k: torch.Tensor):
        """Replace the oldest keys of the queue by k [B, D] (by all ranks' keys under torchrun)."""
        k = all_gather(k)                                                            # k: [B * world, D]
        idx = (self.queue_ptr + torch.arange(len(k), device=k.device)) % len(self.queue)
        self.queue[idx] = k.to(self.queue.dtype)
        self.queue_ptr.copy_((self.queue_ptr + len(k)) % len(self.queue))

# =============================================== 5. Losses ==================================================
def contrastive_loss(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, T: float) -> torch.Tensor:
    """InfoNCE: L_con = -log exp(q.k+/T) / (exp(q.k+/T) + sum_j exp(q.queue_j/T)), a cross-entropy over
    1+K logits whose correct class is 0, the positive key. q, k: [N, D], queue: [K, D], all unit length."""
    l_pos = (q * k).sum(dim=1, keepdim=True)                                         # l_pos: [N, 1]
    l_neg = q @ queue.t()                                                            # l_neg: [N, K]
    logits = torch.cat([l_pos, l_neg], dim=1) / T                                    # logits: [N, 1+K]
    labels = torch.zeros(len(q), dtype=torch.long, device=q.device)                  # labels: [N]
    return F.cross_entropy(logits, labels)

@torch.no_grad()
def sinkhorn(scores: torch.Tensor, eps: float = 0.05, iters: int = 3) -> torch.Tensor:
    """Balanced soft assignment (Sinkhorn-Knopp, as in SwAV): scores [N, K_c] -> Q [N, K_c], rows summing to
    1, each cluster taking 1/K_c of the (global) batch. Ours, over CoKe's minimal cluster size: both forbid
    one cluster for everything, but Sinkhorn keeps no state across steps and is global over GPUs with a few
    all-reduces; its price, equal sizes per batch, is mild with more clusters than classes (100 vs 10)."""
    logits = scores.float().t() / eps                                                # logits: [K_c, N]
    Q = torch.exp(logits - all_reduce(logits.max(), "MAX"))   # one shift for the (global) batch
    K_c, N = Q.shape[0], Q.shape[1] * rank_and_world()[1]
    Q /= all_reduce(Q.sum())
    for _ in range(iters):
        Q /= all_reduce(Q.sum(dim=1, keepdim=True)) * K_c                            # each cluster: 1/K_c
        Q /= Q.sum(dim=0, keepdim=True) * N                                          # each sample: 1/N
    return (Q * N).t()                                                               # Q: [N, K_c]

def clustering_loss(s_q: torch.Tensor, s_k: torch.Tensor, tau: float, eps: float) -> torch.Tensor:
    """Ours: L_clu = -sum_c Q(k+)_c log softmax(q.C / tau)_c, batch mean: the query predicts its key's
    balanced assignment. s_q, s_k: [N, K_c] cosines of query and key with C (gradient: to q and C)."""
    Q = sinkhorn(s_k, eps)                                                           # Q: [N, K_c]
    log_p = F.log_softmax(s_q.float() / tau, dim=1)                                  # log_p: [N, K_c]
    return -(Q * log_p).sum(dim=1).mean()

def cueco_loss(model: CueCo, encoder_q: nn.Module, x1: torch.Tensor, x2: torch.Tensor, T: float, tau: float,
               eps: float, lam: float, shuffle: bool = True):
    """L = L_con(q1, k2) + L_con(q2, k1) + lam * (L_clu(q1, k2) + L_clu(q2, k1)) on two views [N, 3, S, S],
    its parts, the keys to enqueue [2N, D], each centroid's share [K_c]; encoder_q may be wrapped (DDP)."""
    q1, s1 = encoder_q(x1)                                                      # q1: [N, D], s1: [N, K_c]
    q2, s2 = encoder_q(x2)
    k1, sk1 = model.keys(x1, shuffle)                                                # k1: [N, D], no gradient
    k2, sk2 = model.keys(x2, shuffle)
    queue = model.queue                                                              # queue: [K, D]
    with torch.autocast(x1.device.type, enabled=False):   # logits / T need float32
        l_con = contrastive_loss(q1, k2, queue, T) + contrastive_loss(q2, k1, queue, T)
        l_clu = clustering_loss(s1, sk2, tau, eps) + clustering_loss(s2, sk1, tau, eps)
    shares = (s1 == s1.max(dim=1, keepdim=True).values).float().mean(0)              # shares: [K_c]
    return l_con + lam * l_clu, l_con.detach(), l_clu.detach(), torch.cat([k1, k2]), shares

# ============================================== 6. Training =================================================
def clustering_weight(lam: float, epoch: int, epochs: int, warmup: float) -> float:
    """lambda in epoch `epoch` (from 1), ramped up from 0 over the first `warmup` of the epochs. Ours: the
    clusters of early, noisy features are noise, and pulling queries to them fights L_con (README.md)."""
    return lam * min(1.0, epoch / (warmup * epochs)) if warmup * epochs > 0 else lam

def make_optimizer(encoder_q: Encoder, lr: float, weight_decay: float) -> torch.optim.SGD:
    """SGD with momentum; no weight decay on the centroids, which only their direction matters for."""
    rest = [p for name, p in encoder_q.named_parameters() if name != "C"]
    return torch.optim.SGD([{"params": rest}, {"params": [encoder_q.C], "weight_decay": 0.0}],
                           lr=lr, momentum=0.9, weight_decay=weight_decay)

def view_size(epoch: int, image_size: int, res_schedule: str) -> int:
    """The views' side in epoch `epoch` (from 1): `res_schedule` "0.5:12,0.75:4" means half the image size
    for 12 epochs, then three quarters for 4, then the full size. Small views cost about (S/H)^2 of a full
    step, and random resized crops already show objects larger than the test images do (FixRes)."""
    end = 0
    for stage in filter(None, res_schedule.split(",")):
        fraction, epochs = stage.split(":")
        end += int(epochs)
        if epoch <= end:
            return round(float(fraction) * image_size)
    return image_size

def epoch_views(data, epoch: int, batch_size: int, seed: int, device, loader=None, rank=0, world=1, size=0):
    """Two views [b, 3, S, S] of this process's share b = batch_size / world of each batch of an epoch: whole
    batches augmented on the device (memory path), or `mocov2_transform` in loader workers (loader path);
    S = size (0: the images' own)."""
    size = size or data.image_size
    if loader is not None:
        loader.sampler.set_epoch(epoch)
        for x1, x2 in loader:   # full-size views, shrunk on the device if this epoch's are smaller
            x1, x2 = x1.to(device, non_blocking=True), x2.to(device, non_blocking=True)
            if size != data.image_size:
                x1 = F.interpolate(x1, size=(size, size), mode="bilinear", antialias=True)
                x2 = F.interpolate(x2, size=(size, size), mode="bilinear", antialias=True)
            yield x1, x2
        return
    order = torch.Generator(device=device).manual_seed(seed + epoch)   # the same order on every rank
    perm = torch.randperm(len(data.train), generator=order, device=device)           # perm: [N]
    s = seed * 100_003 + epoch * 1009 + rank                                         # this rank's views
    g, rng = torch.Generator(device=device).manual_seed(s), random.Random(s)
    for i in range(len(perm) // batch_size):   # the same permutation on every rank; rank r takes r::world
        x = data.train[perm[i * batch_size:(i + 1) * batch_size][rank::world]]        # x: [b, 3, H, W]
        yield augment(x, size, g, rng), augment(x, size, g, rng)

def train(model: CueCo, encoder_q: nn.Module, optimizer, data, device, *, epochs: int, batch_size: int,
          lr: float, m: float, T: float, tau: float, eps: float, lam: float, clu_warmup: float, seed=0,
          precision="fp32", eval_every=10, save_minutes=1.0, log_every=20, workers=0, loader=None, out=None,
          config=None, start_epoch=0, history=None, res_schedule="", scaler=None):
    """Epochs start_epoch+1..epochs: each step lr, views, loss, backward, SGD step, momentum update, enqueue;
    each epoch ends (rank 0) with the kNN monitor, metrics.json and a checkpoint. Returns the history and
    the last epoch's features (bank, test), which the final evaluation reuses."""
    rank, world = rank_and_world()
    history = [] if history is None else history
    scaler = scaler or torch.amp.GradScaler(device.type, enabled=False)
    steps, t_run, done = len(data.train) // batch_size, time.time(), 0
    saved, last = t_run, None
    total, base_lr = epochs * steps, lr * batch_size / 512           # the recipe's lr is for batch 512
    sizes = [view_size(e, data.image_size, res_schedule) for e in range(1, epochs + 1)]
    work_left = sum(s * s for s in sizes[start_epoch:]) * steps      # a step's cost ~ pixels, for "left"
    for epoch in range(start_epoch + 1, epochs + 1):
        model.train()
        lam_now = clustering_weight(lam, epoch, epochs, clu_warmup)
        torch.manual_seed(seed * 1009 + epoch)   # key shuffles: a resumed run draws what an unstopped one did
        sums, t0 = torch.zeros(4, device=device), time.time()        # L, L_con, L_clu, largest cluster share
        size = sizes[epoch - 1]
        views = epoch_views(data, epoch, batch_size, seed, device, loader, rank, world, size)
        for step, (x1, x2) in enumerate(views):
            lr_now = base_lr * 0.5 * (1 + math.cos(math.pi * ((epoch - 1) * steps + step) / max(1, total)))
            for group in optimizer.param_groups:
                group["lr"] = lr_now
            with autocast(device, precision):
                loss, l_con, l_clu, keys, shares = cueco_loss(model, encoder_q, x1, x2, T, tau, eps, lam_now)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()   # without fp16: loss.backward(), optimizer.step()
            scaler.step(optimizer)
            scaler.update()
            model.momentum_update(m)
            model.enqueue(keys)
            sums += torch.stack([loss.detach(), l_con, l_clu, shares.max()])
            done += size * size
            if (step + 1) % log_every == 0 or step + 1 == steps:
                avg = (all_reduce(sums.clone()) / (world * (step + 1))).tolist()   # all ranks' mean
                if not all(map(math.isfinite, avg)):
                    raise CueCoError(f"the loss became NaN/inf in epoch {epoch}; the last checkpoint is kept "
                                     f"in {out}; try a lower --lr")
                ips = (step + 1) * batch_size / (time.time() - t0)
                left = (work_left - done) * (time.time() - t_run) / done
                line = (f"epoch {epoch}/{epochs} step {step + 1}/{steps} loss {avg[0]:.3f} (con {avg[1]:.3f} "
                        f"clu {avg[2]:.3f}) max-cluster {avg[3]:.2f} lr {lr_now:.4f} | {size} px, "
                        f"{ips:.0f} img/s | {hms(left)} left")
                if rank == 0:
                    print(line, flush=True)
        seconds = time.time() - t0
        avg = (all_reduce(sums) / (world * max(1, steps))).tolist()
        record = {"epoch": epoch, "view_size": size, "loss": avg[0], "loss_contrastive": avg[1], "loss_clustering": avg[2],
                  "max_cluster_share": avg[3], "num_clusters": model.encoder_q.C.shape[0],
                  "lambda_clu": lam_now, "lr": lr_now, "img_per_s": steps * batch_size / seconds,
                  "seconds": seconds}
        if device.type == "cuda":
            record["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
        if rank == 0:
            if epoch == epochs or (eval_every and epoch % eval_every == 0):
                f_bank, f_test = features(model.encoder_q.backbone, data, device, precision, workers)
                record["knn"] = knn_accuracy(f_bank, data.bank_y, f_test, data.test_y)
                last = (f_bank, f_test) if epoch == epochs else None
                print(f"epoch {epoch}: kNN top-1 {record['knn']:.2f}% ({seconds:.1f}s)", flush=True)
            history.append(record)
            if out:
                write_json(os.path.join(out, "metrics.json"), {"args": config, "epochs": history})
            if out and (time.time() - saved >= 60 * save_minutes or epoch == epochs):
                save_checkpoint(os.path.join(out, "checkpoint.pt"), model, optimizer, scaler, epoch, config,
                                history)
                saved = time.time()
        if world > 1:
            dist.barrier()
    return history, last

# ========================== 7. Evaluation: features, weighted kNN, linear probe =============================
@torch.no_grad()
def features(backbone: nn.Module, data, device, precision="fp32", workers=0, batch_size=512):
    """Backbone features (float32, on `device`) of the unaugmented bank and test images. Leaves the backbone
    in eval mode (batch norm from running statistics); `train` switches back at each epoch."""
    backbone.eval()
    out = []
    for images in (data.bank, data.test):   # uint8 [N, 3, S, S] tensors, or Datasets of (image, label)
        batches = images.split(batch_size) if isinstance(images, torch.Tensor) else \
            (x for x, _ in DataLoader(images, batch_size, num_workers=workers))
        with autocast(device, precision):
            out.append(torch.cat([backbone(normalize(x.to(device).float() / 255, data.image_size)).float()
                                  for x in batches]))                               # [N, F]
    return out

@torch.no_grad()
def knn_accuracy(train_x, train_y, test_x, test_y, k=200, t=0.1, chunk=1024) -> float:
    """Top-1 accuracy (%) of weighted kNN (Wu et al. 2018, MoCo's monitor): each of the k nearest training
    features (cosine similarity) votes for its class with weight exp(similarity / t)."""
    dev = train_x.device
    train_x, test_x = F.normalize(train_x.float(), dim=1), F.normalize(test_x.to(dev).float(), dim=1)
    train_y, test_y = train_y.to(dev), test_y.to(dev)
    num_classes, correct = int(max(train_y.max(), test_y.max())) + 1, 0
    for i in range(0, len(test_x), chunk):
        sim = test_x[i:i + chunk] @ train_x.t()                                      # sim: [M, N]
        top_sim, top_idx = sim.topk(min(k, len(train_x)), dim=1)                     # [M, k]
        votes = torch.zeros(len(sim), num_classes, device=dev)                       # votes: [M, classes]
        votes.scatter_add_(1, train_y[top_idx], (top_sim / t).exp())
        correct += (votes.argmax(dim=1) == test_y[i:i + chunk]).sum().item()
    return 100.0 * correct / len(test_x)

def linear_probe(train_x, train_y, test_x, test_y, epochs=100, batch_size=256, lr=1e-2, seed=0) -> float:
    """Top-1 (%) of a linear layer on frozen, standardised features: seconds; the usual protocol (100 epochs
    of augmented images) scores a little higher."""
    g, dev = torch.Generator().manual_seed(seed), train_x.device
    mu, sd = train_x.mean(0, keepdim=True), train_x.std(0, keepdim=True) + 1e-6     # [1, F]
    xtr, xte, ytr, yte = (train_x - mu) / sd, (test_x.to(dev) - mu) / sd, train_y.to(dev), test_y.to(dev)
    with torch.random.fork_rng(devices=[]):   # a seeded head, the global random state untouched
        torch.manual_seed(seed)
        head = nn.Linear(xtr.shape[1], int(max(ytr.max(), yte.max())) + 1).to(dev)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * math.ceil(len(xtr) / batch_size))
    for _ in range(epochs):
        for idx in torch.randperm(len(xtr), generator=g).to(dev).split(batch_size):
            loss = F.cross_entropy(head(xtr[idx]), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    with torch.no_grad():
        return 100.0 * (head(xte).argmax(1) == yte).float().mean().item()

# ========= 8. Clustering metrics (k-means, Hungarian matching, NMI, ARI, ACC) and t-SNE, in torch ===========
@torch.no_grad()
def kmeans(x: torch.Tensor, k: int, iters=100, seed=0) -> torch.Tensor:
    """Lloyd's k-means with k-means++ seeding (one run, as scikit-learn) on unit vectors: [N, F] -> [N]."""
    x, g = F.normalize(x.float(), dim=1), torch.Generator().manual_seed(seed)
    centers = x[torch.randint(len(x), (1,), generator=g).to(x.device)]               # centers: [1, F]
    for _ in range(1, k):   # k-means++: the next centre drawn with probability ~ squared distance
        d2 = torch.cdist(x, centers).min(dim=1).values ** 2                          # d2: [N]
        centers = torch.cat([centers, x[torch.multinomial(d2.cpu() + 1e-12, 1, generator=g).to(x.device)]])
    for _ in range(iters):
        onehot = F.one_hot(torch.cdist(x, centers).argmin(dim=1), k).float()         # onehot: [N, k]
        counts = onehot.sum(0)[:, None]                                              # counts: [k, 1]
        new = torch.where(counts > 0, onehot.t() @ x / counts.clamp_min(1), centers)   # an empty one stays
        if torch.allclose(new, centers, atol=1e-6):
            break
        centers = new                                                                # centers: [k, F]
    return torch.cdist(x, centers).argmin(dim=1)                                     # labels: [N]

def hungarian(cost: list) -> list:
    """Min-cost matching on a square cost matrix (Kuhn-Munkres, O(n^3)): col[i], the column of row i."""
    n, inf = len(cost), float("inf")
    u, v, match, way = [0.0] * (n + 1), [0.0] * (n + 1), [0] * (n + 1), [0] * (n + 1)   # 1-based; 0 virtual
    for i in range(1, n + 1):
        match[0], j0, minv, used = i, 0, [inf] * (n + 1), [False] * (n + 1)
        while match[j0]:   # grow an alternating tree from row i until it reaches a free column
            used[j0], i0, delta, j1 = True, match[j0], inf, 0
            for j in range(1, n + 1):
                if not used[j]:
                    cur = cost[i0 - 1][j - 1] - u[i0] - v[j]
                    if cur < minv[j]:
                        minv[j], way[j] = cur, j0
                    if minv[j] < delta:
                        delta, j1 = minv[j], j
            for j in range(n + 1):
                if used[j]:
                    u[match[j]], v[j] = u[match[j]] + delta, v[j] - delta
                else:
                    minv[j] -= delta
            j0 = j1
        while j0:   # flip the augmenting path
            match[j0], j0 = match[way[j0]], way[j0]
    return [j - 1 for j in sorted(range(1, n + 1), key=lambda j: match[j])]   # the columns in row order

def contingency(pred: torch.Tensor, target: torch.Tensor):
    """Contingency table n_ij (points of cluster i with class j) [P, T], and the cluster and class values."""
    p_vals, p = pred.long().cpu().unique(return_inverse=True)
    t_vals, t = target.long().cpu().unique(return_inverse=True)
    table = torch.zeros(len(p_vals), len(t_vals), dtype=torch.float64)             # table: [P, T]
    return table.index_put_((p, t), torch.ones(len(p), dtype=torch.float64), accumulate=True), p_vals, t_vals

def match_clusters(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Each cluster renamed as its class in the best one-to-one map (unmatched clusters: negative), [N]."""
    table, p_vals, t_vals = contingency(pred, target)
    n = max(table.shape)
    col = hungarian((-F.pad(table, (0, n - table.shape[1], 0, n - table.shape[0]))).tolist())
    label = [t_vals[c].item() if c < len(t_vals) else -1 - i for i, c in enumerate(col[:len(p_vals)])]
    return torch.tensor(label)[torch.searchsorted(p_vals, pred.long().cpu())]            # [N]

def cluster_metrics(pred: torch.Tensor, target: torch.Tensor) -> dict:
    """NMI (arithmetic mean normalisation, as scikit-learn), ARI and Hungarian-matched ACC of pred [N]."""
    table, _, _ = contingency(pred, target)
    n, a, b = table.sum(), table.sum(1), table.sum(0)                                # a: [P], b: [T]
    nz = table > 0
    mi = (table[nz] / n * torch.log(table[nz] * n / (a[:, None] * b[None, :])[nz])).sum()   # I(P; T)
    entropy = lambda c: -(c[c > 0] / n * torch.log(c[c > 0] / n)).sum()              # noqa: E731
    h_sum = entropy(a) + entropy(b)
    nmi = 1.0 if h_sum == 0 else (2 * mi / h_sum).item()                             # I / mean(H(P), H(T))
    pairs = lambda c: (c * (c - 1) / 2).sum()                                        # noqa: E731
    expected = pairs(a) * pairs(b) / max(1.0, pairs(n.reshape(1)).item())            # E[index] by chance
    top = (pairs(a) + pairs(b)) / 2
    ari = 1.0 if top == expected else ((pairs(table) - expected) / (top - expected)).item()
    acc = (match_clusters(pred, target) == target.long().cpu()).double().mean().item()
    return {"nmi": float(nmi), "ari": float(ari), "acc": float(acc)}

@torch.no_grad()
def cluster_exemplars(f: torch.Tensor, clusters: torch.Tensor, n: int = 10) -> torch.Tensor:
    """For each cluster of features f [N, F], its n members nearest its centre (cosine), nearest first:
    indices [k, n], -1 where a cluster has fewer members."""
    f, k = F.normalize(f.float(), dim=1), int(clusters.max()) + 1
    centres = F.normalize(torch.zeros(k, f.shape[1], device=f.device).index_add_(0, clusters.to(f.device), f),
                          dim=1)                                                     # centres: [k, F]
    sim = (f @ centres.t()).masked_fill(F.one_hot(clusters.to(f.device), k) == 0, -2.0)   # sim: [N, k]
    top = sim.topk(min(n, len(f)), dim=0)                                            # [n, k]
    return torch.where(top.values > -2.0, top.indices, -1).t().cpu()                 # [k, n]

@torch.no_grad()
def tsne(x: torch.Tensor, perplexity=30.0, seed=0, iters=750) -> torch.Tensor:
    """Exact t-SNE (van der Maaten & Hinton 2008), [N, F] -> [N, 2]: PCA init, exaggeration 12, gains."""
    x = x.detach().cpu().double()   # on the host first: Apple's MPS has no float64
    x, n = x - x.mean(0), len(x)
    d2 = torch.cdist(x, x) ** 2                                                      # d2: [N, N]
    d2.fill_diagonal_(float("inf"))   # a point is not its own neighbour
    # each point's Gaussian precision beta_i, by bisection, so that the entropy of P(.|i) is log(perplexity)
    target = math.log(min(perplexity, (n - 1) / 3))
    lo, hi = torch.full((n, 1), -50.0, dtype=x.dtype), torch.full((n, 1), 50.0, dtype=x.dtype)   # log beta
    for _ in range(64):
        mid = (lo + hi) / 2                                                          # mid: [N, 1]
        P = torch.softmax(-d2 * mid.exp(), dim=1)                                    # P(j|i): [N, N]
        H = -(P * torch.log(P.clamp_min(1e-300))).sum(1, keepdim=True)               # H: [N, 1]
        lo, hi = torch.where(H > target, mid, lo), torch.where(H > target, hi, mid)  # too flat: narrower
    P = ((P + P.t()) / (2 * n)).float().clamp_min(1e-12)                             # P_ij: [N, N]
    y = (x @ torch.linalg.svd(x, full_matrices=False)[2][:2].t()).float()            # y: [N, 2]
    y = y / y[:, 0].std() * 1e-4 + 1e-8 * torch.randn(n, 2, generator=torch.Generator().manual_seed(seed))
    lr, update, gains = max(n / 48, 50.0), torch.zeros_like(y), torch.ones_like(y)
    for it in range(iters):
        exaggeration, momentum = (12.0, 0.5) if it < 250 else (1.0, 0.8)
        w = 1 / (1 + torch.cdist(y, y) ** 2)                                         # w: [N, N]
        w.fill_diagonal_(0)
        Q = (w / w.sum()).clamp_min(1e-12)                                           # Q_ij: [N, N]
        m = (exaggeration * P - Q) * w                                               # m: [N, N]
        grad = 4 * (m.sum(1, keepdim=True) * y - m @ y)   # dC/dy_i = 4 sum_j (p_ij - q_ij) w_ij (y_i - y_j)
        gains = torch.where((grad > 0) == (update > 0), gains * 0.8, gains + 0.2).clamp_min(0.01)   # [N, 2]
        update = momentum * update - lr * gains * grad                               # update: [N, 2]
        y = y + update
        y = y - y.mean(0)
    return y                                                                         # [N, 2]

# ================ 9. Figures (matplotlib's object API: no global state, no display needed) ==================
def plot_tsne(y, labels, clusters, classes: list, path: str, title: str = ""):
    """The t-SNE coloured by true class, and by k-means cluster in the colour of its matched class."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(13, 6.2), dpi=110)
    cmap = "tab10" if len(classes) <= 10 else "tab20"
    for ax, c, name in zip(fig.subplots(1, 2), (labels, clusters), ("true class", "k-means cluster")):
        sc = ax.scatter(y[:, 0].cpu(), y[:, 1].cpu(), c=c.cpu().clamp_min(0), cmap=cmap, s=4, alpha=0.8,
                        linewidths=0, vmin=0, vmax=max(len(classes), 10) - 1)
        ax.set(title=f"coloured by {name}", xticks=[], yticks=[])
        if name == "true class" and len(classes) <= 20:
            ax.legend(handles=[ax.scatter([], [], color=sc.cmap(sc.norm(i)), s=20, label=cls)
                               for i, cls in enumerate(classes)], fontsize=7, framealpha=0.7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)

def plot_clusters(images: list, names: list, path: str, title: str = ""):
    """One row per cluster: its images (uint8 [3, S, S], None where it has too few) nearest its centre."""
    from matplotlib.figure import Figure
    size = next(x for row in images for x in row if x is not None).shape[-1]
    blank = torch.full((3, size, size), 255, dtype=torch.uint8)
    grid = torchvision.utils.make_grid([blank if x is None else x for row in images for x in row],
                                       nrow=len(images[0]), padding=2, pad_value=255)   # grid: [3, H, W]
    fig = Figure(figsize=(1 + 0.6 * len(images[0]), 0.3 + 0.6 * len(images)), dpi=110)
    ax = fig.subplots()
    ax.imshow(grid.permute(1, 2, 0).numpy())
    ax.set(xticks=[], yticks=[(size + 2) * (i + 0.5) for i in range(len(names))], yticklabels=names)
    ax.set_title(title, fontsize=9)
    fig.savefig(path, bbox_inches="tight")   # room for the row labels and the title

def plot_curves(history: list, path: str, title: str = ""):
    """Both losses, the kNN monitor, and the largest cluster's share of a batch (near 1 = collapse)."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(13, 3.6), dpi=110)
    panels = [("loss_contrastive", "contrastive loss"), ("loss_clustering", "clustering loss"),
              ("knn", "kNN top-1 (%)"), ("max_cluster_share", "largest cluster's share of a batch")]
    for ax, (key, name) in zip(fig.subplots(1, 4), panels):
        ax.plot([h["epoch"] for h in history if key in h], [h[key] for h in history if key in h], ".-")
        ax.set(title=name, xlabel="epoch")
    ax.axhline(1 / history[0]["num_clusters"], ls="--", color="gray")   # uniform share
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)

# =================== 10. Data sets: CIFAR-10/100 (and CIFAR-20), STL-10, image folders ======================
# What a run trains and evaluates on. train: uint8 images [N, 3, S, S] (memory path) or a Dataset of view
# pairs (loader path); bank, bank_y: the labelled images of the kNN monitor and the linear probe (usually
# the training images); test, test_y; test_y20: CIFAR-100's 20 superclasses of the test images, else None.
Data = collections.namedtuple("Data", ["train", "bank", "bank_y", "test", "test_y", "classes", "image_size",
                                       "test_y20"], defaults=[None])

def balanced_subset(labels: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """Sorted indices of n samples, class counts within one of each other, drawn reproducibly."""
    if n <= 0 or n >= len(labels):
        return torch.arange(len(labels))
    g, rank_in_class = torch.Generator().manual_seed(seed), torch.empty(len(labels), dtype=torch.long)
    for c in labels.unique():   # a random order within each class, then round-robin over the classes
        idx = torch.nonzero(labels == c).flatten()
        rank_in_class[idx[torch.randperm(len(idx), generator=g)]] = torch.arange(len(idx))
    return torch.argsort(rank_in_class * (int(labels.max()) + 1) + labels)[:n].sort().values

def read_image(path: str):
    try:
        return torchvision.datasets.folder.default_loader(path)
    except Exception as e:
        raise CueCoError(f"cannot read image {path}: {str(e).splitlines()[0][:100]}") from None

class Images(Dataset):
    """Image files [(path, label)] -> (transform(image), label); with `seed`, a pair of random views of item
    (i, epoch), drawn from (seed, epoch, i) alone: any worker, any restart draws the same views."""
    def __init__(self, samples: list, transform, seed: int | None = None):
        self.samples, self.transform, self.seed = samples, transform, seed
    def __len__(self):
        return len(self.samples)
    def __getitem__(self, key):
        i, epoch = key if isinstance(key, tuple) else (key, 0)
        path, label = self.samples[i]
        x = read_image(path)
        if self.seed is None:
            return self.transform(x), label
        with torch.random.fork_rng(devices=[]):   # torchvision draws from the global generator
            torch.manual_seed((self.seed * 1009 + epoch) * len(self) + i)
            return self.transform(x), self.transform(x)

class EpochSampler(DistributedSampler):
    """This rank's share of a shuffled epoch, each index with its epoch: (i, epoch) for `Images`."""
    def __iter__(self):
        return ((i, self.epoch) for i in super().__iter__())

def scan(path: str, keep: list | None):
    """(path, label) pairs and class names of an ImageFolder layout; with `keep`, only those classes."""
    try:
        classes = sorted(e.name for e in os.scandir(path) if e.is_dir() and (keep is None or e.name in keep))
    except OSError:
        raise CueCoError(f"data folder {path} does not exist (--dataset folder reads DIR/train/<class>/*.png "
                         f"and DIR/test/<class>/*.png or DIR/val/...)") from None
    missing = sorted(set(keep or []) - set(classes))
    if missing:
        raise CueCoError(f"--class-list names classes that {path} lacks: {missing[:5]}")
    samples = torchvision.datasets.folder.make_dataset(path, {c: i for i, c in enumerate(classes)},
                                                       torchvision.datasets.folder.IMG_EXTENSIONS,
                                                       allow_empty=True) if classes else []
    if not samples:
        raise CueCoError(f"data folder {path} holds no images (expected class folders: {path}/cat/1.png)")
    return samples, classes

def load_folder(args, log) -> Data:
    """An image folder: decoded into memory if it fits in --memory-gb (CIFAR), else a loader (ImageNet)."""
    root, keep = args.data_dir, None
    if args.class_list:
        try:
            with open(args.class_list) as f:
                keep = f.read().split()   # one class folder name per line
        except OSError as e:
            raise CueCoError(f"cannot read --class-list {args.class_list}: {e.strerror}") from None
    test_dir = "test" if os.path.isdir(os.path.join(root, "test")) else "val"        # ImageNet calls it val/
    train, classes = scan(os.path.join(root, "train"), keep)
    test, test_classes = scan(os.path.join(root, test_dir), keep)
    if test_classes != classes:
        raise CueCoError(f"train/ and {test_dir}/ in {root} have different class folders")
    pick = lambda s, n: [s[i] for i in balanced_subset(torch.tensor([y for _, y in s]), n, args.seed)]  # noqa
    train, test = pick(train, args.limit_train), pick(test, args.limit_test)
    ys = [torch.tensor([y for _, y in s]) for s in (train, test)]
    size = args.image_size or max(read_image(train[0][0]).size)
    size = size if args.image_size or size <= 64 else 224                            # large images: 224 px
    resize = [v2.Resize((size, size))] if size <= 64 else [v2.Resize(size * 8 // 7), v2.CenterCrop(size)]
    plain = v2.Compose([v2.PILToTensor(), *resize])                                  # uint8 [3, S, S]
    if len(train) * 3 * size * size > args.memory_gb * 2**30:                        # the loader path
        return Data(Images(train, mocov2_transform(size), args.seed), Images(train, plain), ys[0],
                    Images(test, plain), ys[1], classes, size)
    decoded = [torch.cat([x for x, _ in DataLoader(Images(s, plain), 256, num_workers=args.num_workers)])
               for s in (train, test)]                                               # uint8 [N, 3, S, S]
    return Data(decoded[0], decoded[0], ys[0], decoded[1], ys[1], classes, size)

def load_torchvision_set(args) -> Data:
    """CIFAR-10/100 or STL-10 (trains on unlabelled + train) through torchvision, as uint8 tensors."""
    name, root = args.dataset, args.data_dir
    cls = getattr(torchvision.datasets, name.upper())                        # CIFAR10, CIFAR100 or STL10
    try:
        if name == "stl10":
            sets = [cls(root, split=s, download=True) for s in ("train+unlabeled", "train", "test")]
            xs, ys = [torch.as_tensor(s.data) for s in sets], [torch.as_tensor(s.labels) for s in sets[1:]]
        else:
            sets = [cls(root, train=True, download=True), cls(root, train=False, download=True)]
            xs = [torch.as_tensor(s.data).permute(0, 3, 1, 2).contiguous() for s in sets[:1] + sets]
            ys = [torch.as_tensor(s.targets) for s in sets]
    except Exception as e:
        raise CueCoError(f"could not load or download {name} into {root} ({type(e).__name__}: {str(e)[:80]});"
                         f" without internet, download {cls.filename} from {cls.url} elsewhere and put it "
                         f"into {root} by hand, or use --dataset folder") from None
    size = xs[1].shape[-1]
    if args.image_size and args.image_size != size:
        raise CueCoError(f"--image-size {args.image_size} differs from {name}'s {size} px images")
    bank, test = (balanced_subset(y, n, args.seed) for y, n in zip(ys, (args.limit_train, args.limit_test)))
    train, y20 = xs[0][:args.limit_train or None] if name == "stl10" else xs[0][bank], None
    if name == "cifar100":   # the coarse labels that CIFAR-100's own test file carries
        with open(os.path.join(root, cls.base_folder, "test"), "rb") as f:
            y20 = torch.tensor(pickle.load(f, encoding="latin1")["coarse_labels"])[test]
    return Data(train, xs[1][bank], ys[0][bank], xs[2][test], ys[1][test], sets[-1].classes, size, y20)

# =================== 11. Plumbing: device and precision, several processes, checkpoints =====================
# Nothing in a training step reads a GPU value on the host (the CPU would wait for the GPU at every step):
# statistics are summed on the device and read every --log-every steps, the augmentation draws its
# random numbers on the device, and its per-batch choices come from Python's `random`.

def setup_device(name: str):
    """(device, rank, world); under torchrun, one process per GPU (NCCL) or CPU worker (gloo)."""
    try:
        device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)
        torch.empty(0, device=device)   # fails here, not later, if PyTorch cannot use the device
    except (RuntimeError, AssertionError) as e:
        raise CueCoError(f"--device {name} cannot be used here ({str(e).splitlines()[0][:80]})") from None
    if device.type == "cuda":   # under torchrun, the GPU of this process; --device cuda:1 made current too
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", device.index or 0)))
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True   # every batch has the same shape: pick the fastest kernels
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        # the other ranks wait while rank 0 evaluates (minutes on ImageNet): longer than the default 10 min
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(hours=2))
    return (device, *rank_and_world())

def pick_precision(device, precision: str = "auto") -> tuple:
    """(precision, why). auto: bf16 where the hardware computes it natively (CUDA compute capability >= 8.0:
    A100, H100 and newer; CPUs with AVX512-BF16 or AMX), fp16 with a gradient scaler on older GPUs (T4,
    V100: bf16 would leave cuDNN for slow fallbacks), fp32 elsewhere: CPUs without native bf16 (AVX-512
    Xeons before Cooper Lake included) emulate it, 10x slower than fp32 on this project's AMD EPYC."""
    if precision != "auto":
        return precision, "--precision"
    if device.type == "cuda":
        if torch.cuda.get_device_capability(device) >= (8, 0):
            return "bf16", "native on this GPU"
        return "fp16", "no native bf16 on this GPU"
    if device.type == "cpu" and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()):
        return "bf16", "native on this CPU (AVX512-BF16 or AMX)"
    return "fp32", f"no native bf16 on this {device.type.upper()}"

def autocast(device, precision: str):
    """Autocast in bf16 or fp16 (convolutions and matmuls; batch norm statistics, the embeddings and the
    losses stay in float32); fp32: a no-op."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    return torch.autocast(device.type, dtype=dtype, enabled=precision != "fp32")

def rank_and_world():
    on = dist.is_available() and dist.is_initialized()
    return (dist.get_rank(), dist.get_world_size()) if on else (0, 1)

def all_gather(x: torch.Tensor) -> torch.Tensor:
    """x of every rank, concatenated in rank order; x itself in a single process."""
    world = rank_and_world()[1]
    if world == 1:
        return x
    out = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)

def all_reduce(x: torch.Tensor, op: str = "SUM") -> torch.Tensor:
    if rank_and_world()[1] > 1:
        dist.all_reduce(x, op=getattr(dist.ReduceOp, op))
    return x

CHECKPOINT_FORMAT = "cueco-checkpoint-v1"

def save_checkpoint(path: str, model, optimizer, scaler, epoch: int, config: dict, history: list):
    """Written to a temporary file and renamed over the old one: a crash never leaves half a checkpoint.
    Width 64: 134 MB in about 0.5 s here, under 1% of a minute between checkpoints."""
    torch.save({"format": CHECKPOINT_FORMAT, "epoch": epoch, "args": config, "history": history,
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict()}, path + ".tmp")
    os.replace(path + ".tmp", path)

def load_checkpoint(path: str, model=None, optimizer=None, scaler=None) -> dict:
    """The checkpoint (loaded into model, optimizer and fp16's gradient scaler if given); weights_only: data,
    never code to run."""
    if not os.path.isfile(path):
        raise CueCoError(f"--resume {path}: no such file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"format is not {CHECKPOINT_FORMAT}")
        if model is not None:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            if ckpt["scaler"]:   # empty unless fp16: its loss scale, as it had adapted
                scaler.load_state_dict(ckpt["scaler"])
    except Exception as e:
        raise CueCoError(f"--resume {path} is not a checkpoint of this script, or of another model "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:100]})") from None
    return ckpt

def hms(seconds: float) -> str:
    """'02:03:04', or '27d 02:03:04' past a day (a clock's %H wraps around at 24 hours)."""
    days, rest = divmod(round(seconds), 86400)
    return (f"{days}d " if days else "") + time.strftime("%H:%M:%S", time.gmtime(rest))

def make_loader(train: Dataset, batch_size: int, seed: int, workers: int, device, rank=0, world=1):
    """Batches of view pairs for this rank, len(train) // batch_size of them, from workers started once."""
    sampler = EpochSampler(train, world, rank, seed=seed, drop_last=True)   # every rank: the same steps
    return DataLoader(train, batch_size // world, sampler=sampler, drop_last=True, num_workers=workers,
                      persistent_workers=workers > 0, pin_memory=device.type == "cuda",
                      generator=torch.Generator().manual_seed(seed))   # not the global one: key shuffles

def query_network(model, device, world: int, compile: bool) -> nn.Module:
    """encoder_q as the step calls it: wrapped for several processes, compiled with --compile."""
    encoder_q = model.encoder_q
    if world > 1:   # no buffer broadcast: a rank's BN statistics are its own, and a broadcast between the
        # two forwards of a step would overwrite what backward needs (torch >= 2.6 raises at step 1)
        ids = [device] if device.type == "cuda" else None
        encoder_q = nn.parallel.DistributedDataParallel(encoder_q, device_ids=ids, broadcast_buffers=False)
    if compile:   # static shapes: every batch has the same size (a notebook's next run recompiles)
        encoder_q = torch.compile(encoder_q, dynamic=False)
        model.encoder_k.compile(dynamic=False)
    return encoder_q

def write_json(path: str, obj):
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)

# ================= 12. Main: data, model, resume, train, evaluate, figures, metrics.json ====================
def data_name(args) -> str:
    """The data set, or a folder's own name (cifar10-jpeg): names the output folder and the figures."""
    return args.dataset if args.dataset != "folder" else os.path.basename(os.path.normpath(args.data_dir))

@torch.no_grad()
def evaluate(model: CueCo, data: Data, device, precision="fp32", seed=0, workers=0, feats=None):
    """The final metrics (kNN, linear, k-means NMI/ARI/ACC; CIFAR-20: suffix 20), test features, clusters;
    feats: the features (bank, test) if the last epoch extracted them already."""
    f_bank, f_test = feats or features(model.encoder_q.backbone, data, device, precision, workers)
    res = {"knn": knn_accuracy(f_bank, data.bank_y, f_test, data.test_y)}
    with torch.enable_grad():
        res["linear"] = linear_probe(f_bank, data.bank_y, f_test, data.test_y, seed=seed)
    clusters = kmeans(f_test, len(data.classes), seed=seed)                          # clusters: [N_test]
    res.update(cluster_metrics(clusters, data.test_y))
    if data.test_y20 is not None:
        coarse = cluster_metrics(kmeans(f_test, 20, seed=seed), data.test_y20)
        res.update({k + "20": v for k, v in coarse.items()})
    res["largest_kmeans_cluster"] = torch.bincount(clusters).max().item() / len(clusters)
    return res, f_test, clusters

def run(argv=None) -> dict:
    args = parse_args(argv)
    device, rank, world = setup_device(args.device)
    log = print if rank == 0 else (lambda *a, **k: None)
    precision, why = pick_precision(device, args.precision)   # no channels_last: split BN would undo it
    log(f"{describe_preset(args)} | {device} x {world}, {precision} ({why})")
    if args.batch_size % world or (args.batch_size // world) % max(1, args.bn_splits // world):
        raise CueCoError(f"--batch-size {args.batch_size} must split evenly over {world} process(es) and "
                         f"--bn-splits {args.bn_splits} batch-norm groups")
    torch.manual_seed(args.seed)
    if world > 1 and rank > 0:
        dist.barrier()   # rank 0 downloads first, alone
    data = load_folder(args, log) if args.dataset == "folder" else load_torchvision_set(args)
    if world > 1 and rank == 0:
        dist.barrier()
    if args.epochs > 0 and len(data.train) < args.batch_size:
        raise CueCoError(f"--batch-size {args.batch_size} exceeds the {len(data.train)} training images")
    memory, loader = isinstance(data.train, torch.Tensor), None
    if memory:   # the memory path: the whole training set lives on the device
        data = data._replace(train=data.train.to(device))
    else:   # the loader path: DataLoader workers run mocov2_transform
        loader = make_loader(data.train, args.batch_size, args.seed, args.num_workers, device, rank, world)
    model = CueCo(args.width, args.dim, args.num_clusters, args.queue_size, cifar_stem=data.image_size <= 64,
                  bn_splits=max(1, args.bn_splits // world)).to(device)
    optimizer = make_optimizer(model.encoder_q, args.lr, args.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")   # fp16 gradients underflow
    history, start_epoch = [], 0
    if args.resume:
        ckpt = load_checkpoint(args.resume, model, optimizer, scaler)
        history, start_epoch = ckpt["history"], ckpt["epoch"]
        log(f"resumed from {args.resume} at epoch {start_epoch}")
    encoder_q = query_network(model, device, world, args.compile)
    method, name = "CueCo" if args.lambda_clu else "MoCo-v2 (lambda_clu 0)", data_name(args)
    log(f"{method} on {name}: {len(data.train)} train, {len(data.test_y)} test images, {data.image_size} px, "
        f"ResNet-18 width {args.width}, {'memory' if memory else 'loader'} path")
    try:
        _, feats = train(model, encoder_q, optimizer, data, device, epochs=args.epochs,
              batch_size=args.batch_size, lr=args.lr, m=args.momentum, T=args.temperature, tau=args.clu_temperature,
              eps=args.sinkhorn_eps, lam=args.lambda_clu, clu_warmup=args.clu_warmup, seed=args.seed,
              precision=precision, eval_every=args.eval_every, save_minutes=args.save_minutes,
              log_every=args.log_every, workers=args.num_workers, loader=loader, out=args.out,
              config=vars(args), start_epoch=start_epoch, history=history, res_schedule=args.res_schedule,
              scaler=scaler)
        return report(args, model, data, device, precision, history, method, name, feats) if rank == 0 else {}
    except KeyboardInterrupt:
        path = os.path.join(args.out, "checkpoint.pt")
        if not os.path.isfile(path):
            raise CueCoError("interrupted before the first checkpoint (see --save-minutes)") from None
        epoch = load_checkpoint(path)["epoch"]
        then = "finish the evaluation" if epoch == args.epochs else "continue"
        raise CueCoError(f"interrupted; the checkpoint of epoch {epoch} is in {path}; {then} with: "
                         f"python cueco.py --resume {path}") from None

def report(args, model, data, device, precision, history, method, name, feats=None) -> dict:
    """The final evaluation, the figures and metrics.json (rank 0); returns the final metrics."""
    final, f_test, clusters = evaluate(model, data, device, precision, args.seed, args.num_workers, feats)
    title = f"{method} on {name}, epoch {args.epochs}"
    matched = match_clusters(clusters, data.test_y)   # each test image's cluster, named as its matched class
    if args.tsne_points:
        idx = balanced_subset(data.test_y, min(args.tsne_points, len(f_test)), seed=0)   # idx: [n]
        emb = tsne(f_test[idx.to(device)], seed=args.seed)                          # emb: [n, 2]
        path = os.path.join(args.figures_dir, f"tsne_{name}.png")
        plot_tsne(emb, data.test_y[idx], matched[idx], data.classes, path,
                  f"{title}: kNN {final['knn']:.1f}%, NMI {final['nmi']:.3f} ({len(idx)} test images)")
    # what the network groups without labels: for each cluster (up to 20), the images nearest its centre
    rows = cluster_exemplars(f_test, clusters)[:20]                                  # rows: [<=20, 10]
    image = lambda i: data.test[i] if isinstance(data.test, torch.Tensor) else data.test[i][0]   # noqa: E731
    plot_clusters([[image(i) if i >= 0 else None for i in row.tolist()] for row in rows],
                  [f"{int((clusters == c).sum())} ~ {data.classes[matched[r[0]]] if r[0] >= 0 else ''}"
                   for c, r in enumerate(rows)], os.path.join(args.figures_dir, f"clusters_{name}.png"),
                  f"{title}\nthe test images nearest each k-means centre (row: cluster size ~ matched class)")
    if history:
        plot_curves(history, os.path.join(args.figures_dir, f"curves_{name}.png"),
                    f"{title} (lambda {args.lambda_clu}, warm-up {args.clu_warmup}, K_c {args.num_clusters})")
    write_json(os.path.join(args.out, "metrics.json"), dict(args=vars(args), epochs=history, final=final))
    print("final: " + ", ".join(f"{k} {v:.4f}" for k, v in final.items()))
    return final

def main(argv=None) -> dict:
    """Returns the final metrics; a user error is one line on stderr, exit status 2 (130 after Ctrl-C)."""
    try:
        return run(argv)
    except CueCoError as e:   # raised in a DataLoader worker, it arrives inside a traceback's text
        msg = str(e).strip().splitlines()[-1].split("CueCoError: ", 1)[-1]
        print(f"cueco.py: error: {msg}", file=sys.stderr)
        raise SystemExit(130 if msg.startswith("interrupted") else 2) from None
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()

if __name__ == "__main__":
    main()
