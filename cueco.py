r"""CueCo: Cluster Contrast for unsupervised visual representation learning, in one file.

CueCo (arXiv:2507.12359, ICIP 2025) learns image features without labels. Two copies of a ResNet-18 see
two random views of every image. The query network encoder_q learns by gradient descent; the key network
encoder_k is its moving average, theta_k <- m theta_k + (1 - m) theta_q, and a FIFO queue holds its last K
keys. For the query q of one view of an image and the key k+ of its other view:

  contrastive loss, separates instances (InfoNCE, as in MoCo):
      L_con = -log( exp(q.k+ / T) / (exp(q.k+ / T) + sum_{j=1..K} exp(q.queue_j / T)) )
  clustering loss, pulls each cluster together (OURS: the paper publishes no formula), two terms:
      centroids: K_c learned directions C (C_k: encoder_k's slow copy); Q(k+) = Sinkhorn(k+.C_k / eps), the key's
          soft assignment, each centroid taking 1/K_c of the batch;   L_cen = -sum_c Q(k+)_c log softmax(q.C / tau)_c
      groups: g = the image's group among the G groups that k-means finds in the other view's batch of
          queries, M the groups' unit means;              L_grp = -log softmax(q.M / tau)_g
      L_clu = (L_cen + L_grp) / 2;  argmax_c q.C is the model's own cluster of an image
  L = L_con(q1, k2) + L_con(q2, k1) + lambda * (L_clu(q1; k2, view 2's queries) + L_clu(q2; k1, view 1's))

Ours, not the paper's: all of L_clu (SwAV's Sinkhorn on C, which lives in the encoder so that the key
network has a slow copy; CLD's k-means groups of a batch; K_c = the number of classes, C at 10 times the learning
rate, eps 0.05, G = 100, tau 0.2), lambda = 1 reached in equal steps at half-time, and the gpu, laptop and
lab presets. L_clu is a plug-in: CueCo(clustering_loss=f) or main(clustering_loss=f), f(q1, q2, k1, k2,
model) -> a scalar. The rest is the MoCo CIFAR-10 notebook's recipe with MoCo-v2's crops and MLP head.

    python cueco.py --dataset cifar10                   # a CUDA GPU: 200 epochs; else the laptop preset
    python cueco.py --dataset cifar10 --lambda-clu 0    # MoCo-v2, to compare; --preset lab: minutes a run
    python -m pytest -q test_cueco.py                   # the tests; README.md: results, exercises, options
"""
import argparse
import collections
import datetime
import functools
import json
import math
import os
import pathlib
import random
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from matplotlib.figure import Figure   # matplotlib's object API: no global state, no display needed
from torch.utils.data import DataLoader
from torchvision.transforms import v2


class CueCoError(Exception):
    """A problem with the command line's input or machine: one line on stderr, exit status 2, no traceback."""

def expect(ok: bool, where: str, expected: str, *got, error=ValueError):
    """Wrong input to a reusable piece, in one line: what `where` expected, and the dtype and shape it got."""
    if not ok:
        seen = ", ".join(f"{str(x.dtype)[6:]} {list(x.shape)}" if torch.is_tensor(x) else type(x).__name__ for x in got)
        raise error(f"{where} expected {expected}, got {seen}")

# ============ 1. Augmentation: two random views of each image, which share only what it shows ============
def augment(x: torch.Tensor, size: int, g: torch.Generator | None, rng: random.Random) -> torch.Tensor:
    """A random view of each image of a batch, uint8 [B, 3, H, W] -> normalised float [B, 3, size, size] on x's
    device, by MoCo-v2's recipe as torchvision draws it image by image (the tests compare): RandomResizedCrop(size,
    scale=(0.2, 1)), RandomHorizontalFlip(), RandomApply([ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), RandomGrayscale(
    p=0.2), above 64 px RandomApply([GaussianBlur(~size/10, sigma=(0.1, 2))], p=0.5), Normalize. A batch at once on
    the device: g draws every per-image number there, rng the per-batch ones (the jitter's order, the blur's sigma)."""
    expect(torch.is_tensor(x) and x.dtype == torch.uint8, "augment", "uint8 images [B, 3, H, W]", x, error=TypeError)
    expect(x.dim() == 4 and x.shape[1] == 3, "augment", "uint8 images [B, 3, H, W]", x)
    b, H, W = x.shape[0], x.shape[2], x.shape[3]
    blur = H > 64
    u = torch.rand((29 + blur) * b, device=x.device, generator=g)      # u: [29 B] (30 B with blur), U(0, 1)
    area_u, aspect_u = u[:10 * b].view(b, 10), u[10 * b:20 * b].view(b, 10)   # [B, 10] each
    top_u, left_u, flip_u, jitter_u, bright_u, contrast_u, sat_u, hue_u, gray_u, *blur_u = u[20 * b:].view(-1, b)  # [B]

    x = x.float() / 255                                                # x: [B, 3, H, W]
    # Random resized crop, torchvision's rule: 10 tries of area ~ U(0.2, 1) * H * W and log-aspect
    # ~ U(log 3/4, log 4/3); the first box that fits wins, else the whole image.
    area = H * W * (0.2 + 0.8 * area_u)                                # area: [B, 10]
    aspect = torch.exp(math.log(3 / 4) + math.log(16 / 9) * aspect_u)  # aspect: [B, 10]
    w = (area * aspect).sqrt().round()                                 # w: [B, 10]
    h = (area / aspect).sqrt().round()                                 # h: [B, 10]
    fits = (w <= W) & (h <= H)                                         # fits: [B, 10]
    first = fits.float().argmax(1, keepdim=True)                       # first: [B, 1]
    w = torch.where(fits.any(1), w.gather(1, first)[:, 0], float(W))   # w: [B]
    h = torch.where(fits.any(1), h.gather(1, first)[:, 0], float(H))   # h: [B]
    top = (top_u * (H - h + 1)).floor()                                # top: [B]
    left = (left_u * (W - w + 1)).floor()                              # left: [B]

    # crop, resize and horizontal flip (p = 0.5) as one bilinear resampling through an affine grid
    flip = torch.where(flip_u < 0.5, -1.0, 1.0)                        # flip: [B]
    theta = torch.stack([w / W * flip, 0 * w, (2 * left + w) / W - 1,   # [[scale x, 0, shift x],
                         0 * h, h / H, (2 * top + h) / H - 1], 1).view(b, 2, 3)   # [0, scale y, shift y]]: [B, 2, 3]
    grid = F.affine_grid(theta, [b, 3, size, size], align_corners=False)   # grid: [B, S, S, 2]
    # no sample beyond the outermost pixel centres: the zero padding never counts, the output of
    # padding_mode="border", which Apple's MPS lacks before torch 2.13
    grid = torch.stack([grid[..., 0].clamp(-1 + 1 / W, 1 - 1 / W),    # x: the columns
                        grid[..., 1].clamp(-1 + 1 / H, 1 - 1 / H)], dim=-1)   # y: the rows
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    # colour jitter (brightness, contrast, saturation 0.4, hue 0.1) with p = 0.8, else identity
    # factors; the order of the four is drawn per batch (each image's order is still uniform)
    on = (jitter_u < 0.8).float()                                      # on: [B]
    bright, contrast, sat = (1 + on * (2 * torch.stack([bright_u, contrast_u, sat_u]) - 1) * 0.4).view(3, b, 1, 1, 1)
    hue = (on * (2 * hue_u - 1) * 0.1).view(b, 1, 1)                   # hue: [B, 1, 1]
    for op in rng.sample(range(4), 4):
        if op == 0:
            x = (bright * x).clamp(0, 1)
        elif op == 1:
            mean = grayscale(x).mean((1, 2, 3), keepdim=True)          # mean: [B, 1, 1, 1]
            x = (contrast * x + (1 - contrast) * mean).clamp(0, 1)
        elif op == 2:
            x = (sat * x + (1 - sat) * grayscale(x)).clamp(0, 1)
        else:
            x = shift_hue(x, hue)
    x = torch.where(gray_u.view(b, 1, 1, 1) < 0.2, grayscale(x).expand_as(x), x)   # grayscale, p = 0.2

    if blur:   # p = 0.5 per image, sigma ~ U(0.1, 2) per batch; an odd kernel, SimCLR's 10% of the side (23 px at 224)
        sigma, kernel = rng.uniform(0.1, 2.0), max(3, int(0.1 * size) // 2 * 2 + 1)
        blurred = v2.functional.gaussian_blur(x, [kernel, kernel], [sigma, sigma])   # [B, 3, S, S]
        x = torch.where(blur_u[0].view(b, 1, 1, 1) < 0.5, blurred, x)
    return normalize(x, H)                                             # [B, 3, S, S]

def norm_stats(size: int):
    """Per-channel mean and std: CIFAR's for images up to 64 px, ImageNet's for larger ones."""
    cifar = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
    return cifar if size <= 64 else ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))

def normalize(x: torch.Tensor, size: int) -> torch.Tensor:
    mean, std = norm_stats(size)
    return torch.stack([(x[:, c] - mean[c]) / std[c] for c in range(3)], dim=1)   # [B, 3, S, S]

def grayscale(x: torch.Tensor) -> torch.Tensor:
    return (0.2989 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)    # [B, 1, H, W]

