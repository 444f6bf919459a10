"""Tests for cueco.py: every piece against an independent reference (PyTorch, brute force, worked
examples, torchvision), then the command line end to end. CPU only; a few minutes in all.

    python -m pytest -q test_cueco.py
"""
import itertools
import json
import math
import os
import signal
import subprocess
import sys
import tarfile
import time

import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms import v2 as T

import cueco

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED_CIFAR = os.path.join(HERE, "..", "shared", "data", "cifar10-jpeg.tar.gz")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


# ----------------------------------------------------------------------------------------------------
# fixtures
# ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def cifar_dir(tmp_path_factory):
    """The real CIFAR-10 copy from ../shared/data, unpacked once (skips when it is absent)."""
    local = os.path.join(HERE, "data", "cifar10-jpeg")
    if os.path.isdir(os.path.join(local, "train")):
        return local
    if not os.path.isfile(SHARED_CIFAR):
        pytest.skip(f"real CIFAR-10 copy not found at {SHARED_CIFAR}")
    out = tmp_path_factory.mktemp("cifar")
    with tarfile.open(SHARED_CIFAR) as tar:
        if hasattr(tarfile, "data_filter"):   # Python 3.12+ (and recent 3.8-3.11): safe extraction
            tar.extractall(out, filter="data")
        else:
            tar.extractall(out)
    return str(out)


def make_folder(root, n_per_class=8, classes=("a", "b"), size=32, splits=("train", "test")):
    """A tiny ImageFolder of random PNG images."""
    from torchvision.transforms.v2.functional import to_pil_image
    g = torch.Generator().manual_seed(0)
    for split in splits:
        for c in classes:
            os.makedirs(os.path.join(root, split, c), exist_ok=True)
            for i in range(n_per_class):
                img = torch.randint(0, 256, (3, size, size), generator=g, dtype=torch.uint8)
                to_pil_image(img).save(os.path.join(root, split, c, f"{i}.png"))
    return str(root)


def tiny_args(folder, out, *extra):
    return ["--dataset", "folder", "--data-dir", folder, "--width", "4", "--dim", "16",
            "--num-clusters", "4", "--queue-size", "64", "--batch-size", "8", "--bn-splits", "2",
            "--num-workers", "0", "--tsne-points", "20", "--out", str(out),
            "--figures-dir", str(out / "fig"), *extra]


def run_cli(args, timeout=300, **kw):
    return subprocess.run([sys.executable, os.path.join(HERE, "cueco.py"), *args], capture_output=True,
                          text=True, timeout=timeout, cwd=kw.pop("cwd", HERE), **kw)


def unit(n, d, seed=0):
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1)


# ----------------------------------------------------------------------------------------------------
# losses
# ----------------------------------------------------------------------------------------------------

def test_contrastive_loss_equals_cross_entropy_on_hand_built_logits():
    q, k, queue, T_ = unit(6, 8, 1), unit(6, 8, 2), unit(10, 8, 3), 0.07
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.t()], dim=1) / T_   # [6, 11]
    expected = F.cross_entropy(logits, torch.zeros(6, dtype=torch.long))
    assert torch.allclose(cueco.contrastive_loss(q, k, queue, T_), expected, atol=1e-6)


