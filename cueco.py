r"""CueCo: Cluster Contrast for unsupervised visual representation learning, in one file.

CueCo (arXiv:2507.12359, ICIP 2025) learns image features without labels. Two copies of a ResNet-18
see two random views of every image. The query network encoder_q learns by gradient descent; the key
network encoder_k is its moving average, theta_k <- m theta_k + (1 - m) theta_q, and a FIFO queue
holds its last K keys. For the query q of one view and the key k+ of the other view of one image:

  contrastive loss, separates instances (InfoNCE, as in MoCo):
      L_con = -log( exp(q.k+ / T) / (exp(q.k+ / T) + sum_{j=1..K} exp(q.queue_j / T)) )
  clustering loss, pulls each cluster together (OURS: the paper publishes no formula), two heads:
      K_c groups: g = the image's group in k-means of the other view's batch of queries, M the groups'
          unit means;  L_grp = -log softmax(q.M / tau)_g                                  (CLD's)
      K centroids C_K, K the number of classes: Q(k) = Sinkhorn(k.C_K / eps), each centroid 1/K of
          the batch;  L_K = -sum_c Q(k+)_c log softmax(q.C_K / tau)_c;  argmax q.C_K clusters images
      L_clu = (L_grp + L_K) / 2
  L = L_con(q1, k2) + L_con(q2, k1) + lambda * (L_clu(q1, k2) + L_clu(q2, k1))

Ours, not the paper's: all of L_clu (CLD's batch groups, Wang et al. 2021, on z; C_K in the encoder, so
the key network carries a slow copy; SwAV's Sinkhorn, not CoKe's minimal cluster size; K_c = 100, tau
0.2, eps 0.05, C_K at 10 times the lr; --clu-targets sinkhorn: K_c learned centroids with Sinkhorn too),
lambda = 1, raised once an epoch to its full value at half-time (lambda = 0 is MoCo-v2), the presets. The
rest is the MoCo CIFAR-10 notebook's recipe (facebookresearch/moco) with MoCo-v2's crops and MLP head.

Sections: 1 configuration; the method as a step runs it: 2 augmentation, 3 backbone, 4 query/key model, 5
losses, 6 training; 7 speed; 8 evaluation, 9 clustering, t-SNE, 10 figures, 11 data, 12 plumbing, 13 main.

    python cueco.py --dataset cifar10                    # CUDA: 200 epochs (gpu); else the laptop preset
    python cueco.py --dataset cifar10 --preset laptop    # about an hour on 2 CPU cores; results: README.md
    python cueco.py --dataset folder --data-dir /data/imagenet --class-list imagenet100.txt \
        --epochs 200 --batch-size 256 --lr 0.06 --weight-decay 1e-4 --temperature 0.2 \
        --queue-size 16384 --key-momentum 0.999 --eval-every 20 --memory-gb 24   # ImageNet-100
"""
import argparse
import collections
import datetime
import functools
import json
import math
import os
import pickle
import random
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torch.utils.data import DataLoader
from torchvision.transforms import v2

# ======================================== 1. Configuration ========================================
class CueCoError(Exception):
    """A problem with the user's input or machine: one line on stderr, exit status 2, no traceback."""

# A preset is a named set of defaults, which flags override. "paper" is the parser's own: the paper's
# network and batch for 800 epochs. "gpu" (ours) stops at 200, which a free Colab T4 session can finish,
# for about 95% of the accuracy (MoCo notebook: 85.3% kNN at 200 epochs, 89.7% at 800). "laptop" (ours)
# trains a narrow network on all the images for 16 epochs of 24-px views, in 8 32-px epochs' time.
PRESETS = {"paper": {}, "gpu": {"epochs": 200},
           "laptop": {"width": 16, "batch_size": 256, "epochs": 16, "view_scale": 0.75, "eval_every": 4}}

def build_parser() -> argparse.ArgumentParser:
    # the defaults below are the paper preset's; the epilog, built from PRESETS, says what others change
    presets = "; ".join(f"{name} = " + (" ".join(f"--{k.replace('_', '-')} {v}" for k, v in d.items())
                                      or "as shown") for name, d in PRESETS.items())
    p = argparse.ArgumentParser(prog="cueco.py", description="CueCo self-supervised learning, one file",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                epilog="The defaults shown are the paper preset's. A preset sets "
                                       "defaults, a flag you give wins over them, and --resume restores "
                                       f"the run's own. Presets: {presets}.")
    a = p.add_argument_group("preset").add_argument
    a("--preset", default="auto", choices=["auto", *PRESETS],
      help="defaults that flags you give override: auto = gpu on a CUDA GPU, else laptop")
    a = p.add_argument_group("data").add_argument
    a("--dataset", default="cifar10", help="cifar10 | cifar100 | folder (train/, test/ or val/)")
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
    a("--num-clusters", type=int, default=100, help="K_c, centroids C of the clustering loss (ours)")
    a("--head-clusters", type=int, default=None, help="K, centroids C_K of a second head (ours), whose "
      "argmax clusters the images (None: the number of classes; 0: no head)")
    a("--lambda-clu", type=float, default=1.0, help="lambda, weight of the clustering loss; 0 = MoCo-v2")
    a("--clu-warmup", type=float, default=0.5, help="lambda rises in equal steps, one per epoch, to "
      "its full value at the end of this fraction of the epochs")
    a("--clu-temperature", type=float, default=0.2, help="tau of the clustering softmax (ours)")
    a("--sinkhorn-eps", type=float, default=0.05, help="eps of the balanced assignment (ours)")
    a("--centroid-lr", type=float, default=10.0, help="C's learning rate, a multiple of --lr (ours)")
    a("--clu-targets", default="groups", choices=["groups", "sinkhorn"], help="the K_c head's targets: "
      "CLD's, the image's group in k-means of the other view's batch | the key's Sinkhorn on K_c centroids")
    a = p.add_argument_group("training").add_argument
    a("--epochs", type=int, default=800, help="0 = evaluate the untrained network")
    a("--batch-size", type=int, default=512, help="images per step")
    a("--lr", type=float, default=0.06, help="SGD learning rate at batch 512 (scaled linearly)")
    a("--weight-decay", type=float, default=5e-4, help="SGD weight decay (none on the centroids C)")
    a("--view-scale", type=float, default=1.0, help="side of the training views, as a fraction of the "
      "image size (ours; the evaluation sees whole images at full size)")
    a("--seed", type=int, default=0, help="seeds the weights, the views, the subsets and the evaluation")
    a("--resume", default=None, help="checkpoint.pt to go on from, its settings the defaults (None: new)")
    a("--save-minutes", type=float, default=1.0, help="checkpoint after each epoch that ends this long "
      "after the last one, and at the end: a crash loses up to this much training plus an epoch")
    a = p.add_argument_group("evaluation and output").add_argument
    a("--eval-every", type=int, default=10, help="kNN monitor every N epochs (0: only at the end)")
    a("--tsne-points", type=int, default=2000, help="test images in the t-SNE figure (0 = none)")
    a("--log-every", type=int, default=20, help="steps between progress lines")
    a("--out", default=None, help="checkpoint.pt and metrics.json go here (None: runs/<data>)")
    a("--figures-dir", default="figures", help="where the t-SNE, cluster and curve figures go")
    a = p.add_argument_group("machine").add_argument
    a("--device", default="auto", help="auto (CUDA if present, else the CPU) | cpu | cuda | cuda:N | mps")
    a("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
      help="auto: bf16 where the hardware has it, fp16 on older GPUs, else fp32 (pick_precision)")
    a("--compile", action="store_true", help="torch.compile the query and key networks")
    a("--memory-gb", type=float, default=4.0, help="largest training set kept on the device, and on a GPU "
      "at most half its free memory (else in host memory, copied a batch at a time)")
    a("--num-workers", type=int, default=min(8, os.cpu_count() or 1), help="workers decoding folder images")
    return p

