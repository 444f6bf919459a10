"""CueCo: Cluster Contrast for unsupervised visual representation learning, in one file.

What CueCo is
-------------
CueCo (Cluster Contrast, arXiv:2507.12359, ICIP 2025, https://arxiv.org/abs/2507.12359) learns image
features without labels by optimising two objectives at once on a MoCo-style query/key pair:

* a *contrastive* loss that pushes every image away from all others (inter-class separation):
  InfoNCE of a query q against its positive key k+ and a queue of K past keys,
      L_con = -log exp(q.k+ / T) / (exp(q.k+ / T) + sum_j exp(q.k_j / T))
* a *clustering* loss that pulls features of one cluster together (intra-class compactness). The paper
  does not publish its formula; ours (labelled as our choice everywhere below) keeps K centroids C on the
  unit sphere, assigns each key to clusters under an equal-size constraint (Sinkhorn-Knopp), and asks
  the query of the other view to predict that assignment:
      L_clu = -sum_c Q(k)_c log softmax(q.C / tau)_c
  total loss = L_con + lambda * L_clu, symmetrised over the two views, with lambda ramped up from 0
  over the first half of training (our choice, from measurements). lambda = 0 is plain MoCo-v2.

The key network is never trained by gradients: it is an exponential moving average of the query network,
theta_k <- m theta_k + (1 - m) theta_q, which keeps the keys in the queue consistent with each other.

Papers: CueCo arXiv:2507.12359; MoCo arXiv:1911.05722; MoCo-v2 arXiv:2003.04297; SwAV (Sinkhorn
assignment) arXiv:2006.09882; CoKe (constrained k-means) arXiv:2105.11527; Contrastive Clustering
arXiv:2009.09687.

Run it
------
GPU (one card; the paper's setting, 800 epochs):
    python cueco.py --dataset cifar10
Laptop CPU (minutes; a narrow network on 5,000 images, see README for the measured time and result):
    python cueco.py --dataset cifar10 --width 16 --limit-train 5000 --limit-test 2000 --epochs 20 \
        --batch-size 256 --eval-every 5
Several GPUs:
    torchrun --nproc_per_node=4 cueco.py --dataset folder --data-dir imagenet100 --image-size 224

Results measured so far (README: commands, machine, seeds, and the paper's numbers in their own column):
  laptop recipe above on the JPEG CIFAR-10 copy, 2 CPU cores, 7 minutes a run, mean of three seeds:
      CueCo   kNN 39.4%  linear 44.4%  NMI 0.143  ARI 0.072  ACC 0.257
      MoCo-v2 kNN 38.5%  linear 43.1%  NMI 0.143  ARI 0.074  ACC 0.259   (--lambda-clu 0)
      untrained network: kNN 25.0%, linear 34.7%
  Paper (ResNet-18, linear): 91.40% CIFAR-10, 68.56% CIFAR-100, 78.65% ImageNet-100; not reproduced here,
  since no GPU was available to measure the full schedule.

The file reads top to bottom in the order the data flows:
  1 configuration   2 data and augmentation   3 backbone   4 query/key model   5 losses
  6 kNN monitor     7 linear probe            8 clustering metrics   9 t-SNE   10 figures
  11 distributed helpers and checkpoints      12 training loop       13 main
"""

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.transforms import v2 as T


# =====================================================================================================
# 1. Configuration
# =====================================================================================================

class CueCoError(Exception):
    """A problem with the user's input or environment: printed as one line, exit code 2, no traceback."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cueco.py", description="CueCo: Cluster Contrast self-supervised learning (single file).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    # data
    a("--dataset", default="cifar10", help="cifar10 | cifar100 | stl10 | folder")
    a("--data-dir", default=None, help="where CIFAR/STL is (or is downloaded to), or the folder with "
      "train/ and test/ for --dataset folder [default: data/<dataset>]")
    a("--image-size", type=int, default=0, help="training resolution; 0 = the data set's own "
      "(32 CIFAR, 96 STL-10, a folder's first image if <= 64 px, else 224)")
    a("--class-list", default=None, help="text file of class folder names to keep, one per line (e.g. "
      "the usual ImageNet-100 list); --dataset folder only")
    a("--limit-train", type=int, default=0, help="use N training images, class-balanced (0 = all)")
    a("--limit-test", type=int, default=0, help="use N test images, class-balanced (0 = all)")
    a("--data-path", default="auto", choices=["auto", "memory", "stream", "torchvision"],
      help="memory: data set on the device, whole batches augmented there; stream: DataLoader workers "
      "crop, the device does the rest; torchvision: the classic per-image pipeline (for comparison); "
      "auto: memory when the images fit in --memory-gb")
    a("--memory-gb", type=float, default=4.0, help="largest training set (uint8) that auto keeps in memory")
    a("--num-workers", type=int, default=min(8, os.cpu_count() or 1), help="DataLoader workers")
    # model
    a("--width", type=int, default=64, help="base channels of the ResNet-18 (64 = standard)")
    a("--dim", type=int, default=128, help="embedding dimension of the projection head")
    a("--bn-splits", type=int, default=8, help="split batch norm groups in the global batch")
    # method
    a("--queue-size", type=int, default=4096, help="K negatives in the queue")
    a("--temperature", type=float, default=0.1, help="T of the contrastive loss")
    a("--momentum", type=float, default=0.99, help="m of the key network's moving average")
    a("--num-clusters", type=int, default=100, help="centroids C of the clustering loss (our choice)")
    a("--lambda-clu", type=float, default=1.0, help="weight of the clustering loss; 0 = MoCo-v2")
    a("--clu-temperature", type=float, default=0.1, help="tau of the clustering softmax (our choice)")
    a("--sinkhorn-eps", type=float, default=0.05, help="entropy of the balanced assignment (our choice)")
    a("--clu-warmup", type=float, default=0.5, help="fraction of the epochs over which lambda ramps up "
      "linearly from 0 (our choice: the clustering targets mean little before the features do)")
    # optimisation
    a("--epochs", type=int, default=800, help="training epochs (0 = evaluate the untrained network)")
    a("--batch-size", type=int, default=512, help="global batch size")
    a("--lr", type=float, default=0.06, help="SGD learning rate for batch 512 (scaled linearly)")
    a("--weight-decay", type=float, default=5e-4)
    a("--compile", action="store_true", help="torch.compile the query network")
    a("--benchmark", type=int, default=0, metavar="STEPS", help="only time STEPS training steps of the "
      "memory and torchvision data paths (images/s, data share of a step) and exit")
    # evaluation and output
    a("--eval-every", type=int, default=10, help="kNN monitor every N epochs (0 = only at the end)")
    a("--tsne-points", type=int, default=2000, help="test points in the t-SNE figure")
    a("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    a("--seed", type=int, default=0)
    a("--log-every", type=int, default=20, help="steps between progress updates")
    a("--out", default=None, help="checkpoint.pt and metrics.json go here [default: runs/<data set or "
      "folder name>]")
    a("--figures-dir", default="figures")
    a("--resume", default=None, help="checkpoint.pt to continue from (its settings are the defaults)")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """Parse flags. With --resume, the checkpoint's own settings become the defaults, so that
    `python cueco.py --resume runs/cifar10/checkpoint.pt` continues the same run to the same end."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.resume:
        ckpt = load_checkpoint(args.resume)
        known = {k: v for k, v in ckpt["args"].items() if k != "resume"}
        parser.set_defaults(**known)
        args = parser.parse_args(argv)
    args.data_dir = args.data_dir or os.path.join("data", args.dataset)
    args.out = args.out or os.path.join("runs", data_name(args))
    check_args(args)
    return args


def data_name(args) -> str:
    """Names figures: the data set, or for a folder the folder's own name (e.g. cifar10-jpeg)."""
    if args.dataset != "folder":
        return args.dataset
    return os.path.basename(os.path.normpath(args.data_dir)) or "folder"


def method_name(args) -> str:
    return "MoCo-v2 (lambda_clu 0)" if args.lambda_clu == 0 else "CueCo"