def test_contrastive_loss_worked_value():
    # q = k (cosine 1) and K queue keys orthogonal to q (cosine 0): L = -log(e^(1/T) / (e^(1/T) + K))
    q = torch.tensor([[1.0, 0, 0, 0]])
    queue = torch.tensor([[0.0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    expected = -math.log(math.exp(2) / (math.exp(2) + 3))   # T = 0.5: 0.3486
    assert cueco.contrastive_loss(q, q, queue, 0.5).item() == pytest.approx(expected, rel=1e-5)


def test_clustering_loss_is_soft_cross_entropy_to_sinkhorn_targets():
    s_q, s_k = unit(12, 5, 4) @ unit(5, 5, 5).t(), unit(12, 5, 6) @ unit(5, 5, 7).t()
    targets = cueco.sinkhorn(s_k, 0.05)
    expected = F.cross_entropy(s_q / 0.1, targets)   # PyTorch's cross-entropy with probability targets
    assert torch.allclose(cueco.clustering_loss(s_q, s_k, 0.1, 0.05), expected, atol=1e-6)


def test_sinkhorn_marginals_are_balanced_even_when_one_cluster_dominates():
    scores = unit(256, 16, 8) @ unit(10, 16, 9).t()                 # cosines [256, 10]
    scores[:, 0] += 1.0                                             # ~every sample prefers cluster 0
    assert (scores.argmax(1) == 0).float().mean() > 0.9
    Q = cueco.sinkhorn(scores, eps=0.05, iters=3)
    assert torch.allclose(Q.sum(1), torch.ones(256), atol=1e-5)     # each row is a distribution
    mass = Q.sum(0) / 256                                           # each cluster's share
    assert mass.max() < 0.15 and mass.min() > 0.06                  # 0.98 -> near 1/10 in 3 iterations
    Q50 = cueco.sinkhorn(scores, eps=0.05, iters=50)
    assert torch.allclose(Q50.sum(0) / 256, torch.full((10,), 0.1), atol=1e-3)


def tiny_model(**kw):
    torch.manual_seed(0)
    opts = dict(width=4, dim=8, num_clusters=5, queue_size=32, bn_splits=2)
    opts.update(kw)
    return cueco.CueCo(**opts)


def test_gradients_reach_query_and_centroids_but_not_key():
    model = tiny_model()
    x1, x2 = torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16)
    loss, l_con, l_clu, keys, shares = cueco.cueco_loss(model, model.encoder_q, x1, x2, 0.1, 0.1, 0.05, 1.0)
    loss.backward()
    assert keys.shape == (16, 8) and not keys.requires_grad
    assert shares.sum().item() == pytest.approx(1.0)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoder_q.parameters())
    assert all(p.grad is None for p in model.encoder_k.parameters())
    assert loss.item() == pytest.approx(l_con.item() + l_clu.item(), rel=1e-5)


def test_cueco_loss_pairs_each_query_with_the_other_views_key():
    model = tiny_model()
    with torch.no_grad():   # make the key network differ from the query network
        for p in model.encoder_k.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x1, x2 = torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16)
    loss, l_con, l_clu, keys, _ = cueco.cueco_loss(model, model.encoder_q, x1, x2, 0.2, 0.1, 0.05, 0.5,
                                                   shuffle=False)
    with torch.no_grad():
        (q1, s1), (q2, s2) = model.encoder_q(x1), model.encoder_q(x2)
        (k1, t1), (k2, t2) = model.encoder_k(x1), model.encoder_k(x2)
        con = cueco.contrastive_loss(q1, k2, model.queue, 0.2) + cueco.contrastive_loss(q2, k1, model.queue, 0.2)
        clu = cueco.clustering_loss(s1, t2, 0.1, 0.05) + cueco.clustering_loss(s2, t1, 0.1, 0.05)
    assert torch.allclose(l_con, con, atol=1e-5) and torch.allclose(l_clu, clu, atol=1e-5)
    assert torch.allclose(loss, con + 0.5 * clu, atol=1e-5)
    assert torch.allclose(keys, torch.cat([k1, k2]), atol=1e-6)


def test_lambda_zero_is_plain_moco_no_clustering_gradient():
    model = tiny_model()
    x1, x2 = torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16)
    loss = cueco.cueco_loss(model, model.encoder_q, x1, x2, 0.1, 0.1, 0.05, 0.0)[0]
    loss.backward()
    assert model.encoder_q.C.grad.abs().max() == 0