def resolve_preset(args) -> str:
    """--preset auto: the gpu preset on a CUDA GPU, the laptop preset on a CPU or Apple's MPS."""
    if args.preset != "auto":
        return args.preset
    gpu = args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
    return "gpu" if gpu else "laptop"

def data_name(args) -> str:
    """The data set, or a folder's own name (cifar10-jpeg): names the output folder and the figures."""
    return args.dataset if args.dataset != "folder" else os.path.basename(os.path.normpath(args.data_dir))

def parse_args(argv=None) -> argparse.Namespace:
    """The flags over the preset's defaults (--resume: the run's own settings), checked now, not late."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.resume:   # its resolved preset included
        saved = load_checkpoint(args.resume)["args"]
        parser.set_defaults(**{k: v for k, v in saved.items() if k != "resume"})
    else:
        parser.set_defaults(**PRESETS[resolve_preset(args)])
    args = parser.parse_args(argv)
    args.preset = resolve_preset(args)
    args.data_dir = args.data_dir or os.path.join("data", args.dataset)
    args.out = args.out or os.path.join("runs", data_name(args))

    if args.dataset not in ("cifar10", "cifar100", "folder"):
        raise CueCoError(f"unknown data set '{args.dataset}': choose cifar10, cifar100 or folder")
    if args.dataset != "folder" and args.image_size not in (0, 32):   # before any download
        raise CueCoError(f"--image-size {args.image_size} differs from {args.dataset}'s 32 px images")
    rules = [("batch_size width dim queue_size num_clusters bn_splits log_every lr temperature "
              "clu_temperature sinkhorn_eps", "> 0", lambda v: v > 0),
             ("epochs limit_train limit_test eval_every num_workers image_size tsne_points lambda_clu "
              "weight_decay memory_gb save_minutes centroid_lr", ">= 0", lambda v: v >= 0),
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
    for flag, path in (("--out", args.out), ("--figures-dir", args.figures_dir)):
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as e:
            raise CueCoError(f"{flag} {path} cannot be created ({e.strerror})") from None
        if not os.access(path, os.W_OK):
            raise CueCoError(f"{flag} {path} is not writable")
    return args

# =================================== 2. The augmentation recipe ===================================
def norm_stats(size: int):
    """Per-channel mean and std: CIFAR's for images up to 64 px, ImageNet's for larger ones."""
    if size <= 64:
        return (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
    return (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

def mocov2_transform(size: int) -> v2.Compose:
    """MoCo-v2's random view of one image, in torchvision: the views' specification, which `augment` (section
    7) draws a whole batch at a time on the device, as the tests check. Blur is ImageNet's alone."""
    mean, std = norm_stats(size)
    tfs = [v2.ToImage(), v2.RandomResizedCrop(size, scale=(0.2, 1.0), antialias=True),
           v2.RandomHorizontalFlip(), v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
           v2.RandomGrayscale(p=0.2)]
    if size > 64:
        tfs.append(v2.RandomApply([v2.GaussianBlur(blur_kernel(size), (0.1, 2.0))], p=0.5))
    return v2.Compose(tfs + [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])

def blur_kernel(size: int) -> int:
    return max(3, int(0.1 * size) // 2 * 2 + 1)   # odd, about 10% of the image (MoCo-v2: 23 at 224)

# ========================== 3. Backbone: ResNet-18 with split batch norm ==========================
class SplitBatchNorm(nn.BatchNorm2d):
    """Batch norm over `num_splits` groups of a batch, as if each were on its own GPU (MoCo's CIFAR-10
    notebook): with the keys shuffled, a query and its key meet other images' statistics (~4 points)."""
    def __init__(self, num_features: int, num_splits: int):
        super().__init__(num_features)
        self.num_splits = num_splits
    def forward(self, x):
        (n, c, h, w), s = x.shape, self.num_splits
        if not self.training or s == 1 or n % s:
            return super().forward(x)
        # fold the groups into the channels, [N, C, H, W] -> [N/s, C*s, H, W], a view in PyTorch's
        # default layout: group j holds samples j, j+s, j+2s, ...
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
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), bn(c_out))
    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))

class ResNet18(nn.Module):
    """ResNet-18 -> [N, 8 * width]; the CIFAR stem (3x3 conv, no max-pool) keeps 32-px images whole."""
    def __init__(self, width: int = 64, cifar_stem: bool = True, bn_splits: int = 1):
        super().__init__()
        bn = functools.partial(SplitBatchNorm, num_splits=bn_splits)   # plain batch norm if bn_splits is 1
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
        return torch.flatten(F.adaptive_avg_pool2d(self.layers(self.stem(x)), 1), 1)   # [N, 8*width]

# ============ 4. The query/key model: encoder_q, its momentum copy encoder_k, the queue ============
class Encoder(nn.Module):
    """Backbone -> MLP head -> unit-length z [N, D], and its cosines with the centroids C, here (ours) so that
    keys and the centroids that assign them share a network. C stacks the heads' centroids: C_K, and
    before it K_c centroids under --clu-targets sinkhorn (CLD's groups need none)."""
    def __init__(self, width: int, dim: int, cifar_stem: bool, bn_splits: int, centroids: int):
        super().__init__()
        self.backbone = ResNet18(width, cifar_stem, bn_splits)
        f = self.backbone.out_dim
        self.projector = nn.Sequential(nn.Linear(f, f), nn.ReLU(), nn.Linear(f, dim))   # MoCo-v2's
        self.C = nn.Parameter(F.normalize(torch.randn(centroids, dim), dim=1))          # C: [sum(heads), D]
        self.register_buffer("C_start", self.C.detach().clone())   # to log how far C has moved
    def forward(self, x):
        h = self.projector(self.backbone(x))                                   # h: [N, D]
        with torch.autocast(x.device.type, enabled=False):   # float32 whatever the autocast (section 12)
            z = F.normalize(h.float(), dim=1)                                  # z: [N, D]
            return z, z @ F.normalize(self.C.float(), dim=1).t()               # z.C: [N, sum(heads)]