def shift_hue(x: torch.Tensor, hue: torch.Tensor) -> torch.Tensor:
    """Rotate the hue of RGB images x [B, 3, H, W] in [0, 1] by hue [B, 1, 1] turns, through HSV."""
    r, g, b = x.unbind(1)                                              # [B, H, W] each
    v = x.max(1).values                                                # v: [B, H, W]
    delta = v - x.min(1).values                                        # delta: [B, H, W]
    d = delta.clamp_min(1e-8)
    h = torch.where(v == g, (b - r) / d + 2, (r - g) / d + 4)         # green or blue is largest
    h = torch.where(v == r, (g - b) / d % 6, h) / 6                    # h: [B, H, W], in turns
    h = (torch.where(delta > 0, h, 0.0) + hue) % 1
    k = torch.stack([5 + 6 * h, 3 + 6 * h, 1 + 6 * h], dim=1) % 6      # k: [B, 3, H, W]
    s = (delta / v.clamp_min(1e-8))[:, None]                           # s: [B, 1, H, W]
    return v[:, None] * (1 - s * torch.minimum(k, 4 - k).clamp(0, 1))  # [B, 3, H, W]

# ================ 2. The query/key pair: ResNet-18 encoders, the momentum update, the queue ================
class SplitBatchNorm(nn.BatchNorm2d):
    """Batch norm over `num_splits` groups of a batch, as if each were on its own GPU (MoCo's CIFAR-10 notebook).
    With the keys shuffled (CueCo.keys), a query and its key are normalised with different images, so the pair cannot
    be told apart by batch statistics they share: without that shuffle, the notebook loses 4% kNN at 800 epochs."""
    def __init__(self, num_features: int, num_splits: int):
        super().__init__(num_features)
        self.num_splits = num_splits
    def forward(self, x):
        (n, c, h, w), s = x.shape, self.num_splits
        expect(not self.training or n % s == 0, "SplitBatchNorm", f"a training batch of a multiple of {s}", x)
        if not self.training or s == 1:
            return super().forward(x)
        # the s groups folded into the channels, [N, C, H, W] -> [N/s, C*s, H, W]: group j holds j, j+s, ...
        mean_run, var_run = self.running_mean.repeat(s), self.running_var.repeat(s)
        y = F.batch_norm(x.reshape(n // s, c * s, h, w), mean_run, var_run, self.weight.repeat(s),
                         self.bias.repeat(s), True, self.momentum, self.eps).reshape(n, c, h, w)
        self.running_mean.copy_(mean_run.view(s, c).mean(0))   # the groups' statistics, averaged
        self.running_var.copy_(var_run.view(s, c).mean(0))
        self.num_batches_tracked.add_(1)   # in place, the form nn.BatchNorm and compilers use
        return y

class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, bn):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), bn(c_out)
        self.conv2, self.bn2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False), bn(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:   # the sum needs x in the block's output shape: a 1x1 conv
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), bn(c_out))
    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))

class ResNet18(nn.Module):
    """ResNet-18 -> [N, 8 * width]; the CIFAR stem (3x3 conv, no max-pool) keeps 32-px images whole."""
    def __init__(self, width: int = 64, cifar_stem: bool = True, bn_splits: int = 1):
        super().__init__()
        bn = functools.partial(SplitBatchNorm, num_splits=bn_splits)   # plain batch norm if bn_splits is 1
        conv = nn.Conv2d(3, width, 3, 1, 1, bias=False) if cifar_stem else nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.stem = nn.Sequential(conv, bn(width), nn.ReLU(), *([] if cifar_stem else [nn.MaxPool2d(3, 2, 1)]))
        blocks, c_in = [], width
        for i, c_out in enumerate([width, 2 * width, 4 * width, 8 * width]):
            blocks += [BasicBlock(c_in, c_out, 1 if i == 0 else 2, bn), BasicBlock(c_out, c_out, 1, bn)]
            c_in = c_out
        self.layers, self.out_dim = nn.Sequential(*blocks), c_in
    def forward(self, x):
        expect(x.is_floating_point(), "ResNet18", "normalised float images [N, 3, S, S]", x, error=TypeError)
        expect(x.dim() == 4 and x.shape[1] == 3, "ResNet18", "images [N, 3, S, S]", x)
        return torch.flatten(F.adaptive_avg_pool2d(self.layers(self.stem(x)), 1), 1)   # [N, 8*width]

class Encoder(nn.Module):
    """Backbone -> MLP head -> unit-length z [N, D]. It also holds the K_c centroids C [K_c, D] (ours), so
    that the key network, a moving average of this one, holds a slow copy of them."""
    def __init__(self, width: int, dim: int, cifar_stem: bool, bn_splits: int, K_c: int):
        super().__init__()
        self.backbone = ResNet18(width, cifar_stem, bn_splits)
        f = self.backbone.out_dim
        self.projector = nn.Sequential(nn.Linear(f, f), nn.ReLU(), nn.Linear(f, dim))   # MoCo-v2's
        self.C = nn.Parameter(F.normalize(torch.randn(K_c, dim), dim=1))  # C: [K_c, D]; K_c = 0: none
    def forward(self, x):
        return F.normalize(self.projector(self.backbone(x)).float(), dim=1)   # z: [N, D], float32 in any autocast

class CueCo(nn.Module):
    """encoder_q, its momentum copy encoder_k and the queue of K keys; forward(x1, x2) computes the loss's
    parts for two views of a batch. clustering_loss(q1, q2, k1, k2, model) -> a scalar is L_clu, the piece
    to swap (None: ours, cueco_clustering_loss, which with K_c = 0 and G = 0 is 0: MoCo-v2)."""
    def __init__(self, width=64, dim=128, K=4096, K_c=10, G=100, T=0.1, tau=0.2, eps=0.05, cifar_stem=True,
                 bn_splits=8, clustering_loss=None):
        super().__init__()
        self.K_c, self.G, self.T, self.tau, self.eps = K_c, G, T, tau, eps
        self.clustering_loss = clustering_loss or cueco_clustering_loss
        self.encoder_q = Encoder(width, dim, cifar_stem, bn_splits, K_c)
        self.encoder_k = Encoder(width, dim, cifar_stem, bn_splits, K_c)
        self.encoder_k.load_state_dict(self.encoder_q.state_dict())   # theta_k = theta_q to begin with
        self.encoder_k.requires_grad_(False)   # it learns only through the momentum update
        self.register_buffer("queue", F.normalize(torch.randn(K, dim), dim=1))   # queue: [K, D]
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
    def forward(self, x1: torch.Tensor, x2: torch.Tensor):
        """For views x1, x2 [N, 3, S, S] of one batch: L_con, summed over the two pairings (q1 with k2, q2 with
        k1); L_clu, clustering_loss's value; the keys to enqueue [2N, D]; the view-1 queries [N, D]."""
        q1, q2 = self.encoder_q(x1), self.encoder_q(x2)               # q1, q2: [N, D], unit length
        k1, k2 = self.keys(x1), self.keys(x2)                         # k1, k2: [N, D], no gradient
        with torch.autocast(x1.device.type, enabled=False):   # logits / T and / tau need float32
            l_con = contrastive_loss(q1, k2, self.queue, self.T) + contrastive_loss(q2, k1, self.queue, self.T)
            l_clu = self.clustering_loss(q1, q2, k1, k2, self)        # a scalar
        expect(torch.is_tensor(l_clu) and l_clu.dim() == 0, "CueCo", "clustering_loss to return a scalar", l_clu)
        return l_con, l_clu, torch.cat([k1, k2]), q1
    @torch.no_grad()
    def keys(self, x: torch.Tensor) -> torch.Tensor:
        """Keys [N, D] of images x [N, 3, S, S], encoded in a random order of the batch, so that a key meets
        other images in its batch-norm group than its query did; then put back in x's order."""
        idx = torch.randperm(len(x), device=x.device)                  # idx: [N]
        return self.encoder_k(x[idx])[torch.argsort(idx)]             # k: [N, D]
    @torch.no_grad()
    def momentum_update(self, m: float):
        """theta_k <- m theta_k + (1 - m) theta_q over the parameters, C included, not batch norm's statistics: with m
        near 1 encoder_k changes slowly, so the keys in the queue, made over its last K / 2N steps, stay comparable."""
        for p_k, p_q in zip(self.encoder_k.parameters(), self.encoder_q.parameters()):
            p_k.lerp_(p_q, 1 - m)                                      # p_k + (1 - m) (p_q - p_k)
    @torch.no_grad()
    def enqueue(self, k: torch.Tensor):
        """Replace the oldest keys of the queue by k [B, D], B <= K."""
        K, D = self.queue.shape
        expect(k.dim() == 2 and k.shape[1] == D and len(k) <= K, "enqueue", f"at most K={K} keys [B, {D}]", k)
        idx = (self.queue_ptr + torch.arange(len(k), device=k.device)) % len(self.queue)   # idx: [B]
        self.queue[idx] = k.to(self.queue.dtype)
        self.queue_ptr.copy_((self.queue_ptr + len(k)) % len(self.queue))

# ========================================== 3. The losses ==========================================
def contrastive_loss(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, T: float) -> torch.Tensor:
    """InfoNCE, L_con = -log exp(q.k+/T) / (exp(q.k+/T) + sum_j exp(q.queue_j/T)): a cross-entropy
    over 1+K logits whose class 0, the positive key, is right. q, k: [N, D], queue: [K, D], unit length."""
    expect(q.dim() == 2 and q.shape == k.shape and queue.dim() == 2 and queue.shape[1] == q.shape[1],
           "contrastive_loss", "q, k [N, D] and queue [K, D]", q, k, queue)
    l_pos = (q * k).sum(dim=1, keepdim=True)                           # l_pos: [N, 1]
    l_neg = q @ queue.t()                                              # l_neg: [N, K]
    logits = torch.cat([l_pos, l_neg], dim=1) / T                      # logits: [N, 1+K]
    labels = torch.zeros(len(q), dtype=torch.long, device=q.device)    # labels: [N]
    return F.cross_entropy(logits, labels)                             # a scalar