def test_clustering_weight_ramps_up_then_stays():
    assert [cueco.clustering_weight(1.0, e, 10, 0.5) for e in range(1, 11)] == \
        [0.2, 0.4, 0.6, 0.8, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    assert cueco.clustering_weight(0.5, 1, 10, 0.0) == 0.5 and cueco.clustering_weight(0.0, 3, 10, 0.5) == 0


def test_momentum_update_matches_closed_form():
    model = tiny_model()
    with torch.no_grad():
        for p in model.encoder_q.parameters():
            p.add_(torch.randn_like(p))
    before_k = [p.clone() for p in model.encoder_k.parameters()]
    q = [p.clone() for p in model.encoder_q.parameters()]
    model.momentum_update(0.9)
    for pk, pk0, pq in zip(model.encoder_k.parameters(), before_k, q):
        assert torch.allclose(pk, 0.9 * pk0 + 0.1 * pq, atol=1e-6)
    model.momentum_update(0.0)   # m = 0 copies the query
    for pk, pq in zip(model.encoder_k.parameters(), q):
        assert torch.equal(pk, pq)


def test_queue_is_fifo_and_wraps_around():
    model = tiny_model(queue_size=10, dim=4)
    first = torch.arange(24.0).view(6, 4)
    model.enqueue(first)
    assert torch.equal(model.queue[:6], first) and model.queue_ptr.item() == 6
    second = -torch.arange(24.0).view(6, 4) - 1
    model.enqueue(second)            # 4 fill the end, 2 overwrite the oldest two
    assert torch.equal(model.queue[6:], second[:4]) and torch.equal(model.queue[:2], second[4:])
    assert torch.equal(model.queue[2:6], first[2:]) and model.queue_ptr.item() == 2


def test_split_batchnorm_groups_batches_independently():
    bn = cueco.SplitBatchNorm(3, num_splits=2).train()
    x = torch.stack([torch.randn(3, 2, 2) if i % 2 == 0 else 5 + 3 * torch.randn(3, 2, 2) for i in range(8)])
    y = bn(x)
    for group in (y[0::2], y[1::2]):   # groups are strided; each is normalised by its own statistics
        assert group.mean(dim=(0, 2, 3)).abs().max() < 1e-5
        assert (group.var(dim=(0, 2, 3), unbiased=False) - 1).abs().max() < 1e-3
    plain = torch.nn.BatchNorm2d(3).train()
    assert (plain(x)[0::2].mean(dim=(0, 2, 3)).abs() > 0.5).all()   # one group would not be centred


# ----------------------------------------------------------------------------------------------------
# augmentation: shapes and ranges, then the distribution against torchvision's
# ----------------------------------------------------------------------------------------------------

MEAN, STD = cueco.CIFAR_MEAN, cueco.CIFAR_STD


def denorm(x):
    return x * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)


def test_augment_shapes_ranges_and_per_sample_randomness():
    img = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    x = img.repeat(64, 1, 1, 1)
    out = cueco.augment(x, 24, MEAN, STD, torch.Generator().manual_seed(1))
    assert out.shape == (64, 3, 24, 24) and out.dtype == torch.float32
    pix = denorm(out)
    assert pix.min() >= -1e-5 and pix.max() <= 1 + 1e-5
    flat = out.flatten(1)
    assert torch.cdist(flat, flat).topk(2, largest=False).values[:, 1].min() > 0   # all 64 differ
    again = cueco.augment(x, 24, MEAN, STD, torch.Generator().manual_seed(1))
    assert torch.equal(out, again)   # reproducible with the same generator
    blurred = cueco.augment(torch.randint(0, 256, (4, 3, 96, 96), dtype=torch.uint8), 96, MEAN, STD,
                            torch.Generator().manual_seed(2), crop=False, blur=True)
    assert blurred.shape == (4, 3, 96, 96)


def test_augment_flips_half_of_the_images():
    x = torch.zeros(800, 3, 32, 32, dtype=torch.uint8)
    x[..., 16:] = 255                     # gray, dark left half: jitter and grayscale keep the order
    out = cueco.augment(x, 32, MEAN, STD, torch.Generator().manual_seed(0), scale=(1.0, 1.0))
    flipped = (out[..., :16].mean(dim=(1, 2, 3)) > out[..., 16:].mean(dim=(1, 2, 3))).float().mean()
    assert 0.44 < flipped < 0.56, flipped                                              # p = 0.5