class CueCo(nn.Module):
    def __init__(self, width=64, dim=128, queue_size=4096, cifar_stem=True, bn_splits=8, heads=(10,)):
        super().__init__()
        self.heads = list(heads)   # the sizes of C's blocks of rows: [K] (the default) or [K_c, K]
        self.encoder_q = Encoder(width, dim, cifar_stem, bn_splits, sum(heads))
        self.encoder_k = Encoder(width, dim, cifar_stem, bn_splits, sum(heads))
        self.encoder_k.load_state_dict(self.encoder_q.state_dict())
        self.encoder_k.requires_grad_(False)   # it learns only through the momentum update
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, dim), dim=1))   # [K, D]
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
    @torch.no_grad()
    def momentum_update(self, m: float):
        """theta_k <- m theta_k + (1 - m) theta_q, centroids included: with m near 1 the queue's keys, made
        over the last few hundred steps, stay comparable. BN statistics stay the key network's own."""
        torch._foreach_lerp_(list(self.encoder_k.parameters()), list(self.encoder_q.parameters()), 1 - m)
    @torch.no_grad()
    def keys(self, x: torch.Tensor, shuffle: bool = True):
        """Keys [N, D] and cosines [N, sum(heads)] of images x [N, 3, S, S], encoded in a random order of the
        batch, so that a key meets other images in its BN group than its query did; then unshuffled."""
        if not shuffle:
            return self.encoder_k(x)
        idx = torch.randperm(len(x), device=x.device)                  # idx: [N]
        k, s = self.encoder_k(x[idx])                                  # k: [N, D], s: [N, sum(heads)]
        back = torch.argsort(idx)                                      # back: [N]
        return k[back], s[back]
    @torch.no_grad()
    def enqueue(self, k: torch.Tensor):
        """Replace the oldest keys of the queue by k [B, D]."""
        idx = (self.queue_ptr + torch.arange(len(k), device=k.device)) % len(self.queue)   # idx: [B]
        self.queue[idx] = k.to(self.queue.dtype)
        self.queue_ptr.copy_((self.queue_ptr + len(k)) % len(self.queue))

# =========================================== 5. Losses ===========================================
def contrastive_loss(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, T: float) -> torch.Tensor:
    """InfoNCE, L_con = -log exp(q.k+/T) / (exp(q.k+/T) + sum_j exp(q.queue_j/T)): a cross-entropy
    over 1+K logits whose class 0, the positive key, is right. q, k: [N, D], queue: [K, D], unit length."""
    l_pos = (q * k).sum(dim=1, keepdim=True)                           # l_pos: [N, 1]
    l_neg = q @ queue.t()                                              # l_neg: [N, K]
    logits = torch.cat([l_pos, l_neg], dim=1) / T                      # logits: [N, 1+K]
    labels = torch.zeros(len(q), dtype=torch.long, device=q.device)    # labels: [N]
    return F.cross_entropy(logits, labels)                             # a scalar

@torch.no_grad()
def sinkhorn(scores: torch.Tensor, eps: float = 0.05, iters: int = 3) -> torch.Tensor:
    """Balanced soft assignment (Sinkhorn-Knopp, as SwAV): scores [N, K_c] -> Q [N, K_c], each row
    summing to 1, each cluster taking 1/K_c of the batch. Ours, over CoKe's minimal cluster size: both forbid
    one cluster for all, but Sinkhorn is stateless; its price, equal sizes per batch, suits balanced data."""
    logits = scores.float().t() / eps                                  # logits: [K_c, N]
    Q = torch.exp(logits - logits.max())                               # Q: [K_c, N], no overflow
    K_c, N = Q.shape
    Q /= Q.sum()                                                       # Q: [K_c, N], sums to 1
    for _ in range(iters):
        Q /= Q.sum(dim=1, keepdim=True) * K_c                          # each cluster: 1/K_c
        Q /= Q.sum(dim=0, keepdim=True) * N                            # each sample: 1/N
    return (Q * N).t()                                                 # Q: [N, K_c]

def clustering_loss(s_q: torch.Tensor, s_k: torch.Tensor, tau: float, eps: float, heads=None):
    """Ours: L_K = -sum_c Q(k+)_c log softmax(q.C_K / tau)_c, batch mean: the query predicts its key's
    balanced assignment. s_q, s_k: [N, sum(heads)] cosines of query and key with C (gradient: to q and
    C); heads: the sizes of C's blocks, e.g. [K_c, K]: the sum of their losses, each with its own Sinkhorn."""
    heads, loss = [s_q.shape[1]] if heads is None else heads, 0.0   # heads []: no C, no loss
    for sq, sk in zip(s_q.split(heads, dim=1), s_k.split(heads, dim=1)):   # [N, K_h] each
        Q = sinkhorn(sk, eps)                                          # Q: [N, K_h]
        log_p = F.log_softmax(sq.float() / tau, dim=1)                 # log_p: [N, K_h]
        loss = loss - (Q * log_p).sum(dim=1).mean()                    # a scalar
    return loss

def batch_groups(q: torch.Tensor, z: torch.Tensor, K_c: int, iters: int = 5):
    """CLD's targets (Wang et al., CVPR 2021; ours: on z, spherical): k-means of the other view's batch
    z [N, D] into K_c groups, 5 Lloyd steps from its first K_c (the batch is in random order). Returns q's
    cosines with the groups' unit means [N, K_c] (gradient: to q and, as CLD's, z), each image's group [N]."""
    M = z.detach()[:K_c]                                               # M: [K_c, D]
    for _ in range(iters):
        g = (z.detach() @ M.t()).argmax(dim=1)                         # g: [N]
        M = F.normalize(F.one_hot(g, K_c).to(z.dtype).t() @ z.detach(), dim=1)   # M: [K_c, D]; empty: 0
    return q @ F.normalize(F.one_hot(g, K_c).to(z.dtype).t() @ z, dim=1).t(), g   # [N, K_c], [N]

def cueco_loss(model: CueCo, encoder_q: nn.Module, x1: torch.Tensor, x2: torch.Tensor, T: float,
               tau: float, eps: float, lam: float, shuffle: bool = True, K_c: int = 100):
    """L = L_con(q1, k2) + L_con(q2, k1) + lam * (L_clu(q1, k2) + L_clu(q2, k1)) on two views
    [N, 3, S, S], L_clu the mean of the heads': CLD's K_c groups (K_c 0: none) and C's blocks. Returns L,
    its two parts, the keys to enqueue [2N, D] and each cluster's share of the batch, C's last block's
    (C_K's) if any, else the groups'. encoder_q is model.encoder_q, or the same compiled (--compile)."""
    q1, s1 = encoder_q(x1)                                             # q1: [N, D], s1: [N, sum(heads)]
    q2, s2 = encoder_q(x2)                                             # q2: [N, D], s2 alike
    k1, sk1 = model.keys(x1, shuffle)                                  # k1: [N, D], sk1: [N, sum(heads)]
    k2, sk2 = model.keys(x2, shuffle)                                  # k2, sk2 alike; no gradient
    queue = model.queue                                                # queue: [K, D]
    with torch.autocast(x1.device.type, enabled=False):   # logits / T need float32
        l_con = contrastive_loss(q1, k2, queue, T) + contrastive_loss(q2, k1, queue, T)   # scalar
        l_clu = (clustering_loss(s1, sk2, tau, eps, model.heads)
                 + clustering_loss(s2, sk1, tau, eps, model.heads))                     # scalar
        if K_c:   # CLD's head: q1 predicts its image's group t2 among view 2's queries, and vice versa
            (g1, t2), (g2, t1) = batch_groups(q1, q2, K_c), batch_groups(q2, q1, K_c)   # [N, K_c], [N]
            l_clu = l_clu + F.cross_entropy(g1 / tau, t2) + F.cross_entropy(g2 / tau, t1)   # L_grp
        l_clu = l_clu / (len(model.heads) + (K_c > 0))                 # the heads' mean
    s = s1[:, -model.heads[-1]:] if model.heads else g1                # s: [N, K], C_K's (or the groups')
    shares = (s == s.max(dim=1, keepdim=True).values).float().mean(0)  # shares: [K]
    return l_con + lam * l_clu, l_con.detach(), l_clu.detach(), torch.cat([k1, k2]), shares