@torch.no_grad()
def sinkhorn(scores: torch.Tensor, eps: float = 0.05, iters: int = 3) -> torch.Tensor:
    """Balanced soft assignment (Sinkhorn-Knopp, as SwAV): scores [N, K_c] -> Q [N, K_c], each row summing to 1,
    each cluster taking 1/K_c of the batch. Ours, over the minimal cluster size of CoKe (Qian et al., CVPR 2022):
    both forbid one cluster for all, but Sinkhorn is stateless; its price, equal sizes per batch, fits balanced data."""
    expect(scores.dim() == 2, "sinkhorn", "scores [N, K_c]", scores)
    logits = scores.float().t() / eps                                  # logits: [K_c, N]
    Q = torch.exp(logits - logits.max())                               # Q: [K_c, N], no overflow
    K_c, N = Q.shape
    Q /= Q.sum()                                                       # Q: [K_c, N], sums to 1
    for _ in range(iters):
        Q /= Q.sum(dim=1, keepdim=True) * K_c                          # each cluster: 1/K_c
        Q /= Q.sum(dim=0, keepdim=True) * N                            # each sample: 1/N
    return (Q * N).t()                                                 # Q: [N, K_c]

def centroid_loss(s_q: torch.Tensor, s_k: torch.Tensor, tau: float, eps: float) -> torch.Tensor:
    """Ours: L_cen = -sum_c Q(k+)_c log softmax(q.C / tau)_c, the batch's mean: the query predicts its key's
    balanced assignment. s_q, s_k: [N, K_c], query's and key's cosines with C (gradient: to q and C)."""
    expect(s_q.dim() == 2 and s_q.shape == s_k.shape, "centroid_loss", "s_q, s_k [N, K_c] of one shape", s_q, s_k)
    Q = sinkhorn(s_k, eps)                                             # Q: [N, K_c]
    log_p = F.log_softmax(s_q.float() / tau, dim=1)                    # log_p: [N, K_c]
    return -(Q * log_p).sum(dim=1).mean()                              # a scalar

def batch_groups(q: torch.Tensor, z: torch.Tensor, G: int, iters: int = 5):
    """CLD's targets (Wang et al., CVPR 2021; ours: on z, spherical): k-means of the other view's batch
    z [N, D] into G groups, 5 Lloyd steps from its first G (the batch is in random order). Returns q's
    cosines with the groups' unit means [N, G] (gradient: to q and, as CLD's, z), each image's group [N]."""
    expect(q.dim() == 2 and q.shape == z.shape, "batch_groups", "q, z [N, D] of one shape", q, z)
    M = z.detach()[:G]                                                 # M: [G, D]
    for _ in range(iters):
        g = (z.detach() @ M.t()).argmax(dim=1)                         # g: [N]
        M = F.normalize(F.one_hot(g, G).to(z.dtype).t() @ z.detach(), dim=1)   # M: [G, D]; empty: 0
    return q @ F.normalize(F.one_hot(g, G).to(z.dtype).t() @ z, dim=1).t(), g   # [N, G], [N]