def check_args(args) -> None:
    if args.dataset not in ("cifar10", "cifar100", "stl10", "folder"):
        raise CueCoError(f"unknown data set '{args.dataset}': choose cifar10, cifar100, stl10 or folder")
    positive = ["batch_size", "width", "dim", "queue_size", "num_clusters", "bn_splits", "log_every"]
    for name in positive:
        if getattr(args, name) <= 0:
            raise CueCoError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name in ["epochs", "limit_train", "limit_test", "eval_every", "num_workers", "image_size",
                 "tsne_points"]:
        if getattr(args, name) < 0:
            raise CueCoError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    for name in ["lr", "temperature", "clu_temperature", "sinkhorn_eps", "memory_gb"]:
        if not getattr(args, name) > 0:
            raise CueCoError(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    if args.lambda_clu < 0 or args.weight_decay < 0:
        raise CueCoError("--lambda-clu and --weight-decay must be >= 0")
    if not 0 <= args.clu_warmup <= 1:
        raise CueCoError(f"--clu-warmup is a fraction of the epochs, in [0, 1], got {args.clu_warmup}")
    if not 0 <= args.momentum < 1:
        raise CueCoError(f"--momentum must be in [0, 1), got {args.momentum}")
    if args.queue_size < 2 * args.batch_size:
        raise CueCoError(f"--queue-size ({args.queue_size}) must hold at least one step of keys "
                         f"(2 x --batch-size = {2 * args.batch_size})")
    if args.batch_size % args.bn_splits:
        raise CueCoError(f"--batch-size ({args.batch_size}) must be divisible by --bn-splits "
                         f"({args.bn_splits})")


# =====================================================================================================
# 2. Data and augmentation
# =====================================================================================================
# Training images are kept as uint8 [N, 3, S, S] tensors on the training device whenever they fit
# (CIFAR: 150 MB), and both views of a whole batch are made there in one go by `augment`. That removes
# the usual bottleneck of CIFAR self-supervised learning: per-image PIL transforms on a few CPU workers.

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

# CIFAR-100's 20 superclasses ("CIFAR-20" in the clustering papers), in the index order of its meta file.
CIFAR100_SUPERCLASSES = {
    "aquatic_mammals": ["beaver", "dolphin", "otter", "seal", "whale"],
    "fish": ["aquarium_fish", "flatfish", "ray", "shark", "trout"],
    "flowers": ["orchid", "poppy", "rose", "sunflower", "tulip"],
    "food_containers": ["bottle", "bowl", "can", "cup", "plate"],
    "fruit_and_vegetables": ["apple", "mushroom", "orange", "pear", "sweet_pepper"],
    "household_electrical_devices": ["clock", "keyboard", "lamp", "telephone", "television"],
    "household_furniture": ["bed", "chair", "couch", "table", "wardrobe"],
    "insects": ["bee", "beetle", "butterfly", "caterpillar", "cockroach"],
    "large_carnivores": ["bear", "leopard", "lion", "tiger", "wolf"],
    "large_man-made_outdoor_things": ["bridge", "castle", "house", "road", "skyscraper"],
    "large_natural_outdoor_scenes": ["cloud", "forest", "mountain", "plain", "sea"],
    "large_omnivores_and_herbivores": ["camel", "cattle", "chimpanzee", "elephant", "kangaroo"],
    "medium_mammals": ["fox", "porcupine", "possum", "raccoon", "skunk"],
    "non-insect_invertebrates": ["crab", "lobster", "snail", "spider", "worm"],
    "people": ["baby", "boy", "girl", "man", "woman"],
    "reptiles": ["crocodile", "dinosaur", "lizard", "snake", "turtle"],
    "small_mammals": ["hamster", "mouse", "rabbit", "shrew", "squirrel"],
    "trees": ["maple_tree", "oak_tree", "palm_tree", "pine_tree", "willow_tree"],
    "vehicles_1": ["bicycle", "bus", "motorcycle", "pickup_truck", "train"],
    "vehicles_2": ["lawn_mower", "rocket", "streetcar", "tank", "tractor"],
}


def cifar100_coarse_targets(fine_classes: list) -> torch.Tensor:
    """Superclass index of each fine class name: [100] -> values in 0..19."""
    coarse_of = {fine: i for i, fines in enumerate(CIFAR100_SUPERCLASSES.values()) for fine in fines}
    return torch.tensor([coarse_of[name] for name in fine_classes])


@dataclass
class Data:
    """Everything the run needs. Images are uint8 tensors [N, 3, S, S] (memory path) or Datasets that
    yield uint8 tensors (stream path). `train` is what self-supervised training sees; `bank` (labelled,
    often the same images) feeds the kNN monitor and the linear probe."""
    train: object
    bank: object
    bank_y: torch.Tensor
    test: object
    test_y: torch.Tensor
    classes: list
    image_size: int
    coarse: Optional[torch.Tensor] = None   # fine label -> superclass (CIFAR-100 only)


def balanced_subset(labels: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """Indices of n samples with (nearly) equal counts per class, drawn reproducibly."""
    if n <= 0 or n >= len(labels):
        return torch.arange(len(labels))
    g = torch.Generator().manual_seed(seed)
    classes = labels.unique()
    per_class = [torch.nonzero(labels == c).flatten() for c in classes]
    per_class = [idx[torch.randperm(len(idx), generator=g)] for idx in per_class]
    take, i = [], 0
    while len(take) < n:   # round-robin over classes keeps the counts within one of each other
        pool = per_class[i % len(classes)]
        j = i // len(classes)
        if j < len(pool):
            take.append(pool[j])
        i += 1
    return torch.stack(take).sort().values


def read_image(path: str):
    """An image file (JPEG, PNG, ...) -> an RGB image, read by torchvision's own ImageFolder loader."""
    try:
        return torchvision.datasets.folder.default_loader(path)
    except Exception as e:
        raise CueCoError(f"cannot read image {path}: {str(e).splitlines()[0][:100]}") from None


class ImageFiles(torch.utils.data.Dataset):
    """Image files (path, label) -> uint8 [3, S, S]. `mode` is 'resize' (whole image to S x S, for data
    that is stored small), 'center' (short side to S*8/7, centre crop S: the usual evaluation view), or
    'two_crops' (two independent random-resized crops + flips: the stream path's training views)."""

    def __init__(self, samples, size, mode, scale=(0.2, 1.0)):
        self.samples, self.size, self.mode = samples, size, mode
        if mode == "resize":
            self.tf = T.Compose([T.PILToTensor(), T.Resize((size, size), antialias=True)])
        elif mode == "center":
            self.tf = T.Compose([T.PILToTensor(), T.Resize(int(size * 8 / 7), antialias=True),
                                 T.CenterCrop(size)])
        else:
            self.tf = T.Compose([T.PILToTensor(), T.RandomResizedCrop(size, scale=scale, antialias=True),
                                 T.RandomHorizontalFlip()])

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, label = self.samples[i]
        img = read_image(path)
        if self.mode == "two_crops":
            return self.tf(img), self.tf(img)
        return self.tf(img), label


class TorchvisionTwoViews(torch.utils.data.Dataset):
    """The classic per-image path: torchvision transforms on one uint8 image at a time, in workers."""

    def __init__(self, images: torch.Tensor, transform):
        self.images, self.transform = images, transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.transform(self.images[i]), self.transform(self.images[i])


def torchvision_augmentation(size: int, mean, std, blur: bool):
    """The MoCo-v2 recipe as torchvision transforms, per image: the reference that `augment` replaces."""
    tfs = [T.RandomResizedCrop(size, scale=(0.2, 1.0), antialias=True), T.RandomHorizontalFlip(),
           T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), T.RandomGrayscale(p=0.2)]
    if blur:
        tfs.append(T.RandomApply([T.GaussianBlur(blur_kernel_size(size), (0.1, 2.0))], p=0.5))
    return T.Compose(tfs + [T.ToDtype(torch.float32, scale=True), T.Normalize(mean, std)])


def blur_kernel_size(size: int) -> int:
    return max(3, int(0.1 * size) // 2 * 2 + 1)   # about 10% of the image, odd (MoCo-v2: 23 at 224)


def decode_all(dataset, workers: int, what: str) -> tuple:
    """Decode a whole Dataset of (uint8 image, label) into one uint8 tensor [N, 3, S, S] and labels [N]."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=256, num_workers=workers)
    xs, ys = [], []
    for x, y in loader:
        xs.append(x)
        ys.append(y)
    if not xs:
        raise CueCoError(f"no images in {what}")
    return torch.cat(xs), torch.cat(ys)


def scan_folder(root: str, split: str, keep: Optional[list] = None) -> tuple:
    """(path, label) pairs and class names of root/split/<class>/<image>, optionally only the classes
    named in `keep` (labels renumbered 0..len(keep)-1 in sorted order)."""
    path = os.path.join(root, split)
    if not os.path.isdir(path):
        raise CueCoError(f"data folder {path} does not exist (--dataset folder needs train/ and test/ "
                         f"(or val/) folders of class folders, as torchvision's ImageFolder reads)")
    empty = CueCoError(f"data folder {path} holds no images (expected class folders of images, such as "
                       f"{path}/cat/0001.png)")
    if not any(e.is_dir() for e in os.scandir(path)):
        raise empty
    try:
        folder = torchvision.datasets.ImageFolder(path, allow_empty=True)
    except Exception as e:
        raise CueCoError(f"cannot read data folder {path}: {e}") from None
    samples, classes = folder.samples, folder.classes
    if keep is not None:
        missing = sorted(set(keep) - set(classes))
        if missing:
            raise CueCoError(f"--class-list names classes that {path} does not have: {missing[:5]}")
        classes = sorted(set(keep))
        new_label = {folder.class_to_idx[c]: i for i, c in enumerate(classes)}
        samples = [(p, new_label[y]) for p, y in samples if y in new_label]
    if len(samples) == 0:
        raise empty
    return samples, classes


def load_torchvision_set(name: str, root: str):
    """CIFAR-10/100 or STL-10 through torchvision, downloaded when missing; uint8 tensors."""
    cls = {"cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100,
           "stl10": torchvision.datasets.STL10}[name]
    try:
        if name == "stl10":
            splits = [cls(root, split=s, download=True) for s in ("train+unlabeled", "train", "test")]
            to_t = [torch.as_tensor(s.data) for s in splits]                  # already [N, 3, 96, 96]
            ys = [torch.as_tensor(s.labels) for s in splits]
            return to_t[0], to_t[1], ys[1], to_t[2], ys[2], splits[1].classes
        tr, te = cls(root, train=True, download=True), cls(root, train=False, download=True)
    except Exception as e:
        file, url = {"cifar10": ("cifar-10-python.tar.gz", "https://www.cs.toronto.edu/~kriz/cifar.html"),
                     "cifar100": ("cifar-100-python.tar.gz", "https://www.cs.toronto.edu/~kriz/cifar.html"),
                     "stl10": ("stl10_binary.tar.gz", "https://cs.stanford.edu/~acoates/stl10/")}[name]
        raise CueCoError(f"could not load or download {name} into {root} ({type(e).__name__}: "
                         f"{str(e)[:100]}); without internet, download {file} from {url} elsewhere and "
                         f"put it into {root} by hand, or use --dataset folder") from None
    x_tr = torch.as_tensor(tr.data).permute(0, 3, 1, 2).contiguous()          # [N, 3, 32, 32] uint8
    x_te = torch.as_tensor(te.data).permute(0, 3, 1, 2).contiguous()
    return x_tr, x_tr, torch.as_tensor(tr.targets), x_te, torch.as_tensor(te.targets), tr.classes


def load_data(args, log=print) -> Data:
    """Load the data set as uint8 tensors (memory path) or file-backed Datasets (stream path)."""
    if args.dataset == "folder":
        if not args.data_dir or not os.path.isdir(args.data_dir):
            raise CueCoError(f"--dataset folder needs --data-dir with train/ and test/ image folders "
                             f"(got {args.data_dir!r})")
        keep = None
        if args.class_list:
            try:
                with open(args.class_list) as f:
                    keep = [line.strip() for line in f if line.strip() and not line.startswith("#")]
            except OSError as e:
                raise CueCoError(f"cannot read --class-list {args.class_list}: {e.strerror}") from None
        train_s, classes = scan_folder(args.data_dir, "train", keep)
        test_split = "test" if os.path.isdir(os.path.join(args.data_dir, "test")) or not \
            os.path.isdir(os.path.join(args.data_dir, "val")) else "val"   # ImageNet calls it val/
        test_s, test_classes = scan_folder(args.data_dir, test_split, keep)
        if test_classes != classes:
            raise CueCoError(f"train/ and test/ in {args.data_dir} have different class folders")
        size = args.image_size
        if size == 0:   # small images (CIFAR-like) train at their own size, large ones at 224
            size = max(read_image(train_s[0][0]).size)
            size = size if size <= 64 else 224
        train_y = torch.tensor([y for _, y in train_s])
        test_y = torch.tensor([y for _, y in test_s])
        keep_tr = balanced_subset(train_y, args.limit_train, args.seed)
        keep_te = balanced_subset(test_y, args.limit_test, args.seed)
        train_s, test_s = [train_s[i] for i in keep_tr], [test_s[i] for i in keep_te]
        if use_memory_path(args, len(train_s), size):
            log(f"decoding {len(train_s) + len(test_s)} images from {args.data_dir} at {size}px ...")
            mode = "resize" if size <= 64 else "center"
            x_tr, y_tr = decode_all(ImageFiles(train_s, size, mode), args.num_workers, args.data_dir)
            x_te, y_te = decode_all(ImageFiles(test_s, size, mode), args.num_workers, args.data_dir)
            return Data(x_tr, x_tr, y_tr, x_te, y_te, classes, size)
        return Data(ImageFiles(train_s, size, "two_crops"), ImageFiles(train_s, size, "center"),
                    train_y[keep_tr], ImageFiles(test_s, size, "center"), test_y[keep_te], classes, size)

    x_ssl, x_bank, y_bank, x_te, y_te, classes = load_torchvision_set(args.dataset, args.data_dir)
    keep = balanced_subset(y_bank, args.limit_train, args.seed)
    if x_ssl is x_bank:
        x_ssl = x_bank = x_bank[keep]
    else:   # STL-10: the unlabelled images train, the labelled ones are the kNN/probe bank
        x_ssl, x_bank = x_ssl[:args.limit_train or None], x_bank[keep]
    keep_te = balanced_subset(y_te, args.limit_test, args.seed)
    size = x_bank.shape[-1]
    if args.image_size and args.image_size != size:
        raise CueCoError(f"--image-size {args.image_size} differs from {args.dataset}'s {size}px images")
    coarse = cifar100_coarse_targets(classes) if args.dataset == "cifar100" else None
    return Data(x_ssl, x_bank, y_bank[keep], x_te[keep_te], y_te[keep_te], classes, size, coarse)


def use_memory_path(args, n: int, size: int) -> bool:
    if args.data_path in ("memory", "torchvision"):
        return True
    return args.data_path == "auto" and n * 3 * size * size <= args.memory_gb * 2**30


# ----- batched augmentation on the device ------------------------------------------------------------

def sample_crop_boxes(n: int, height: int, width: int, scale, ratio, g, device) -> torch.Tensor:
    """RandomResizedCrop's box sampler for n images at once: [n, 4] boxes (top, left, h, w) in pixels.
    Same rule as torchvision: up to 10 tries of (area fraction ~ U(scale), log aspect ~ U(log ratio)),
    the first try that fits wins; if none fits, a centre crop with the aspect clamped into `ratio`."""
    tries = 10
    area = height * width * torch.empty(n, tries, device=device).uniform_(*scale, generator=g)
    log_r = torch.empty(n, tries, device=device).uniform_(math.log(ratio[0]), math.log(ratio[1]),
                                                          generator=g)
    w = torch.sqrt(area * torch.exp(log_r)).round()                                  # w: [n, tries]
    h = torch.sqrt(area / torch.exp(log_r)).round()                                  # h: [n, tries]
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)                            # ok: [n, tries]
    first = ok.float().argmax(dim=1, keepdim=True)                                   # first: [n, 1]
    w, h, found = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0], ok.any(dim=1)  # [n]
    # fallback: the whole image with its aspect clamped into [ratio[0], ratio[1]]
    in_r = width / height
    fw = width if ratio[0] <= in_r <= ratio[1] else (
        width if in_r < ratio[0] else round(height * ratio[1]))
    fh = height if ratio[0] <= in_r <= ratio[1] else (
        round(width / ratio[0]) if in_r < ratio[0] else height)
    w = torch.where(found, w, torch.full_like(w, fw))
    h = torch.where(found, h, torch.full_like(h, fh))
    # torchvision draws the corner with randint(0, H - h + 1): uniform over integer offsets
    top = torch.floor(torch.rand(n, device=device, generator=g) * (height - h + 1))
    left = torch.floor(torch.rand(n, device=device, generator=g) * (width - w + 1))
    top = torch.where(found, top, ((height - h) / 2).round())
    left = torch.where(found, left, ((width - w) / 2).round())
    return torch.stack([top, left, h, w], dim=1)                                     # [n, 4]


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)                                                  # each [B, H, W], in [0, 1]
    maxc, _ = x.max(1)
    minc, _ = x.min(1)
    delta = maxc - minc
    s = delta / maxc.clamp_min(1e-8)
    d = delta.clamp_min(1e-8)
    h = torch.where(maxc == r, ((g - b) / d) % 6,
                    torch.where(maxc == g, (b - r) / d + 2, (r - g) / d + 4)) / 6
    h = torch.where(delta > 0, h, torch.zeros_like(h))
    return torch.stack([h, s, maxc], dim=1)                                # [B, 3, H, W]


def hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    h, s, v = x.unbind(1)
    k = torch.stack([(5 + h * 6) % 6, (3 + h * 6) % 6, (1 + h * 6) % 6], dim=1)   # [B, 3, H, W]
    return v[:, None] - v[:, None] * s[:, None] * (torch.minimum(k, 4 - k).clamp(0, 1))


def grayscale(x: torch.Tensor) -> torch.Tensor:
    return (0.2989 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)    # [B, 1, H, W]


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, ksize: int) -> torch.Tensor:
    """Per-image Gaussian blur: x [B, 3, H, W], sigma [B]; one grouped separable convolution."""
    b, c, hgt, wid = x.shape
    t = torch.arange(ksize, device=x.device, dtype=x.dtype) - ksize // 2             # [k]
    kern = torch.exp(-t[None] ** 2 / (2 * sigma[:, None] ** 2))                      # [B, k]
    kern = (kern / kern.sum(1, keepdim=True)).repeat_interleave(c, 0)               # [B*3, k]
    y = F.pad(x.reshape(1, b * c, hgt, wid), [ksize // 2] * 4, mode="reflect")
    y = F.conv2d(y, kern[:, None, None, :], groups=b * c)                            # along width
    y = F.conv2d(y, kern[:, None, :, None], groups=b * c)                            # along height
    return y.reshape(b, c, hgt, wid)


def augment(x: torch.Tensor, size: int, mean, std, g: torch.Generator, crop: bool = True,
            blur: bool = False, scale=(0.2, 1.0), order_g: Optional[torch.Generator] = None
            ) -> torch.Tensor:
    """One random view of every image in a batch, on x's device: uint8 [B, 3, H, W] -> float
    [B, 3, size, size], normalised. The MoCo-v2 recipe with every random parameter drawn independently
    per image: random resized crop (scale 0.2-1, aspect 3/4-4/3) and flip, colour jitter (0.4, 0.4, 0.4,
    0.1) with p=0.8, grayscale with p=0.2, optionally Gaussian blur (sigma 0.1-2) with p=0.5.
    g draws on x's device; order_g (a CPU generator, needed when x is on a GPU) draws the jitter order."""
    b, dev = x.shape[0], x.device
    x = x.float() / 255                                                   # x: [B, 3, H, W] in [0, 1]
    u = lambda *shape: torch.rand(*shape, device=dev, generator=g)        # noqa: E731
    if crop:   # crop + resize + flip as one bilinear resampling, through an affine grid per image
        top, left, h, w = sample_crop_boxes(b, x.shape[2], x.shape[3], scale, (3 / 4, 4 / 3), g,
                                            dev).unbind(1)                            # each [B]
        flip = (u(b) < 0.5).float() * 2 - 1                                          # -1 = mirrored
        theta = torch.zeros(b, 2, 3, device=dev)                                      # [B, 2, 3]
        theta[:, 0, 0] = w / x.shape[3] * flip
        theta[:, 0, 2] = (2 * left + w) / x.shape[3] - 1
        theta[:, 1, 1] = h / x.shape[2]
        theta[:, 1, 2] = (2 * top + h) / x.shape[2] - 1
        grid = F.affine_grid(theta, [b, 3, size, size], align_corners=False)          # [B, S, S, 2]
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    # Colour jitter. An image that skips jitter (p=0.2) gets the identity factors (1, 1, 1, 0). The
    # order of the four operations is drawn per batch rather than per image: each image's order is still
    # uniformly random, as in torchvision, and the batch needs one pass per operation instead of 4x4.
    on = (u(b) < 0.8).float()                                                          # [B]
    factor = lambda r: (1 + on * (u(b) * 2 - 1) * r)[:, None, None, None]             # noqa: E731
    bright, contrast, sat = factor(0.4), factor(0.4), factor(0.4)                     # [B, 1, 1, 1]
    hue = (on * (u(b) * 2 - 1) * 0.1)[:, None, None]                                  # [B, 1, 1]
    for op in torch.randperm(4, generator=order_g or g).tolist():   # a CPU generator: no GPU sync
        if op == 0:
            x = (x * bright).clamp(0, 1)
        elif op == 1:
            m = grayscale(x).mean(dim=(1, 2, 3), keepdim=True)                        # [B, 1, 1, 1]
            x = (contrast * x + (1 - contrast) * m).clamp(0, 1)
        elif op == 2:
            x = (sat * x + (1 - sat) * grayscale(x)).clamp(0, 1)
        else:
            hsv = rgb_to_hsv(x)                                                       # [B, 3, S, S]
            hsv = torch.stack([(hsv[:, 0] + hue) % 1.0, hsv[:, 1], hsv[:, 2]], dim=1)
            x = hsv_to_rgb(hsv)
    gray = (u(b) < 0.2)[:, None, None, None]                                          # [B, 1, 1, 1]
    x = torch.where(gray, grayscale(x).expand_as(x), x)
    if blur:
        ks = blur_kernel_size(size)
        sigma = torch.where(u(b) < 0.5, 0.1 + 1.9 * u(b), torch.full((b,), 1e-3, device=dev))
        x = gaussian_blur(x, sigma, ks)
    return normalize(x, mean, std)                                                    # [B, 3, S, S]


def normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    """(x - mean) / std per channel, with Python numbers: building a mean tensor on a GPU would copy
    it from the host, and that copy waits for the GPU (a sync in every step)."""
    return torch.stack([(x[:, c] - mean[c]) / std[c] for c in range(3)], dim=1)


# =====================================================================================================
# 3. Backbone: ResNet-18
# =====================================================================================================

class SplitBatchNorm(nn.BatchNorm2d):
    """Batch norm whose statistics are computed over `num_splits` groups of the batch separately, as if
    each group were on its own GPU (the MoCo CIFAR-10 notebook's trick). Together with shuffling the key
    batch it stops the "BN leak": if query and key were normalised with statistics of the same images,
    the network could find the positive key through the batch statistics instead of through the image
    content, and the contrastive task would become a shortcut (MoCo loses ~4 points on CIFAR without it)."""

    def __init__(self, num_features: int, num_splits: int):
        super().__init__(num_features)
        self.num_splits = num_splits

    def forward(self, x):
        n, c, h, w = x.shape
        s = self.num_splits
        if not self.training or s == 1 or n % s:
            return super().forward(x)
        # fold the groups into the channel axis: [N, C, H, W] -> [N/s, C*s, H, W]; group j holds the
        # samples j, j+s, j+2s, ... (strided, which is also how the ranks of a torchrun job share a batch)
        # (reshape, not view: a channels_last tensor cannot be regrouped without a copy)
        mean_run, var_run = self.running_mean.repeat(s), self.running_var.repeat(s)
        y = F.batch_norm(x.reshape(n // s, c * s, h, w), mean_run, var_run, self.weight.repeat(s),
                         self.bias.repeat(s), True, self.momentum, self.eps).reshape(n, c, h, w)
        with torch.no_grad():   # the s groups' running statistics are averaged into one
            self.running_mean.copy_(mean_run.view(s, c).mean(0))
            self.running_var.copy_(var_run.view(s, c).mean(0))
            self.num_batches_tracked += 1
        return y


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, bn):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = bn(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = bn(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), bn(c_out))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 -> [N, 8*width] features (512 at width 64). `cifar_stem`: a 3x3 stride-1 first conv and
    no max-pool, so 32x32 images keep their resolution (the usual CIFAR variant); otherwise the ImageNet
    stem (7x7 stride-2 conv + max-pool) for 224-px images."""

    def __init__(self, width: int = 64, cifar_stem: bool = True, bn_splits: int = 1):
        super().__init__()
        bn = (lambda c: SplitBatchNorm(c, bn_splits)) if bn_splits > 1 else nn.BatchNorm2d
        if cifar_stem:
            self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), bn(width), nn.ReLU())
        else:
            self.stem = nn.Sequential(nn.Conv2d(3, width, 7, 2, 3, bias=False), bn(width), nn.ReLU(),
                                      nn.MaxPool2d(3, 2, 1))
        layers, c_in = [], width
        for i, c_out in enumerate([width, 2 * width, 4 * width, 8 * width]):
            stride = 1 if i == 0 else 2
            layers += [BasicBlock(c_in, c_out, stride, bn), BasicBlock(c_out, c_out, 1, bn)]
            c_in = c_out
        self.layers = nn.Sequential(*layers)
        self.out_dim = c_in

    def forward(self, x):
        return torch.flatten(F.adaptive_avg_pool2d(self.layers(self.stem(x)), 1), 1)   # [N, 8*width]


# =====================================================================================================
# 4. The query/key model: encoder_q, encoder_k (momentum copy), the queue
# =====================================================================================================

class Encoder(nn.Module):
    """Backbone -> MLP projection -> L2-normalised embedding z, plus the centroids C it is scored against.
    C lives inside the encoder so that the key network, a moving-average copy, carries its own slowly
    moving centroids: keys and the centroids that assign them come from the same slow network."""

    def __init__(self, width, dim, num_clusters, cifar_stem, bn_splits):
        super().__init__()
        self.backbone = ResNet18(width, cifar_stem, bn_splits)
        f = self.backbone.out_dim
        self.projector = nn.Sequential(nn.Linear(f, f), nn.ReLU(), nn.Linear(f, dim))   # MoCo-v2 head
        self.C = nn.Parameter(F.normalize(torch.randn(num_clusters, dim), dim=1))        # [K_c, D]

    def forward(self, x):
        h = self.projector(self.backbone(x))                                             # h: [N, D]
        with torch.autocast(x.device.type, enabled=False):   # similarities in float32, not bf16
            z = F.normalize(h.float(), dim=1)                                            # z: [N, D]
            s = z @ F.normalize(self.C.float(), dim=1).t()                               # s: [N, K_c]
        return z, s


class CueCo(nn.Module):
    def __init__(self, width=64, dim=128, num_clusters=100, queue_size=4096, cifar_stem=True,
                 bn_splits=8):
        super().__init__()
        self.encoder_q = Encoder(width, dim, num_clusters, cifar_stem, bn_splits)
        self.encoder_k = Encoder(width, dim, num_clusters, cifar_stem, bn_splits)
        self.encoder_k.load_state_dict(self.encoder_q.state_dict())
        for p in self.encoder_k.parameters():
            p.requires_grad = False        # the key network learns only through the momentum update
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, dim), dim=1))  # [K, D]
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def momentum_update(self, m: float):
        """theta_k <- m * theta_k + (1 - m) * theta_q for every parameter (centroids included). A large
        m keeps the keys in the queue, made over the last few hundred steps, comparable with each other.
        Batch-norm running statistics are not averaged: the key network keeps its own."""
        for p_k, p_q in zip(self.encoder_k.parameters(), self.encoder_q.parameters()):
            p_k.mul_(m).add_(p_q.detach(), alpha=1 - m)

    @torch.no_grad()
    def keys(self, x: torch.Tensor, shuffle: bool = True):
        """Key embeddings and cluster scores of x. The batch is shuffled before the key network and
        unshuffled after, so that its batch-norm groups hold other images than the query's groups."""
        idx = torch.randperm(len(x), device=x.device) if shuffle else torch.arange(len(x), device=x.device)
        k, s = self.encoder_k(x[idx])                                   # k: [N, D], s: [N, K_c]
        inv = torch.argsort(idx)
        return k[inv], s[inv]

    @torch.no_grad()
    def enqueue(self, k: torch.Tensor):
        """Replace the oldest keys of the FIFO queue by k [B, D] (all ranks' keys under torchrun)."""
        k = all_gather(k)                                               # k: [B * world, D]
        idx = (self.queue_ptr + torch.arange(len(k), device=k.device)) % len(self.queue)   # [B * world]
        self.queue[idx] = k.to(self.queue.dtype)
        self.queue_ptr.copy_((self.queue_ptr + len(k)) % len(self.queue))


# =====================================================================================================
# 5. Losses
# =====================================================================================================

def contrastive_loss(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, T: float) -> torch.Tensor:
    """InfoNCE: L = -log exp(q.k+/T) / (exp(q.k+/T) + sum_j exp(q.queue_j/T)), i.e. cross-entropy over
    1+K logits whose correct class is 0 (the positive key). q, k: [N, D], queue: [K, D], all unit norm."""
    l_pos = (q * k).sum(dim=1, keepdim=True)                            # l_pos: [N, 1]
    l_neg = q @ queue.t()                                               # l_neg: [N, K]
    logits = torch.cat([l_pos, l_neg], dim=1) / T                       # logits: [N, 1+K]
    labels = torch.zeros(len(q), dtype=torch.long, device=q.device)     # labels: [N]
    return F.cross_entropy(logits, labels)


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, eps: float = 0.05, iters: int = 3) -> torch.Tensor:
    """Balanced soft assignment of N samples to K clusters (Sinkhorn-Knopp, as in SwAV).
    scores [N, K] -> Q [N, K], each row a distribution over clusters and, jointly, every cluster taking
    1/K of the batch. Under torchrun the sums run over the global batch.

    Why equipartition and not CoKe's minimal-cluster-size constraint (our choice): both forbid the
    trivial solution where one cluster takes everything. Sinkhorn needs no state across steps (CoKe keeps
    dual variables for every cluster between epochs), is three matrix scalings, and is easy to make global
    with two all-reduces. Its cost is that it forces equal sizes within a batch, which is mild when there
    are more clusters than classes (our default 100 on CIFAR-10)."""
    top = scores.float().max()
    if is_distributed():   # one shift for the global batch, or the ranks' columns would be scaled apart
        dist.all_reduce(top, op=dist.ReduceOp.MAX)
    Q = torch.exp((scores.float() - top) / eps).t()                     # Q: [K, N]
    n_total = all_reduce_sum(torch.full((), float(Q.shape[1]), device=Q.device))  # no host copy
    K = Q.shape[0]
    Q /= all_reduce_sum(Q.sum())
    for _ in range(iters):
        Q /= all_reduce_sum(Q.sum(dim=1, keepdim=True)) * K             # every cluster: mass 1/K
        Q /= Q.sum(dim=0, keepdim=True) * n_total                       # every sample: mass 1/N
    return (Q * n_total).t()                                            # Q: [N, K], rows sum to 1


def clustering_loss(s_q: torch.Tensor, s_k: torch.Tensor, tau: float, eps: float) -> torch.Tensor:
    """Our clustering loss (the paper publishes none): the query predicts the balanced cluster assignment
    of its positive key. L = -sum_c Q(k)_c log softmax(q.C / tau)_c, averaged over the batch.
    s_q: [N, K_c] query-centroid cosines (grad flows to the query and to C), s_k: [N, K_c] key's."""
    targets = sinkhorn(s_k, eps)                                        # targets: [N, K_c]
    log_p = F.log_softmax(s_q.float() / tau, dim=1)                     # log_p: [N, K_c]
    return -(targets * log_p).sum(dim=1).mean()


def cueco_loss(model: CueCo, net_q: nn.Module, x1: torch.Tensor, x2: torch.Tensor, T: float,
               tau: float, eps: float, lam: float, shuffle: bool = True):
    """The symmetric CueCo objective on two views [N, 3, S, S] of the same N images:
        L = L_con(q1, k2) + L_con(q2, k1) + lam * (L_clu(q1, k2) + L_clu(q2, k1))
    net_q is model.encoder_q, or its DistributedDataParallel wrapper. Returns the loss, its two parts,
    the keys to enqueue [2N, D] and the cluster shares of the batch [K_c] (a collapse monitor)."""
    q1, s1 = net_q(x1)                                                  # q: [N, D], s: [N, K_c]
    q2, s2 = net_q(x2)
    k1, sk1 = model.keys(x1, shuffle)                                   # k: [N, D], no gradient
    k2, sk2 = model.keys(x2, shuffle)
    queue = model.queue.clone().detach()                                # [K, D]
    with torch.autocast(x1.device.type, enabled=False):   # the logits / T need float32 precision
        l_con = contrastive_loss(q1, k2, queue, T) + contrastive_loss(q2, k1, queue, T)
        l_clu = clustering_loss(s1, sk2, tau, eps) + clustering_loss(s2, sk1, tau, eps)
    # (scatter_add rather than one_hot/bincount, which check their input on the host: a GPU sync)
    shares = torch.zeros(s1.shape[1], device=s1.device).scatter_add_(
        0, s1.argmax(1), torch.ones(len(s1), device=s1.device)) / len(s1)  # shares: [K_c]
    return l_con + lam * l_clu, l_con.detach(), l_clu.detach(), torch.cat([k1, k2]), shares


# =====================================================================================================
# 6. kNN monitor
# =====================================================================================================

def batches(images, batch_size: int, workers: int = 0):
    """Yield uint8 image batches from a tensor [N, 3, S, S] or from a Dataset of (uint8 image, label)."""
    if isinstance(images, torch.Tensor):
        for i in range(0, len(images), batch_size):
            yield images[i:i + batch_size]
    else:
        loader = torch.utils.data.DataLoader(images, batch_size=batch_size, num_workers=workers,
                                             pin_memory=torch.cuda.is_available())
        for x, _ in loader:
            yield x


@torch.no_grad()
def extract_features(backbone: nn.Module, images, mean, std, device, batch_size: int = 512,
                     workers: int = 0) -> torch.Tensor:
    """Backbone features of unaugmented images: [N, F] float32, on `device`."""
    was_training = backbone.training
    backbone.eval()
    feats = []
    for x in batches(images, batch_size, workers):
        x = normalize(x.to(device, non_blocking=True).float() / 255, mean, std)  # [B, 3, S, S]
        with autocast(device):
            feats.append(backbone(to_channels_last(x, device)).float())         # [B, F]
    backbone.train(was_training)
    return torch.cat(feats)                                                     # [N, F]


@torch.no_grad()
def knn_predict(train_x, train_y, test_x, k: int = 200, t: float = 0.1, num_classes: int = 0,
                chunk: int = 1024) -> torch.Tensor:
    """Weighted kNN (Wu et al. 2018, as in the MoCo monitor): each of the k nearest training features
    (cosine similarity) votes for its class with weight exp(sim / t). Returns predicted labels [M]."""
    train_x, test_x = F.normalize(train_x.float(), dim=1), F.normalize(test_x.float(), dim=1)
    num_classes = num_classes or int(train_y.max()) + 1
    k = min(k, len(train_x))
    preds = []
    for i in range(0, len(test_x), chunk):
        sim = test_x[i:i + chunk] @ train_x.t()                                 # sim: [M, N]
        top_sim, top_idx = sim.topk(k, dim=1)                                   # [M, k]
        votes = torch.zeros(len(sim), num_classes, device=sim.device)           # votes: [M, C]
        votes.scatter_add_(1, train_y[top_idx], (top_sim / t).exp())
        preds.append(votes.argmax(1))                                           # [M]
    return torch.cat(preds)


def bank_and_test_features(backbone: nn.Module, data, device, workers: int = 0):
    """Features of the labelled bank (kNN memory, probe training set) and of the test set."""
    mean, std = norm_stats(data.image_size)
    return tuple(extract_features(backbone, images, mean, std, device, workers=workers)
                 for images in (data.bank, data.test))                     # [N_bank, F], [N_test, F]


def knn_accuracy(train_x, train_y, test_x, test_y, k: int = 200, t: float = 0.1) -> float:
    """Top-1 accuracy (%) of the weighted kNN classifier."""
    train_y, test_y = train_y.to(train_x.device), test_y.to(train_x.device)
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    pred = knn_predict(train_x, train_y, test_x.to(train_x.device), k, t, num_classes)
    return 100.0 * (pred == test_y).float().mean().item()


# =====================================================================================================
# 7. Linear probe
# =====================================================================================================

def linear_probe(train_x, train_y, test_x, test_y, epochs: int = 100, batch_size: int = 256,
                 lr: float = 1e-2, seed: int = 0, min_steps: int = 1000) -> float:
    """Top-1 accuracy (%) of a linear classifier trained on frozen, precomputed backbone features.
    Features are standardised with the training statistics and the layer is trained with AdamW and a
    cosine schedule, for `epochs` or at least `min_steps` steps (small data sets need more epochs).
    Precomputed features without augmentation make this take seconds; the usual protocol
    (augmented images, 100 epochs through the frozen network) typically scores a little higher."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    dev = train_x.device
    mu, sd = train_x.mean(0, keepdim=True), train_x.std(0, keepdim=True) + 1e-6     # [1, F]
    xtr, xte = (train_x - mu) / sd, (test_x.to(dev) - mu) / sd
    ytr, yte = train_y.to(dev), test_y.to(dev)
    num_classes = int(max(ytr.max(), yte.max())) + 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = nn.Linear(xtr.shape[1], num_classes).to(dev)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=5e-4)
    epochs = max(epochs, math.ceil(min_steps / math.ceil(len(xtr) / batch_size)))
    steps = epochs * math.ceil(len(xtr) / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(epochs):
        perm = torch.randperm(len(xtr), generator=g).to(dev)
        for i in range(0, len(xtr), batch_size):
            idx = perm[i:i + batch_size]
            loss = F.cross_entropy(head(xtr[idx]), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    with torch.no_grad():
        return 100.0 * (head(xte).argmax(1) == yte).float().mean().item()


# =====================================================================================================
# 8. Clustering metrics: k-means, NMI, ARI, Hungarian accuracy
# =====================================================================================================

@torch.no_grad()
def kmeans(x: torch.Tensor, k: int, iters: int = 100, n_init: int = 3, seed: int = 0) -> torch.Tensor:
    """Lloyd's k-means with k-means++ seeding on L2-normalised features; the best of n_init runs
    (lowest inertia). x: [N, F] -> labels [N]."""
    x = F.normalize(x.float(), dim=1)
    g = torch.Generator(device="cpu").manual_seed(seed)
    best, best_inertia = None, float("inf")
    for _ in range(n_init):
        centers = x[torch.randint(len(x), (1,), generator=g).to(x.device)]          # [1, F]
        for _ in range(1, k):   # k-means++: next centre drawn with probability ~ squared distance
            d2 = torch.cdist(x, centers).min(dim=1).values ** 2                       # [N]
            nxt = torch.multinomial((d2 + 1e-12).cpu(), 1, generator=g).to(x.device)
            centers = torch.cat([centers, x[nxt]])                                    # [c+1, F]
        for _ in range(iters):
            labels = torch.cdist(x, centers).argmin(dim=1)                            # [N]
            onehot = F.one_hot(labels, k).float()                                     # [N, k]
            counts = onehot.sum(0)                                                    # [k]
            new = (onehot.t() @ x) / counts.clamp_min(1)[:, None]                     # [k, F]
            new = torch.where(counts[:, None] > 0, new, centers)   # an empty cluster keeps its centre
            if torch.allclose(new, centers, atol=1e-6):
                break
            centers = new
        labels = torch.cdist(x, centers).argmin(dim=1)
        inertia = ((x - centers[labels]) ** 2).sum().item()
        if inertia < best_inertia:
            best, best_inertia = labels, inertia
    return best


def hungarian(cost: list) -> list:
    """Minimum-cost perfect matching on a square cost matrix (list of lists): the Kuhn-Munkres algorithm
    with potentials, O(n^3). Returns col[i], the column matched to row i."""
    n = len(cost)
    INF = float("inf")
    u, v = [0.0] * (n + 1), [0.0] * (n + 1)   # row and column potentials (1-based, 0 = virtual)
    match = [0] * (n + 1)                      # match[j] = row matched to column j
    way = [0] * (n + 1)
    for i in range(1, n + 1):
        match[0], j0 = i, 0
        minv, used = [INF] * (n + 1), [False] * (n + 1)
        while True:   # grow an alternating tree from row i until a free column is reached
            used[j0] = True
            i0, delta, j1 = match[j0], INF, 0
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
            if match[j0] == 0:
                break
        while j0:   # flip the augmenting path
            j1 = way[j0]
            match[j0] = match[j1]
            j0 = j1
    col = [0] * n
    for j in range(1, n + 1):
        col[match[j] - 1] = j - 1
    return col


def cluster_metrics(pred: torch.Tensor, target: torch.Tensor) -> dict:
    """NMI (arithmetic normalisation, as scikit-learn's default), ARI and Hungarian-matched accuracy
    of a clustering `pred` against true labels `target` (both integer tensors [N])."""
    pred, target = pred.long().cpu(), target.long().cpu()
    _, p = pred.unique(return_inverse=True)
    _, t = target.unique(return_inverse=True)
    n = len(p)
    cont = torch.zeros(int(p.max()) + 1, int(t.max()) + 1, dtype=torch.float64)     # [P, T]
    cont.index_put_((p, t), torch.ones(n, dtype=torch.float64), accumulate=True)
    a, b = cont.sum(1), cont.sum(0)                                                  # [P], [T]
    # NMI = I(P; T) / ((H(P) + H(T)) / 2)
    nz = cont > 0
    mi = (cont[nz] / n * torch.log(cont[nz] * n / (a[:, None] * b[None, :])[nz])).sum()
    h = lambda c: -(c[c > 0] / n * torch.log(c[c > 0] / n)).sum()                     # noqa: E731
    hp, ht = h(a), h(b)
    nmi = 1.0 if hp + ht == 0 else (2 * mi / (hp + ht)).item()
    # ARI = (RI - E[RI]) / (max RI - E[RI]), counted over pairs
    comb2 = lambda x: (x * (x - 1) / 2).sum()                                         # noqa: E731
    s_ij, s_a, s_b, pairs = comb2(cont), comb2(a), comb2(b), n * (n - 1) / 2
    expected = s_a * s_b / pairs if pairs else 0.0
    max_index = (s_a + s_b) / 2
    ari = 1.0 if max_index == expected else ((s_ij - expected) / (max_index - expected)).item()
    # ACC: accuracy after the best one-to-one map from clusters to classes
    acc = (match_clusters(pred, target) == target).double().mean().item()
    return {"nmi": float(nmi), "ari": float(ari), "acc": float(acc)}


def match_clusters(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Relabel each cluster as the class it is matched to by the best one-to-one map (Hungarian on the
    negated contingency table); clusters left without a class get negative labels. [N] -> [N]"""
    pred, target = pred.long().cpu(), target.long().cpu()
    p_vals, p = pred.unique(return_inverse=True)
    t_vals, t = target.unique(return_inverse=True)
    size = max(len(p_vals), len(t_vals))
    cont = torch.zeros(size, size, dtype=torch.float64)                             # [P, T], padded
    cont.index_put_((p, t), torch.ones(len(p), dtype=torch.float64), accumulate=True)
    col = hungarian((-cont).tolist())                                               # cluster -> class
    label = torch.tensor([t_vals[c].item() if c < len(t_vals) else -1 - i for i, c in enumerate(col)])
    return label[p]


# =====================================================================================================
# 9. t-SNE, written in torch (the card allows no scikit-learn)
# =====================================================================================================

@torch.no_grad()
def tsne(x: torch.Tensor, perplexity: float = 30.0, seed: int = 0, iters: int = 750,
         pca_dim: int = 50) -> torch.Tensor:
    """Exact t-SNE (van der Maaten & Hinton 2008) of x [N, F] -> [N, 2], with the usual modern choices:
    PCA to 50 dimensions first, PCA initialisation, early exaggeration 12 for 250 steps, learning rate
    max(N / 48, 50), momentum 0.5 then 0.8, and adaptive gains. O(N^2) memory: fine for a few thousand
    points (2,000 take seconds on a laptop CPU)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = x.detach().double().cpu()
    x = x - x.mean(0)
    n = len(x)
    if x.shape[1] > pca_dim:
        x = x @ torch.linalg.svd(x, full_matrices=False)[2][:pca_dim].t()           # x: [N, 50]
    d2 = torch.cdist(x, x) ** 2                                                     # d2: [N, N]
    d2.fill_diagonal_(float("inf"))   # a point is not its own neighbour
    # Per-point Gaussian bandwidth beta_i, found by bisection so that the entropy of P(.|i) = log(perp).
    target = math.log(min(perplexity, (n - 1) / 3))
    lo, hi = torch.full((n, 1), 1e-20, dtype=x.dtype), torch.full((n, 1), 1e20, dtype=x.dtype)
    beta = torch.ones(n, 1, dtype=x.dtype) / d2[d2.isfinite()].median()             # beta: [N, 1]
    for _ in range(64):
        logits = -d2 * beta                                                         # [N, N]
        P = torch.softmax(logits, dim=1)                                            # P(j|i): [N, N]
        H = -(P * torch.log(P.clamp_min(1e-300))).sum(1, keepdim=True)              # H: [N, 1]
        too_flat = H > target   # entropy too high -> narrower kernel -> larger beta
        lo = torch.where(too_flat, beta, lo)
        hi = torch.where(too_flat, hi, beta)
        beta = torch.where(hi < 1e19, (lo + hi) / 2, beta * 2)
    P = ((P + P.t()) / (2 * n)).float().clamp_min(1e-12)                            # P_ij: [N, N]
    # initialise with the first two principal components, scaled to std 1e-4
    y = (x @ torch.linalg.svd(x, full_matrices=False)[2][:2].t()).float()           # y: [N, 2]
    y = y / y[:, 0].std() * 1e-4 + 1e-8 * torch.randn(n, 2, generator=g)
    lr = max(n / 12 / 4, 50.0)
    update, gains = torch.zeros_like(y), torch.ones_like(y)
    for it in range(iters):
        exag, mom = (12.0, 0.5) if it < 250 else (1.0, 0.8)
        w = 1 / (1 + torch.cdist(y, y) ** 2)                                        # w: [N, N]
        w.fill_diagonal_(0)
        Q = (w / w.sum()).clamp_min(1e-12)                                          # Q_ij: [N, N]
        # dC/dy_i = 4 sum_j (p_ij - q_ij) w_ij (y_i - y_j)
        m = (exag * P - Q) * w                                                      # m: [N, N]
        grad = 4 * (m.sum(1, keepdim=True) * y - m @ y)                             # grad: [N, 2]
        same_sign = (grad > 0) == (update > 0)
        gains = torch.where(same_sign, gains * 0.8, gains + 0.2).clamp_min(0.01)   # [N, 2]
        update = mom * update - lr * gains * grad                                   # [N, 2]
        y = y + update
        y = y - y.mean(0)
    return y                                                                        # [N, 2]


# =====================================================================================================
# 10. Figures (matplotlib's object API: no global pyplot state, works without a display)
# =====================================================================================================

def plot_tsne(y: torch.Tensor, labels: torch.Tensor, clusters: torch.Tensor, classes: list, path: str,
              title: str = ""):
    from matplotlib.figure import Figure
    fig = Figure(figsize=(13, 6.2), dpi=110)
    axes = fig.subplots(1, 2)
    y = y.cpu()
    for ax, lab, name in [(axes[0], labels.cpu(), "true class"),
                          (axes[1], clusters.cpu(), "k-means cluster (colour of its matched class)")]:
        cmap = "tab10" if len(classes) <= 10 else "tab20"
        sc = ax.scatter(y[:, 0], y[:, 1], c=lab.clamp_min(0), cmap=cmap, s=4, alpha=0.8, linewidths=0,
                        vmin=0, vmax=max(len(classes), 10) - 1)
        ax.set_title(f"coloured by {name}")
        ax.set_xticks([])
        ax.set_yticks([])
        if name == "true class" and len(classes) <= 20:
            handles = [ax.scatter([], [], color=sc.cmap(sc.norm(i)), s=20, label=c)
                       for i, c in enumerate(classes)]
            ax.legend(handles=handles, loc="best", fontsize=7, markerscale=1, framealpha=0.7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)


def plot_curves(history: list, path: str, title: str = ""):
    from matplotlib.figure import Figure
    fig = Figure(figsize=(13, 3.6), dpi=110)
    axes = fig.subplots(1, 4)
    ep = [h["epoch"] for h in history]
    axes[0].plot(ep, [h["loss_contrastive"] for h in history], label="contrastive")
    axes[0].set_title("contrastive loss")
    axes[1].plot(ep, [h["loss_clustering"] for h in history], color="tab:orange")
    axes[1].set_title("clustering loss")
    knn = [(h["epoch"], h["knn"]) for h in history if h.get("knn") is not None]
    if knn:
        axes[2].plot(*zip(*knn), marker="o", color="tab:green")
    axes[2].set_title("kNN top-1 (%)")
    axes[3].plot(ep, [h["max_cluster_share"] for h in history], color="tab:red")
    if history:
        axes[3].axhline(1 / history[0]["num_clusters"], ls="--", color="gray", label="uniform")
        axes[3].legend(fontsize=7)
    axes[3].set_title("largest cluster's share of a batch")
    for ax in axes:
        ax.set_xlabel("epoch")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)


# =====================================================================================================
# 11. Devices, distributed helpers and checkpoints
# =====================================================================================================

def autocast(device):
    """bf16 autocast on CUDA (batch norm and the losses stay in float32); a no-op elsewhere."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=torch.device(device).type == "cuda")


def to_channels_last(x, device):
    return x.contiguous(memory_format=torch.channels_last) if torch.device(device).type == "cuda" else x


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate x from every rank (rank order); x itself when single-process."""
    if not is_distributed():
        return x
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        dist.all_reduce(x)
    return x


CHECKPOINT_FORMAT = "cueco-checkpoint-v1"


def save_checkpoint(path: str, model, optimizer, epoch: int, args, history: list):
    """Atomic: write a temporary file, then rename over the old one, so a crash never leaves half a
    checkpoint behind."""
    state = {"format": CHECKPOINT_FORMAT, "epoch": epoch, "args": vars(args), "history": history,
             "model": model.state_dict(), "optimizer": optimizer.state_dict()}
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str) -> dict:
    """Load with weights_only=True: a checkpoint from the internet can hold tensors and plain data, never
    code to run."""
    if not os.path.isfile(path):
        raise CueCoError(f"--resume {path}: no such file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CueCoError(f"--resume {path} is not a checkpoint of this script "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CueCoError(f"--resume {path} is not a checkpoint of this script")
    return ckpt


def write_json(path: str, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


# =====================================================================================================
# 12. Training loop
# =====================================================================================================

def norm_stats(image_size: int):
    return (CIFAR_MEAN, CIFAR_STD) if image_size <= 64 else (IMAGENET_MEAN, IMAGENET_STD)


def training_views(args, data: Data, epoch: int, device, world: int = 1, rank_: int = 0):
    """Yield (x1, x2): two augmented views [b, 3, S, S] of this rank's share b = B / world of every
    global batch, for one epoch. Three data paths, one recipe (see --data-path)."""
    size, b = data.image_size, args.batch_size // world
    mean, std = norm_stats(size)
    blur = size > 64   # the ImageNet MoCo-v2 recipe adds blur; the CIFAR one does not
    seed = args.seed * 100_003 + epoch * 1009 + rank_   # reseeded per epoch: a resumed run sees the same
    g = torch.Generator(device=device).manual_seed(seed)
    order_g = torch.Generator().manual_seed(seed)
    if isinstance(data.train, torch.Tensor) and args.data_path != "torchvision":   # memory path
        n = len(data.train)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed + epoch))  # all ranks
        perm = perm.to(data.train.device)
        for step in range(n // args.batch_size):
            idx = perm[step * args.batch_size:(step + 1) * args.batch_size][rank_::world]   # [b]
            x = data.train[idx]                                                      # [b, 3, H, W] uint8
            yield tuple(to_channels_last(augment(x, size, mean, std, g, blur=blur, order_g=order_g),
                                         device) for _ in range(2))
        return
    if isinstance(data.train, torch.Tensor):   # the classic per-image torchvision path
        dataset = TorchvisionTwoViews(data.train.cpu(), torchvision_augmentation(size, mean, std, blur))
    else:                                      # stream path: workers decode and crop, device does colour
        dataset = data.train
    sampler = torch.utils.data.DistributedSampler(dataset, world, rank_, seed=args.seed) if world > 1 \
        else torch.utils.data.RandomSampler(dataset, generator=torch.Generator().manual_seed(seed))
    if world > 1:
        sampler.set_epoch(epoch)
    loader = torch.utils.data.DataLoader(dataset, batch_size=b, sampler=sampler, drop_last=True,
                                         num_workers=args.num_workers, pin_memory=device.type == "cuda",
                                         persistent_workers=False)
    for v1, v2 in loader:
        v1, v2 = v1.to(device, non_blocking=True), v2.to(device, non_blocking=True)
        if args.data_path != "torchvision":
            v1 = augment(v1, size, mean, std, g, crop=False, blur=blur, order_g=order_g)
            v2 = augment(v2, size, mean, std, g, crop=False, blur=blur, order_g=order_g)
        yield to_channels_last(v1, device), to_channels_last(v2, device)


def clustering_weight(lam: float, epoch: int, epochs: int, warmup: float) -> float:
    """lambda of epoch `epoch` (1-based): a linear ramp from 0 over the first `warmup` fraction of the
    epochs, then constant. Our choice, from the CPU evidence in the README: at the start the features,
    and so the cluster assignments, are noise, and pulling queries towards noisy clusters hurts."""
    warm = warmup * epochs
    return lam * min(1.0, epoch / warm) if warm > 0 else lam


def cosine_lr(base_lr: float, step: int, total: int) -> float:
    return base_lr * 0.5 * (1 + math.cos(math.pi * step / max(1, total)))


def make_optimizer(model: CueCo, args):
    """SGD with momentum; no weight decay on the centroids (they are renormalised anyway)."""
    q = model.encoder_q
    decay = [p for n, p in q.named_parameters() if n != "C"]
    return torch.optim.SGD([{"params": decay}, {"params": [q.C], "weight_decay": 0.0}],
                           lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)


def benchmark(args, data: Data, device, steps: int, log=print) -> dict:
    """Images/s (an image = both its views) of full training steps on the memory path and on the classic
    per-image torchvision path, and the share of a step spent making the views. Timing waits for the
    GPU only at the ends of a timed stretch."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    results = {}
    for path in ("memory", "torchvision"):
        args.data_path = path
        torch.manual_seed(args.seed)
        model = CueCo(args.width, args.dim, args.num_clusters, args.queue_size, data.image_size <= 64,
                      args.bn_splits).to(device)
        if device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        net_q = torch.compile(model.encoder_q) if args.compile else model.encoder_q
        opt = make_optimizer(model, args)
        views = training_views(args, data, 1, device)
        times = {}
        for phase in ("train", "data"):
            for i in range(3 + steps):          # 3 warm-up steps (compilation, allocator, workers)
                if i == 3:
                    sync()
                    t0 = time.time()
                x1, x2 = next(views, (None, None))
                if x1 is None:
                    views = training_views(args, data, 2, device)
                    x1, x2 = next(views)
                if phase == "train":
                    with autocast(device):
                        loss, _, _, keys, _ = cueco_loss(model, net_q, x1, x2, args.temperature,
                                                         args.clu_temperature, args.sinkhorn_eps,
                                                         args.lambda_clu)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    model.momentum_update(args.momentum)
                    model.enqueue(keys)
            sync()
            times[phase] = (time.time() - t0) / steps
        ips = args.batch_size / times["train"]
        results[path] = {"img_per_s": ips, "seconds_per_epoch": len(data.train) / ips,
                         "data_share": min(1.0, times["data"] / times["train"])}
        if device.type == "cuda":
            results[path]["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
        log(f"{path:>11} path: {ips:8.0f} img/s, {len(data.train) / ips:7.1f} s per epoch of "
            f"{len(data.train)} images, making the views takes {100 * results[path]['data_share']:.0f}% "
            f"of a step")
    log(f"memory path / torchvision path: {results['memory']['img_per_s'] / results['torchvision']['img_per_s']:.2f}x")
    return results


def format_time(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def train(args, model: CueCo, data: Data, device, optimizer, start_epoch: int, on_epoch_end):
    """The training loop: for each step, lr -> forward -> loss -> backward -> step -> momentum update ->
    enqueue -> log. Statistics stay on the device and are read every --log-every steps only: reading a
    GPU value each step would stall the GPU queue."""
    world, rnk = (dist.get_world_size(), dist.get_rank()) if is_distributed() else (1, 0)
    net_q = model.encoder_q
    if world > 1:
        net_q = nn.parallel.DistributedDataParallel(net_q, device_ids=[device] if device.type == "cuda"
                                                    else None)
    if args.compile:
        net_q = torch.compile(net_q)
    n_train = len(data.train)
    steps = n_train // args.batch_size
    total = args.epochs * steps
    base_lr = args.lr * args.batch_size / 512   # linear scaling from the recipe's batch 512
    tty = sys.stdout.isatty()
    done_steps, t_start = 0, time.time()
    for epoch in range(start_epoch + 1, args.epochs + 1):
        model.train()
        lam = clustering_weight(args.lambda_clu, epoch, args.epochs, args.clu_warmup)
        sums = torch.zeros(4, device=device)   # loss, contrastive, clustering, largest cluster share
        t0 = time.time()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for step, (x1, x2) in enumerate(training_views(args, data, epoch, device, world, rnk)):
            lr = cosine_lr(base_lr, (epoch - 1) * steps + step, total)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with autocast(device):
                loss, l_con, l_clu, keys, shares = cueco_loss(
                    model, net_q, x1, x2, args.temperature, args.clu_temperature, args.sinkhorn_eps, lam)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            model.momentum_update(args.momentum)
            model.enqueue(keys)
            sums += torch.stack([loss.detach(), l_con, l_clu, shares.max()])
            done_steps += 1
            if (step + 1) % args.log_every == 0 or step + 1 == steps:
                avg = (sums / (step + 1)).tolist()
                if not all(math.isfinite(v) for v in avg):
                    raise CueCoError(f"the loss became NaN/inf in epoch {epoch} (step {step + 1}); the "
                                     f"last good checkpoint (epoch {epoch - 1}) is kept in {args.out}; "
                                     f"try a lower --lr")
                ips = (step + 1) * args.batch_size / (time.time() - t0)        # this epoch's speed
                per_step = (time.time() - t_start) / done_steps                   # evaluation included
                left = (total - (epoch - 1) * steps - step - 1) * per_step
                mem = (f" | {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GB"
                       if device.type == "cuda" else "")
                if rnk == 0:
                    line = (f"epoch {epoch}/{args.epochs} step {step + 1}/{steps} loss {avg[0]:.3f} "
                            f"(con {avg[1]:.3f} clu {avg[2]:.3f}) max-cluster {avg[3]:.2f} lr {lr:.4f} "
                            f"| {ips:.0f} img/s{mem} | {format_time(left)} left")
                    print("\r" + line if tty else line, end="" if tty else "\n", flush=True)
        if tty and rnk == 0:
            print()
        seconds = time.time() - t0
        avg = (sums / max(1, steps)).tolist()
        record = {"epoch": epoch, "loss": avg[0], "loss_contrastive": avg[1], "loss_clustering": avg[2],
                  "max_cluster_share": avg[3], "lambda_clu": lam, "lr": lr,
                  "img_per_s": steps * args.batch_size / seconds, "seconds": seconds}
        if device.type == "cuda":
            record["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
        on_epoch_end(epoch, record)


# =====================================================================================================
# 13. Evaluation and main
# =====================================================================================================

def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise CueCoError(f"unknown --device '{name}' (auto, cpu, cuda, cuda:N or mps)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CueCoError("--device cuda, but PyTorch sees no CUDA GPU here (use --device cpu)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise CueCoError("--device mps, but the MPS backend is not available here")
    return dev


@torch.no_grad()
def evaluate(args, model: CueCo, data: Data, device, figures: bool = True, log=print) -> dict:
    """kNN, linear probe and k-means clustering metrics on frozen backbone features, plus the t-SNE
    figure. CIFAR-100 is also scored against its 20 superclasses (suffix 20)."""
    f_bank, f_test = bank_and_test_features(model.encoder_q.backbone, data, device, args.num_workers)
    y_bank, y_test = data.bank_y.to(device), data.test_y.to(device)
    res = {"knn": knn_accuracy(f_bank, y_bank, f_test, y_test)}
    with torch.enable_grad():
        res["linear"] = linear_probe(f_bank, y_bank, f_test, y_test, seed=args.seed)
    clusters = kmeans(f_test, len(data.classes), seed=args.seed)
    res.update(cluster_metrics(clusters, y_test))
    if data.coarse is not None:
        coarse = data.coarse.to(device)[y_test]
        res.update({k + "20": v for k, v in
                    cluster_metrics(kmeans(f_test, 20, seed=args.seed), coarse).items()})
    counts = torch.bincount(clusters, minlength=len(data.classes))
    res["largest_kmeans_cluster"] = counts.max().item() / len(clusters)
    if figures and args.tsne_points > 0:
        idx = balanced_subset(data.test_y, min(args.tsne_points, len(f_test)), seed=0).to(device)
        t0 = time.time()
        emb = tsne(f_test[idx], seed=args.seed)                                 # emb: [n, 2]
        os.makedirs(args.figures_dir, exist_ok=True)
        path = os.path.join(args.figures_dir, f"tsne_{data_name(args)}.png")
        title = (f"{method_name(args)} on {data_name(args)}, epoch {args.epochs}: kNN {res['knn']:.1f}%, "
                 f"NMI {res['nmi']:.3f}, ACC {res['acc']:.3f} (t-SNE of {len(idx)} test images)")
        matched = match_clusters(clusters, data.test_y)   # a cluster takes its matched class's colour
        plot_tsne(emb, data.test_y[idx.cpu()], matched[idx.cpu()], data.classes, path, title)
        log(f"t-SNE of {len(idx)} points in {time.time() - t0:.1f}s -> {path}")
    return res


def setup_distributed(device: torch.device):
    """Under torchrun (WORLD_SIZE > 1): one process per GPU (NCCL) or per CPU worker (gloo). Returns
    this process's device, the number of processes and this process's rank; (device, 1, 0) otherwise."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device, 1, 0
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device, dist.get_world_size(), dist.get_rank()


def run(argv=None) -> dict:
    """Load, build (or resume), train, evaluate, draw; returns the final metrics (rank 0)."""
    args = parse_args(argv)
    device, world, rnk = setup_distributed(resolve_device(args.device))
    log = print if rnk == 0 else (lambda *a, **k: None)
    if args.batch_size % world or (args.batch_size // world) % max(1, args.bn_splits // world):
        raise CueCoError(f"--batch-size {args.batch_size} must split evenly over {world} processes and "
                         f"their batch-norm groups")
    torch.manual_seed(args.seed)

    data = load_data(args, log)
    if args.epochs > 0 and len(data.train) < args.batch_size:
        raise CueCoError(f"--batch-size {args.batch_size} is larger than the training set "
                         f"({len(data.train)} images)")
    if args.benchmark:
        if not isinstance(data.train, torch.Tensor):
            raise CueCoError("--benchmark needs a training set that fits in memory (--memory-gb)")
        data.train = data.train.to(device)
        log(f"benchmark: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}, "
            f"torch {torch.__version__}, width {args.width}, batch {args.batch_size}, "
            f"{args.num_workers} workers{', compiled' if args.compile else ''}")
        return benchmark(args, data, device, args.benchmark, log)
    if isinstance(data.train, torch.Tensor) and args.data_path != "torchvision":
        data.train = data.train.to(device)   # the memory path: the whole training set on the device
    model = CueCo(args.width, args.dim, args.num_clusters, args.queue_size,
                  cifar_stem=data.image_size <= 64, bn_splits=max(1, args.bn_splits // world)).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, args)
    history, start_epoch = [], 0
    if args.resume:
        ckpt = load_checkpoint(args.resume)
        try:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise CueCoError(f"--resume {args.resume} does not fit this model "
                             f"({str(e).splitlines()[0][:150]})") from None
        history, start_epoch = ckpt["history"], ckpt["epoch"]
        log(f"resumed from {args.resume} at epoch {start_epoch}")
    os.makedirs(args.out, exist_ok=True)
    ckpt_path, metrics_path = os.path.join(args.out, "checkpoint.pt"), os.path.join(args.out, "metrics.json")
    n_params = sum(p.numel() for p in model.encoder_q.parameters()) / 1e6
    log(f"{method_name(args)} on {data_name(args)}: {len(data.train)} training images at {data.image_size}px, "
        f"{len(data.test_y)} test images, ResNet-18 width {args.width} ({n_params:.1f}M parameters), "
        f"device {device}{f' x {world} processes' if world > 1 else ''}, data path "
        f"{'memory' if isinstance(data.train, torch.Tensor) and args.data_path != 'torchvision' else args.data_path}")

    def on_epoch_end(epoch, record):   # rank 0: kNN monitor, history, checkpoint, metrics.json
        if rnk == 0:
            if args.eval_every and (epoch % args.eval_every == 0 or epoch == args.epochs):
                f_bank, f_test = bank_and_test_features(model.encoder_q.backbone, data, device,
                                                        args.num_workers)
                record["knn"] = knn_accuracy(f_bank, data.bank_y.to(device), f_test, data.test_y)
                log(f"epoch {epoch}: kNN top-1 {record['knn']:.2f}%  ({record['seconds']:.1f}s, "
                    f"{record['img_per_s']:.0f} img/s)")
            record["num_clusters"] = args.num_clusters
            history.append(record)
            save_checkpoint(ckpt_path, model, optimizer, epoch, args, history)
            write_json(metrics_path, {"args": vars(args), "epochs": history})
        if is_distributed():
            dist.barrier()

    try:
        train(args, model, data, device, optimizer, start_epoch, on_epoch_end)
    except KeyboardInterrupt:
        done = history[-1]["epoch"] if history else start_epoch
        raise CueCoError(f"interrupted; the checkpoint of epoch {done} is saved in {ckpt_path}; continue "
                         f"with: python cueco.py --resume {ckpt_path}") from None
    if rnk != 0:
        return {}
    final = evaluate(args, model, data, device, log=log)
    if history:
        os.makedirs(args.figures_dir, exist_ok=True)
        plot_curves(history, os.path.join(args.figures_dir, f"curves_{data_name(args)}.png"),
                    f"{method_name(args)} on {data_name(args)} (lambda_clu {args.lambda_clu}, warm-up "
                    f"{args.clu_warmup}, {args.num_clusters} clusters, width {args.width})")
    write_json(metrics_path, {"args": vars(args), "epochs": history, "final": final})
    log("final: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                              for k, v in final.items()))
    return final


def main(argv=None) -> dict:
    """Run CueCo as the command line describes; returns the final metrics. A user error exits with one
    line on stderr and status 2 (130 after Ctrl-C), never a traceback."""
    try:
        return run(argv)
    except CueCoError as e:
        # an error raised in a DataLoader worker arrives wrapped in its traceback text: keep the message
        msg = str(e).strip().splitlines()[-1].split("CueCoError: ", 1)[-1]
        print(f"{chr(10) if sys.stdout.isatty() else ''}cueco.py: error: {msg}", file=sys.stderr)
        raise SystemExit(130 if msg.startswith("interrupted") else 2) from None
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