# ========================================== 6. Training ==========================================
def clustering_weight(lambda_clu: float, epoch: int, epochs: int, clu_warmup: float) -> float:
    """lambda in epoch `epoch` (from 1): lambda * min(1, epoch / (clu_warmup * epochs)). Ours: the clusters
    of early, noisy features are noise, and pulling queries to them fights L_con."""
    if clu_warmup * epochs == 0:
        return lambda_clu
    return lambda_clu * min(1.0, epoch / (clu_warmup * epochs))

def make_optimizer(encoder_q: Encoder, lr: float, weight_decay: float, centroid_lr=1.0) -> torch.optim.SGD:
    """SGD with momentum 0.9; no weight decay on the centroids, of which only the direction counts, and
    centroid_lr times the learning rate (ours): at 1x the centroids lagged the features (README.md)."""
    rest = [p for name, p in encoder_q.named_parameters() if name != "C"]
    return torch.optim.SGD([{"params": rest, "scale": 1.0},
                            {"params": [encoder_q.C], "weight_decay": 0.0, "scale": centroid_lr}],
                           lr=lr, momentum=0.9, weight_decay=weight_decay)

def train(args, model: CueCo, encoder_q: nn.Module, optimizer, scaler, data, device, precision: str,
          start_epoch: int, history: list) -> tuple | None:
    """Epochs start_epoch+1 .. args.epochs, each ending with the kNN monitor (every --eval-every and the
    last), metrics.json and a checkpoint (every --save-minutes at most). Returns the last epoch's features
    (train, test) if it extracted them, for the final evaluation; history grows in place."""
    steps = len(data.train) // args.batch_size
    base_lr = args.lr * args.batch_size / 512   # the recipe's lr is for batch 512
    # Smaller views (--view-scale) cost about (S / H)^2 of a full step and lose little: random crops enlarge
    # objects, so 3/4-size views show them about as large as whole test images do (FixRes, Touvron 2019).
    size = round(args.view_scale * data.image_size)
    last_save, last = time.time(), None
    for epoch in range(start_epoch + 1, args.epochs + 1):
        model.train()
        lam = clustering_weight(args.lambda_clu, epoch, args.epochs, args.clu_warmup)
        # each epoch seeds its own random streams (key shuffles here, views in epoch_views), so a
        # resumed run draws exactly what the uninterrupted one would have
        torch.manual_seed(args.seed * 1009 + epoch)
        sums = torch.zeros(4, device=device)   # L, L_con, L_clu, largest cluster share: on the device
        used = torch.zeros((), dtype=torch.bool, device=device)   # grows to shares' [K]: clusters in use
        t0, mark = time.time(), None   # mark: the time and step of the epoch's first progress line
        views = epoch_views(data, epoch, args.batch_size, args.seed, device, size)
        for step, (x1, x2) in enumerate(views):
            angle = math.pi * ((epoch - 1) * steps + step) / max(1, args.epochs * steps)   # cosine decay
            lr = base_lr * 0.5 * (1 + math.cos(angle))
            for group in optimizer.param_groups:
                group["lr"] = lr * group["scale"]

            with autocast(device, precision):
                loss, l_con, l_clu, keys, shares = cueco_loss(
                    model, encoder_q, x1, x2, args.temperature, args.clu_temperature, args.sinkhorn_eps, lam,
                    K_c=args.num_clusters * (args.clu_targets == "groups"))

            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()   # fp16 only scales; else loss.backward(), optimizer.step()
            scaler.step(optimizer)
            scaler.update()
            model.momentum_update(args.key_momentum)
            model.enqueue(keys)

            sums += torch.stack([loss.detach(), l_con, l_clu, shares.max()])
            used = used | (shares > 0)
            if (step + 1) % args.log_every == 0 or step + 1 == steps:
                avg = (sums / (step + 1)).tolist()   # the epoch's means so far: one host sync
                if not all(map(math.isfinite, avg)):
                    raise CueCoError(f"the loss became NaN/inf in epoch {epoch}; the last checkpoint "
                                     f"is kept in {args.out}; try a lower --lr")
                # the rate since the epoch's first progress line: not slowed by what came before it
                # (compilation, cuDNN's autotuning, the kNN monitor, the last epoch's checkpoint)
                now = time.time()
                t_from, s_from = mark or (t0, 0)
                per_step = (now - t_from) / (step + 1 - s_from)
                mark = mark or (now, step + 1)
                speed = args.batch_size / per_step
                left = ((args.epochs - epoch + 1) * steps - step - 1) * per_step
                print(f"epoch {epoch}/{args.epochs} step {step + 1}/{steps} loss {avg[0]:.3f} "
                      f"(con {avg[1]:.3f} clu {avg[2]:.3f}) max-cluster {avg[3]:.2f} lr {lr:.4f} | "
                      f"{size} px, {speed:.0f} img/s | {datetime.timedelta(seconds=round(left))} left")

        # the end of an epoch: the record, the kNN monitor, metrics.json, a checkpoint
        seconds = time.time() - t0
        avg = (sums / max(1, steps)).tolist()
        # do the centroids learn? the mean angle each has moved since the start (from the chord between
        # unit vectors: acos loses small angles), and the share of them in use
        C = F.normalize(model.encoder_q.C.detach().float(), dim=1)                 # C: [sum(heads), D]
        chord = (C - model.encoder_q.C_start).norm(dim=1)                          # chord: [sum(heads)]
        moved = torch.rad2deg(2 * torch.asin(chord.clamp(max=2) / 2)).sum() / max(1, len(C))   # degrees
        record = {"epoch": epoch, "view_size": size, "loss": avg[0], "loss_contrastive": avg[1],
                  "loss_clustering": avg[2], "max_cluster_share": avg[3], "num_clusters": len(used),
                  "centroids_moved_deg": moved.item(), "centroids_used": used.float().mean().item(),
                  "lambda_clu": lam, "lr": lr, "img_per_s": steps * args.batch_size / seconds,
                  "seconds": seconds}
        if device.type == "cuda":
            record["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
        if epoch == args.epochs or (args.eval_every and epoch % args.eval_every == 0):
            f_train, f_test = features(model.encoder_q.backbone, data, device, precision)
            record["knn"] = knn_accuracy(f_train, data.train_y, f_test, data.test_y)
            last = (f_train, f_test) if epoch == args.epochs else None
            print(f"epoch {epoch}: kNN top-1 {record['knn']:.2f}% ({seconds:.1f}s)")
        history.append(record)
        write_json(os.path.join(args.out, "metrics.json"), {"args": vars(args), "epochs": history})
        if time.time() - last_save >= 60 * args.save_minutes or epoch == args.epochs:
            save_checkpoint(os.path.join(args.out, "checkpoint.pt"), model, optimizer, scaler, epoch,
                            vars(args), history)
            last_save = time.time()
    return last

# ========================= 7. Making it fast: whole batches on the device =========================
# Workers augmenting one image at a time on the CPU would limit CIFAR training on a GPU more than the
# ResNet does. So the training set is decoded once into a uint8 tensor, on the device if it fits, and
# `augment` draws both views of a whole batch there, from `mocov2_transform`'s distribution (tested).
# Nothing in a step waits for the GPU (fp16's gradient scaler aside): statistics stay on the device until
# a progress line, per-batch choices come from `random`, host batches copy from page-locked memory.
def epoch_views(data, epoch: int, batch_size: int, seed: int, device, size: int):
    """Two views [B, 3, size, size] of each batch of an epoch, from the images data.train [N, 3, H, W]."""
    order = torch.Generator(device=data.train.device).manual_seed(seed + epoch)
    perm = torch.randperm(len(data.train), generator=order, device=data.train.device)   # perm: [N]
    s = seed * 100_003 + epoch * 1009
    g, rng = torch.Generator(device=device).manual_seed(s), random.Random(s)
    for i in range(len(perm) // batch_size):
        x = batch_to(data.train, perm[i * batch_size:(i + 1) * batch_size], device)   # x: [B, 3, H, W]
        yield augment(x, size, g, rng), augment(x, size, g, rng)

def batch_to(images: torch.Tensor, idx: torch.Tensor, device) -> torch.Tensor:
    """images[idx] on `device`. From host memory to a GPU: gathered into page-locked memory, whose copy
    runs without stopping the host, so the gathering of the next batch overlaps the GPU's step."""
    if images.device.type != "cpu" or device.type != "cuda":
        return images[idx].to(device)
    x = torch.empty((len(idx), *images.shape[1:]), dtype=images.dtype, pin_memory=True)   # [B, 3, H, W]
    return torch.index_select(images, 0, idx, out=x).to(device, non_blocking=True)

def augment(x: torch.Tensor, size: int, g: torch.Generator | None, rng: random.Random):
    """A random view of each image of a batch, uint8 [B, 3, H, W] -> float [B, 3, size, size] on x's device;
    g draws the per-image parameters there, rng the per-batch ones (jitter order, blur width) on the host."""
    b, H, W = x.shape[0], x.shape[2], x.shape[3]
    def u(*shape):   # uniform random numbers on the device
        return torch.rand(*shape, device=x.device, generator=g)

    x = x.float() / 255                                                # x: [B, 3, H, W]
    # Random resized crop, torchvision's rule: 10 tries of area ~ U(0.2, 1) * H * W and log-aspect
    # ~ U(log 3/4, log 4/3); the first box that fits wins, else the whole image.
    area = H * W * (0.2 + 0.8 * u(b, 10))                              # area: [B, 10]
    aspect = torch.exp(math.log(3 / 4) + math.log(16 / 9) * u(b, 10))  # aspect: [B, 10]
    w = (area * aspect).sqrt().round()                                 # w: [B, 10]
    h = (area / aspect).sqrt().round()                                 # h: [B, 10]
    fits = (w <= W) & (h <= H)                                         # fits: [B, 10]
    first = fits.float().argmax(1, keepdim=True)                       # first: [B, 1]
    w = torch.where(fits.any(1), w.gather(1, first)[:, 0], float(W))   # w: [B]
    h = torch.where(fits.any(1), h.gather(1, first)[:, 0], float(H))   # h: [B]
    top = (u(b) * (H - h + 1)).floor()                                 # top: [B]
    left = (u(b) * (W - w + 1)).floor()                                # left: [B]

    # crop, resize and horizontal flip (p = 0.5) as one bilinear resampling through an affine grid
    flip = torch.where(u(b) < 0.5, -1.0, 1.0)                          # flip: [B]
    theta = torch.zeros(b, 2, 3, device=x.device)                      # theta: [B, 2, 3]
    theta[:, 0, 0] = w / W * flip
    theta[:, 0, 2] = (2 * left + w) / W - 1
    theta[:, 1, 1] = h / H
    theta[:, 1, 2] = (2 * top + h) / H - 1
    grid = F.affine_grid(theta, [b, 3, size, size], align_corners=False)   # grid: [B, S, S, 2]
    # no sample beyond the outermost pixel centres: the zero padding never counts, the output of
    # padding_mode="border", which Apple's MPS lacks before torch 2.13
    grid = torch.stack([grid[..., 0].clamp(-1 + 1 / W, 1 - 1 / W),    # x: the columns
                        grid[..., 1].clamp(-1 + 1 / H, 1 - 1 / H)], dim=-1)   # y: the rows
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    # colour jitter (brightness, contrast, saturation 0.4, hue 0.1) with p = 0.8, else identity
    # factors; the order of the four is drawn per batch (each image's order is still uniform)
    on = (u(b) < 0.8).float()                                          # on: [B]
    bright = (1 + on * (2 * u(b) - 1) * 0.4).view(b, 1, 1, 1)          # bright: [B, 1, 1, 1]
    contrast = (1 + on * (2 * u(b) - 1) * 0.4).view(b, 1, 1, 1)        # contrast: [B, 1, 1, 1]
    sat = (1 + on * (2 * u(b) - 1) * 0.4).view(b, 1, 1, 1)             # sat: [B, 1, 1, 1]
    hue = (on * (2 * u(b) - 1) * 0.1).view(b, 1, 1)                    # hue: [B, 1, 1]
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
    x = torch.where(u(b).view(b, 1, 1, 1) < 0.2, grayscale(x).expand_as(x), x)   # grayscale, p = 0.2

    if H > 64:   # the recipe of the images' own size; blur p = 0.5, sigma ~ U(0.1, 2) per batch
        sigma = rng.uniform(0.1, 2.0)
        blurred = v2.functional.gaussian_blur(x, [blur_kernel(size)] * 2, [sigma, sigma])
        x = torch.where(u(b).view(b, 1, 1, 1) < 0.5, blurred, x)
    return normalize(x, H)                                             # [B, 3, S, S]

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

# ============================ 8. Evaluation: weighted kNN, linear probe ============================
@torch.no_grad()
def features(backbone: nn.Module, data, device, precision="fp32", batch_size=512):
    """Backbone features (float32, on `device`) of the unaugmented training and test images. Leaves the
    backbone in eval mode (batch norm from running statistics); `train` switches back each epoch."""
    backbone.eval()
    out = []
    for images in (data.train, data.test):                             # uint8 [N, 3, S, S]
        with autocast(device, precision):
            f = [backbone(normalize(x.to(device).float() / 255, data.image_size)).float()
                 for x in images.split(batch_size)]                    # [batch, F] each
        out.append(torch.cat(f))                                       # [N, F]
    return out

@torch.no_grad()
def knn_accuracy(train_x, train_y, test_x, test_y, k=200, t=0.1, chunk=1024) -> float:
    """Top-1 accuracy (%) of weighted kNN (Wu et al. 2018, MoCo's monitor): each of the k nearest
    training features (cosine similarity) votes for its class with weight exp(similarity / t)."""
    dev, correct = train_x.device, 0
    train_x = F.normalize(train_x.float(), dim=1)                      # train_x: [N, F]
    test_x = F.normalize(test_x.to(dev).float(), dim=1)                # test_x: [T, F]
    train_y, test_y = train_y.to(dev), test_y.to(dev)                  # [N], [T]
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    for i in range(0, len(test_x), chunk):
        sim = test_x[i:i + chunk] @ train_x.t()                        # sim: [M, N]
        top_sim, top_idx = sim.topk(min(k, len(train_x)), dim=1)       # [M, k]
        votes = torch.zeros(len(sim), num_classes, device=dev)         # votes: [M, classes]
        votes.scatter_add_(1, train_y[top_idx], (top_sim / t).exp())
        correct += (votes.argmax(dim=1) == test_y[i:i + chunk]).sum().item()
    return 100.0 * correct / len(test_x)

def linear_probe(train_x, train_y, test_x, test_y, epochs=100, batch_size=256, lr=1e-2, seed=0) -> float:
    """Top-1 (%) of a linear layer on frozen, standardised features: seconds; the usual protocol
    (100 epochs of augmented images) scores a little higher."""
    g, dev = torch.Generator().manual_seed(seed), train_x.device
    mu, sd = train_x.mean(0, keepdim=True), train_x.std(0, keepdim=True) + 1e-6   # [1, F]
    xtr, xte = (train_x - mu) / sd, (test_x.to(dev) - mu) / sd
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
    with torch.no_grad():
        return 100.0 * (head(xte).argmax(1) == yte).float().mean().item()

# ================= 9. Clustering metrics (k-means, NMI, ARI, matched accuracy), t-SNE =================
@torch.no_grad()
def kmeans(x: torch.Tensor, k: int, iters=100, seed=0) -> torch.Tensor:
    """Lloyd's k-means with k-means++ seeding (one run, as scikit-learn) on unit vectors: [N, F] -> [N]."""
    x, g = F.normalize(x.float(), dim=1), torch.Generator().manual_seed(seed)
    centers = x[torch.randint(len(x), (1,), generator=g).to(x.device)]     # centers: [1, F]
    for _ in range(1, k):   # k-means++: the next centre drawn with probability ~ squared distance
        d2 = torch.cdist(x, centers).min(dim=1).values ** 2                # d2: [N]
        pick = torch.multinomial(d2.cpu() + 1e-12, 1, generator=g)         # pick: [1]
        centers = torch.cat([centers, x[pick.to(x.device)]])
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
    """Contingency table n_ij (points of cluster i in class j) [P, T], the cluster and class values."""
    p_vals, p = pred.long().cpu().unique(return_inverse=True)
    t_vals, t = target.long().cpu().unique(return_inverse=True)
    table = torch.zeros(len(p_vals), len(t_vals), dtype=torch.float64)   # table: [P, T]
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
    def entropy(c):
        return -(c[c > 0] / n * torch.log(c[c > 0] / n)).sum()
    def pairs(c):
        return (c * (c - 1) / 2).sum()

    h_sum = entropy(a) + entropy(b)
    nmi = 1.0 if h_sum == 0 else (2 * mi / h_sum).item()               # I / mean(H(P), H(T))
    expected = pairs(a) * pairs(b) / max(1.0, pairs(n.reshape(1)).item())   # the index by chance
    top = (pairs(a) + pairs(b)) / 2
    ari = 1.0 if top == expected else ((pairs(table) - expected) / (top - expected)).item()
    acc = (match_clusters(pred, target) == target.long().cpu()).double().mean().item()
    return {"nmi": float(nmi), "ari": float(ari), "acc": float(acc)}

@torch.no_grad()
def cluster_exemplars(f: torch.Tensor, clusters: torch.Tensor, n: int = 10) -> torch.Tensor:
    """For each cluster of features f [N, F], its n members nearest its centre (cosine), nearest
    first: indices [k, n], -1 where a cluster has fewer members."""
    f, k, clusters = F.normalize(f.float(), dim=1), int(clusters.max()) + 1, clusters.to(f.device)
    centres = torch.zeros(k, f.shape[1], device=f.device).index_add_(0, clusters, f)   # [k, F]
    sim = f @ F.normalize(centres, dim=1).t()                          # sim: [N, k]
    sim = sim.masked_fill(F.one_hot(clusters, k) == 0, -2.0)           # members only
    top = sim.topk(min(n, len(f)), dim=0)                              # [n, k]
    return torch.where(top.values > -2.0, top.indices, -1).t().cpu()   # [k, n]

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
        exaggeration = 12.0 if it < 250 else 1.0
        momentum = 0.5 if it < 250 else 0.8                            # of the descent, t-SNE's own
        w = 1 / (1 + torch.cdist(y, y) ** 2)                           # w: [N, N]
        w.fill_diagonal_(0)
        Q = (w / w.sum()).clamp_min(1e-12)                             # Q_ij: [N, N]
        m = (exaggeration * P - Q) * w                                 # m: [N, N]
        # dC/dy_i = 4 sum_j (p_ij - q_ij) w_ij (y_i - y_j)
        grad = 4 * (m.sum(1, keepdim=True) * y - m @ y)                # grad: [N, 2]
        gains = torch.where((grad > 0) == (update > 0), gains * 0.8, gains + 0.2).clamp_min(0.01)   # [N, 2]
        update = momentum * update - lr * gains * grad                 # update: [N, 2]
        y = y + update
        y = y - y.mean(0)                                              # y: [N, 2]
    return y

# ============== 10. Figures (matplotlib's object API: no global state, no display needed) ==============
def plot_tsne(y, labels, clusters, classes: list, path: str, title: str = "", what="k-means cluster"):
    """The t-SNE coloured by true class, and by cluster (`what` kind) in the colour of its matched class."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(13, 6.2), dpi=110)
    cmap = "tab10" if len(classes) <= 10 else "tab20"
    for ax, c, name in zip(fig.subplots(1, 2), (labels, clusters), ("true class", what)):
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
                                       nrow=len(images[0]), padding=2, pad_value=255)   # [3, H, W]
    fig = Figure(figsize=(1 + 0.6 * len(images[0]), 0.3 + 0.6 * len(images)), dpi=110)
    ax = fig.subplots()
    ax.imshow(grid.permute(1, 2, 0).numpy())
    ax.set(xticks=[], yticks=[(size + 2) * (i + 0.5) for i in range(len(names))], yticklabels=names)
    ax.set_title(title, fontsize=9)
    fig.savefig(path, bbox_inches="tight")   # room for the row labels and the title

def plot_curves(history: list, path: str, title: str = ""):
    """Both losses, the kNN monitor, and the largest cluster's share of a batch (near 1: collapse)."""
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

# ====================== 11. Data sets: CIFAR-10/100 (and CIFAR-20), image folders ======================
# What a run trains and evaluates on: uint8 images [N, 3, S, S] and labels [N] (the training ones are also
# the kNN bank and the probe's training set); test_y20: CIFAR-100's 20 superclasses, else None.
Data = collections.namedtuple("Data", ["train", "train_y", "test", "test_y", "classes", "image_size",
                                       "test_y20"], defaults=[None])

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
        out[256 * i:256 * i + len(x)] = x                              # x: [256, 3, S, S]
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
    folder = torchvision.datasets.folder
    index = {c: i for i, c in enumerate(classes)}
    samples = folder.make_dataset(path, index, folder.IMG_EXTENSIONS, allow_empty=True) if classes else []
    if not samples:
        raise CueCoError(f"data folder {path} holds no images (expected class folders: {path}/cat/1.png)")
    return samples, classes

def load_folder(args) -> Data:
    """An image folder, decoded: 32 px as they are, large images resized to 256 and centre-cropped to 224."""
    root, keep = args.data_dir, None
    if args.class_list:
        try:
            with open(args.class_list) as f:
                keep = f.read().split()   # one class folder name per line
        except OSError as e:
            raise CueCoError(f"cannot read --class-list {args.class_list}: {e.strerror}") from None
    test_dir = "test" if os.path.isdir(os.path.join(root, "test")) else "val"   # ImageNet's: val/
    train, classes = scan(os.path.join(root, "train"), keep)
    test, test_classes = scan(os.path.join(root, test_dir), keep)
    if test_classes != classes:
        raise CueCoError(f"train/ and {test_dir}/ in {root} have different class folders")
    train = [train[i] for i in balanced_subset(torch.tensor([y for _, y in train]), args.limit_train,
                                               args.seed)]
    test = [test[i] for i in balanced_subset(torch.tensor([y for _, y in test]), args.limit_test, args.seed)]
    ys = [torch.tensor([y for _, y in s]) for s in (train, test)]
    size = args.image_size or max(read_image(train[0][0]).size)
    size = size if args.image_size or size <= 64 else 224              # large images: 224 px
    resize = [v2.Resize((size, size))] if size <= 64 else [v2.Resize(size * 8 // 7), v2.CenterCrop(size)]
    plain = v2.Compose([v2.PILToTensor(), *resize])                    # uint8 [3, S, S]
    xs = [decode(s, plain, size, args.num_workers) for s in (train, test)]   # [N, 3, S, S], [T, 3, S, S]
    return Data(xs[0], ys[0], xs[1], ys[1], classes, size)

def load_cifar(args) -> Data:
    """CIFAR-10 or CIFAR-100 through torchvision, downloaded if need be, as uint8 tensors."""
    name, root = args.dataset, args.data_dir
    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    try:
        sets = [cls(root, train=True, download=True), cls(root, train=False, download=True)]
    except Exception as e:
        raise CueCoError(f"could not load or download {name} into {root} ({type(e).__name__}: "
                         f"{str(e)[:80]}); without internet, download {cls.filename} from {cls.url} "
                         f"elsewhere and put it into {root} by hand, or use --dataset folder") from None
    xs = [torch.as_tensor(s.data).permute(0, 3, 1, 2).contiguous() for s in sets]   # uint8 [N, 3, 32, 32]
    ys = [torch.as_tensor(s.targets) for s in sets]
    train = balanced_subset(ys[0], args.limit_train, args.seed)
    test = balanced_subset(ys[1], args.limit_test, args.seed)
    y20 = None
    if name == "cifar100":   # the coarse labels that CIFAR-100's own test file carries
        with open(os.path.join(root, cls.base_folder, "test"), "rb") as f:
            y20 = torch.tensor(pickle.load(f, encoding="latin1")["coarse_labels"])[test]
    return Data(xs[0][train], ys[0][train], xs[1][test], ys[1][test], sets[1].classes, 32, y20)

# ============================ 12. Plumbing: device, precision, checkpoints ============================
def setup_device(name: str) -> torch.device:
    try:
        device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)
        # a real kernel, read back, fails here on a GPU this PyTorch build has no code for (allocating passes)
        (torch.ones(2, device=device) * 2).sum().item()
    except Exception as e:
        msg = str(e).splitlines()[0][:80]
        if "no kernel image" in msg:   # e.g. a V100 (sm_70) with the cu128/cu130 wheels of torch >= 2.11
            msg += ("; this PyTorch build has no code for this GPU: install one built for it, e.g. "
                    "pip install torch torchvision --index-url https://download.pytorch.org/whl/cu126")
        raise CueCoError(f"--device {name} cannot be used here ({msg})") from None
    if device.type == "cuda":   # --device cuda:1 is made the current GPU too
        device = torch.device("cuda", device.index or 0)
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True   # every batch has the same shape: the fastest kernels
    return device

def train_set_place(nbytes: int, device, memory_gb: float) -> tuple:
    """Where the training images live, and the words for it: on the device when they fit in --memory-gb
    and half a GPU's free memory (ImageNet-100 training at width 64 takes 6-8 GB), else in host memory."""
    size, host = f"{nbytes / 2**30:.1f} GB", torch.device("cpu")
    if nbytes > memory_gb * 2**30:
        return host, f"in host memory ({size}, over --memory-gb {memory_gb:g})"
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else float("inf")
    if nbytes > free / 2:
        return host, f"in host memory ({size}, over half of the GPU's free {free / 2**30:.1f} GB)"
    return device, f"on {device} ({size})"

def pick_precision(device, precision: str = "auto") -> tuple:
    """(precision, why). auto: bf16 where native (CUDA capability 8.0+; CPUs with AVX512-BF16 or AMX), fp16
    and a gradient scaler on older GPUs (T4, V100: bf16 leaves cuDNN), else fp32: other CPUs emulate bf16,
    15x slower here (README.md); on MPS both fail (PyTorch issues 142397, 154887)."""
    if device.type == "mps" and precision in ("bf16", "fp16"):
        raise CueCoError(f"--precision {precision} fails on MPS (the fp16 gradient scaler needs float64, and "
                         f"batch norm in eval mode under autocast aborts): use --precision fp32")
    if precision != "auto":
        return precision, "--precision"
    if device.type == "cuda":
        if torch.cuda.get_device_capability(device) >= (8, 0):
            return "bf16", "native on this GPU"
        return "fp16", "no native bf16 on this GPU"
    if device.type == "cpu" and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()):
        return "bf16", "native on this CPU: AVX512-BF16 or AMX"
    return "fp32", f"no native bf16 on this {device.type.upper()}"

def autocast(device, precision: str):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    return torch.autocast(device.type, dtype=dtype, enabled=precision != "fp32")

CHECKPOINT_FORMAT = "cueco-checkpoint-v2"   # v2: C without unused rows

def save_checkpoint(path: str, model, optimizer, scaler, epoch: int, config: dict, history: list):
    """Written to a temporary file and renamed over the old one: a crash never leaves half a checkpoint.
    Width 64: 140 MB; README.md ("It fails gracefully") gives the time to write it, measured."""
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
        if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"format is not {CHECKPOINT_FORMAT}")
        if model is not None:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            if ckpt.get("scaler"):   # empty unless fp16: the loss scale, as it had adapted
                scaler.load_state_dict(ckpt["scaler"])
    except Exception as e:
        raise CueCoError(f"--resume {path} is not a checkpoint of this script, or of another model "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:100]})") from None
    return ckpt