def test_crop_boxes_follow_torchvision_distribution():
    n = 4000
    ours = cueco.sample_crop_boxes(n, 32, 32, (0.2, 1.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(0),
                                   "cpu")
    area_ours = ours[:, 2] * ours[:, 3] / 1024
    aspect_ours = ours[:, 3] / ours[:, 2]
    img = torch.zeros(3, 32, 32)
    torch.manual_seed(0)
    boxes = []
    crop = T.RandomResizedCrop(32, scale=(0.2, 1.0))   # torchvision's own sampler, one box at a time
    for _ in range(n):
        p = crop.make_params([img])
        boxes.append((p["top"], p["left"], p["height"], p["width"]))
    ref = torch.tensor(boxes, dtype=torch.float32)
    area_ref, aspect_ref = ref[:, 2] * ref[:, 3] / 1024, ref[:, 3] / ref[:, 2]
    for a, b in [(area_ours, area_ref), (aspect_ours, aspect_ref), (ours[:, 0], ref[:, 0])]:
        assert abs(a.mean() - b.mean()) < 0.04 * b.mean() + 0.02
        assert abs(a.std() - b.std()) < 0.06 * b.std() + 0.02
    assert (ours[:, 0] + ours[:, 2] <= 32).all() and (ours[:, 1] + ours[:, 3] <= 32).all()


def test_colour_pipeline_matches_torchvision_statistics():
    """A flat coloured image isolates the photometric part (jitter in random order, grayscale): the
    distribution of the output colour must match torchvision's per-image pipeline."""
    n = 3000
    img = torch.tensor([200, 90, 40], dtype=torch.uint8).view(1, 3, 1, 1).expand(1, 3, 8, 8)
    ours = denorm(cueco.augment(img.expand(n, 3, 8, 8).contiguous(), 8, MEAN, STD,
                                torch.Generator().manual_seed(0))).mean(dim=(2, 3))        # [n, 3]
    torch.manual_seed(0)
    tf = cueco.torchvision_augmentation(8, MEAN, STD, blur=False)
    ref = torch.stack([denorm(tf(img[0].contiguous())[None])[0].mean(dim=(1, 2)) for _ in range(n)])
    assert torch.allclose(ours.mean(0), ref.mean(0), atol=0.015), (ours.mean(0), ref.mean(0))
    assert torch.allclose(ours.std(0), ref.std(0), atol=0.015), (ours.std(0), ref.std(0))
    gray_ours = (ours.max(1).values - ours.min(1).values < 1e-3).float().mean()
    gray_ref = (ref.max(1).values - ref.min(1).values < 1e-3).float().mean()
    assert abs(gray_ours - gray_ref) < 0.03                                              # p = 0.2


def test_hsv_round_trip():
    x = torch.rand(4, 3, 5, 5)
    assert torch.allclose(cueco.hsv_to_rgb(cueco.rgb_to_hsv(x)), x, atol=1e-5)


# ----------------------------------------------------------------------------------------------------
# evaluation: metrics, kNN, k-means, t-SNE
# ----------------------------------------------------------------------------------------------------

def brute_force_metrics(pred, target):
    pred, target = pred.tolist(), target.tolist()
    n = len(pred)
    # ARI from its definition over all pairs
    pairs = list(itertools.combinations(range(n), 2))
    a = sum(pred[i] == pred[j] and target[i] == target[j] for i, j in pairs)
    same_p = sum(pred[i] == pred[j] for i, j in pairs)
    same_t = sum(target[i] == target[j] for i, j in pairs)
    exp = same_p * same_t / len(pairs)
    ari = (a - exp) / ((same_p + same_t) / 2 - exp)
    # accuracy: best over all injective maps from clusters to labels
    cl, lb = sorted(set(pred)), sorted(set(target))
    lb_pad = lb + [None] * max(0, len(cl) - len(lb))
    acc = max(sum(perm[cl.index(p)] == t for p, t in zip(pred, target))
              for perm in itertools.permutations(lb_pad, len(cl))) / n
    return ari, acc


def test_cluster_metrics_worked_example():
    # pred [0 0 1 1 2 2] vs truth [0 0 0 1 1 1]: I = (2/3) ln 2, H(P) = ln 3, H(T) = ln 2
    pred, target = torch.tensor([0, 0, 1, 1, 2, 2]), torch.tensor([0, 0, 0, 1, 1, 1])
    m = cueco.cluster_metrics(pred, target)
    nmi = 2 * (2 / 3) * math.log(2) / (math.log(3) + math.log(2))
    assert m["nmi"] == pytest.approx(nmi, abs=1e-9)           # 0.5158
    assert m["ari"] == pytest.approx(8 / 33, abs=1e-9)        # 0.2424
    assert m["acc"] == pytest.approx(4 / 6, abs=1e-9)


def test_cluster_metrics_perfect_permuted_and_random():
    y = torch.arange(30) % 3
    assert cueco.cluster_metrics((y + 1) % 3 + 7, y) == {"nmi": 1.0, "ari": 1.0, "acc": 1.0}
    assert torch.equal(cueco.match_clusters((y + 1) % 3 + 7, y), y)   # clusters renamed as their classes
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        p, t = torch.randint(0, 4, (9,), generator=g), torch.randint(0, 3, (9,), generator=g)
        m = cueco.cluster_metrics(p, t)
        ari, acc = brute_force_metrics(p, t)
        assert m["ari"] == pytest.approx(ari, abs=1e-9) and m["acc"] == pytest.approx(acc, abs=1e-9)
    big = cueco.cluster_metrics(torch.randint(0, 10, (20000,), generator=g),
                                torch.randint(0, 10, (20000,), generator=g))
    assert abs(big["ari"]) < 0.01 and big["nmi"] < 0.01     # chance level is ~0


def test_hungarian_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    for n in (1, 2, 4, 6):
        cost = torch.randint(0, 20, (n, n), generator=g).tolist()
        col = cueco.hungarian(cost)
        best = min(sum(cost[i][p[i]] for i in range(n)) for p in itertools.permutations(range(n)))
        assert sorted(col) == list(range(n)) and sum(cost[i][col[i]] for i in range(n)) == best


def blobs(n_per, centers, dim, spread, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(centers, dim, generator=g) * 10
    x = torch.cat([c[i] + spread * torch.randn(n_per, dim, generator=g) for i in range(centers)])
    return x, torch.arange(centers).repeat_interleave(n_per)


def test_knn_on_separable_and_worked_data():
    x, y = blobs(50, 4, 16, 0.5)
    perm = torch.randperm(200, generator=torch.Generator().manual_seed(1))
    tr, te = perm[:150], perm[150:]
    assert cueco.knn_accuracy(x[tr], y[tr], x[te], y[te], k=20) == 100.0
    # worked: 2 neighbours of class 1 at cosine 1.0 outweigh 3 of class 0 at cosine 0 (k=5, t=0.1)
    train = torch.tensor([[1.0, 0], [1, 0], [0, 1], [0, 1], [0, 1]])
    labels = torch.tensor([1, 1, 0, 0, 0])
    assert cueco.knn_predict(train, labels, torch.tensor([[1.0, 0]]), k=5, t=0.1).item() == 1
    assert cueco.knn_predict(train, labels, torch.tensor([[1.0, 0]]), k=5, t=100.0).item() == 0


def test_kmeans_recovers_blobs():
    x, y = blobs(40, 5, 8, 0.3)
    assert cueco.cluster_metrics(cueco.kmeans(x, 5), y)["acc"] == 1.0


def trustworthiness(x, y, k=10):
    """Venna & Kaski's trustworthiness: 1 = no false neighbours in the embedding."""
    n = len(x)
    rx = torch.cdist(x, x).fill_diagonal_(float("inf")).argsort(1).argsort(1)      # rank of j for i
    ny = torch.cdist(y, y).fill_diagonal_(float("inf")).argsort(1)[:, :k]          # embedding kNN
    pen = (rx.gather(1, ny) + 1 - k).clamp_min(0).sum().item()
    return 1 - 2 / (n * k * (2 * n - 3 * k - 1)) * pen


def test_tsne_separates_blobs_and_keeps_neighbourhoods_quickly():
    x, y = blobs(100, 5, 30, 1.0)
    t0 = time.time()
    emb = cueco.tsne(x, perplexity=30, seed=0)
    assert emb.shape == (500, 2) and torch.isfinite(emb).all()
    assert cueco.knn_accuracy(emb, y, emb, y, k=10) == 100.0   # the blobs stay apart in 2-D
    # a curved manifold (a noisy swiss roll in 10-D): neighbourhoods must survive the embedding
    g = torch.Generator().manual_seed(0)
    t = 1.5 * math.pi * (1 + 2 * torch.rand(800, generator=g))
    roll = torch.stack([t * torch.cos(t), 20 * torch.rand(800, generator=g), t * torch.sin(t)], 1)
    roll = torch.cat([roll, 0.1 * torch.randn(800, 7, generator=g)], 1)
    tw = trustworthiness(roll, cueco.tsne(roll, seed=0))
    assert tw > 0.95, tw                     # scikit-learn's TSNE scores about 0.99 on such data
    assert time.time() - t0 < 60


def test_linear_probe_learns_separable_features():
    x, y = blobs(60, 3, 10, 2.0)
    assert cueco.linear_probe(x[::2], y[::2], x[1::2], y[1::2]) > 95
    assert cueco.linear_probe(x[::2], y[::2], x[1::2], torch.roll(y[1::2], 30)) < 50   # can fail


def test_cifar100_superclasses():
    names = [n for fines in cueco.CIFAR100_SUPERCLASSES.values() for n in fines]
    assert len(names) == 100 == len(set(names)) and len(cueco.CIFAR100_SUPERCLASSES) == 20
    coarse = cueco.cifar100_coarse_targets(sorted(names))   # torchvision's classes are sorted
    super_names = list(cueco.CIFAR100_SUPERCLASSES)
    lookup = dict(zip(sorted(names), coarse.tolist()))
    assert super_names[lookup["whale"]] == "aquatic_mammals"
    assert super_names[lookup["sweet_pepper"]] == "fruit_and_vegetables"
    assert super_names[lookup["streetcar"]] == "vehicles_2"
    assert super_names[lookup["maple_tree"]] == "trees"
    assert lookup["apple"] == 4 and lookup["beaver"] == 0 and lookup["tractor"] == 19
    assert torch.bincount(coarse).tolist() == [5] * 20


# ----------------------------------------------------------------------------------------------------
# checkpoints and bad input
# ----------------------------------------------------------------------------------------------------

def test_checkpoint_round_trip(tmp_path):
    model = tiny_model()
    opt = torch.optim.SGD(model.encoder_q.parameters(), lr=0.1, momentum=0.9)
    args = cueco.parse_args(["--out", str(tmp_path)])
    path = str(tmp_path / "c.pt")
    cueco.save_checkpoint(path, model, opt, 3, args, [{"epoch": 3}])
    ck = cueco.load_checkpoint(path)
    other = tiny_model()
    other.load_state_dict(ck["model"])
    for a, b in zip(model.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b)
    assert ck["epoch"] == 3 and ck["args"]["lr"] == 0.06 and not os.path.exists(path + ".tmp")


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


@pytest.mark.parametrize("content", ["garbage", "pickle", "plain_dict"])
def test_resume_rejects_files_that_are_not_our_checkpoints(tmp_path, capsys, content):
    path = tmp_path / "bad.pt"
    if content == "garbage":
        path.write_bytes(b"\x00not a checkpoint" * 10)
    elif content == "pickle":
        torch.save({"x": Evil()}, path)
    else:
        torch.save({"model": {}}, path)
    with pytest.raises(SystemExit) as e:
        cueco.main(["--resume", str(path)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "not a checkpoint of this script" in err and "Traceback" not in err


@pytest.mark.parametrize("argv, message", [
    (["--dataset", "imagenet"], "unknown data set"),
    (["--epochs", "-1"], "--epochs must be >= 0"),
    (["--batch-size", "0"], "--batch-size must be positive"),
    (["--lr", "0"], "--lr must be > 0"),
    (["--momentum", "1.0"], "--momentum must be in [0, 1)"),
    (["--queue-size", "100"], "--queue-size"),
    (["--clu-warmup", "2"], "--clu-warmup is a fraction"),
    (["--dataset", "folder", "--data-dir", "/nonexistent/x"], "--dataset folder needs --data-dir"),
    (["--resume", "/nonexistent/ckpt.pt"], "no such file"),
    (["--device", "banana"], "unknown --device"),
])
def test_bad_input_gives_one_line_and_exit_2(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        cueco.main(argv + ["--out", str(tmp_path)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "Traceback" not in err and len(err.splitlines()) == 1, err


def test_folder_errors(tmp_path, capsys):
    def fails(argv, message):
        with pytest.raises(SystemExit) as e:
            cueco.main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and "Traceback" not in err, err

    os.makedirs(tmp_path / "empty" / "train")
    os.makedirs(tmp_path / "empty" / "test")
    os.makedirs(tmp_path / "classes_only" / "train" / "cat")
    fails(tiny_args(str(tmp_path / "classes_only"), tmp_path), "holds no images")
    fails(tiny_args(str(tmp_path / "empty"), tmp_path), "holds no images")
    fails(tiny_args(str(tmp_path / "nothing"), tmp_path), "needs --data-dir")
    fails(["--dataset", "folder", "--data-dir", str(tmp_path / "empty" / "train")], "does not exist")
    folder = make_folder(tmp_path / "ok", n_per_class=2)
    fails(tiny_args(folder, tmp_path, "--epochs", "1"), "larger than the training set")
    bad = tmp_path / "ok" / "train" / "a" / "broken.png"
    bad.write_bytes(b"this is not a png")
    fails(tiny_args(folder, tmp_path, "--epochs", "0"), "broken.png")


def test_unreadable_image_is_named_from_a_worker(tmp_path):
    folder = make_folder(tmp_path / "d", n_per_class=4)
    (tmp_path / "d" / "test" / "b" / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    r = run_cli(tiny_args(folder, tmp_path, "--epochs", "0", "--num-workers", "1"))
    assert r.returncode == 2 and "broken.jpg" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_cifar_not_downloadable_says_how_to_place_files(tmp_path):
    # No internet here: the download fails, and the message says what to do by hand.
    r = run_cli(["--dataset", "cifar10", "--data-dir", str(tmp_path), "--epochs", "0"], timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "cifar-10-python.tar.gz" in r.stderr and "by hand" in r.stderr


# ----------------------------------------------------------------------------------------------------
# training end to end: resume, interruption, NaN, and the features improve
# ----------------------------------------------------------------------------------------------------

def test_resume_continues_without_losing_or_repeating_epochs(tmp_path):
    folder = make_folder(tmp_path / "d", n_per_class=8)
    out = tmp_path / "run"
    cueco.main(tiny_args(folder, out, "--epochs", "1", "--eval-every", "1"))
    # continue to 3 epochs; the checkpoint's settings are the defaults
    final = cueco.main(["--resume", str(out / "checkpoint.pt"), "--epochs", "3"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2, 3]
    assert metrics["args"]["width"] == 4 and set(final) >= {"knn", "linear", "nmi", "ari", "acc"}
    assert os.path.isfile(out / "fig" / "tsne_d.png") and os.path.isfile(out / "fig" / "curves_d.png")


def test_ctrl_c_saves_and_resume_finishes_the_same_run(tmp_path):
    folder = make_folder(tmp_path / "d", n_per_class=40)
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "cueco.py"),
                             *tiny_args(folder, out, "--epochs", "200", "--eval-every", "0")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "checkpoint.pt").exists() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err, err
    done = cueco.load_checkpoint(str(out / "checkpoint.pt"))["epoch"]
    assert 1 <= done < 200
    cueco.main(["--resume", str(out / "checkpoint.pt"), "--epochs", str(done + 1)])
    epochs = [e["epoch"] for e in json.loads((out / "metrics.json").read_text())["epochs"]]
    assert epochs == list(range(1, done + 2))


def test_nan_loss_stops_with_a_message_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    folder = make_folder(tmp_path / "d", n_per_class=8)
    out = tmp_path / "run"
    real, calls = cueco.contrastive_loss, []

    def poisoned(q, k, queue, T_):
        calls.append(1)
        loss = real(q, k, queue, T_)
        return loss * float("nan") if len(calls) > 4 else loss   # 2 steps x 2 calls = epoch 1 is fine

    monkeypatch.setattr(cueco, "contrastive_loss", poisoned)
    with pytest.raises(SystemExit) as e:
        cueco.main(tiny_args(folder, out, "--epochs", "3", "--eval-every", "0", "--log-every", "1"))
    assert e.value.code == 2 and "NaN" in capsys.readouterr().err
    assert cueco.load_checkpoint(str(out / "checkpoint.pt"))["epoch"] == 1


def test_epochs_zero_evaluates_the_untrained_network(tmp_path):
    folder = make_folder(tmp_path / "d", n_per_class=8)
    final = cueco.main(tiny_args(folder, tmp_path / "r", "--epochs", "0"))
    assert 0 <= final["knn"] <= 100 and 0 <= final["nmi"] <= 1


@pytest.mark.parametrize("path", ["memory", "torchvision", "stream"])
def test_every_data_path_trains(tmp_path, path):
    folder = make_folder(tmp_path / "d", n_per_class=8)
    final = cueco.main(tiny_args(folder, tmp_path / "r", "--epochs", "1", "--data-path", path,
                                 "--tsne-points", "0"))
    assert math.isfinite(final["knn"])


def test_features_improve_over_the_untrained_network_on_real_cifar(cifar_dir, tmp_path):
    """A short real run: kNN accuracy of the trained backbone must beat the same backbone untrained."""
    common = ["--dataset", "folder", "--data-dir", cifar_dir, "--width", "8", "--limit-train", "2000",
              "--limit-test", "1000", "--batch-size", "128", "--num-workers", "0", "--eval-every", "0",
              "--tsne-points", "0", "--num-clusters", "20", "--figures-dir", str(tmp_path / "fig")]
    before = cueco.main(common + ["--epochs", "0", "--out", str(tmp_path / "a")])
    after = cueco.main(common + ["--epochs", "8", "--out", str(tmp_path / "b")])
    print(f"kNN untrained {before['knn']:.1f}% -> trained {after['knn']:.1f}%")
    assert after["knn"] > before["knn"] + 3


# ----------------------------------------------------------------------------------------------------
# several processes (torchrun / gloo on CPU) and ImageNet-size images
# ----------------------------------------------------------------------------------------------------

def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fixed_views(n=8, size=16):
    g = torch.Generator().manual_seed(42)
    return torch.randn(n, 3, size, size, generator=g), torch.randn(n, 3, size, size, generator=g)


def one_step(model, x1, x2):
    """Loss and gradients of one CueCo step without shuffling (so BN groups are comparable)."""
    net = model.encoder_q
    if cueco.is_distributed():
        net = torch.nn.parallel.DistributedDataParallel(model.encoder_q)
    loss, l_con, l_clu, keys, _ = cueco.cueco_loss(model, net, x1, x2, 0.2, 0.1, 0.05, 1.0, shuffle=False)
    loss.backward()
    model.enqueue(keys.detach())
    return loss.detach(), model.encoder_q.C.grad.clone(), model.encoder_q.backbone.stem[0].weight.grad.clone()


def _ddp_worker(rank, world, port, out_dir):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    model = tiny_model(bn_splits=1, queue_size=64)   # each rank's half of the batch is one BN group
    x1, x2 = fixed_views()
    loss, g_c, g_w = one_step(model, x1[rank::world], x2[rank::world])
    dist.all_reduce(loss)
    torch.save({"loss": loss / world, "g_c": g_c, "g_w": g_w, "queue": model.queue,
                "ptr": model.queue_ptr}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_two_processes_match_one_process_on_the_same_global_batch(tmp_path):
    torch.multiprocessing.spawn(_ddp_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    single = tiny_model(bn_splits=2, queue_size=64)  # the same 8 images in 2 strided BN groups
    x1, x2 = fixed_views()
    loss, g_c, g_w = one_step(single, x1, x2)
    assert torch.allclose(r0["loss"], loss, atol=1e-5), (r0["loss"], loss)   # global Sinkhorn, same queue
    for r in (r0, r1):   # DDP averaged the gradients: the same as one process on the whole batch
        assert torch.allclose(r["g_c"], g_c, atol=1e-5) and torch.allclose(r["g_w"], g_w, atol=1e-5)
    # both ranks hold the same queue, and it holds keys from both ranks: 2 views x 4 images x 2 ranks
    assert torch.equal(r0["queue"], r1["queue"]) and r0["ptr"].item() == 16
    rows = lambda q: sorted(map(tuple, q[:16].round(decimals=4).tolist()))   # noqa: E731
    assert rows(r0["queue"]) == rows(single.queue)


def torchrun(args, timeout=600):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           "--master_port", str(free_port()), os.path.join(HERE, "cueco.py"), *args],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=HERE)


def test_torchrun_two_processes_train_and_resume(tmp_path):
    folder = make_folder(tmp_path / "d", n_per_class=8)
    out = tmp_path / "run"
    r = torchrun(tiny_args(folder, out, "--epochs", "1", "--eval-every", "1"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("CueCo on d:") == 1              # only rank 0 prints
    r = torchrun(["--resume", str(out / "checkpoint.pt"), "--epochs", "2"])
    assert r.returncode == 0, r.stderr[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2] and "final" in metrics


def test_imagenet_size_folder_trains_a_few_steps(tmp_path):
    folder = make_folder(tmp_path / "d", n_per_class=8, size=64 + 16)
    for data_path in ("auto", "stream"):
        final = cueco.main(tiny_args(folder, tmp_path / data_path, "--image-size", "96", "--epochs", "1",
                                     "--data-path", data_path, "--tsne-points", "0"))
        assert math.isfinite(final["knn"])
    model = cueco.ResNet18(width=4, cifar_stem=False)
    assert model(torch.randn(2, 3, 224, 224)).shape == (2, 32)
    assert isinstance(model.stem[-1], torch.nn.MaxPool2d)   # the ImageNet stem: 7x7/2 conv + max-pool


def test_class_list_selects_a_subset(tmp_path):
    folder = make_folder(tmp_path / "d", n_per_class=8, classes=("a", "b", "c"))
    (tmp_path / "list.txt").write_text("a\nc\n")
    args = cueco.parse_args(tiny_args(folder, tmp_path, "--class-list", str(tmp_path / "list.txt")))
    data = cueco.load_data(args, print)
    assert data.classes == ["a", "c"] and sorted(data.bank_y.unique().tolist()) == [0, 1]


def test_benchmark_times_both_data_paths(tmp_path):
    folder = make_folder(tmp_path / "d", n_per_class=8)
    res = cueco.main(tiny_args(folder, tmp_path / "r", "--benchmark", "2"))
    assert set(res) == {"memory", "torchvision"}
    for r in res.values():
        assert r["img_per_s"] > 0 and 0 <= r["data_share"] <= 1