def cosines(z: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """z [N, D] against the centroids C [K_c, D], unit length: [N, K_c]; argmax is an image's own cluster."""
    return z @ F.normalize(C.float(), dim=1).t()                      # z.C: [N, K_c]

def cueco_clustering_loss(q1, q2, k1, k2, model) -> torch.Tensor:
    """Ours: L_clu = (L_cen + L_grp) / 2, each term over both pairings (view 1's queries against view 2's targets
    and back); one term if K_c or G is 0, none (0) if both are. Any clustering loss gets the queries q1, q2 [N, D]
    (gradient), keys k1, k2 [N, D] (none) and the model (C: model.encoder_q.C, its slow copy model.encoder_k.C)."""
    l_clu, terms = q1.new_zeros(()), 0
    if model.K_c:   # L_cen: each query predicts the balanced assignment of the other view's key to C
        C_q, C_k = model.encoder_q.C, model.encoder_k.C                # [K_c, D] each
        l_clu = centroid_loss(cosines(q1, C_q), cosines(k2, C_k), model.tau, model.eps) \
            + centroid_loss(cosines(q2, C_q), cosines(k1, C_k), model.tau, model.eps)
        terms += 1
    if model.G:   # L_grp: each query finds its image's group among the other view's queries
        (s1, g2), (s2, g1) = batch_groups(q1, q2, model.G), batch_groups(q2, q1, model.G)   # [N, G], [N]
        l_clu = l_clu + F.cross_entropy(s1 / model.tau, g2) + F.cross_entropy(s2 / model.tau, g1)
        terms += 1
    return l_clu / max(1, terms)                                       # a scalar

# ===================================== 4. The step and the loop =====================================
def train_step(model: CueCo, optimizer, scaler, x1: torch.Tensor, x2: torch.Tensor, lam: float, m: float,
               forward=None):
    """MoCo's Algorithm 1 with the clustering term: two views x1, x2 [N, 3, S, S] of a batch -> L -> SGD on encoder_q
    -> momentum update of encoder_k -> enqueue. scaler: a GradScaler for fp16, or None. forward: what computes
    model(x1, x2), or None (the script passes make_forward's). Returns L, L_con, L_clu, the view-1 queries [N, D]."""
    l_con, l_clu, k, q1 = (forward or model)(x1, x2)                   # k: [2N, D], q1: [N, D]
    loss = l_con + lam * l_clu                                         # L, a scalar
    optimizer.zero_grad(set_to_none=True)
    scaler = scaler or torch.amp.GradScaler(enabled=False)   # disabled: a plain backward and step
    scaler.scale(loss).backward()   # fp16: the loss scaled so that small gradients do not underflow
    scaler.step(optimizer)          # SGD on encoder_q and C (with fp16, unscaled first)
    scaler.update()
    model.momentum_update(m)        # theta_k <- m theta_k + (1 - m) theta_q
    model.enqueue(k)                # the 2N newest keys replace the oldest
    return loss.detach(), l_con.detach(), l_clu.detach(), q1.detach()

def clustering_weight(lambda_clu: float, epoch: int, epochs: int, clu_warmup: float) -> float:
    """lambda in epoch `epoch` (from 1): lambda * min(1, epoch / (clu_warmup * epochs)). Ours: the clusters
    of early, noisy features are noise, and pulling queries to them fights L_con."""
    return lambda_clu * min(1.0, epoch / (clu_warmup * epochs)) if clu_warmup * epochs else lambda_clu

def scaled_lr(lr: float, batch_size: int) -> float:
    """The linear scaling rule (Goyal et al., 2017): --lr is the rate at batch 512."""
    return lr * batch_size / 512

def make_optimizer(model: CueCo, lr=0.06, weight_decay=5e-4, centroid_lr=10.0) -> torch.optim.SGD:
    """SGD with momentum 0.9 on encoder_q, at lr (for the batch: scaled_lr); no weight decay on the centroids C, of
    which only the direction counts, and centroid_lr x lr for them (ours, not ablated: C follows moving features)."""
    rest = [p for name, p in model.encoder_q.named_parameters() if name != "C"]
    C = {"params": [model.encoder_q.C], "lr": lr * centroid_lr, "weight_decay": 0.0}
    return torch.optim.SGD([{"params": rest}, C], lr=lr, momentum=0.9, weight_decay=weight_decay)

def cosine_schedule(optimizer, total_steps: int, done_steps: int = 0):
    """Each group's learning rate times (1 + cos(pi t / total_steps)) / 2 at step t, from its own to 0; a
    resumed run starts at step done_steps. Step it after each optimizer step."""
    decay = lambda t: 0.5 * (1 + math.cos(math.pi * t / max(1, total_steps)))   # noqa: E731
    return torch.optim.lr_scheduler.LambdaLR(optimizer, decay, last_epoch=done_steps - 1)

def epoch_views(images: torch.Tensor, epoch: int, batch_size: int, seed: int, device, size: int):
    """Two views [B, 3, size, size] of each batch of an epoch, from uint8 images [N, 3, H, W] in a new order
    each epoch; each epoch seeds its own streams, so that a resumed run draws what a whole one would."""
    order = torch.Generator(device=images.device).manual_seed(seed + epoch)
    perm = torch.randperm(len(images), generator=order, device=images.device)   # perm: [N]
    s = seed * 100_003 + epoch * 1009
    g, rng = torch.Generator(device=device).manual_seed(s), random.Random(s)
    for i in range(len(perm) // batch_size):
        x = images[perm[i * batch_size:(i + 1) * batch_size]].to(device)   # x: [B, 3, H, W]
        yield augment(x, size, g, rng), augment(x, size, g, rng)

def train(args, model: CueCo, optimizer, scheduler, scaler, forward, data, device, precision: str, history: list):
    """Epochs len(history)+1 .. args.epochs of train_step, each recorded in history and metrics.json; kNN every
    --eval-every epochs, a checkpoint every --save-minutes, both at the end. Returns the last (train, test) features."""
    # --view-scale 0.75 costs (3/4)^2 of a step and loses little: crops enlarge objects (FixRes, Touvron 2019)
    steps, size = len(data.train) // args.batch_size, round(args.view_scale * data.image_size)
    last_save, feats, compiling = time.time(), None, args.compile
    for epoch in range(len(history) + 1, args.epochs + 1):
        model.train()
        lam = clustering_weight(args.lambda_clu, epoch, args.epochs, args.clu_warmup)
        torch.manual_seed(args.seed * 1009 + epoch)   # the key shuffles: a resumed run draws the same
        sums = torch.zeros(4, device=device)   # L, L_con, L_clu, largest cluster's share: on the device
        t0, mark, record = time.time(), None, {"epoch": epoch}   # mark: time and step of the first progress line
        for step, (x1, x2) in enumerate(epoch_views(data.train, epoch, args.batch_size, args.seed, device, size)):
            lr, C = optimizer.param_groups[0]["lr"], model.encoder_q.C.detach().clone()   # C: as the step meets it
            loss, l_con, l_clu, q1 = train_step(model, optimizer, scaler, x1, x2, lam, args.key_momentum, forward)
            scheduler.step()
            if compiling:   # the run's first step compiled the forward: reported apart, out of the rate
                loss.item()   # waits for the device
                compiling, record["compile_seconds"], t0 = False, time.time() - t0, time.time()
                mark = (t0, 1)
                print(f"compiled the step in {record['compile_seconds']:.0f} s")
            largest = torch.zeros((), device=device)   # the largest share of the batch that one centroid has
            if model.K_c:                              # (nearest to its view-1 queries): 1 is a collapse
                s = cosines(q1, C)                                             # s: [N, K_c]
                largest = (s == s.max(dim=1, keepdim=True).values).float().mean(0).max()
            sums += torch.stack([loss, l_con, l_clu, largest])
            if (step + 1) % args.log_every == 0 or step + 1 == steps:
                avg = (sums / (step + 1)).tolist()   # the epoch's means so far: one host sync
                if not all(map(math.isfinite, avg)):
                    part = "L_con" if math.isfinite(avg[2]) else f"L_clu, from {args.clustering_loss}"
                    raise CueCoError(f"the loss became NaN/inf in epoch {epoch} ({part}); the last checkpoint "
                                     f"is kept in {args.out}; try a lower --lr")
                # the rate since the epoch's first progress line, not slowed by cuDNN's autotuning before it
                (t_from, s_from), now = mark or (t0, 0), time.time()
                per_step, mark = (now - t_from) / max(1, step + 1 - s_from), mark or (now, step + 1)
                left = datetime.timedelta(seconds=round(((args.epochs - epoch + 1) * steps - step - 1) * per_step))
                share = f" | largest cluster {avg[3]:.0%} of a batch (even: {1 / model.K_c:.0%})" if model.K_c else ""
                print(f"epoch {epoch}/{args.epochs} step {step + 1}/{steps}: loss {avg[0]:.3f} (con {avg[1]:.3f} "
                      f"clu {avg[2]:.3f} lambda {lam:.2f}){share} | lr {lr:.4f} | {size} px, "
                      f"{args.batch_size / max(per_step, 1e-9):.0f} img/s | {left} left")

        seconds, avg = time.time() - t0, (sums / steps).tolist()
        record.update(view_size=size, loss=avg[0], loss_contrastive=avg[1], loss_clustering=avg[2], lambda_clu=lam,
                      lr=lr, img_per_s=steps * args.batch_size / seconds, seconds=seconds,
                      **({"max_cluster_share": avg[3]} if model.K_c else {}))   # the own clusters' only
        if device.type == "cuda":
            record["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30   # the run's so far
        if epoch == args.epochs or (args.eval_every and epoch % args.eval_every == 0):
            f_train, f_test = features(model.encoder_q.backbone, data, device, precision)
            record["knn"] = knn_accuracy(f_train, data.train_y, f_test, data.test_y)
            feats = (f_train, f_test) if epoch == args.epochs else None
            print(f"epoch {epoch}: kNN top-1 {record['knn']:.2f}% (the epoch trained in {seconds:.1f} s)")
        history.append(record)
        write_json(os.path.join(args.out, "metrics.json"), {"args": vars(args), "epochs": history})
        if time.time() - last_save >= 60 * args.save_minutes or epoch == args.epochs:
            save_checkpoint(os.path.join(args.out, "checkpoint.pt"), model, optimizer, scaler, epoch, vars(args),
                            history)
            last_save = time.time()
    return feats

# ================= 5. Evaluation: weighted kNN, linear probe, compactness and separation =================
@torch.no_grad()
def features(backbone: nn.Module, data, device, precision="fp32", batch_size=512):
    """Backbone features (float32, on `device`) of the unaugmented training and test images, in eval mode (batch
    norm from running statistics), in which it leaves the backbone: `train` switches back each epoch."""
    backbone.eval()
    with autocast(device, precision):   # uint8 [N, 3, S, S] -> [N, F], a batch at a time
        return [torch.cat([backbone(normalize(x.to(device).float() / 255, data.image_size)).float()
                           for x in images.split(batch_size)]) for images in (data.train, data.test)]

@torch.no_grad()
def knn_accuracy(train_x, train_y, test_x, test_y, k=200, t=0.1, chunk=1024) -> float:
    """Top-1 accuracy (%) of weighted kNN (Wu et al. 2018, MoCo's monitor): each of the k nearest
    training features (cosine similarity) votes for its class with weight exp(similarity / t)."""
    expect(train_x.dim() == test_x.dim() == 2 and train_x.shape[1] == test_x.shape[1] and train_y.shape ==
           train_x.shape[:1] and test_y.shape == test_x.shape[:1], "knn_accuracy",
           "train_x [N, F], train_y [N], test_x [N_test, F], test_y [N_test]", train_x, train_y, test_x, test_y)
    dev, correct = train_x.device, 0
    train_x = F.normalize(train_x.float(), dim=1)                      # train_x: [N, F]
    test_x = F.normalize(test_x.to(dev).float(), dim=1)                # test_x: [N_test, F]
    train_y, test_y = train_y.to(dev), test_y.to(dev)                  # [N], [N_test]
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    for i in range(0, len(test_x), chunk):
        sim = test_x[i:i + chunk] @ train_x.t()                        # sim: [M, N], M <= chunk
        top_sim, top_idx = sim.topk(min(k, len(train_x)), dim=1)       # [M, k]
        votes = torch.zeros(len(sim), num_classes, device=dev)         # votes: [M, classes]
        votes.scatter_add_(1, train_y[top_idx], (top_sim / t).exp())   # each of k voters: [M, k] classes, weights
        correct += (votes.argmax(dim=1) == test_y[i:i + chunk]).sum().item()
    return 100.0 * correct / len(test_x)

@torch.no_grad()
def class_geometry(x: torch.Tensor, y: torch.Tensor) -> tuple:
    """The paper's two claims for features x [N, F] of classes y [N]: intra-class compactness, the mean cosine of each
    x_i with its class's mean direction mu_y (1: a point); inter-class separation, the mean cos(mu_c, mu_c')."""
    expect(x.dim() == 2 and y.shape == x.shape[:1], "class_geometry", "features x [N, F], labels y [N]", x, y)
    x = F.normalize(x.float(), dim=1)                                  # x: [N, F]
    y = y.to(x.device).unique(return_inverse=True)[1]                  # y: [N], classes 0..n-1
    mu = F.normalize(F.one_hot(y).to(x.dtype).t() @ x, dim=1)          # mu: [n, F]
    cos, n = mu @ mu.t(), len(mu)                                      # cos: [n, n]
    separation = (cos.sum() - cos.diagonal().sum()) / max(1, n * (n - 1))   # the mean over c != c'
    return (x * mu[y]).sum(1).mean().item(), separation.item()         # mean_i cos(x_i, mu_{y_i}), separation

@torch.enable_grad()   # also when called under no_grad, as report() is
def linear_probe(train_x, train_y, test_x, test_y, epochs=100, batch_size=256, lr=1e-2, seed=0) -> float:
    """Top-1 (%) of a linear layer on frozen, standardised features of unaugmented images: seconds; the usual
    protocol, 100 epochs of augmented images through the frozen backbone, scores a little higher."""
    g, dev = torch.Generator().manual_seed(seed), train_x.device
    mu, sd = train_x.mean(0, keepdim=True), train_x.std(0, keepdim=True) + 1e-6   # [1, F]
    xtr, xte = (train_x - mu) / sd, (test_x.to(dev) - mu) / sd     # [N, F], [N_test, F]
    ytr, yte = train_y.to(dev), test_y.to(dev)
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
    return 100.0 * (head(xte).argmax(1) == yte).float().mean().item()

# ================ 6. Clustering metrics (k-means, NMI, ARI, matched accuracy) and t-SNE ================
@torch.no_grad()
def kmeans(x: torch.Tensor, k: int, iters=100, seed=0) -> torch.Tensor:
    """Lloyd's k-means with k-means++ seeding (one run, as scikit-learn) on unit vectors: [N, F] -> [N]."""
    x, g = F.normalize(x.float(), dim=1), torch.Generator().manual_seed(seed)
    centers = x[torch.randint(len(x), (1,), generator=g).to(x.device)]     # centers: [1, F]
    for _ in range(1, k):   # k-means++: the next centre drawn with probability ~ squared distance
        d2 = torch.cdist(x, centers).min(dim=1).values ** 2                # d2: [N]
        pick = torch.multinomial(d2.cpu() + 1e-12, 1, generator=g)         # pick: [1]
        centers = torch.cat([centers, x[pick.to(x.device)]])          # centers: [2..k, F]
    for _ in range(iters):
        onehot = F.one_hot(torch.cdist(x, centers).argmin(dim=1), k).float()   # onehot: [N, k]
        counts = onehot.sum(0)[:, None]                                    # counts: [k, 1]
        new = torch.where(counts > 0, onehot.t() @ x / counts.clamp_min(1), centers)   # empty: stays
        if torch.allclose(new, centers, atol=1e-6):
            break
        centers = new                                                      # centers: [k, F]
    return torch.cdist(x, centers).argmin(dim=1)                           # labels: [N]

def hungarian(cost: list) -> list:
    """Min-cost matching on a square cost matrix (Kuhn-Munkres, O(n^3)): col[i], the column of row i."""
    n, inf = len(cost), float("inf")
    u, v = [0.0] * (n + 1), [0.0] * (n + 1)   # potentials of rows and columns, 1-based; 0 is virtual
    match, way = [0] * (n + 1), [0] * (n + 1)
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
                    u[match[j]] += delta
                    v[j] -= delta
                else:
                    minv[j] -= delta
            j0 = j1
        while j0:   # flip the augmenting path
            match[j0], j0 = match[way[j0]], way[j0]
    return [j - 1 for j in sorted(range(1, n + 1), key=lambda j: match[j])]   # columns in row order

def contingency(pred: torch.Tensor, target: torch.Tensor):
    """Contingency table n_ij (points of cluster i in class j) [P, classes], the cluster and class values."""
    p_vals, p = pred.long().cpu().unique(return_inverse=True)
    t_vals, t = target.long().cpu().unique(return_inverse=True)
    table = torch.zeros(len(p_vals), len(t_vals), dtype=torch.float64)   # table: [P, classes]
    table.index_put_((p, t), torch.ones(len(p), dtype=torch.float64), accumulate=True)
    return table, p_vals, t_vals

def match_clusters(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Each cluster renamed as its class in the best one-to-one map (unmatched: negative), [N]."""
    table, p_vals, t_vals = contingency(pred, target)
    n = max(table.shape)
    col = hungarian((-F.pad(table, (0, n - table.shape[1], 0, n - table.shape[0]))).tolist())
    label = [t_vals[c].item() if c < len(t_vals) else -1 - i for i, c in enumerate(col[:len(p_vals)])]
    return torch.tensor(label)[torch.searchsorted(p_vals, pred.long().cpu())]   # [N]

def cluster_metrics(pred: torch.Tensor, target: torch.Tensor) -> dict:
    """NMI (arithmetic-mean normalisation, as scikit-learn), ARI and Hungarian-matched ACC of pred [N]."""
    table, _, _ = contingency(pred, target)
    n, a, b = table.sum(), table.sum(1), table.sum(0)                  # a: [P], b: [T]
    nz = table > 0
    mi = (table[nz] / n * torch.log(table[nz] * n / (a[:, None] * b[None, :])[nz])).sum()   # I(P; T)
    entropy = lambda c: -(c[c > 0] / n * torch.log(c[c > 0] / n)).sum()   # noqa: E731
    pairs = lambda c: (c * (c - 1) / 2).sum()                          # noqa: E731, the pairs within each part
    h_sum = entropy(a) + entropy(b)
    nmi = 1.0 if h_sum == 0 else (2 * mi / h_sum).item()               # I / mean(H(P), H(T))
    expected = pairs(a) * pairs(b) / max(1.0, pairs(n.reshape(1)).item())   # the index by chance
    top = (pairs(a) + pairs(b)) / 2
    ari = 1.0 if top == expected else ((pairs(table) - expected) / (top - expected)).item()
    acc = (match_clusters(pred, target) == target.long().cpu()).double().mean().item()
    return {"nmi": float(nmi), "ari": float(ari), "acc": float(acc)}

@torch.no_grad()
def tsne(x: torch.Tensor, perplexity=30.0, seed=0, iters=750) -> torch.Tensor:
    """Exact t-SNE (van der Maaten & Hinton 2008), [N, F] -> [N, 2]: PCA init, exaggeration 12, gains. The
    perplexity search runs in float64 on the host (MPS has none), the 750 steps in float32 on x's device."""
    device, x = x.device, x.detach().cpu().double()
    x, n = x - x.mean(0), len(x)                                       # x: [N, F]
    d2 = torch.cdist(x, x) ** 2                                        # d2: [N, N]
    d2.fill_diagonal_(float("inf"))   # a point is not its own neighbour
    # each point's Gaussian precision beta_i, by bisection: the entropy of P(.|i) is log(perplexity)
    target = math.log(min(perplexity, (n - 1) / 3))
    lo, hi = x.new_full((n, 1), -50.0), x.new_full((n, 1), 50.0)        # bounds of log beta: [N, 1]
    for _ in range(64):
        mid = (lo + hi) / 2                                            # mid: [N, 1]
        P = torch.softmax(-d2 * mid.exp(), dim=1)                      # P(j|i): [N, N]
        H = -(P * torch.log(P.clamp_min(1e-300))).sum(1, keepdim=True)   # H: [N, 1]
        too_flat = H > target                                          # [N, 1]: narrower Gaussians
        lo, hi = torch.where(too_flat, mid, lo), torch.where(too_flat, hi, mid)   # [N, 1] each
    P = ((P + P.t()) / (2 * n)).float().clamp_min(1e-12).to(device)    # P_ij: [N, N]
    y = (x @ torch.linalg.svd(x, full_matrices=False)[2][:2].t()).float()   # y: [N, 2]
    noise = torch.randn(n, 2, generator=torch.Generator().manual_seed(seed))   # noise: [N, 2]
    y = (y / y[:, 0].std() * 1e-4 + 1e-8 * noise).to(device)           # y: [N, 2], tiny
    lr, update, gains = max(n / 48, 50.0), torch.zeros_like(y), torch.ones_like(y)   # [N, 2] each
    for it in range(iters):
        exaggeration, momentum = (12.0, 0.5) if it < 250 else (1.0, 0.8)   # the descent's momentum
        w = 1 / (1 + torch.cdist(y, y) ** 2)                           # w: [N, N]
        w.fill_diagonal_(0)
        Q = (w / w.sum()).clamp_min(1e-12)                             # Q_ij: [N, N]
        a = (exaggeration * P - Q) * w                                 # a: [N, N]
        # dC/dy_i = 4 sum_j (p_ij - q_ij) w_ij (y_i - y_j)
        grad = 4 * (a.sum(1, keepdim=True) * y - a @ y)                # grad: [N, 2]
        gains = torch.where((grad > 0) == (update > 0), gains * 0.8, gains + 0.2).clamp_min(0.01)   # [N, 2]
        update = momentum * update - lr * gains * grad                 # update: [N, 2]
        y = y + update
        y = y - y.mean(0)                                              # y: [N, 2]
    return y

# ============= 7. Figures: what the features group together, what kNN sees, how training went =============
def plot_tsne(y, labels, clusters, classes: list, path: str, title: str = "", what="k-means cluster"):
    """The t-SNE coloured by true class, and by cluster (`what` kind) in the colour of its matched class."""
    fig = Figure(figsize=(13, 6.2), dpi=110)
    cmap = "tab10" if len(classes) <= 10 else "tab20"
    for ax, c, name in zip(fig.subplots(1, 2), (labels, clusters), ("true class", what)):
        sc = ax.scatter(y[:, 0].cpu(), y[:, 1].cpu(), c=c.cpu().clamp_min(0), cmap=cmap, s=4, alpha=0.8,
                        linewidths=0, vmin=0, vmax=max(len(classes), 10) - 1)
        ax.set(title=f"coloured by {name}" + ("" if c is labels else ", in its matched class's colour"), xticks=[],
               yticks=[])
        if name == "true class" and len(classes) <= 20:
            ax.legend(handles=[ax.scatter([], [], color=sc.cmap(sc.norm(i)), s=20, label=cls)
                               for i, cls in enumerate(classes)], fontsize=7, framealpha=0.7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)

def plot_grid(images: list, names: list, path: str, title: str = ""):
    """Rows of images (uint8 [3, S, S], None: blank), each named on its left: the gallery, the neighbours."""
    size = next(x for row in images for x in row if x is not None).shape[-1]
    blank = torch.full((3, size, size), 255, dtype=torch.uint8)
    grid = torchvision.utils.make_grid([blank if x is None else x for row in images for x in row],
                                       nrow=len(images[0]), padding=2, pad_value=255)   # [3, H, W]
    fig = Figure(figsize=(1 + 0.6 * len(images[0]), 0.3 + 0.6 * len(images)), dpi=110)
    ax = fig.subplots()
    ax.imshow(grid.permute(1, 2, 0).numpy())
    ax.set(xticks=[], yticks=[(size + 2) * (i + 0.5) for i in range(len(names))], yticklabels=names)
    ax.set_title(title, fontsize=9)
    fig.savefig(path, bbox_inches="tight")   # room for the row labels and the title

def plot_curves(history: list, path: str, title: str = "", K_c: int = 0):
    """The two losses, the kNN monitor and the largest cluster's share of a batch, against the epochs; shaded:
    the epochs in which lambda still rises."""
    fig = Figure(figsize=(14, 3.8), dpi=110)
    rising = [h["epoch"] for h in history if h.get("lambda_clu", 0) < max(h.get("lambda_clu", 0) for h in history)]
    panels = [("loss_contrastive", "L_con", "contrastive loss (both directions)", "mean of the epoch's steps"),
              ("loss_clustering", "L_clu", "clustering loss", "mean of the epoch's steps"),
              ("knn", "top-1 (%)", "kNN monitor on the test set", "every --eval-every epochs, and the last"),
              ("max_cluster_share", "share of a batch", "largest own cluster", "mean of the epoch's steps")]
    for ax, (key, ylabel, name, label) in zip(fig.subplots(1, 4), panels):
        epochs = [h["epoch"] for h in history if key in h]
        ax.plot(epochs, [h[key] for h in history if key in h], ".-", label=label)
        if key == "max_cluster_share" and K_c:   # collapse would approach 1; even clusters sit at 1/K_c
            ax.axhline(1 / K_c, ls="--", color="gray", label=f"even split: 1/K_c = 1/{K_c}")
        if rising:
            ax.axvspan(0.5, max(rising) + 0.5, color="0.92", label="lambda rising")
        if key in ("knn", "max_cluster_share"):   # from 0: no exaggerated change
            ax.set_ylim(bottom=0)
        ax.set(title=name, xlabel="epoch", ylabel=ylabel)
        ax.xaxis.get_major_locator().set_params(integer=True)   # whole epochs
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)

# ============================ 8. Data sets: CIFAR-10/100, image folders ============================
# uint8 images [N, 3, S, S] and labels [N]; the training images are also kNN's bank and the probe's training set
Data = collections.namedtuple("Data", ["train", "train_y", "test", "test_y", "classes", "image_size"])

def balanced_subset(labels: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """Sorted indices of n samples, drawn reproducibly: round-robin over the classes, each in a random
    order, so class counts differ by one at most, unless a class too small for its share gives all it has."""
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

def decode(samples: list, transform, size: int, workers: int) -> torch.Tensor:
    """All the images [(path, label)] as uint8 [N, 3, S, S], decoded 256 at a time by DataLoader workers
    and filled in place (ImageNet-100's 19 GB are not held twice)."""
    out = torch.empty(len(samples), 3, size, size, dtype=torch.uint8)
    load = functools.partial(read_batch, transform)   # a module function: workers that spawn can pickle it
    for i, x in enumerate(DataLoader(samples, 256, num_workers=workers, collate_fn=load)):
        out[256 * i:256 * i + len(x)] = x                              # x: [<= 256, 3, S, S]
    return out

def read_batch(transform, samples: list) -> torch.Tensor:
    return torch.stack([transform(read_image(path)) for path, _ in samples])   # [B, 3, S, S]

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
    folder, index = torchvision.datasets.folder, {c: i for i, c in enumerate(classes)}
    samples = folder.make_dataset(path, index, folder.IMG_EXTENSIONS, allow_empty=True) if classes else []
    if not samples:
        raise CueCoError(f"data folder {path} holds no images (expected class folders: {path}/cat/1.png)")
    return samples, classes

def load_folder(root: str, class_list=None, limit_train=0, limit_test=0, image_size=0, seed=0, workers=0) -> Data:
    """An image folder (root/train/<class>/*, root/test/ or root/val/), decoded: images up to 64 px resized
    to image_size (0: their own), larger ones resized to 256 and centre-cropped to image_size (0: 224);
    class_list: a file of the class folders to keep; limit_*: class-balanced subsets (0: all)."""
    try:
        keep = pathlib.Path(class_list).read_text().split() if class_list else None   # a class folder name a line
    except OSError as e:
        raise CueCoError(f"cannot read --class-list {class_list}: {e.strerror}") from None
    test_dir = "test" if os.path.isdir(os.path.join(root, "test")) else "val"   # ImageNet's: val/
    train, classes = scan(os.path.join(root, "train"), keep)
    test, test_classes = scan(os.path.join(root, test_dir), keep)
    if test_classes != classes:
        raise CueCoError(f"train/ and {test_dir}/ in {root} have different class folders")
    train = [train[i] for i in balanced_subset(torch.tensor([y for _, y in train]), limit_train, seed)]
    test = [test[i] for i in balanced_subset(torch.tensor([y for _, y in test]), limit_test, seed)]
    ys = [torch.tensor([y for _, y in s]) for s in (train, test)]
    size = image_size or max(read_image(train[0][0]).size)
    size = size if image_size or size <= 64 else 224                   # large images: 224 px
    resize = [v2.Resize((size, size))] if size <= 64 else [v2.Resize(size * 8 // 7), v2.CenterCrop(size)]
    plain = v2.Compose([v2.PILToTensor(), *resize])                    # uint8 [3, S, S]
    xs = [decode(s, plain, size, workers) for s in (train, test)]      # [N, 3, S, S], [T, 3, S, S]
    return Data(xs[0], ys[0], xs[1], ys[1], classes, size)

def load_cifar(name: str, root: str, limit_train=0, limit_test=0, seed=0) -> Data:
    """CIFAR-10 or -100 (name) through torchvision, downloaded into root if need be; limit_*: as load_folder's."""
    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    try:
        sets = [cls(root, train=True, download=True), cls(root, train=False, download=True)]
    except Exception as e:
        raise CueCoError(f"could not load or download {name} into {root} ({type(e).__name__}: {str(e)[:60]}); "
                         f"offline, put {cls.filename} from {cls.url} there by hand, or use --dataset folder") from None
    xs = [torch.as_tensor(s.data).permute(0, 3, 1, 2).contiguous() for s in sets]   # uint8 [N, 3, 32, 32]
    ys = [torch.as_tensor(s.targets) for s in sets]
    train, test = balanced_subset(ys[0], limit_train, seed), balanced_subset(ys[1], limit_test, seed)
    return Data(xs[0][train], ys[0][train], xs[1][test], ys[1][test], sets[1].classes, 32)

# ========================== 9. The command line: flags over a preset's defaults ==========================
# A preset is a named set of defaults, which flags override. "full" is the parser's own: ResNet-18 at width 64
# and batch 512 for the MoCo CIFAR-10 notebook's 800 epochs (the paper publishes no schedule). "gpu" (ours)
# stops at 200, which a free Colab T4 session can finish, for about 95% of the accuracy (the notebook: 85.3%
# kNN at 200 epochs, 89.7% at 800). "laptop" (ours) trains a narrow network on all the images for 16 epochs
# of 24-px views, each (3/4)^2 of a 32-px one. "lab" (ours): width 8 for 5 epochs, minutes a run, for the exercises.
PRESETS = {"full": {}, "gpu": {"epochs": 200},
           "laptop": {"width": 16, "batch_size": 256, "epochs": 16, "view_scale": 0.75, "eval_every": 4},
           "lab": {"width": 8, "batch_size": 256, "epochs": 5, "view_scale": 0.75, "eval_every": 0}}

class Parser(argparse.ArgumentParser):
    def error(self, message):   # one line, as the script's other errors, not the usage
        raise CueCoError(f"{message} (python cueco.py --help lists the flags)")

def build_parser() -> argparse.ArgumentParser:
    presets = "; ".join(f"{name} = " + (" ".join(f"--{k.replace('_', '-')} {v}" for k, v in d.items())
                                      or "as shown") for name, d in PRESETS.items())
    p = Parser(prog="cueco.py", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
               description="CueCo self-supervised learning in one file. The defaults shown are the full preset's: "
               "--preset auto lays the gpu preset over them on a CUDA GPU, the laptop preset elsewhere. A flag you "
               "give wins over any preset.", epilog=f"Presets: {presets}. --resume restores the run's own settings.")
    a = p.add_argument_group("preset").add_argument
    a("--preset", default="auto", choices=["auto", *PRESETS], help="auto = gpu on a CUDA GPU, else laptop")
    a = p.add_argument_group("data").add_argument
    a("--dataset", default="cifar10", choices=["cifar10", "cifar100", "folder"], help="folder: train/, test/ or val/")
    a("--data-dir", default=None, help="where the data set is or is downloaded to (None: data/<dataset>)")
    a("--image-size", type=int, default=0, help="0 = the data's own (32 CIFAR, 224 large images)")
    a("--class-list", default=None, help="file of the class folders to keep, e.g. ImageNet-100 (None: all)")
    a("--limit-train", type=int, default=0, help="N class-balanced training images (0 = all)")
    a("--limit-test", type=int, default=0, help="N class-balanced test images (0 = all)")
    a = p.add_argument_group("model and method").add_argument
    a("--width", type=int, default=64, help="base channels of the ResNet-18 (64 = standard)")
    a("--dim", type=int, default=128, help="embedding dimension D")
    a("--bn-splits", type=int, default=8, help="batch-norm groups of a batch (SplitBatchNorm)")
    a("--queue-size", type=int, default=4096, help="K, keys in the queue")
    a("--temperature", type=float, default=0.1, help="T of the contrastive loss")
    a("--key-momentum", type=float, default=0.99, help="m of the key network's moving average")
    a("--lambda-clu", type=float, default=1.0, help="lambda, the clustering loss's weight; 0: MoCo-v2 (no C, G)")
    a("--clu-warmup", type=float, default=0.5, help="lambda rises each epoch to full at this fraction of the run")
    a("--head-clusters", type=int, default=None, help="K_c, centroids C (ours; None: the number of classes; 0: none)")
    a("--num-groups", type=int, default=100, help="G, CLD's groups of the other view's queries (ours; 0: none)")
    a("--clu-temperature", type=float, default=0.2, help="tau of the clustering softmaxes (ours)")
    a("--sinkhorn-eps", type=float, default=0.05, help="eps of the centroids' balanced assignment (ours)")
    a("--centroid-lr", type=float, default=10.0, help="C's learning rate, a multiple of --lr (ours)")
    a = p.add_argument_group("training").add_argument
    a("--epochs", type=int, default=800, help="0 = evaluate the untrained network")
    a("--batch-size", type=int, default=512, help="images per step")
    a("--lr", type=float, default=0.06, help="SGD learning rate at batch 512 (scaled linearly)")
    a("--weight-decay", type=float, default=5e-4, help="SGD weight decay (none on the centroids C)")
    a("--view-scale", type=float, default=1.0, help="training views' side / the images' (ours; evaluation: 1)")
    a("--seed", type=int, default=0, help="seeds the weights, the views, the subsets and the evaluation")
    a("--resume", default=None, help="checkpoint.pt to go on from, its settings the defaults (None: new)")
    a("--save-minutes", type=float, default=1.0, help="checkpoint at an epoch's end this long after the last")
    a = p.add_argument_group("evaluation and output").add_argument
    a("--eval-every", type=int, default=10, help="kNN monitor every N epochs (0: only at the end)")
    a("--tsne-points", type=int, default=2000, help="test images in the t-SNE figure (0 = none)")
    a("--log-every", type=int, default=20, help="steps between progress lines")
    a("--out", default=None, help="checkpoint.pt and metrics.json go here (None: runs/<data>)")
    a("--figures-dir", default=None, help="where the t-SNE, cluster, neighbour and curve figures go (None: --out)")
    a = p.add_argument_group("machine").add_argument
    a("--device", default="auto", help="auto (CUDA if present, else the CPU) | cpu | cuda | cuda:N | mps")
    a("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"], help="auto: see pick_precision")
    a("--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile the forward (None: CUDA)")
    a("--memory-gb", type=float, default=4.0, help="largest training set kept on the device (else in host memory)")
    a("--num-workers", type=int, default=min(8, os.cpu_count() or 1), help="workers decoding folder images")
    return p

def on_cuda(args) -> bool:
    return args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())

def resolve_preset(args) -> str:   # auto: the gpu preset on a CUDA GPU, the laptop preset on a CPU or a Mac
    return args.preset if args.preset != "auto" else "gpu" if on_cuda(args) else "laptop"

def data_name(args) -> str:
    """The data set, or a folder's own name (cifar10-jpeg): names the output folder and the figures."""
    return args.dataset if args.dataset != "folder" else os.path.basename(os.path.normpath(args.data_dir))

def parse_args(argv=None) -> argparse.Namespace:
    """The flags over the preset's defaults (--resume: the run's own settings, but for --compile, which the
    machine decides again), checked now, not late. It creates nothing: run() makes the output folders."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.resume:   # its resolved preset included
        saved = load_checkpoint(args.resume)["args"]
        parser.set_defaults(**{k: v for k, v in saved.items() if k not in ("resume", "compile")})
    else:
        parser.set_defaults(**PRESETS[resolve_preset(args)])
    args = parser.parse_args(argv)
    args.preset = resolve_preset(args)
    args.data_dir = args.data_dir or os.path.join("data", args.dataset)
    args.out = args.out or os.path.join("runs", data_name(args))
    args.figures_dir = args.figures_dir or args.out
    args.compile = on_cuda(args) if args.compile is None else args.compile   # a CPU compiles for minutes to gain little

    rules = [("batch_size width dim queue_size bn_splits log_every lr temperature clu_temperature "
              "sinkhorn_eps", "> 0", lambda v: v > 0),
             ("epochs limit_train limit_test eval_every num_workers image_size tsne_points lambda_clu "
              "weight_decay memory_gb save_minutes centroid_lr num_groups", ">= 0", lambda v: v >= 0),
             ("head_clusters", ">= 0", lambda v: v is None or v >= 0),   # None: the number of classes
             ("key_momentum", "in [0, 1)", lambda v: 0 <= v < 1),
             ("view_scale", "in (0, 1]", lambda v: 0 < v <= 1),
             ("clu_warmup", "in [0, 1]", lambda v: 0 <= v <= 1)]
    for names, what, ok in rules:
        for name in names.split():
            if not ok(getattr(args, name)):
                raise CueCoError(f"--{name.replace('_', '-')} must be {what}, got {getattr(args, name)}")
    if args.queue_size < 2 * args.batch_size:
        raise CueCoError(f"--queue-size ({args.queue_size}) must hold one step's keys (2 x --batch-size)")
    if args.batch_size % args.bn_splits:
        raise CueCoError(f"--batch-size {args.batch_size} is not a multiple of --bn-splits {args.bn_splits}")
    return args

def settings_line(args) -> str:
    """A run's first line: the preset and why, the values it set, and the values the user set."""
    why = {"full": "the MoCo notebook's", "gpu": "a CUDA GPU", "laptop": "no CUDA GPU", "lab": "the exercises'"}
    flags = lambda d: " ".join(f"--{k.replace('_', '-')} {v}" for k, v in d.items()) or "none"   # noqa: E731
    defaults = {**vars(build_parser().parse_args([])), **PRESETS[args.preset]}
    skip = ("preset", "data_dir", "out", "figures_dir", "compile", "resume", "clustering_loss")   # said elsewhere
    yours = {k: v for k, v in vars(args).items() if k not in skip and v != defaults[k]}
    return f"preset {args.preset} ({why[args.preset]}): {flags(PRESETS[args.preset])}; yours: {flags(yours)}"

# ============ 10. Plumbing: device, memory, precision, compilation, output folders, checkpoints ============
def setup_device(name: str) -> torch.device:
    try:
        device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)
        # a real kernel, read back, fails here on a GPU this PyTorch build has no code for (allocating passes)
        (torch.ones(2, device=device) * 2).sum().item()
    except Exception as e:
        msg = str(e).strip().splitlines()[0]
        msg = "not a device's name; valid: auto, cpu, cuda, cuda:N, mps" if "Expected one of" in msg else msg
        raise CueCoError(f"--device {name} cannot be used here ({msg})") from None
    if device.type == "cuda":   # --device cuda:1 is made the current GPU too
        device = torch.device("cuda", device.index or 0)
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True   # every batch has the same shape: the fastest kernels
    return device

def pick_precision(device, precision: str = "auto") -> tuple:
    """(precision, why). auto: bf16 where native (GPUs of compute capability 8.0+, CPUs with AVX512-BF16 or AMX),
    fp16 and a gradient scaler on older GPUs (T4, V100), else fp32: other CPUs emulate bf16, 15x slower."""
    if precision != "auto":
        return precision, "--precision"
    if device.type == "cuda":
        native = torch.cuda.get_device_capability(device) >= (8, 0)
        return ("bf16", "native on this GPU") if native else ("fp16", "no native bf16 on this GPU")
    if device.type == "cpu" and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()):
        return "bf16", "native on this CPU: AVX512-BF16 or AMX"
    return "fp32", f"no native bf16 on this {device.type.upper()}"

def autocast(device, precision: str):
    device, dtype = torch.device(device), {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    return torch.autocast(device.type, dtype=dtype, enabled=precision != "fp32")

def make_forward(model: CueCo, device, precision: str, compile: bool = False):
    """model(x1, x2) in the run's precision, compiled if asked (the networks and losses: lambda and the lr never
    recompile it); if compiling fails, one line says so and the run goes on eagerly."""
    net = torch.compile(model, dynamic=False) if compile else model   # every batch has the same shape

    def forward(x1, x2):
        nonlocal net
        with autocast(device, precision):
            try:
                return net(x1, x2)
            except Exception as e:
                if net is model or isinstance(e, torch.cuda.OutOfMemoryError):
                    raise
                print(f"torch.compile failed ({type(e).__name__}: {str(e).strip().splitlines()[0][:120]}); "
                      f"going on without it")
                net = model
                return model(x1, x2)
    return forward

def make_dirs(args):
    for flag, path in (("--out", args.out), ("--figures-dir", args.figures_dir)):
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as e:
            raise CueCoError(f"{flag} {path} cannot be created ({e.strerror})") from None

CHECKPOINT_FORMAT = "cueco-checkpoint-v3"   # a new name whenever the model's or the run's state changes

def save_checkpoint(path: str, model, optimizer, scaler, epoch: int, config: dict, history: list):
    """Written to a temporary file, then renamed: a crash never leaves half a checkpoint (140 MB at width 64)."""
    torch.save({"format": CHECKPOINT_FORMAT, "epoch": epoch, "args": config, "history": history,
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict()}, path + ".tmp")
    os.replace(path + ".tmp", path)

def load_checkpoint(path: str, model=None, optimizer=None, scaler=None) -> dict:
    """The checkpoint, loaded into model, optimizer and scaler if given; weights_only: data, not code."""
    if not os.path.isfile(path):
        raise CueCoError(f"--resume {path}: no such file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        fmt = str(ckpt.get("format")) if isinstance(ckpt, dict) else "none"
    except Exception as e:
        fmt = f"none ({type(e).__name__}: {str(e).splitlines()[0][:100]})"
    if fmt != CHECKPOINT_FORMAT:
        raise CueCoError(f"--resume {path} is a {fmt}, written by another version of cueco.py: finish it with that "
                         f"version, or start a new run" if fmt.startswith("cueco-checkpoint") else
                         f"--resume {path} is not a checkpoint of this script (format: {fmt})")
    try:
        if model is not None:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            if ckpt["scaler"]:   # empty unless fp16: the loss scale as it had adapted
                scaler.load_state_dict(ckpt["scaler"])
    except Exception as e:
        raise CueCoError(f"--resume {path} is a checkpoint of another model ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:100]})") from None
    return ckpt

def write_json(path: str, obj):
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)

# ========= 11. Main: the final report (scores, figures, metrics.json), and the run from data to it =========
def method_name(args) -> str:
    plugin = "" if args.clustering_loss == "cueco_clustering_loss" else f" with {args.clustering_loss}"
    return f"CueCo{plugin}" if args.lambda_clu else "MoCo-v2 (lambda_clu 0)"

@torch.no_grad()
def report(args, model, data, device, precision, history, feats=None) -> dict:
    """kNN, linear probe, compactness and separation, NMI/ARI/ACC of k-means on the backbone's features and of
    the own clusters (head_); the figures; metrics.json. feats: the last epoch's features, if any."""
    f_train, f_test = feats or features(model.encoder_q.backbone, data, device, precision)
    final = {"knn": knn_accuracy(f_train, data.train_y, f_test, data.test_y)}
    final["linear"] = linear_probe(f_train, data.train_y, f_test, data.test_y, seed=args.seed)
    final["compactness"], final["separation"] = class_geometry(f_test, data.test_y)
    clusters = kmeans(f_test, len(data.classes), seed=args.seed)       # clusters: [N_test]
    final.update(cluster_metrics(clusters, data.test_y))
    own = model.K_c > 0   # the model's own clusters: each test image's nearest centroid
    if own:
        z = F.normalize(model.encoder_q.projector(f_test), dim=1)      # z: [N_test, D]
        clusters = cosines(z, model.encoder_q.C).argmax(dim=1)        # clusters: [N_test]
        final.update({"head_" + k: v for k, v in cluster_metrics(clusters, data.test_y).items()})
        final["largest_head_cluster"] = torch.bincount(clusters).max().item() / len(clusters)   # 1: collapsed

    name, what = data_name(args), "own cluster (argmax z.C)" if own else "k-means cluster"
    title = f"{method_name(args)} on {name}, epoch {len(history)}"
    path = lambda figure: os.path.join(args.figures_dir, f"{figure}_{name}.png")   # noqa: E731
    matched = match_clusters(clusters, data.test_y)   # each test image's cluster, named as its class
    if args.tsne_points:
        idx = balanced_subset(data.test_y, min(args.tsne_points, len(f_test)), seed=0)   # idx: [n]
        emb = tsne(f_test[idx.to(device)], seed=args.seed)             # emb: [n, 2]
        nmi = final["head_nmi" if own else "nmi"]
        plot_tsne(emb, data.test_y[idx], matched[idx], data.classes, path("tsne"),
                  f"{title}: t-SNE of {len(idx)} test images' backbone features; the clusters' NMI {nmi:.3f}", what)
    # what the network groups without labels: the largest clusters (up to 20), each by 10 of its test images spread
    # evenly over it, named by its size and the share of its most common class
    (table, ids, labels), rows, names = contingency(clusters, data.test_y), [], []   # table: [P, classes]
    for i in table.sum(1).argsort(descending=True)[:20].tolist():     # clusters with members, largest first
        members = (clusters.cpu() == ids[i]).nonzero()[:, 0]           # members: [n_i], in the test set's order
        shown = members[torch.linspace(0, len(members) - 1, min(10, len(members))).long()].tolist()
        rows.append([data.test[j] for j in shown] + [None] * (10 - len(shown)))
        names.append(f"{table[i].sum():.0f}: {table[i].max() / table[i].sum():.0%} "
                     f"{data.classes[labels[table[i].argmax()]]}")
    plot_grid(rows, names, path("clusters"), f"{title}\n10 test images of each {what}, largest first; left: its "
              f"size: the share of its most common class")
    # kNN made concrete: one test image of each class (up to 10), then its 8 nearest training images
    frame = lambda x, v: torch.stack([F.pad(x[c], [2] * 4, value=v[c]) for c in range(3)])   # noqa: E731
    pick = balanced_subset(data.test_y, min(10, len(data.classes)), seed=args.seed).tolist()
    sim = F.normalize(f_test[pick], dim=1) @ F.normalize(f_train, dim=1).t()   # sim: [n, N], cosines
    near = sim.topk(min(8, len(f_train)), dim=1).indices.cpu()         # near: [n, 8], as kNN's voters
    hits = (data.train_y[near] == data.test_y[pick][:, None]).tolist() # hits: [n, 8]
    rows = [[frame(data.test[i], (128, 128, 128))] + [frame(data.train[j].cpu(), (0, 60, 200) if hit else
            (255, 255, 255)) for j, hit in zip(row, hit_row)] for i, row, hit_row in zip(pick, near.tolist(), hits)]
    plot_grid(rows, [f"{data.classes[data.test_y[i]]}: {sum(h)} of {len(h)}" for i, h in zip(pick, hits)],
              path("neighbours"), f"{title}\none random test image per class (grey frame), then its nearest training "
              f"images by the backbone's features, framed if of its class; left: its class, how many of 8 share it")
    if history:
        plot_curves(history, path("curves"), f"{title}: clustering weight lambda {args.lambda_clu}, "
                    f"{model.K_c} centroids, {model.G} groups", model.K_c)
    write_json(os.path.join(args.out, "metrics.json"), dict(args=vars(args), epochs=history, final=final))
    scores = lambda p, s="": ", ".join(f"{m.upper()} {final[p + m + s]:.3f}" for m in ("nmi", "ari", "acc"))  # noqa
    print(f"final: kNN {final['knn']:.2f}%, linear probe {final['linear']:.2f}%, compactness "
          f"{final['compactness']:.3f}, separation {final['separation']:.3f} | k-means of the backbone's "
          f"features: {scores('')}" + (f" | own clusters (argmax z.C): {scores('head_')}, the largest "
                                       f"{final['largest_head_cluster']:.0%}" if own else ""))
    saved = " and checkpoint.pt" if os.path.isfile(os.path.join(args.out, "checkpoint.pt")) else ""
    print(f"wrote metrics.json{saved} to {args.out}, the figures to {args.figures_dir}")
    return final

def run(argv=None, clustering_loss=None) -> dict:
    args, loss_fn = parse_args(argv), clustering_loss or cueco_clustering_loss
    name = getattr(loss_fn, "__name__", type(loss_fn).__name__)   # a function's, or a partial's or an object's class
    if getattr(args, "clustering_loss", name) != name:   # --resume: the run's own
        raise CueCoError(f"--resume {args.resume} trained with the clustering loss {args.clustering_loss}: pass "
                         f"it again, main(argv, clustering_loss={args.clustering_loss})")
    args.clustering_loss = name   # in metrics.json and the checkpoint
    make_dirs(args)   # first: an unwritable --out or --figures-dir is found before any data loads
    device = setup_device(args.device)
    precision, why = pick_precision(device, args.precision)
    print(f"{settings_line(args)} | {device}, {precision} ({why}), {'compiled' if args.compile else 'eager'}")

    torch.manual_seed(args.seed)
    if args.dataset == "folder":
        data = load_folder(args.data_dir, args.class_list, args.limit_train, args.limit_test, args.image_size,
                           args.seed, args.num_workers)
    else:
        data = load_cifar(args.dataset, args.data_dir, args.limit_train, args.limit_test, args.seed)
    if args.epochs > 0 and len(data.train) < args.batch_size:
        raise CueCoError(f"--batch-size {args.batch_size} exceeds the {len(data.train)} training images")
    gb = data.train.numel() / 2**30   # uint8: a byte a pixel; else in host memory, copied a batch at a time
    data = data._replace(train=data.train.to(device if gb <= args.memory_gb else "cpu"))

    if args.lambda_clu == 0:   # MoCo-v2: no centroids, no groups (metrics.json records what ran)
        args.head_clusters, args.num_groups = 0, 0
    elif args.head_clusters is None:
        args.head_clusters = len(data.classes)
    model = CueCo(args.width, args.dim, args.queue_size, args.head_clusters, args.num_groups, args.temperature,
                  args.clu_temperature, args.sinkhorn_eps, data.image_size <= 64, args.bn_splits, loss_fn).to(device)
    optimizer = make_optimizer(model, scaled_lr(args.lr, args.batch_size), args.weight_decay, args.centroid_lr)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")   # fp16 gradients underflow
    history = []
    if args.resume:
        history = load_checkpoint(args.resume, model, optimizer, scaler)["history"]
    steps = len(data.train) // args.batch_size
    scheduler = cosine_schedule(optimizer, args.epochs * steps, len(history) * steps)
    forward = make_forward(model, device, precision, args.compile)
    print(f"{method_name(args)} on {data_name(args)} ({len(data.train)} train, {len(data.test_y)} test images of "
          f"{data.image_size} px, the training set on {data.train.device}, {gb:.1f} GB): ResNet-18 width {args.width}, "
          f"epochs {len(history) + 1} to {args.epochs} of {steps} steps of {args.batch_size} images")

    try:
        feats = train(args, model, optimizer, scheduler, scaler, forward, data, device, precision, history)
        return report(args, model, data, device, precision, history, feats)
    except (KeyboardInterrupt, torch.cuda.OutOfMemoryError) as e:   # one line, and how to go on
        what = "interrupted" if isinstance(e, KeyboardInterrupt) else \
            f"out of memory on {device}: try --batch-size {args.batch_size // 2} or a smaller --width"
        path = os.path.join(args.out, "checkpoint.pt")
        if not os.path.isfile(path):
            raise CueCoError(f"{what}; no checkpoint yet (see --save-minutes)") from None
        epoch = load_checkpoint(path)["epoch"]
        then = "finish the evaluation" if epoch == args.epochs else "continue"
        raise CueCoError(f"{what}; the checkpoint of epoch {epoch} is in {path}; {then} with: "
                         f"python cueco.py --resume {path}") from None

def main(argv=None, clustering_loss=None) -> dict:
    """The whole script for argv (None: sys.argv), with your clustering_loss(q1, q2, k1, k2, model) if given.
    Returns the final metrics; a user error is one line on stderr, exit status 2 (130 after Ctrl-C)."""
    try:
        return run(argv, clustering_loss)
    except CueCoError as e:   # raised in a DataLoader worker, it arrives inside a traceback's text
        msg = str(e).strip().splitlines()[-1].split("CueCoError: ", 1)[-1]
        print(f"cueco.py: error: {msg}", file=sys.stderr)
        raise SystemExit(130 if msg.startswith("interrupted") else 2) from None

if __name__ == "__main__":
    sys.stdout.reconfigure(line_buffering=True)   # each progress line reaches a log file at once
    main()