def write_json(path: str, obj):
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)

# ============== 13. Main: data, model, resume, train, evaluate, figures, metrics.json ==============
def run(argv=None) -> dict:
    args = parse_args(argv)
    device = setup_device(args.device)
    precision, why = pick_precision(device, args.precision)
    preset = " ".join(f"--{k.replace('_', '-')} {getattr(args, k)}" for k in PRESETS[args.preset])
    why_preset = {"paper": "the paper's setting, 9-13 h on a T4 by estimate; 200 epochs: --preset gpu",
                  "gpu": "fits a free Colab session; the paper's 800 epochs: --preset paper",
                  "laptop": "no CUDA GPU; the paper's 800 epochs at width 64, weeks here: --preset paper"}
    print(f"preset {args.preset} ({why_preset[args.preset]}): {preset or 'the parser defaults'} | {device}, "
          f"{precision} ({why})")

    torch.manual_seed(args.seed)
    data = load_folder(args) if args.dataset == "folder" else load_cifar(args)
    if args.epochs > 0 and len(data.train) < args.batch_size:
        raise CueCoError(f"--batch-size {args.batch_size} exceeds the {len(data.train)} training images")
    where, place = train_set_place(data.train.numel(), device, args.memory_gb)
    data = data._replace(train=data.train.to(where))

    K = len(data.classes) if args.head_clusters is None else args.head_clusters   # C's blocks:
    heads = [args.num_clusters] * (args.clu_targets == "sinkhorn") + [K] * (K > 0)   # no groups there
    model = CueCo(args.width, args.dim, args.queue_size, data.image_size <= 64, args.bn_splits,
                  heads).to(device)
    optimizer = make_optimizer(model.encoder_q, args.lr, args.weight_decay, args.centroid_lr)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")   # fp16 gradients underflow
    history, start_epoch = [], 0
    if args.resume:
        ckpt = load_checkpoint(args.resume, model, optimizer, scaler)
        history, start_epoch = ckpt["history"], ckpt["epoch"]
        print(f"resumed from {args.resume} at epoch {start_epoch}")
    encoder_q = model.encoder_q   # the step calls it; checkpoints save the plain model's state
    if args.compile:   # static shapes: every batch has the same size
        encoder_q = torch.compile(model.encoder_q, dynamic=False)
        model.encoder_k.compile(dynamic=False)
    print(f"{method_name(args)} on {data_name(args)}: {len(data.train)} train, {len(data.test_y)} test "
          f"images, {data.image_size} px, ResNet-18 width {args.width}, training images {place}")

    try:
        feats = train(args, model, encoder_q, optimizer, scaler, data, device, precision, start_epoch,
                      history)
        return report(args, model, data, device, precision, history, feats)
    except (KeyboardInterrupt, torch.cuda.OutOfMemoryError) as e:   # one line, and how to go on
        what = "interrupted" if isinstance(e, KeyboardInterrupt) else (
            f"out of memory on {device} at --batch-size {args.batch_size}, --width {args.width}: try "
            f"--batch-size {args.batch_size // 2} or --preset laptop")
        path = os.path.join(args.out, "checkpoint.pt")
        if not os.path.isfile(path):
            raise CueCoError(f"{what}; no checkpoint yet (see --save-minutes)") from None
        epoch = load_checkpoint(path)["epoch"]
        then = "finish the evaluation" if epoch == args.epochs else "continue"
        raise CueCoError(f"{what}; the checkpoint of epoch {epoch} is in {path}; {then} with: "
                         f"python cueco.py --resume {path}") from None

def method_name(args) -> str:
    return "CueCo" if args.lambda_clu else "MoCo-v2 (lambda_clu 0)"

@torch.no_grad()
def report(args, model, data, device, precision, history, feats=None) -> dict:
    """kNN, linear probe, NMI/ARI/ACC of k-means on the backbone (CIFAR-20's: suffix 20), on z (z_) and of
    the own clusters (head_); the figures; metrics.json. feats: the last epoch's features, if any."""
    f_train, f_test = feats or features(model.encoder_q.backbone, data, device, precision)
    final = {"knn": knn_accuracy(f_train, data.train_y, f_test, data.test_y)}
    with torch.enable_grad():
        final["linear"] = linear_probe(f_train, data.train_y, f_test, data.test_y, seed=args.seed)
    clusters = kmeans(f_test, len(data.classes), seed=args.seed)       # clusters: [N_test]
    final.update(cluster_metrics(clusters, data.test_y))
    final["largest_kmeans_cluster"] = torch.bincount(clusters).max().item() / len(clusters)
    if data.test_y20 is not None:
        coarse = cluster_metrics(kmeans(f_test, 20, seed=args.seed), data.test_y20)
        final.update({k + "20": v for k, v in coarse.items()})
    z = F.normalize(model.encoder_q.projector(f_test), dim=1)          # z: [N_test, D]
    final.update({"z_" + k: v for k, v in cluster_metrics(kmeans(z, len(data.classes), seed=args.seed),
                                                          data.test_y).items()})
    own = args.lambda_clu and args.head_clusters != 0   # the own clusters: the nearest centroid of C_K
    if own:
        C_K = F.normalize(model.encoder_q.C[-model.heads[-1]:].float(), dim=1)   # C_K: [K, D]
        clusters = (z @ C_K.t()).argmax(dim=1)                         # clusters: [N_test]
        final.update({"head_" + k: v for k, v in cluster_metrics(clusters, data.test_y).items()})

    name, what = data_name(args), "own cluster (argmax z.C_K)" if own else "k-means cluster"
    title = f"{method_name(args)} on {name}, epoch {args.epochs}"
    matched = match_clusters(clusters, data.test_y)   # each test image's cluster, named as its class
    if args.tsne_points:
        idx = balanced_subset(data.test_y, min(args.tsne_points, len(f_test)), seed=0)   # idx: [n]
        emb = tsne(f_test[idx.to(device)], seed=args.seed)             # emb: [n, 2]
        plot_tsne(emb, data.test_y[idx], matched[idx], data.classes,
                  os.path.join(args.figures_dir, f"tsne_{name}.png"), f"{title}: kNN {final['knn']:.1f}%, "
                  f"NMI {final['head_nmi' if own else 'nmi']:.3f} ({len(idx)} test images)", what)

    # what the network groups without labels: for each cluster (up to 20), the images nearest its centre
    rows = cluster_exemplars(z if own else f_test, clusters)[:20]      # rows: [<=20, 10]
    images = [[data.test[i] if i >= 0 else None for i in row] for row in rows.tolist()]   # uint8 [3, S, S]
    cls = [int(matched[row[0]]) if row[0] >= 0 else -1 for row in rows.tolist()]   # -1: no class left
    names = [f"{int((clusters == c).sum())} ~ {data.classes[k] if k >= 0 else ''}" for c, k in enumerate(cls)]
    plot_clusters(images, names, os.path.join(args.figures_dir, f"clusters_{name}.png"),
                  f"{title}\nthe test images nearest the centre of each {what} (row: size ~ matched class)")
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

if __name__ == "__main__":
    sys.stdout.reconfigure(line_buffering=True)   # each progress line reaches a log file at once
    main()
