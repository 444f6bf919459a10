"""Tests for cueco.py: every piece against an independent reference (PyTorch, torchvision, brute force, a
worked example), the lesson's pieces called the way the training step calls them, then the command line
end to end. CPU only, a few minutes on 2 cores:

    python -m pytest -q test_cueco.py
"""
import copy
import functools
import itertools
import json
import math
import os
import pickle
import random
import re
import signal
import subprocess
import sys
import tarfile
import time

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torchvision.transforms import v2

import cueco

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED_CIFAR = os.path.join(HERE, "..", "shared", "data", "cifar10-jpeg.tar.gz")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


# ---------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------


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
            "--num-groups", "4", "--queue-size", "64", "--batch-size", "8", "--bn-splits", "2",
            "--num-workers", "0", "--tsne-points", "20", "--save-minutes", "0", "--out", str(out),
            "--figures-dir", str(out / "fig"), "--preset", "full", *extra]


def run_cli(args, timeout=300, **kw):
    return subprocess.run([sys.executable, os.path.join(HERE, "cueco.py"), *args], capture_output=True,
                          text=True, timeout=timeout, cwd=kw.pop("cwd", HERE), **kw)


def fails(argv, message, capsys):
    """main(argv) must stop with exit status 2 and one line on stderr that contains `message`."""
    with pytest.raises(SystemExit) as e:
        cueco.main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and message in err and "Traceback" not in err and len(err.splitlines()) == 1, err


def unit(n, d, seed=0):
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1)


def fixed_views(n=8, size=16):
    g = torch.Generator().manual_seed(42)
    return torch.randn(n, 3, size, size, generator=g), torch.randn(n, 3, size, size, generator=g)


def tiny_model(**kw):
    torch.manual_seed(0)
    opts = dict(width=4, dim=8, K=32, K_c=5, G=3, bn_splits=2)
    opts.update(kw)
    return cueco.CueCo(**opts)


def step_result(loss, q1, device="cpu"):
    """What train_step returns (L, L_con, L_clu, the view-1 queries), for stand-ins of the step."""
    one = torch.tensor(float(loss), device=device)
    return one, one, torch.zeros((), device=device), q1.to(device)


# ---------------------------------------------------------------------------------------------------------
# losses and the query/key model
# ---------------------------------------------------------------------------------------------------------


def test_contrastive_loss_equals_cross_entropy_on_hand_built_logits():
    q, k, queue, T = unit(6, 8, 1), unit(6, 8, 2), unit(10, 8, 3), 0.07
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.t()], dim=1) / T   # [6, 11]
    expected = F.cross_entropy(logits, torch.zeros(6, dtype=torch.long))
    assert torch.allclose(cueco.contrastive_loss(q, k, queue, T), expected, atol=1e-6)


def test_contrastive_loss_worked_value():
    # q = k (cosine 1) and K queue keys orthogonal to q (cosine 0): L = -log(e^(1/T) / (e^(1/T) + K))
    q = torch.tensor([[1.0, 0, 0, 0]])
    queue = torch.tensor([[0.0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    expected = -math.log(math.exp(2) / (math.exp(2) + 3))   # T = 0.5: 0.3486
    assert cueco.contrastive_loss(q, q, queue, 0.5).item() == pytest.approx(expected, rel=1e-5)


def sinkhorn_reference(scores, eps, iters):
    """Textbook Sinkhorn-Knopp in float64: alternately give every cluster mass 1/K, every sample 1/N."""
    Q = torch.exp(scores.double() / eps)
    n, k = Q.shape
    Q = Q / Q.sum()
    for _ in range(iters):
        Q = Q / Q.sum(0, keepdim=True) / k
        Q = Q / Q.sum(1, keepdim=True) / n
    return (Q * n).float()


def test_centroid_loss_is_cross_entropy_to_three_sinkhorn_iterations():
    """As the model calls it (the defaults): SwAV's 3 iterations, checked against a textbook Sinkhorn and
    PyTorch's cross-entropy with probability targets."""
    s_q, s_k = unit(12, 5, 4) @ unit(5, 5, 5).t(), unit(12, 5, 6) @ unit(5, 5, 7).t()
    expected = F.cross_entropy(s_q / 0.1, sinkhorn_reference(s_k, 0.05, 3))
    assert torch.allclose(cueco.centroid_loss(s_q, s_k, 0.1, 0.05), expected, atol=1e-5)


def spherical_kmeans_reference(z, K, iters):
    """Lloyd's k-means on the sphere, point by point: from the first K points, each point to its most
    similar centre, each centre the unit mean of its points (a zero vector if it has none)."""
    centres = [z[i] for i in range(K)]
    for _ in range(iters):
        labels = [max(range(K), key=lambda c: float(z[n] @ centres[c])) for n in range(len(z))]
        centres = [F.normalize(sum((z[n] for n in range(len(z)) if labels[n] == c), torch.zeros_like(z[0])),
                               dim=0) for c in range(K)]
    return torch.tensor(labels), torch.stack(centres)


def test_cld_groups_are_five_lloyd_steps_on_the_other_views_batch_and_carry_its_gradient():
    """k-means of z into G groups, 5 steps from z's first G, against the textbook loop; q's cosines with the
    groups' unit means; the means pass the gradient on to z (CLD)."""
    q, z = unit(64, 6, 1).double(), unit(64, 6, 2).double().requires_grad_()
    for G in (7, 3):
        s, groups = cueco.batch_groups(q, z, G)
        labels, centres = spherical_kmeans_reference(z.detach(), G, 5)
        assert s.shape == (64, G) and torch.equal(groups, labels)
        assert torch.allclose(s, q @ centres.t(), atol=1e-12)
    assert not torch.equal(cueco.batch_groups(q, z, 7)[1], spherical_kmeans_reference(z.detach(), 7, 1)[0])
    s.sum().backward()
    assert z.grad.abs().sum() > 0


def reference_loss(model, x1, x2, T, tau, eps, G):
    """The header's L_con and L_clu from the networks' outputs, one term at a time: hand-built logits and
    F.cross_entropy, the textbook Sinkhorn and spherical Lloyd; L_clu the mean of the terms the model has."""
    q1, q2 = model.encoder_q(x1), model.encoder_q(x2)
    k1, k2 = model.keys(x1), model.keys(x2)
    C_q, C_k = (F.normalize(C, dim=1) for C in (model.encoder_q.C, model.encoder_k.C))
    s1, s2, t1, t2 = q1 @ C_q.t(), q2 @ C_q.t(), k1 @ C_k.t(), k2 @ C_k.t()
    zero = torch.zeros(len(q1), dtype=torch.long)
    con = sum(F.cross_entropy(torch.cat([(q * k).sum(1, keepdim=True), q @ model.queue.t()], 1) / T, zero)
              for q, k in ((q1, k2), (q2, k1)))
    terms = []
    if s1.shape[1]:
        terms.append(sum(F.cross_entropy(s / tau, sinkhorn_reference(t, eps, 3)) for s, t in ((s1, t2), (s2, t1))))
    if G:
        groups = [(q, *spherical_kmeans_reference(z, G, 5)) for q, z in ((q1, q2), (q2, q1))]
        terms.append(sum(F.cross_entropy(q @ centres.t() / tau, labels) for q, labels, centres in groups))
    return con, sum(terms) / max(1, len(terms)), torch.cat([k1, k2]), q1


@pytest.mark.parametrize("K_c, G", [(5, 3), (5, 0), (0, 3), (0, 0)], ids=["both", "centroids", "groups", "moco"])
def test_the_model_computes_the_headers_loss_one_term_at_a_time(K_c, G, monkeypatch):
    """model(x1, x2): each query against the other view's key, L_cen against the other view's key's Sinkhorn,
    L_grp against the other view's batch groups, L_clu their mean; no C and no groups (MoCo-v2) compute no
    clustering at all, and L_clu is 0."""
    model, (x1, x2) = tiny_model(K_c=K_c, G=G, T=0.2, tau=0.3, eps=0.07), fixed_views(8, 16)
    with torch.no_grad():   # the key network unlike the query network
        for p in model.encoder_k.parameters():
            p.add_(0.1 * torch.randn_like(p))
    calls, real_sinkhorn, real_groups = [], cueco.sinkhorn, cueco.batch_groups
    monkeypatch.setattr(cueco, "sinkhorn", lambda *a, **k: calls.append("sinkhorn") or real_sinkhorn(*a, **k))
    monkeypatch.setattr(cueco, "batch_groups", lambda *a, **k: calls.append("groups") or real_groups(*a, **k))
    torch.manual_seed(1)   # the same key shuffles for both
    l_con, l_clu, keys, q1 = model(x1, x2)
    assert sorted(set(calls)) == [name for name, on in (("groups", G), ("sinkhorn", K_c)) if on]
    torch.manual_seed(1)
    with torch.no_grad():
        con, clu, keys_ref, q1_ref = reference_loss(model, x1, x2, 0.2, 0.3, 0.07, G)
    assert torch.allclose(l_con, con, atol=1e-5) and torch.allclose(l_clu, torch.as_tensor(clu), atol=1e-5)
    assert torch.allclose(keys, keys_ref, atol=1e-6) and torch.allclose(q1, q1_ref, atol=1e-6)
    assert q1.shape == (8, 8) and model.encoder_q.C.shape == (K_c, 8) and l_clu.dtype == torch.float32
    if K_c == G == 0:
        assert l_clu.item() == 0


def test_gradients_reach_query_and_centroids_but_not_key():
    model = tiny_model()
    x1, x2 = torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16)
    l_con, l_clu, keys, q1 = model(x1, x2)
    (l_con + l_clu).backward()
    assert keys.shape == (16, 8) and not keys.requires_grad and q1.shape == (8, 8)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoder_q.parameters())
    assert all(p.grad is None for p in model.encoder_k.parameters())


def test_key_shuffle_changes_the_batch_norm_groups_but_not_the_keys_order():
    model = tiny_model(bn_splits=4)
    x = torch.randn(16, 3, 16, 16)
    torch.manual_seed(1)
    k_shuffled = model.keys(x)
    with torch.no_grad():
        k_plain = model.encoder_k(x)
    assert not torch.allclose(k_shuffled, k_plain, atol=1e-4)                   # other BN groups ...
    cos = (k_shuffled * k_plain).sum(1)
    assert cos.min() > 0.5 and cos.mean() > (k_shuffled @ k_plain.t()).mean() + 0.1   # ... same images


def test_the_model_shuffles_the_key_batch():
    """model(x1, x2) hands the key network a permutation of each view's batch (other batch-norm groups than
    the query's) and returns the keys in the batch's order."""
    model, seen = tiny_model(bn_splits=4), []
    model.encoder_k.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0]))
    x1, x2 = torch.randn(16, 3, 16, 16), torch.randn(16, 3, 16, 16)
    torch.manual_seed(0)
    keys = model(x1, x2)[2]
    for x, x_k in zip((x1, x2), seen):
        rows = lambda t: sorted(map(tuple, t.flatten(1)[:, :4].tolist()))   # noqa: E731
        assert rows(x_k) == rows(x) and not torch.equal(x_k, x)
    with torch.no_grad():
        model.eval()   # batch norm from running statistics: a key no longer depends on its batch
        assert torch.allclose(model.keys(x1), model.encoder_k(x1), atol=1e-6)
    assert keys.shape == (32, 8)


def test_train_step_is_mocos_algorithm_1_with_the_clustering_term():
    """One train_step against the same done by hand: L = L_con + lambda L_clu, backward, SGD, theta_k <- m theta_k
    + (1 - m) theta_q, the 2N new keys at the queue's head; it returns L, its parts and the view-1 queries.
    Without a scaler (None) it is the same as with a disabled one."""
    model, (x1, x2) = tiny_model(), fixed_views(8, 16)
    ref = copy.deepcopy(model)
    opt, opt_ref = (cueco.make_optimizer(m, 0.1, 5e-4, 3.0) for m in (model, ref))
    torch.manual_seed(0)
    loss, l_con, l_clu, q1 = cueco.train_step(model, opt, None, x1, x2, 0.7, 0.9)
    torch.manual_seed(0)
    c, u, k, q = ref(x1, x2)
    (c + 0.7 * u).backward()
    opt_ref.step()
    assert loss.item() == pytest.approx((c + 0.7 * u).item()) and torch.equal(q1, q.detach())
    assert (l_con.item(), l_clu.item()) == (c.item(), u.item()) and not loss.requires_grad
    for a, b in zip(model.encoder_q.parameters(), ref.encoder_q.parameters()):
        assert torch.equal(a, b)
    for a, b, q in zip(model.encoder_k.parameters(), ref.encoder_k.parameters(), ref.encoder_q.parameters()):
        assert torch.allclose(a, 0.9 * b + 0.1 * q, atol=1e-6)
    assert torch.equal(model.queue[:16], k) and torch.equal(model.queue[16:], ref.queue[16:])
    assert model.queue_ptr.item() == 16


def test_lambda_zero_leaves_the_centroids_where_they_are():
    """With lambda 0 (the warm-up's start, or MoCo-v2) no gradient reaches C: one step does not move it."""
    model, (x1, x2) = tiny_model(), fixed_views(8, 16)
    C = model.encoder_q.C.detach().clone()
    opt = cueco.make_optimizer(model, 0.1, 5e-4, 10.0)
    cueco.train_step(model, opt, torch.amp.GradScaler("cpu", enabled=False), x1, x2, 0.0, 0.99)
    assert torch.equal(model.encoder_q.C, C) and model.encoder_q.C.grad.abs().max() == 0


def test_clustering_weight_ramps_up_then_stays():
    assert [cueco.clustering_weight(1.0, e, 10, 0.5) for e in range(1, 11)] == \
        [0.2, 0.4, 0.6, 0.8, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    assert cueco.clustering_weight(0.5, 1, 10, 0.0) == 0.5 and cueco.clustering_weight(0.0, 3, 10, 0.5) == 0


def test_momentum_update_matches_closed_form():
    """theta_k <- m theta_k + (1 - m) theta_q, parameter by parameter; bit for bit what torch.lerp computes."""
    model = tiny_model()
    with torch.no_grad():
        for p in model.encoder_q.parameters():
            p.add_(torch.randn_like(p))
    before_k = [p.clone() for p in model.encoder_k.parameters()]
    q = [p.clone() for p in model.encoder_q.parameters()]
    model.momentum_update(0.9)
    for pk, pk0, pq in zip(model.encoder_k.parameters(), before_k, q):
        assert torch.allclose(pk, 0.9 * pk0 + 0.1 * pq, atol=1e-6) and torch.equal(pk, torch.lerp(pk0, pq, 1 - 0.9))
    model.momentum_update(0.0)   # m = 0 copies the query
    for pk, pq in zip(model.encoder_k.parameters(), q):
        assert torch.equal(pk, pq)


def test_queue_is_fifo_and_wraps_around():
    model = tiny_model(K=10, dim=4)
    first = torch.arange(24.0).view(6, 4)
    model.enqueue(first)
    assert torch.equal(model.queue[:6], first) and model.queue_ptr.item() == 6
    second = -torch.arange(24.0).view(6, 4) - 1
    model.enqueue(second)            # 4 fill the end, 2 overwrite the oldest two
    assert torch.equal(model.queue[6:], second[:4]) and torch.equal(model.queue[:2], second[4:])
    assert torch.equal(model.queue[2:6], first[2:]) and model.queue_ptr.item() == 2


def test_the_optimizer_holds_the_centroids_rate_in_pytorchs_own_terms():
    """The centroids' group has its own lr (centroid_lr times the network's) and no weight decay; the groups
    carry no key that SGD does not know, so the optimizer copied alone keeps --centroid-lr."""
    model = tiny_model()
    opt = cueco.make_optimizer(model, 0.1, 5e-4, centroid_lr=7.0)
    assert opt.param_groups[1]["params"] == [model.encoder_q.C] and opt.param_groups[1]["lr"] == pytest.approx(0.7)
    assert opt.param_groups[0]["lr"] == 0.1 and opt.param_groups[1]["weight_decay"] == 0
    assert all(set(group) <= set(opt.defaults) | {"params"} for group in opt.param_groups)
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed == {id(p) for n, p in model.encoder_q.named_parameters() if n != "C"}


def test_the_cosine_schedule_is_a_pytorch_scheduler_that_resumes_where_it_stopped():
    """Each group's rate times (1 + cos(pi t / T)) / 2 at step t, stepped once a step; made again after t
    steps (a resumed run), it goes on with step t's rates."""
    opt = cueco.make_optimizer(tiny_model(), 0.2, 0.0, centroid_lr=5.0)
    schedule, lrs = cueco.cosine_schedule(opt, 10), []
    assert isinstance(schedule, torch.optim.lr_scheduler.LRScheduler)
    for _ in range(10):
        lrs.append([group["lr"] for group in opt.param_groups])
        opt.step()
        schedule.step()
    decay = [0.5 * (1 + math.cos(math.pi * t / 10)) for t in range(10)]
    assert lrs == [[pytest.approx(0.2 * f), pytest.approx(1.0 * f)] for f in decay]
    resumed = cueco.make_optimizer(tiny_model(), 0.2, 0.0, centroid_lr=5.0)
    resumed.load_state_dict(opt.state_dict())
    cueco.cosine_schedule(resumed, 10, 4)
    assert [group["lr"] for group in resumed.param_groups] == lrs[4]


# ---------------------------------------------------------------------------------------------------------
# backbone
# ---------------------------------------------------------------------------------------------------------


def test_split_batchnorm_groups_batches_independently():
    bn = cueco.SplitBatchNorm(3, num_splits=2).train()
    x = torch.stack([torch.randn(3, 2, 2) if i % 2 == 0 else 5 + 3 * torch.randn(3, 2, 2) for i in range(8)])
    y = bn(x)
    for group in (y[0::2], y[1::2]):   # groups are strided; each is normalised by its own statistics
        assert group.mean(dim=(0, 2, 3)).abs().max() < 1e-5
        assert (group.var(dim=(0, 2, 3), unbiased=False) - 1).abs().max() < 1e-3
    plain = torch.nn.BatchNorm2d(3).train()
    assert (plain(x)[0::2].mean(dim=(0, 2, 3)).abs() > 0.5).all()   # one group would not be centred
    assert torch.allclose(bn.running_mean, 0.1 * x.mean(dim=(0, 2, 3)), atol=1e-5)   # groups averaged


def test_split_batchnorm_equals_batch_norm_on_each_group():
    """Against F.batch_norm applied to each strided group on its own (as one GPU each would): outputs,
    gradients, and running statistics averaged over the groups."""
    torch.manual_seed(0)
    bn = cueco.SplitBatchNorm(3, num_splits=4).train()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2)
        bn.bias.normal_()
    x = (3 + 2 * torch.randn(16, 3, 5, 5)).requires_grad_()
    y, y_ref, means, variances = bn(x), torch.empty(16, 3, 5, 5), [], []
    for j in range(4):
        mean, var = torch.zeros(3), torch.ones(3)
        y_ref = y_ref.index_put((torch.arange(j, 16, 4),), F.batch_norm(x[j::4], mean, var, bn.weight, bn.bias,
                                                                          True, 0.1, bn.eps))
        means, variances = means + [mean], variances + [var]
    assert torch.allclose(y, y_ref, atol=1e-5)
    dy = torch.randn_like(y)
    for g, g_ref in zip(torch.autograd.grad(y, [x, bn.weight, bn.bias], dy),
                        torch.autograd.grad(y_ref, [x, bn.weight, bn.bias], dy)):
        assert torch.allclose(g, g_ref, atol=1e-4)
    assert torch.allclose(bn.running_mean, torch.stack(means).mean(0), atol=1e-6)   # unbiased variance
    assert torch.allclose(bn.running_var, torch.stack(variances).mean(0), atol=1e-6)


def test_resnet18_has_torchvisions_architecture():
    """At width 64 our ResNet-18 has exactly torchvision's parameters (without its classifier); the CIFAR
    stem is torchvision's with a 3x3 first convolution and no max-pool, as the MoCo notebook builds it."""
    count = lambda m: sum(p.numel() for p in m.parameters())                     # noqa: E731
    tv = torchvision.models.resnet18()
    ours = cueco.ResNet18(64, cifar_stem=False)
    assert count(ours) == count(tv) - count(tv.fc) == 11_176_512
    tv.conv1, tv.maxpool = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False), torch.nn.Identity()
    assert count(cueco.ResNet18(64, cifar_stem=True)) == count(tv) - count(tv.fc)
    assert ours(torch.randn(2, 3, 224, 224)).shape == (2, 512)
    assert cueco.ResNet18(16)(torch.randn(2, 3, 32, 32)).shape == (2, 128)


@pytest.mark.parametrize("cifar_stem, size", [(False, 64), (True, 32)], ids=["imagenet", "cifar"])
def test_resnet18_computes_torchvisions_features(cifar_stem, size):
    """With torchvision's weights copied in, the same pooled features in eval and train mode."""
    torch.manual_seed(0)
    tv = torchvision.models.resnet18()
    tv.fc = torch.nn.Identity()
    if cifar_stem:   # the MoCo notebook's CIFAR variant of torchvision's network
        tv.conv1, tv.maxpool = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False), torch.nn.Identity()
    with torch.no_grad():   # batch norm far from the identity, so eval mode tests the running statistics
        for m in tv.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5), m.bias.normal_(0, 0.2)
                m.running_mean.normal_(0, 0.2), m.running_var.uniform_(0.5, 2)
    ours = cueco.ResNet18(64, cifar_stem=cifar_stem, bn_splits=1)
    # the same modules in the same order: conv1 bn1 layer1.0.conv1 ... and stem.0 stem.1 layers.0.conv1 ...
    theirs = tv.state_dict()
    assert len(ours.state_dict()) == len(theirs) == 120
    for (name, a), (tv_name, b) in zip(ours.state_dict().items(), theirs.items()):
        assert a.shape == b.shape, (name, tv_name)
        a.copy_(b)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    for train in (False, True):
        ours.train(train), tv.train(train)
        with torch.no_grad():
            f, f_tv = ours(x), tv(x)                                               # [2, 512] each
        assert f.shape == (2, 512) and torch.allclose(f, f_tv, atol=1e-5), (train, (f - f_tv).abs().max())


# ---------------------------------------------------------------------------------------------------------
# augmentation: the batched views the training step draws, against torchvision's per-image recipe
# ---------------------------------------------------------------------------------------------------------

MEAN, STD = cueco.norm_stats(32)


def denorm(x):
    return x * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)


def step_views(images, n_batches=4):
    """The views that the training step sees: both views of every batch of one epoch."""
    views = [v for x1, x2 in cueco.epoch_views(images, 1, len(images) // n_batches, 0, torch.device("cpu"),
                                               images.shape[-1]) for v in (x1, x2)]
    return torch.cat(views)                                                         # [2N, 3, S, S]


def reference_transform(image_size, size):
    """MoCo-v2's recipe in torchvision, one image at a time: the specification of augment's views. Images
    above 64 px take ImageNet's recipe, with blur (a kernel of about a tenth of the view)."""
    mean, std = cueco.norm_stats(image_size)
    tfs = [v2.ToImage(), v2.RandomResizedCrop(size, scale=(0.2, 1.0), antialias=True), v2.RandomHorizontalFlip(),
           v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), v2.RandomGrayscale(p=0.2)]
    if image_size > 64:
        tfs.append(v2.RandomApply([v2.GaussianBlur(max(3, int(0.1 * size) // 2 * 2 + 1), (0.1, 2.0))], p=0.5))
    return v2.Compose(tfs + [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])


def reference_views(image, n):
    """n views of one uint8 image [3, S, S] by the per-image torchvision recipe (the specification)."""
    torch.manual_seed(0)
    tf = reference_transform(image.shape[-1], image.shape[-1])
    return torch.stack([tf(image) for _ in range(n)])                               # [n, 3, S, S]

def test_augment_shapes_ranges_and_per_image_randomness():
    img = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    x = img.repeat(64, 1, 1, 1)
    out = cueco.augment(x, 24, torch.Generator().manual_seed(1), random.Random(1))
    assert out.shape == (64, 3, 24, 24) and out.dtype == torch.float32
    pix = denorm(out)
    assert pix.min() >= -1e-5 and pix.max() <= 1 + 1e-5
    flat = out.flatten(1)
    assert torch.cdist(flat, flat).topk(2, largest=False).values[:, 1].min() > 0   # all 64 differ
    assert torch.equal(out, cueco.augment(x, 24, torch.Generator().manual_seed(1), random.Random(1)))   # reproducible
    big = cueco.augment(torch.randint(0, 256, (4, 3, 96, 96), dtype=torch.uint8), 96, None, random.Random())
    assert big.shape == (4, 3, 96, 96)                                            # the blurred recipe


def transitions(x):
    """Sign changes along the rows and the columns of channel 0, around each row's (column's) midpoint:
    a checkerboard of 2-px squares shows w/2 of them across a crop w pixels wide."""
    c = x[:, 0]                                                                      # [n, S, S]
    def count(rows):
        mid = (rows.amax(-1, keepdim=True) + rows.amin(-1, keepdim=True)) / 2
        s = rows > mid
        return (s[..., 1:] != s[..., :-1]).float().sum(-1).mean(-1)                 # [n]
    return count(c), count(c.transpose(1, 2))


def test_crop_geometry_of_the_step_matches_torchvision():
    """Crop area and aspect (read from a checkerboard, which jitter cannot hide) and flips (read from an
    image dark on the left) of the step's views against torchvision's RandomResizedCrop and flip."""
    n = 1000
    board = ((torch.arange(32)[:, None] // 2 + torch.arange(32)[None, :] // 2) % 2) * 128 + 64
    board = board.to(torch.uint8).expand(3, 32, 32)
    ours, ref = step_views(board.expand(n, 3, 32, 32).contiguous()), reference_views(board, 2 * n)
    (wo, ho), (wr, hr) = transitions(ours), transitions(ref)
    area_o, area_r = (wo * ho) / 256, (wr * hr) / 256                              # about the crop's area
    assert abs(area_o.mean() - area_r.mean()) < 0.03, (area_o.mean(), area_r.mean())
    assert abs(area_o.std() - area_r.std()) < 0.03, (area_o.std(), area_r.std())
    aspect_o, aspect_r = (wo / ho).log(), (wr / hr).log()                         # log(w / h)
    assert abs(aspect_o.mean() - aspect_r.mean()) < 0.03
    assert abs(aspect_o.std() - aspect_r.std()) < 0.02, (aspect_o.std(), aspect_r.std())   # ~0.17
    q = torch.tensor([0.01, 0.99])   # the range: near log(3/4) and log(4/3), as torchvision's
    assert torch.allclose(aspect_o.quantile(q), aspect_r.quantile(q), atol=0.05), aspect_o.quantile(q)
    assert torch.allclose(area_o.quantile(q), area_r.quantile(q), atol=0.03), area_o.quantile(q)
    half = torch.zeros(3, 32, 32, dtype=torch.uint8)
    half[..., 16:] = 200                                                             # dark left, bright right
    flips = lambda v: (v[..., :16].mean((1, 2, 3)) > v[..., 16:].mean((1, 2, 3)) + 0.1).float().mean()   # noqa
    fo, fr = flips(step_views(half.expand(n, 3, 32, 32).contiguous())), flips(reference_views(half, 2 * n))
    assert fr > 0.3 and abs(fo - fr) < 0.05, (fo, fr)                               # p = 0.5 of the non-flat
    top = half.transpose(1, 2).contiguous()                                         # dark top, bright bottom
    upside_down = flips(step_views(top.expand(n, 3, 32, 32).contiguous()).transpose(2, 3))
    assert upside_down == 0                                                         # never flipped vertically


def test_blur_of_large_images_in_the_step_matches_torchvision(monkeypatch):
    """Images above 64 px: the step blurs about half the views, each image on its own coin, as much as
    torchvision's GaussianBlur (p = 0.5, sigma ~ U(0.1, 2)) of the recipe blurs the same views."""
    n, size, batches = 96, 72, 24                                                 # 48 sigmas
    board = ((torch.arange(size)[:, None] // 2 + torch.arange(size)[None, :] // 2) % 2) * 128 + 64
    images = board.to(torch.uint8).expand(n, 3, size, size).contiguous()

    def sharpness(v):   # energy of neighbouring pixels' differences, [n]
        c = v[:, 0]
        return ((c[..., 1:] - c[..., :-1]) ** 2).mean((1, 2)) + ((c[:, 1:] - c[:, :-1]) ** 2).mean((1, 2))

    views = step_views(images, batches)                                             # [2n, 3, S, S]
    with monkeypatch.context() as m:   # the same views (the blur draws nothing from g), none blurred
        m.setattr(v2.functional, "gaussian_blur", lambda x, *args, **kw: x)
        plain = step_views(images, batches)
    blur = [t for t in reference_transform(size, size).transforms if "GaussianBlur" in str(t)]
    torch.manual_seed(0)
    ref = torch.stack([blur[0](v) for v in plain])                                  # per image
    kept_o, kept_r = sharpness(views) / sharpness(plain), sharpness(ref) / sharpness(plain)
    assert kept_o.max() < 1 + 1e-4                                                 # blur only softens
    for threshold in (0.99, 0.6):   # visibly blurred (sigma above ~0.3), and strongly so
        blurred_o, blurred_r = (kept_o < threshold).float().mean(), (kept_r < threshold).float().mean()
        assert abs(blurred_o - blurred_r) < 0.15, (threshold, blurred_o, blurred_r)   # sigma per batch: noisy
    assert 0.35 < (kept_r < 0.99).float().mean() < 0.55                             # p = 0.5 of the views
    # sigma is drawn per batch, the coin per image: most batches hold blurred and sharp views both
    per_batch = (kept_o < 0.99).float().view(2 * batches, -1).mean(1)               # [48]
    assert ((per_batch > 0) & (per_batch < 1)).float().mean() > 0.6, per_batch


def test_the_blur_follows_the_images_size_and_draws_sigma_from_0_1_to_2(monkeypatch):
    """One rule: images above 64 px are blurred (ImageNet's recipe), whatever the views' size, with a kernel
    of about a tenth of the view and sigma ~ U(0.1, 2) (MoCo-v2's); images up to 64 px never are."""
    calls, real = [], v2.functional.gaussian_blur
    monkeypatch.setattr(v2.functional, "gaussian_blur", lambda x, k, s: calls.append((k, s)) or real(x, k, s))
    for i in range(300):
        cueco.augment(torch.randint(0, 256, (2, 3, 72, 72), dtype=torch.uint8), 54, None, random.Random(i))
    sigmas = torch.tensor([s[0] for _, s in calls])
    assert len(calls) == 300 and all(k == [5, 5] and s[0] == s[1] for k, s in calls)
    assert 0.1 <= sigmas.min() < 0.2 and 1.9 < sigmas.max() <= 2.0 and abs(sigmas.mean() - 1.05) < 0.1
    calls.clear()
    cueco.augment(torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8), 64, None, random.Random(0))
    assert calls == []

def test_colour_of_the_step_matches_torchvision():
    """A flat coloured image isolates the photometric part (jitter in random order, grayscale): the
    output colour's distribution must match torchvision's per-image recipe."""
    n = 1500
    img = torch.tensor([200, 90, 40], dtype=torch.uint8).view(3, 1, 1).expand(3, 8, 8)
    ours = denorm(step_views(img.expand(n, 3, 8, 8).contiguous())).mean(dim=(2, 3))    # [2n, 3]
    ref = denorm(reference_views(img.contiguous(), 2 * n)).mean(dim=(2, 3))
    assert torch.allclose(ours.mean(0), ref.mean(0), atol=0.015), (ours.mean(0), ref.mean(0))
    assert torch.allclose(ours.std(0), ref.std(0), atol=0.015), (ours.std(0), ref.std(0))
    gray_ours = (ours.max(1).values - ours.min(1).values < 1e-3).float().mean()
    gray_ref = (ref.max(1).values - ref.min(1).values < 1e-3).float().mean()
    assert abs(gray_ours - gray_ref) < 0.03                                           # p = 0.2


def test_crops_sample_the_same_pixels_without_border_padding(monkeypatch):
    """Apple's MPS lacks grid_sample's padding_mode="border" before torch 2.13: the crop clamps its grid
    to the outermost pixel centres instead, so that zero padding gives border padding's output (exactly
    where 1/W is a binary fraction, as for 32 px; to float rounding elsewhere)."""
    real, modes = F.grid_sample, []

    def spy(x, grid, **kw):
        modes.append(kw["padding_mode"])
        out = real(x, grid, **kw)
        assert torch.allclose(out, real(x, grid, **{**kw, "padding_mode": "border"}), atol=1e-6)
        return out

    monkeypatch.setattr(F, "grid_sample", spy)
    images = torch.randint(0, 256, (64, 3, 24, 40), dtype=torch.uint8)   # not square: each axis its own
    for size in (16, 48):
        cueco.augment(images, size, torch.Generator().manual_seed(size), random.Random(0))
    assert modes == ["zeros", "zeros"]


def test_shift_hue_matches_torchvisions_adjust_hue():
    x = torch.rand(4, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    for h in (0.0, 0.07, -0.1, 0.5):
        expected = v2.functional.adjust_hue(x, h)
        assert torch.allclose(cueco.shift_hue(x, torch.full((4, 1, 1), h)), expected, atol=1e-5), h


# ---------------------------------------------------------------------------------------------------------
# evaluation: metrics, kNN, k-means, t-SNE, figures
# ---------------------------------------------------------------------------------------------------------

def brute_force_metrics(pred, target):
    pred, target = pred.tolist(), target.tolist()
    n = len(pred)
    pairs = list(itertools.combinations(range(n), 2))   # ARI from its definition over all pairs
    a = sum(pred[i] == pred[j] and target[i] == target[j] for i, j in pairs)
    same_p = sum(pred[i] == pred[j] for i, j in pairs)
    same_t = sum(target[i] == target[j] for i, j in pairs)
    exp = same_p * same_t / len(pairs)
    ari = (a - exp) / ((same_p + same_t) / 2 - exp)
    cl, lb = sorted(set(pred)), sorted(set(target))     # accuracy: the best injective map clusters -> labels
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
    # worked: 2 neighbours of class 1 at cosine 1.0 outweigh 3 of class 0 at cosine 0 (k=5, t=0.1) ...
    train = torch.tensor([[1.0, 0], [1, 0], [0, 1], [0, 1], [0, 1]])
    labels, query = torch.tensor([1, 1, 0, 0, 0]), torch.tensor([[1.0, 0]])
    assert cueco.knn_accuracy(train, labels, query, torch.tensor([1]), k=5, t=0.1) == 100.0
    # ... but at t = 100 every vote weighs about the same and the majority, class 0, wins
    assert cueco.knn_accuracy(train, labels, query, torch.tensor([0]), k=5, t=100.0) == 100.0


def test_features_come_from_batch_norms_running_statistics_and_change_nothing():
    """The evaluation runs the backbone in eval mode, even when it was training: an image's features do not
    depend on the other images of its batch, and extracting them leaves the running statistics as they were."""
    backbone = tiny_model(bn_splits=1).encoder_q.backbone.train()
    with torch.no_grad():
        for m in backbone.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.3), m.running_var.uniform_(0.5, 2)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (12, 3, 16, 16), dtype=torch.uint8, generator=g)
    data = cueco.Data(images[:8], torch.zeros(8), images[8:], torch.zeros(4), ["a"], 16)
    before = copy.deepcopy(backbone.state_dict())
    f_train, f_test = cueco.features(backbone, data, torch.device("cpu"), batch_size=3)
    assert f_train.shape == (8, 32) and f_test.shape == (4, 32)
    assert torch.allclose(f_train, cueco.features(backbone, data, torch.device("cpu"), batch_size=8)[0], atol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(before.values(), backbone.state_dict().values()))

def test_kmeans_recovers_blobs():
    x, y = blobs(40, 5, 8, 0.3)
    assert cueco.cluster_metrics(cueco.kmeans(x, 5), y)["acc"] == 1.0


def kmeans_draws(monkeypatch, picks=None):
    """The indices that k-means++'s random draws pick (the seeding's centres), recorded; with `picks`,
    those are drawn instead."""
    drawn = []

    def spy(real):
        def draw(*args, **kw):
            out = real(*args, **kw)
            if picks is not None:
                out = torch.full_like(out, picks[len(drawn)])
            drawn.append(out.item())
            return out
        return draw

    for name in ("randint", "multinomial"):
        monkeypatch.setattr(torch, name, spy(getattr(torch, name)))
    return drawn


def lloyd_reference(x, seeds):
    """Textbook Lloyd in float64 on the unit vectors from the points x[seeds]: assign each point to its
    nearest centre, move each centre to its points' mean (a centre without points stays), until the
    assignment stops changing. Returns the labels and the clusters that were ever empty."""
    x = F.normalize(x.double(), dim=1)
    centres, labels, emptied = x[seeds].clone(), None, set()
    for _ in range(100):
        new = torch.cdist(x, centres).argmin(1)
        if labels is not None and torch.equal(new, labels):
            break
        labels = new
        for j in range(len(centres)):
            if (labels == j).any():
                centres[j] = x[labels == j].mean(0)
            else:
                emptied.add(j)
    return labels, emptied


def test_kmeans_runs_lloyd_to_convergence_from_its_seeding(monkeypatch):
    """Elongated, overlapping blobs, on which the k-means++ seeding alone labels a third of the points
    otherwise: the labels are textbook Lloyd's from the same seeding, a fixed point of Lloyd's update."""
    g = torch.Generator().manual_seed(0)
    stretch = torch.tensor([3.0, 1, 0.3, 0.3, 0.3, 0.3])
    x = torch.cat([c + stretch * torch.randn(60, 6, generator=g) for c in torch.randn(4, 6, generator=g)])
    drawn = kmeans_draws(monkeypatch)
    labels = cueco.kmeans(x, 4)                                                     # labels: [240]
    assert len(drawn) == 4
    expected, _ = lloyd_reference(x, drawn)
    assert torch.equal(labels, expected), f"{(labels != expected).sum()} of 240 points differ"
    u = F.normalize(x, dim=1)
    seeded = torch.cdist(u, u[drawn]).argmin(1)                                    # before any update
    assert (seeded != labels).float().mean() > 0.2                                 # Lloyd has work to do
    means = torch.stack([u[labels == j].mean(0) for j in range(4)])                # [4, 6]
    assert torch.equal(torch.cdist(u, means).argmin(1), labels)                    # a fixed point


def test_kmeans_keeps_the_centre_of_a_cluster_that_empties(monkeypatch):
    """Seeds A, B, C, E, F (drawn for it): after one update A takes B's seed point, C and E take the rest
    of B's points, and B is empty; its centre must stay, not fall to the origin (nearer than 1 to no
    point but the south pole's, which would join it) or become NaN."""
    s = 0.1   # near the north pole, on a small patch of the sphere, so about as in the plane
    plane = [(-1, 0), (0, 0), (2, 2), (2, -2)] + [(-0.55, 0)] * 3 + [(0.9, 0.9)] * 3 + [(0.9, -0.9)] * 3 + \
        [(1.05, 1.05)] * 3 + [(1.05, -1.05)] * 3
    x = torch.tensor([(s * a, s * b, 1.0) for a, b in plane] + [(1.0, 0.01 * i, 0.0) for i in range(10)]
                     + [(0.0, 0.0, -1.0)])                                          # x: [30, 3]
    seeds = [0, 1, 2, 3, 19]                                                        # A, B, C, E, F
    kmeans_draws(monkeypatch, seeds)
    labels = cueco.kmeans(x, 5)
    expected, emptied = lloyd_reference(x, seeds)
    assert emptied == {1} and 1 not in expected.tolist()
    assert torch.equal(labels, expected)
    assert labels[-1] == 4                                                          # the south pole: F's


def trustworthiness(x, y, k=10):
    """Venna & Kaski's trustworthiness: 1 = no false neighbours in the embedding."""
    n = len(x)
    rx = torch.cdist(x, x).fill_diagonal_(float("inf")).argsort(1).argsort(1)      # rank of j for i
    ny = torch.cdist(y, y).fill_diagonal_(float("inf")).argsort(1)[:, :k]          # embedding kNN
    pen = (rx.gather(1, ny) + 1 - k).clamp_min(0).sum().item()
    return 1 - 2 / (n * k * (2 * n - 3 * k - 1)) * pen


def test_tsne_separates_blobs_and_keeps_neighbourhoods():
    x, y = blobs(100, 5, 30, 1.0)
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


@pytest.fixture
def figures(monkeypatch):
    """The matplotlib Figures that the plotting functions save, kept after they are written."""
    from matplotlib.figure import Figure
    saved, real = [], Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **kw: (saved.append(fig), real(fig, *a, **kw))[1])
    return saved


def test_tsne_figure_colours_points_by_class_and_by_matched_cluster(tmp_path, figures):
    """Left: each point at its t-SNE position in its class's tab10 colour; right: in its matched
    cluster's; the legend names the classes in their colours."""
    import matplotlib
    y = torch.randn(12, 2, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2] * 4)
    clusters = torch.tensor([2, 1, 0] * 4)   # matched clusters: other colours than the classes
    cueco.plot_tsne(y, labels, clusters, ["cat", "dog", "ship"], str(tmp_path / "t.png"), "a title")
    (fig,) = figures
    tab10 = matplotlib.colormaps["tab10"].colors
    left, right = fig.axes[:2]
    for ax, c, name in ((left, labels, "true class"), (right, clusters, "k-means cluster")):
        points = ax.collections[0]
        assert ax.get_title() == f"coloured by {name}" + ("" if c is labels else ", in its matched class's colour")
        assert torch.allclose(torch.tensor(points.get_offsets()).float(), y)
        expected = torch.tensor([[*tab10[i], 0.8] for i in c.tolist()])           # RGBA, alpha 0.8
        assert torch.allclose(torch.tensor(points.get_facecolors()).float(), expected, atol=1e-6)
    legend = left.get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["cat", "dog", "ship"]
    assert [tuple(h.get_facecolor()[0][:3]) for h in legend.legend_handles] == list(tab10[:3])
    assert fig._suptitle.get_text() == "a title" and (tmp_path / "t.png").is_file()


def test_curves_figure_plots_the_history_with_labels_and_a_legend_for_every_line(tmp_path, figures):
    """Four panels, each the history's values of one quantity against the epochs that recorded it, with a
    y label and a legend entry for every line; the even split 1/K_c dashed on the last; the epochs in which
    lambda still rose shaded; whole epochs on the x axis; kNN and the share from 0."""
    history = [{"epoch": e, "loss_contrastive": 9 - e, "loss_clustering": 5 - e / 2, "max_cluster_share": 0.1 * e,
                "lambda_clu": min(1.0, e / 2)} for e in range(1, 5)]
    history[1]["knn"], history[3]["knn"] = 30.0, 45.0                               # the monitor's epochs
    cueco.plot_curves(history, str(tmp_path / "c.png"), "t", K_c=20)
    (fig,) = figures
    panels = [("contrastive loss (both directions)", [1, 2, 3, 4], [8, 7, 6, 5]),
              ("clustering loss", [1, 2, 3, 4], [4.5, 4, 3.5, 3]),
              ("kNN monitor on the test set", [2, 4], [30, 45]),
              ("largest own cluster", [1, 2, 3, 4], [0.1, 0.2, 0.3, 0.4])]
    assert len(fig.axes) == 4
    for ax, (title, xs, ys) in zip(fig.axes, panels):
        line = ax.get_lines()[0]
        assert ax.get_title() == title and list(line.get_xdata()) == xs and ax.get_ylabel()
        assert list(line.get_ydata()) == pytest.approx(ys)
        assert [t.get_text() for t in ax.get_legend().get_texts()] == \
            [l.get_label() for l in ax.get_lines()] + ["lambda rising"]
        assert ax.patches[0].get_x() == 0.5 and ax.patches[0].get_width() == 1   # epoch 1: lambda 0.5, then 1
        assert all(float(t).is_integer() for t in ax.get_xticks())
    assert fig.axes[2].get_ylim()[0] == 0 and fig.axes[3].get_ylim()[0] == 0
    even = fig.axes[3].get_lines()[1]
    assert list(even.get_ydata()) == [0.05, 0.05] and even.get_linestyle() == "--"


def test_grid_figure_shows_the_images_in_their_rows(tmp_path, figures):
    """The grid holds each given image at its row and column (white where a row runs short), 2-px
    white borders between them, and each row's label beside it."""
    g, s = torch.Generator().manual_seed(0), 8
    images = [[torch.randint(0, 256, (3, s, s), generator=g, dtype=torch.uint8) for _ in range(3)],
              [torch.randint(0, 256, (3, s, s), generator=g, dtype=torch.uint8), None, None]]
    cueco.plot_grid(images, ["5 ~ cat", "1 ~ "], str(tmp_path / "k.png"))
    (fig,) = figures
    ax = fig.axes[0]
    grid = torch.as_tensor(ax.get_images()[0].get_array()).permute(2, 0, 1)        # [3, H, W]
    assert grid.shape == (3, 2 + 2 * (s + 2), 2 + 3 * (s + 2))
    for r, row in enumerate(images):
        for c, image in enumerate(row):
            top, left = 2 + r * (s + 2), 2 + c * (s + 2)
            cell = grid[:, top:top + s, left:left + s]
            assert torch.equal(cell, image if image is not None else torch.full_like(cell, 255)), (r, c)
    assert (grid[:, :2] == 255).all() and (grid[:, :, :2] == 255).all()              # the borders
    assert [t.get_text() for t in ax.get_yticklabels()] == ["5 ~ cat", "1 ~ "]
    for r, tick in enumerate(ax.get_yticks()):                                      # beside its row
        assert 2 + r * (s + 2) <= tick < 2 + r * (s + 2) + s

def test_linear_probe_learns_separable_features():
    x, y = blobs(60, 3, 10, 2.0)
    assert cueco.linear_probe(x[::2], y[::2], x[1::2], y[1::2]) > 95
    assert cueco.linear_probe(x[::2], y[::2], x[1::2], torch.roll(y[1::2], 30)) < 50   # can fail


def test_linear_probe_standardises_features_of_very_different_scales():
    """One informative feature of scale 1e-3 among large offset noise features: only standardised
    features let the probe find it, and it scores as on features standardised beforehand."""
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (400,), generator=g)
    signal = 5 + 1e-3 * (2 * y - 1) + 2e-4 * torch.randn(400, generator=g)        # 5 sigma apart
    x = torch.cat([signal[:, None], 1000 + 100 * torch.randn(400, 8, generator=g)], 1)   # [400, 9]
    tr, te = slice(0, None, 2), slice(1, None, 2)
    acc = cueco.linear_probe(x[tr], y[tr], x[te], y[te])
    assert acc > 95, acc
    z = (x - x[tr].mean(0)) / x[tr].std(0)                                          # done by hand
    assert acc == cueco.linear_probe(z[tr], y[tr], z[te], y[te])
    # the same head and optimiser on the raw features: the noise's logits drown the signal's
    torch.manual_seed(0)
    head, order = torch.nn.Linear(9, 2), torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-2, weight_decay=5e-4)
    for _ in range(100):
        for idx in torch.randperm(200, generator=order).split(256):
            loss = F.cross_entropy(head(x[tr][idx]), y[tr][idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    raw = 100.0 * (head(x[te]).argmax(1) == y[te]).float().mean().item()
    assert raw < 65, raw   # so the test is meaningful: without standardisation, chance level


# ---------------------------------------------------------------------------------------------------------
# data sets: CIFAR-10 and CIFAR-100 (with its CIFAR-20 labels) in their own file format
# ---------------------------------------------------------------------------------------------------------

def write_cifar(root, hundred, n_train, n_test, monkeypatch):
    """CIFAR files as the Toronto archives hold them (pickled dicts of uint8 rows [N, 3072], R then G then
    B planes), with torchvision's checksum test switched off for these made-up bytes."""
    import numpy as np
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)
    folder = os.path.join(root, "cifar-100-python" if hundred else "cifar-10-batches-py")
    os.makedirs(folder)
    classes = 100 if hundred else 10
    g = torch.Generator().manual_seed(0)

    def batch(name, n):
        labels = (torch.arange(n) % classes).tolist()
        rows = torch.randint(0, 256, (n, 3072), generator=g, dtype=torch.uint8).numpy()
        d = {"data": rows, "fine_labels" if hundred else "labels": labels}
        if hundred:
            d["coarse_labels"] = [(3 * y + 1) % 20 for y in labels]   # any fixed map will do
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump(d, f)
        return np.asarray(rows), labels

    if hundred:
        train, test = batch("train", n_train), batch("test", n_test)
        meta = ("meta", {"fine_label_names": [f"c{i}" for i in range(100)]})
    else:
        train = [batch(f"data_batch_{i}", n_train // 5) for i in range(1, 6)][0]
        test, meta = batch("test_batch", n_test), ("batches.meta", {"label_names": [f"c{i}" for i in range(10)]})
    with open(os.path.join(folder, meta[0]), "wb") as f:
        pickle.dump(meta[1], f)
    return train, test


def test_cifar10_files_load_in_the_right_layout(tmp_path, monkeypatch):
    (rows, labels), _ = write_cifar(tmp_path, False, 50, 20, monkeypatch)
    data = cueco.load_cifar("cifar10", str(tmp_path))
    assert data.train.shape == (50, 3, 32, 32) and data.train.dtype == torch.uint8 and data.image_size == 32
    assert data.train[0, :, 0, 1].tolist() == [rows[0][1], rows[0][1024 + 1], rows[0][2048 + 1]]   # R, G, B
    assert data.train_y[:10].tolist() == labels[:10] and len(data.test_y) == 20


def test_cifar100_runs_on_its_100_fine_classes(tmp_path, monkeypatch):
    _, (_, test_labels) = write_cifar(tmp_path, True, 200, 100, monkeypatch)
    data = cueco.load_cifar("cifar100", str(tmp_path), limit_test=40)
    assert len(data.test_y) == 40 and len(data.classes) == 100
    argv = tiny_args(str(tmp_path), tmp_path / "r", "--epochs", "0", "--tsne-points", "0")
    argv[:4] = ["--dataset", "cifar100", "--data-dir", str(tmp_path)]
    scored, real = [], cueco.cluster_metrics
    monkeypatch.setattr(cueco, "cluster_metrics", lambda pred, target: (
        scored.append(target.tolist()), real(pred, target))[1])
    cueco.main(argv)
    assert scored == [test_labels, test_labels]   # k-means, then the own clusters


# ---------------------------------------------------------------------------------------------------------
# checkpoints and bad input
# ---------------------------------------------------------------------------------------------------------

def test_checkpoint_round_trip(tmp_path):
    model = tiny_model()
    opt = torch.optim.SGD(model.encoder_q.parameters(), lr=0.1, momentum=0.9)
    args = cueco.parse_args(["--out", str(tmp_path)])
    path = str(tmp_path / "c.pt")
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    cueco.save_checkpoint(path, model, opt, scaler, 3, vars(args), [{"epoch": 3}])
    other = tiny_model()
    with torch.no_grad():
        other.queue.zero_()
    ck = cueco.load_checkpoint(path, other, torch.optim.SGD(other.encoder_q.parameters(), lr=0.1), scaler)
    for a, b in zip(model.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b)
    assert ck["epoch"] == 3 and ck["args"]["lr"] == 0.06 and not os.path.exists(path + ".tmp")


class Evil:
    """Unpickled, it runs a shell command that writes a file."""
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("content", ["garbage", "pickle", "plain_dict"])
def test_resume_rejects_files_that_are_not_our_checkpoints(tmp_path, capsys, content):
    path, marker = tmp_path / "bad.pt", tmp_path / "pwned"
    if content == "garbage":
        path.write_bytes(b"\x00not a checkpoint" * 10)
    elif content == "pickle":
        torch.save({"x": Evil(marker)}, path)
    else:
        torch.save({"model": {}}, path)
    fails(["--resume", str(path)], "not a checkpoint of this script", capsys)
    assert not marker.exists()   # weights_only: the payload never ran


def test_resume_into_another_model_is_one_line(tmp_path, capsys):
    folder = make_folder(tmp_path / "d", n_per_class=8)
    cueco.main(tiny_args(folder, tmp_path / "r", "--epochs", "1", "--tsne-points", "0"))
    fails(["--resume", str(tmp_path / "r" / "checkpoint.pt"), "--width", "8"], "of another model", capsys)


def test_a_checkpoint_of_another_version_names_its_format_and_what_to_do(tmp_path, capsys):
    path = tmp_path / "old.pt"
    torch.save({"format": "cueco-checkpoint-v2", "epoch": 3, "args": {}, "model": {}}, path)
    fails(["--resume", str(path)], "is a cueco-checkpoint-v2, written by another version of cueco.py: finish it "
          "with that version, or start a new run", capsys)


@pytest.mark.parametrize("argv, message", [
    (["--dataset", "imagenet"], "argument --dataset: invalid choice: 'imagenet'"),
    (["--epochs", "-1"], "--epochs must be >= 0"),
    (["--batch-size", "0"], "--batch-size must be > 0"),
    (["--lr", "0"], "--lr must be > 0"),
    (["--lr", "nan"], "--lr must be > 0"),
    (["--key-momentum", "1.0"], "--key-momentum must be in [0, 1)"),
    (["--queue-size", "100"], "--queue-size"),
    (["--clu-warmup", "2"], "--clu-warmup must be in [0, 1]"),
    (["--view-scale", "0"], "--view-scale must be in (0, 1]"),
    (["--view-scale", "1.5"], "--view-scale must be in (0, 1]"),
    (["--batch-size", "100"], "--bn-splits 8"),
    (["--dataset", "folder", "--data-dir", "/nonexistent/x"], "does not exist"),
    (["--resume", "/nonexistent/ckpt.pt"], "no such file"),
    (["--device", "banana"], "--device banana cannot be used here (not a device's name; valid: auto, cpu, cuda"),
    (["--device", "gpu"], "--device gpu cannot be used here (not a device's name; valid: auto, cpu, cuda, cuda:N, mps)"),
    (["--precision", "fp8"], "argument --precision: invalid choice: 'fp8'"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag (python cueco.py --help lists the flags)"),
])
def test_bad_input_gives_one_line_and_exit_2(argv, message, capsys, tmp_path):
    fails(argv + ["--out", str(tmp_path)], message, capsys)


# Every range rule of parse_args, written out here rather than read from cueco's own list, so that a rule
# dropped from cueco.py fails this test. The value is the nearest one outside the range.
RANGE_RULES = [(flag, value, "> 0") for flag, value in [
    ("--batch-size", "0"), ("--width", "0"), ("--dim", "0"), ("--queue-size", "0"), ("--bn-splits", "0"),
    ("--log-every", "0"), ("--lr", "0"), ("--temperature", "0"), ("--clu-temperature", "0"),
    ("--sinkhorn-eps", "0")]] + \
    [(flag, value, ">= 0") for flag, value in [
        ("--epochs", "-1"), ("--limit-train", "-1"), ("--limit-test", "-1"), ("--eval-every", "-1"),
        ("--num-workers", "-1"), ("--image-size", "-1"), ("--tsne-points", "-1"),
        ("--lambda-clu", "-0.01"), ("--weight-decay", "-1e-6"), ("--memory-gb", "-0.01"),
        ("--save-minutes", "-0.01"), ("--head-clusters", "-1"), ("--centroid-lr", "-0.01"),
        ("--num-groups", "-1")]] + \
    [("--key-momentum", "1", "in [0, 1)"), ("--key-momentum", "-0.01", "in [0, 1)"),
     ("--view-scale", "0", "in (0, 1]"), ("--view-scale", "1.01", "in (0, 1]"),
     ("--clu-warmup", "-0.01", "in [0, 1]"), ("--clu-warmup", "1.01", "in [0, 1]")]

@pytest.mark.parametrize("flag, value, rule", RANGE_RULES)
def test_every_range_rule_names_its_flag(flag, value, rule, capsys, tmp_path):
    # a folder that does not exist: a rule that is missing ends in the data's error, not a training run
    # (and --image-size is checked against CIFAR's 32 px before the rules)
    data = ["--dataset", "folder", "--data-dir", str(tmp_path / "none")]
    fails(data + ["--out", str(tmp_path / "r"), f"{flag}={value}"], f"{flag} must be {rule}, got", capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_missing_gpu_is_one_line(capsys, tmp_path):
    fails(["--device", "cuda", "--out", str(tmp_path)], "--device cuda cannot be used", capsys)


def test_unwritable_outputs_fail_before_any_data_is_loaded(tmp_path, capsys):
    (tmp_path / "file").write_text("a regular file")
    under_file = str(tmp_path / "file" / "sub")
    # with --data-dir missing, loading data would fail with another message: these must come first
    nodata = ["--data-dir", str(tmp_path / "no-cifar-here")]
    fails(nodata + ["--out", under_file], "--out", capsys)
    fails(nodata + ["--out", str(tmp_path / "r"), "--figures-dir", under_file], "--figures-dir", capsys)
    if os.path.isdir("/sys/kernel"):   # a read-only place, even for root
        fails(nodata + ["--out", "/sys/kernel/cueco-test"], "cannot be created", capsys)


def test_parsing_the_flags_creates_nothing(tmp_path, monkeypatch):
    """parse_args only reads and checks: the run makes its folders (runs/, figures/) when it starts."""
    monkeypatch.chdir(tmp_path)
    cueco.parse_args([])
    cueco.parse_args(["--out", str(tmp_path / "r"), "--figures-dir", str(tmp_path / "f")])
    assert os.listdir(tmp_path) == []

def test_folder_errors(tmp_path, capsys):
    os.makedirs(tmp_path / "empty" / "train")
    os.makedirs(tmp_path / "empty" / "test")
    os.makedirs(tmp_path / "classes_only" / "train" / "cat")
    fails(tiny_args(str(tmp_path / "classes_only"), tmp_path), "holds no images", capsys)
    fails(tiny_args(str(tmp_path / "empty"), tmp_path), "holds no images", capsys)
    fails(tiny_args(str(tmp_path / "nothing"), tmp_path), "does not exist", capsys)
    folder = make_folder(tmp_path / "ok", n_per_class=2)
    fails(tiny_args(folder, tmp_path, "--epochs", "1"), "exceeds the 4 training images", capsys)
    (tmp_path / "list.txt").write_text("a\nzebra\n")
    fails(tiny_args(folder, tmp_path, "--class-list", str(tmp_path / "list.txt")), "zebra", capsys)
    bad = tmp_path / "ok" / "train" / "a" / "broken.png"
    bad.write_bytes(b"this is not a png")
    fails(tiny_args(folder, tmp_path, "--epochs", "0"), "broken.png", capsys)


def test_unreadable_image_is_named_from_a_worker(tmp_path):
    folder = make_folder(tmp_path / "d", n_per_class=4)
    (tmp_path / "d" / "test" / "b" / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    r = run_cli(tiny_args(folder, tmp_path, "--epochs", "0", "--num-workers", "1"))
    assert r.returncode == 2 and "broken.jpg" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_cifar_not_downloadable_says_how_to_place_files(tmp_path):
    # No internet here: the download fails, and the message says what to do by hand.
    r = run_cli(["--dataset", "cifar10", "--data-dir", str(tmp_path), "--epochs", "0",
                 "--out", str(tmp_path / "r")], timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "cifar-10-python.tar.gz" in r.stderr and "by hand" in r.stderr


# ---------------------------------------------------------------------------------------------------------
# presets and what a run says: the laptop's run without a GPU, the gpu preset with one, the user's flags win
# ---------------------------------------------------------------------------------------------------------

def test_preset_auto_is_200_epochs_on_a_gpu_and_the_laptop_elsewhere(tmp_path, monkeypatch):
    """auto: on a CUDA GPU the full network and batch for 200 epochs (a free T4 session), else laptop."""
    out = ["--out", str(tmp_path), "--figures-dir", str(tmp_path)]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    laptop = cueco.parse_args(out)
    assert laptop.preset == "laptop" and cueco.PRESETS["laptop"]
    assert all(getattr(laptop, k) == v for k, v in cueco.PRESETS["laptop"].items())
    assert cueco.parse_args(out + ["--device", "mps"]).preset == "laptop"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    gpu = cueco.parse_args(out)
    assert (gpu.preset, gpu.width, gpu.epochs, gpu.batch_size, gpu.view_scale, gpu.lr, gpu.eval_every) == \
        ("gpu", 64, 200, 512, 1.0, 0.06, 10)
    full = cueco.parse_args(out + ["--preset", "full"])
    assert (full.preset, full.width, full.epochs, full.batch_size) == ("full", 64, 800, 512)
    assert cueco.parse_args(out + ["--device", "cpu"]).preset == "laptop"
    assert cueco.parse_args(out + ["--preset", "laptop"]).preset == "laptop"


def test_the_clustering_defaults_are_those_the_readmes_cueco_rows_ran_with(tmp_path):
    """G = 100 groups and K_c = the number of classes, tau 0.2, Sinkhorn's eps 0.05, C at 10x the lr,
    lambda 1 reached at half-time: a changed default would leave the README's numbers without their command."""
    a = cueco.parse_args(["--out", str(tmp_path), "--figures-dir", str(tmp_path)])
    assert (a.num_groups, a.head_clusters, a.clu_temperature, a.sinkhorn_eps, a.centroid_lr, a.lambda_clu,
            a.clu_warmup) == (100, None, 0.2, 0.05, 10.0, 1.0, 0.5)


def test_flags_given_win_over_the_preset(tmp_path):
    out = ["--out", str(tmp_path), "--figures-dir", str(tmp_path)]
    laptop = cueco.parse_args(out + ["--preset", "laptop", "--epochs", "3", "--width", "8"])
    assert (laptop.epochs, laptop.width, laptop.batch_size) == (3, 8, cueco.PRESETS["laptop"]["batch_size"])
    full = cueco.parse_args(out + ["--width", "16", "--preset", "full"])
    assert (full.width, full.epochs) == (16, 800)


def test_a_run_records_its_preset_and_resume_restores_it_on_any_device(tmp_path, monkeypatch, capsys):
    """The first line names the preset, why and what it sets, then the flags the user set; metrics.json keeps
    the resolved settings (K_c included); a resumed run keeps them (the preset is not chosen again by the
    device it resumes on), flags included; the last line says where the run wrote its files."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    folder = make_folder(tmp_path / "d", n_per_class=8)
    argv = tiny_args(folder, tmp_path / "r", "--epochs", "2", "--view-scale", "0.5", "--tsne-points", "0")
    argv[argv.index("full")] = "auto"
    cueco.main(argv)
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("preset laptop (no CUDA GPU): "
                             "--width 16 --batch-size 256 --epochs 16 --view-scale 0.75 --eval-every 4; yours: ")
    assert out[1].endswith("ResNet-18 width 4, epochs 1 to 2 of 2 steps of 8 images")   # what will run
    yours = out[0].split("; yours: ")[1].split(" | ")[0]
    assert "--width 4" in yours and "--epochs 2" in yours and "--view-scale 0.5" in yours
    assert "--lr" not in yours and "--preset" not in yours and re.search(r"\| cpu, (fp32|bf16) \(.+\), eager$", out[0])
    out_dir, fig_dir = tmp_path / "r", tmp_path / "r" / "fig"
    assert out[-1] == f"wrote metrics.json and checkpoint.pt to {out_dir}, the figures to {fig_dir}"
    saved = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert saved["args"]["preset"] == "laptop" and saved["args"]["view_scale"] == 0.5
    assert saved["args"]["head_clusters"] == 2 and saved["args"]["num_groups"] == 4
    assert [e["view_size"] for e in saved["epochs"]] == [16, 16]   # make_folder: 32-px images
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    resumed = cueco.parse_args(["--resume", str(tmp_path / "r" / "checkpoint.pt"), "--epochs", "5"])
    assert (resumed.preset, resumed.width, resumed.view_scale, resumed.epochs) == ("laptop", 4, 0.5, 5)


def test_compile_is_on_by_default_on_cuda_only_and_decided_again_on_resume(tmp_path, monkeypatch):
    out = ["--out", str(tmp_path), "--figures-dir", str(tmp_path)]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not cueco.parse_args(out).compile and cueco.parse_args(out + ["--compile"]).compile
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    on_gpu = cueco.parse_args(out)
    assert on_gpu.compile and not cueco.parse_args(out + ["--no-compile"]).compile
    assert not cueco.parse_args(out + ["--device", "cpu"]).compile
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cueco.save_checkpoint(str(tmp_path / "c.pt"), model, opt, torch.amp.GradScaler("cpu", enabled=False), 1,
                          vars(on_gpu), [{"epoch": 1}])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)   # resumed on a CPU: not compiled
    assert not cueco.parse_args(["--resume", str(tmp_path / "c.pt")]).compile
    assert cueco.parse_args(["--resume", str(tmp_path / "c.pt"), "--compile"]).compile


def test_smaller_views_reach_the_training_step(tmp_path, monkeypatch):
    folder = make_folder(tmp_path / "d", n_per_class=8)
    data = cueco.load_folder(folder)
    x1, x2 = next(cueco.epoch_views(data.train, 1, 8, 0, torch.device("cpu"), 24))
    assert x1.shape == x2.shape == (8, 3, 24, 24)

    sides, real = [], cueco.train_step   # and --view-scale reaches the training step: 32 px * 0.75
    monkeypatch.setattr(cueco, "train_step", lambda model, opt, scaler, x1, x2, *a: (
        sides.append(x1.shape[-1]), real(model, opt, scaler, x1, x2, *a))[1])
    cueco.main(tiny_args(folder, tmp_path / "r", "--epochs", "1", "--view-scale", "0.75", "--tsne-points", "0"))
    assert sides == [24, 24]


# ---------------------------------------------------------------------------------------------------------
# the training loop: schedules, flags, precision, compilation, NaN, shuffling, monitors
# ---------------------------------------------------------------------------------------------------------

def train_only(monkeypatch, folder, out, *extra):
    """A tiny run of the training loop; the final report (linear probe, k-means, figures) is skipped."""
    monkeypatch.setattr(cueco, "report", lambda *a, **kw: {})
    cueco.main(tiny_args(folder, out, "--tsne-points", "0", "--eval-every", "0", *extra))


def spy_steps(monkeypatch, record):
    """Wraps cueco.train_step: record(model, optimizer, x1, lam, m) before each real step."""
    real = cueco.train_step

    def step(model, optimizer, scaler, x1, x2, lam, m, forward=None):
        record(model, optimizer, x1, lam, m)
        return real(model, optimizer, scaler, x1, x2, lam, m, forward)

    monkeypatch.setattr(cueco, "train_step", step)


def test_the_optimizer_steps_with_the_scheduled_lr_and_the_loss_with_the_ramped_lambda(tmp_path, monkeypatch):
    """Each SGD step runs at lr * batch / 512 * cosine (the centroids C at --centroid-lr times that), each
    step weighs L_clu by lambda's ramp; metrics.json records each epoch's last rate and lambda."""
    folder, lrs, lams = make_folder(tmp_path / "d", n_per_class=8), [], []   # 2 steps an epoch
    real_step = torch.optim.SGD.step

    def step(self, *a, **kw):   # the rate the parameters move with, not the one metrics.json records
        lrs.append([group["lr"] for group in self.param_groups])
        return real_step(self, *a, **kw)

    monkeypatch.setattr(torch.optim.SGD, "step", step)
    spy_steps(monkeypatch, lambda model, opt, x1, lam, m: lams.append(lam))
    train_only(monkeypatch, folder, tmp_path / "r", "--epochs", "2", "--lr", "0.5", "--lambda-clu", "0.8",
               "--clu-warmup", "1", "--centroid-lr", "3")
    base = 0.5 * 8 / 512
    cosine = [base * 0.5 * (1 + math.cos(math.pi * i / 4)) for i in range(4)]
    assert lrs == [[pytest.approx(lr), pytest.approx(3 * lr)] for lr in cosine]
    ramp = [cueco.clustering_weight(0.8, e, 2, 1.0) for e in (1, 2)]
    assert lams == [lam for lam in ramp for _ in "ab"] == pytest.approx([0.4, 0.4, 0.8, 0.8])
    epochs = json.loads((tmp_path / "r" / "metrics.json").read_text())["epochs"]
    assert [e["lr"] for e in epochs] == pytest.approx(cosine[1::2]) and [e["lambda_clu"] for e in epochs] == ramp


def test_each_method_flag_reaches_its_use_in_the_step(tmp_path, monkeypatch):
    """--temperature, --clu-temperature, --sinkhorn-eps, --num-groups, --key-momentum and --weight-decay, none
    at its default, arrive in the losses, Sinkhorn, the groups, the momentum update and the optimizer (0 for
    C) at each step; every step trains in train mode, also after the kNN monitor's eval mode."""
    folder = make_folder(tmp_path / "d", n_per_class=8)
    seen = {name: [] for name in ("T", "tau", "eps", "G", "m", "decay", "C", "training")}
    real_con, real_cen, real_sink = cueco.contrastive_loss, cueco.centroid_loss, cueco.sinkhorn
    real_groups, real_momentum, real_step = cueco.batch_groups, cueco.CueCo.momentum_update, torch.optim.SGD.step

    def spy(name, real, pick):
        return lambda *a, **kw: (seen[name].append(pick(*a, **kw)), real(*a, **kw))[1]

    monkeypatch.setattr(cueco, "contrastive_loss", spy("T", real_con, lambda q, k, queue, T: T))
    monkeypatch.setattr(cueco, "centroid_loss", spy("tau", real_cen, lambda s_q, s_k, tau, eps: tau))
    monkeypatch.setattr(cueco, "sinkhorn", spy("eps", real_sink, lambda scores, eps=0.05, iters=3: eps))
    monkeypatch.setattr(cueco, "batch_groups", spy("G", real_groups, lambda q, z, G, iters=5: G))
    monkeypatch.setattr(cueco.CueCo, "momentum_update", spy("m", real_momentum, lambda self, m: m))
    monkeypatch.setattr(torch.optim.SGD, "step", spy("decay", real_step, lambda self, *a, **k: (
        [group["weight_decay"] for group in self.param_groups], seen["C"].append(self.param_groups[1]["params"]))[0]))
    spy_steps(monkeypatch, lambda model, opt, x1, lam, m: seen["training"].append(
        (model.training, model.tau, all(mod.training for mod in model.modules()))))
    train_only(monkeypatch, folder, tmp_path / "r", "--epochs", "2", "--temperature", "0.2", "--clu-temperature",
               "0.3", "--sinkhorn-eps", "0.07", "--num-groups", "5", "--key-momentum", "0.9", "--weight-decay",
               "0.001", "--eval-every", "1")
    # 4 steps: 2 contrastive and 2 centroid losses each, one Sinkhorn and one k-means of the groups for each
    assert seen["T"] == [0.2] * 8 and seen["tau"] == [0.3] * 8 and seen["eps"] == [0.07] * 8
    assert seen["G"] == [5] * 8 and seen["m"] == [0.9] * 4 and seen["decay"] == [[0.001, 0.0]] * 4
    assert all(len(group) == 1 and group[0].shape == (2, 16) for group in seen["C"])   # C: [K_c, D], 2 classes
    assert seen["training"] == [(True, 0.3, True)] * 4


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_the_steps_convolutions_run_in_the_chosen_precision(tmp_path, monkeypatch, precision, dtype):
    """Inside the training step (not only in a unit test of autocast), every convolution of both networks
    outputs bf16 with --precision bf16 on the CPU, and float32 with fp32."""
    folder, dtypes, real = make_folder(tmp_path / "d", n_per_class=8), [], cueco.train_step

    def step(model, *a, **kw):
        convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
        hooks = [m.register_forward_hook(lambda mod, inp, out: dtypes.append(out.dtype)) for m in convs]
        try:
            return real(model, *a, **kw)
        finally:
            for h in hooks:
                h.remove()

    monkeypatch.setattr(cueco, "train_step", step)
    train_only(monkeypatch, folder, tmp_path / "r", "--epochs", "1", "--precision", precision)
    assert len(dtypes) == 2 * 4 * 20 and set(dtypes) == {dtype}   # 2 steps x 4 passes x 20 convolutions


def test_the_step_runs_through_torch_compile_and_reports_its_time_apart(tmp_path, monkeypatch, capsys):
    """--compile: torch.compile receives the whole model (the networks and the losses), every step calls what
    it returned, the first line says so, and the first step's time (compiling, on a pretend clock: 100 s, then
    1 s a step) is reported apart, left out of the epoch's seconds and the rate that gives the time left."""
    folder, made, calls, clock = make_folder(tmp_path / "d", n_per_class=16), [], [], [0.0]

    def compiling(model, **kw):
        def compiled(x1, x2):
            clock[0] += 100.0 if not calls else 1.0
            calls.append(1)
            return model(x1, x2)
        made.append((model, kw))
        return compiled

    monkeypatch.setattr(torch, "compile", compiling)
    monkeypatch.setattr(cueco.time, "time", lambda: clock[0])
    train_only(monkeypatch, folder, tmp_path / "r", "--epochs", "2", "--compile", "--log-every", "2")
    out = capsys.readouterr().out.splitlines()
    assert len(made) == 1 and isinstance(made[0][0], cueco.CueCo) and len(calls) == 8
    assert out[0].endswith(", compiled") and "compiled the step in 100 s" in out
    lines = [line for line in out if line.startswith("epoch ") and " step " in line]   # after steps 2, 4, 6, 8
    assert [line.split("| ")[-1] for line in lines] == [f"0:00:0{s} left" for s in (6, 4, 2, 0)], lines
    epochs = json.loads((tmp_path / "r" / "metrics.json").read_text())["epochs"]
    assert epochs[0]["compile_seconds"] == 100 and epochs[0]["seconds"] == 3 and "compile_seconds" not in epochs[1]


def test_a_compile_that_fails_is_one_line_and_the_run_goes_on_eagerly(tmp_path, monkeypatch, capsys):
    def failing(model, **kw):
        def compiled(*a):
            raise RuntimeError("InductorError: no working C++ compiler found\nand a long story")
        return compiled

    monkeypatch.setattr(torch, "compile", failing)
    folder = make_folder(tmp_path / "d", n_per_class=8)
    final = cueco.main(tiny_args(folder, tmp_path / "r", "--epochs", "2", "--compile", "--tsne-points", "0"))
    out = capsys.readouterr().out
    assert out.count("torch.compile failed (RuntimeError: InductorError: no working C++ compiler found); going "
                     "on without it") == 1 and math.isfinite(final["knn"])


@pytest.mark.filterwarnings("ignore:Detected call of")   # a stand-in step
@pytest.mark.parametrize("bad_step", [5, 22], ids=["between-progress-lines", "after-the-last-progress-line"])
def test_a_nan_loss_anywhere_in_an_epoch_stops_the_run(tmp_path, monkeypatch, capsys, bad_step):
    """With --log-every 20 and 24 steps an epoch (progress lines after steps 20 and 24), a NaN loss at one step
    alone (the weights stay finite) stops the run with the one-line error before any checkpoint, also at a
    step after the last multiple of --log-every."""
    folder = make_folder(tmp_path / "d", n_per_class=24, size=8, splits=("train",))   # 48 images ...
    make_folder(tmp_path / "d", n_per_class=2, size=8, splits=("test",))
    argv = tiny_args(folder, tmp_path / "r", "--epochs", "1", "--batch-size", "2", "--bn-splits", "1",
                     "--tsne-points", "0")
    assert cueco.parse_args(argv).log_every == 20   # ... batch 2: 24 steps
    calls = []

    def step(model, optimizer, scaler, x1, *rest):   # a stand-in: the loop's check is under test
        calls.append(1)
        return step_result(float("nan") if len(calls) == bad_step else 1.0, model.encoder_q.C[[0, 1]], x1.device)

    monkeypatch.setattr(cueco, "train_step", step)
    fails(argv, "NaN", capsys)
    assert len(calls) in (20, 24) and not (tmp_path / "r" / "checkpoint.pt").exists()


@pytest.mark.filterwarnings("ignore:Detected call of")   # a stand-in step
def test_the_logged_largest_cluster_share_is_the_largest(tmp_path, monkeypatch, capsys):
    """Each step, the centroid nearest to most view-1 queries holds the largest share of the batch (1 would be
    a collapse): the epoch records their mean, which the progress line shows beside the even split."""
    nearest = [[0, 0, 0, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0, 0, 0]]   # each query's centroid: 6/8, then 5/8
    calls = []

    def step(model, optimizer, scaler, x1, *rest):   # queries on the centroids, as the step met them
        calls.append(1)
        return step_result(1.0, F.normalize(model.encoder_q.C.detach(), dim=1)[nearest[len(calls) - 1]], x1.device)

    monkeypatch.setattr(cueco, "train_step", step)
    train_only(monkeypatch, make_folder(tmp_path / "d", n_per_class=8), tmp_path / "r", "--epochs", "1",
               "--log-every", "1")
    record = json.loads((tmp_path / "r" / "metrics.json").read_text())["epochs"][0]
    assert record["max_cluster_share"] == pytest.approx((6 / 8 + 5 / 8) / 2)
    lines = [line for line in capsys.readouterr().out.splitlines() if " step " in line]
    assert "largest cluster 75% of a batch (even: 50%)" in lines[0] and "largest cluster 69%" in lines[1]

def knn_reference(train_x, train_y, test_x, test_y, k, t):
    """Weighted kNN one query at a time: cosine similarities sorted, the k largest vote exp(sim / t)."""
    train_x, test_x = F.normalize(train_x.double(), dim=1), F.normalize(test_x.double(), dim=1)
    correct = 0
    for x, y in zip(test_x, test_y.tolist()):
        sim = train_x @ x
        sim, votes = sim.tolist(), {}
        for i in sorted(range(len(sim)), key=lambda i: -sim[i])[:k]:
            votes[train_y[i].item()] = votes.get(train_y[i].item(), 0.0) + math.exp(sim[i] / t)
        correct += max(votes, key=votes.get) == y
    return 100.0 * correct / len(test_y)


def test_knn_defaults_are_200_neighbours_at_temperature_0_1_in_the_monitor_and_the_report(tmp_path, monkeypatch):
    """knn_accuracy's defaults are k = 200 and t = 0.1 (on data where 20 neighbours, or t = 0.07 or 1,
    score differently), and the epoch's monitor and the final report call it with them."""
    x, y = blobs(100, 4, 8, 20.0, seed=3)   # 4 overlapping classes: far neighbours matter
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(400, generator=g)
    tr, te = perm[:300], perm[300:]
    ref = {(k, t): knn_reference(x[tr], y[tr], x[te], y[te], k, t) for k, t in
           [(200, 0.1), (20, 0.1), (200, 0.07), (200, 1.0)]}
    assert ref[200, 0.1] not in (ref[20, 0.1], ref[200, 0.07], ref[200, 1.0]), ref   # 49: 47, 43, 55
    assert cueco.knn_accuracy(x[tr], y[tr], x[te], y[te]) == pytest.approx(ref[200, 0.1])

    import inspect
    folder, calls, real = make_folder(tmp_path / "d", n_per_class=8), [], cueco.knn_accuracy
    monkeypatch.setattr(cueco, "knn_accuracy", lambda *a, **kw: (
        calls.append(inspect.signature(real).bind(*a, **kw)), real(*a, **kw))[1])
    for slow in ("linear_probe", "plot_grid", "plot_curves"):   # the rest of the report: not needed
        monkeypatch.setattr(cueco, slow, lambda *a, **kw: 0.0)
    cueco.main(tiny_args(folder, tmp_path / "r", "--epochs", "1", "--eval-every", "1", "--tsne-points", "0"))
    for call in calls:   # the monitor of epoch 1, then the report
        call.apply_defaults()
    assert [(c.arguments["k"], c.arguments["t"]) for c in calls] == [(200, 0.1)] * 2


def test_each_epoch_draws_its_batches_from_a_new_permutation(monkeypatch):
    """epoch_views gives both views the same images, each at most once an epoch, in a shuffled order
    that differs from one epoch to the next (and from the identity)."""
    images = torch.arange(42, dtype=torch.uint8).view(42, 1, 1, 1).expand(42, 3, 4, 4)   # pixels: the index
    seen = []
    monkeypatch.setattr(cueco, "augment", lambda x, size, g, rng: (seen.append(x[:, 0, 0, 0].tolist()), x)[1])
    orders = []
    for epoch in (1, 2):
        seen.clear()
        batches = [(x1[:, 0, 0, 0].tolist(), x2[:, 0, 0, 0].tolist())
                   for x1, x2 in cueco.epoch_views(images, epoch, 8, 0, torch.device("cpu"), 4)]
        assert len(batches) == 5 and all(a == b for a, b in batches)   # 42 // 8 batches, one batch per pair
        assert seen == [a for a, _ in batches for _ in "12"]           # augment got those images, twice
        order = [i for a, _ in batches for i in a]
        assert len(set(order)) == 40 and set(order) <= set(range(42))
        orders.append(order)
    assert orders[0] != orders[1] and orders[0] != list(range(40)) and orders[1] != list(range(40))


# ---------------------------------------------------------------------------------------------------------
# training end to end: resume, interruption, NaN, what a run draws, both data paths, the features improve
# ---------------------------------------------------------------------------------------------------------

def test_resume_continues_without_losing_or_repeating_epochs(tmp_path):
    folder = make_folder(tmp_path / "d", n_per_class=8)
    out = tmp_path / "run"
    cueco.main(tiny_args(folder, out, "--epochs", "1", "--eval-every", "1"))
    final = cueco.main(["--resume", str(out / "checkpoint.pt"), "--epochs", "3"])   # its settings: defaults
    metrics = json.loads((out / "metrics.json").read_text())
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2, 3]
    assert set(metrics["epochs"][0]) == {"epoch", "view_size", "loss", "loss_contrastive", "loss_clustering",
                                         "max_cluster_share", "lambda_clu", "lr", "img_per_s", "seconds", "knn"}
    assert metrics["args"]["width"] == 4 and set(final) >= {"knn", "linear", "nmi", "ari", "acc", "head_nmi"}
    assert set(metrics["final"]) == set(final)
    assert all(os.path.isfile(out / "fig" / f"{fig}_d.png") for fig in ("tsne", "curves", "clusters", "neighbours"))

@pytest.mark.parametrize("extra", [[], ["--precision", "fp16"]], ids=["fp32", "fp16"])
def test_resumed_run_equals_an_uninterrupted_one(tmp_path, monkeypatch, extra):
    """Stopped after epoch 1 of 3 and resumed, a run ends with exactly the weights, queue and metrics of the
    run that was never stopped (same schedules, same views, same key shuffles), fp16's adaptive loss
    scale included."""
    folder = make_folder(tmp_path / "d", n_per_class=8, size=16)
    whole = cueco.main(tiny_args(folder, tmp_path / "a", "--epochs", "3", "--tsne-points", "0", *extra))
    real = cueco.epoch_views

    def stop_in_epoch_2(data, epoch, *rest):
        if epoch == 2:
            raise KeyboardInterrupt
        return real(data, epoch, *rest)

    monkeypatch.setattr(cueco, "epoch_views", stop_in_epoch_2)
    with pytest.raises(SystemExit):
        cueco.main(tiny_args(folder, tmp_path / "b", "--epochs", "3", "--tsne-points", "0", *extra))
    monkeypatch.setattr(cueco, "epoch_views", real)
    resumed = cueco.main(["--resume", str(tmp_path / "b" / "checkpoint.pt")])
    assert resumed == whole
    a, b = (cueco.load_checkpoint(str(tmp_path / run / "checkpoint.pt")) for run in "ab")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]) and a["scaler"] == b["scaler"]
    assert bool(a["scaler"]) == ("fp16" in extra)


def test_ctrl_c_saves_and_resume_finishes_the_same_run(tmp_path):
    folder = make_folder(tmp_path / "d", n_per_class=40)
    out = tmp_path / "run"
    # the child takes Ctrl-C even where this suite runs in the background (a shell's `&` ignores SIGINT)
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "cueco.py"),
                             *tiny_args(folder, out, "--epochs", "200", "--eval-every", "0", "--log-every", "1")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for line in proc.stdout:   # progress lines of every step: interrupt inside epoch 3
        if line.startswith("epoch 3/"):
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1 and "continue with: python cueco.py --resume" in err
    done = cueco.load_checkpoint(str(out / "checkpoint.pt"))["epoch"]
    assert 2 <= done < 200
    cueco.main(["--resume", str(out / "checkpoint.pt"), "--epochs", str(done + 1)])
    epochs = [e["epoch"] for e in json.loads((out / "metrics.json").read_text())["epochs"]]
    assert epochs == list(range(1, done + 2))


def test_ctrl_c_during_the_evaluation_keeps_the_run_and_resume_finishes_it(tmp_path, monkeypatch, capsys):
    folder, out = make_folder(tmp_path / "d", n_per_class=8), tmp_path / "run"

    def interrupted(*args, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(cueco, "tsne", interrupted)   # minutes on ImageNet-100: a user presses Ctrl-C
    with pytest.raises(SystemExit) as e:
        cueco.main(tiny_args(folder, out, "--epochs", "2"))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 130 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "epoch 2" in err and "finish the evaluation with: python cueco.py --resume" in err
    monkeypatch.undo()
    final = cueco.main(["--resume", str(out / "checkpoint.pt")])
    metrics = json.loads((out / "metrics.json").read_text())
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2] and metrics["final"] == final
    assert (out / "fig" / "tsne_d.png").exists()


def test_the_last_epochs_features_are_extracted_once(tmp_path, monkeypatch):
    folder, calls, real = make_folder(tmp_path / "d", n_per_class=8), [], cueco.features
    monkeypatch.setattr(cueco, "features", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    final = cueco.main(tiny_args(folder, tmp_path / "r", "--epochs", "2", "--eval-every", "1",
                                 "--tsne-points", "0"))
    epochs = json.loads((tmp_path / "r" / "metrics.json").read_text())["epochs"]
    assert len(calls) == 2 and epochs[1]["knn"] == final["knn"] and "knn" in epochs[0]   # monitor, final


def test_nan_loss_stops_with_a_message_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    folder = make_folder(tmp_path / "d", n_per_class=8)
    out = tmp_path / "run"
    real, calls = cueco.contrastive_loss, []

    def poisoned(q, k, queue, T):
        calls.append(1)
        loss = real(q, k, queue, T)
        return loss * float("nan") if len(calls) > 4 else loss   # 2 steps x 2 calls = epoch 1 is fine

    monkeypatch.setattr(cueco, "contrastive_loss", poisoned)
    fails(tiny_args(folder, out, "--epochs", "3", "--eval-every", "0", "--log-every", "1"), "NaN", capsys)
    assert cueco.load_checkpoint(str(out / "checkpoint.pt"))["epoch"] == 1


@pytest.mark.parametrize("minutes, expected", [("1", [2, 4, 5]), ("0", [1, 2, 3, 4, 5]), ("9", [5])])
def test_a_checkpoint_once_a_minute_at_most_and_at_the_end(tmp_path, monkeypatch, minutes, expected):
    """Epochs of 40 s on a pretend clock: with --save-minutes 1, epochs 2 (80 s) and 4 (160 s), and the end."""
    folder, saved, clock = make_folder(tmp_path / "d", n_per_class=8), [], [1000.0]
    real_save, real_views = cueco.save_checkpoint, cueco.epoch_views

    def views(*args, **kw):
        clock[0] += 40
        yield from real_views(*args, **kw)

    monkeypatch.setattr(cueco.time, "time", lambda: clock[0])
    monkeypatch.setattr(cueco, "epoch_views", views)
    monkeypatch.setattr(cueco, "save_checkpoint", lambda path, model, opt, scaler, epoch, *rest: (
        saved.append(epoch), real_save(path, model, opt, scaler, epoch, *rest)))
    cueco.main(tiny_args(folder, tmp_path / "r", "--epochs", "5", "--save-minutes", minutes,
                         "--eval-every", "0", "--tsne-points", "0"))
    assert saved == expected


def test_a_cluster_without_a_class_is_not_named_after_one(tmp_path, monkeypatch):
    """The gallery shows the clusters that have members, largest first, each named by its size, the share of
    its most common class and that class: with 3 classes in training and 2 in the test set, no row is blank
    or named after a class at a negative index, and the sizes add up to the test set."""
    folder, shown = make_folder(tmp_path / "d", n_per_class=8, classes=("a", "b", "c")), []
    for f in os.listdir(os.path.join(folder, "test", "c")):
        os.remove(os.path.join(folder, "test", "c", f))
    monkeypatch.setattr(cueco, "plot_grid", lambda images, names, *a: shown.append((images, names)))
    cueco.main(tiny_args(folder, tmp_path / "r", "--epochs", "0", "--tsne-points", "0", "--head-clusters", "0"))
    images, names = shown[0]   # the gallery, before the neighbours
    sizes = [int(name.split(":")[0]) for name in names]
    assert sizes == sorted(sizes, reverse=True) and sum(sizes) == 16 and all(row[0] is not None for row in images)
    for name in names:
        share, cls = re.fullmatch(r"\d+: (\d+)% ([ab])", name).groups()
        assert 50 <= int(share) <= 100, names


def test_the_models_own_clusters_are_the_argmax_over_C_and_the_figures_show_them(tmp_path, monkeypatch, capsys):
    """3 classes, so C holds K_c = 3 centroids; head_nmi/ari/acc score argmax z.C of the test images, computed
    here by hand; the t-SNE's right panel and the gallery show those clusters, the gallery by z; k-means on the
    backbone (nmi) stays as it was. After training, C is set to the z of one test image of each class, so
    that the own clusters differ from k-means' (a tiny network's z are alike)."""
    folder, out, seen = make_folder(tmp_path / "d", n_per_class=8, classes=("a", "b", "c")), tmp_path / "r", {}
    real_train, real_contingency = cueco.train, cueco.contingency

    def train(args, model, optimizer, scheduler, scaler, forward, data, *rest):
        feats = real_train(args, model, optimizer, scheduler, scaler, forward, data, *rest)
        with torch.no_grad():
            f_test = cueco.features(model.encoder_q.backbone, data, torch.device("cpu"))[1]
            z = F.normalize(model.encoder_q.projector(f_test), dim=1)
            model.encoder_q.C.copy_(z[[0, 8, 16]])
        seen.update(model=model, data=data, f_test=f_test, z=z)
        return feats

    monkeypatch.setattr(cueco, "train", train)
    monkeypatch.setattr(cueco, "plot_tsne", lambda y, labels, clusters, classes, path, title, what:
                        seen.update(tsne=(clusters, what, title)))
    monkeypatch.setattr(cueco, "contingency", lambda p, t: seen.setdefault("tables", []).append(p) or real_contingency(p, t))
    final = cueco.main(tiny_args(folder, out, "--epochs", "2", "--tsne-points", "24",   # bf16 on some CPUs:
                                 "--precision", "fp32", "--device", "cpu"))
    model, data, f_test, z = seen["model"], seen["data"], seen["f_test"], seen["z"]
    with torch.no_grad():
        own = (z @ F.normalize(model.encoder_q.C, dim=1).t()).argmax(1)
    assert model.encoder_q.C.shape == (3, 16) and own[[0, 8, 16]].tolist() == [0, 1, 2]
    for k, v in cueco.cluster_metrics(own, data.test_y).items():
        assert final["head_" + k] == pytest.approx(v)
    assert final["nmi"] == pytest.approx(cueco.cluster_metrics(cueco.kmeans(f_test, 3), data.test_y)["nmi"])
    assert final["largest_head_cluster"] == torch.bincount(own).max().item() / len(own)
    assert any(torch.equal(p.cpu(), own) for p in seen["tables"])   # the gallery's clusters are the own ones
    matched = cueco.match_clusters(own, data.test_y)[cueco.balanced_subset(data.test_y, 24, seed=0)]
    assert torch.equal(seen["tsne"][0], matched) and "argmax z.C" in seen["tsne"][1]
    assert f"the clusters' NMI {final['head_nmi']:.3f}" in seen["tsne"][2] and "t-SNE of 24 test" in seen["tsne"][2]


def test_own_clusters_that_collapse_are_said_to_have_collapsed(tmp_path, monkeypatch, capsys):
    """C's centroids all but one far from every z: every test image falls into one own cluster, and the final
    line says that the largest holds all of them."""
    real_train = cueco.train

    def train(args, model, *rest):   # rest: optimizer, scheduler, scaler, forward, data, ...
        feats = real_train(args, model, *rest)
        with torch.no_grad():
            z = F.normalize(model.encoder_q.projector(cueco.features(model.encoder_q.backbone, rest[4],
                                                                     torch.device("cpu"))[1]), dim=1)
            model.encoder_q.C[0] = F.normalize(z.mean(0), dim=0)   # nearest to every z, the other opposite
            model.encoder_q.C[1] = -model.encoder_q.C[0]
        return feats

    monkeypatch.setattr(cueco, "train", train)
    final = cueco.main(tiny_args(make_folder(tmp_path / "d", n_per_class=8), tmp_path / "r", "--epochs", "1",
                                 "--tsne-points", "0", "--device", "cpu"))
    assert final["largest_head_cluster"] == 1.0
    assert ", the largest 100%" in capsys.readouterr().out


def test_a_run_draws_the_nearest_training_images_of_one_test_image_per_class(tmp_path, monkeypatch, figures):
    """The fourth figure makes kNN concrete: a row per class, its test image in a grey frame, then its 8
    nearest training images by the cosine of backbone features (brute force here), framed (blue) when they
    share its class and not framed (white, as the grid's gaps) when not, a mark that needs no colour vision; the
    row's label counts the framed ones."""
    folder, grids, real = make_folder(tmp_path / "d", n_per_class=12, splits=("train",)), [], cueco.plot_grid
    make_folder(tmp_path / "d", n_per_class=4, splits=("test",))   # test indices are not training indices
    monkeypatch.setattr(cueco, "plot_grid", lambda images, names, path, title="": (
        grids.append((images, names, path)), real(images, names, path, title))[1])
    real_features, feats = cueco.features, []
    monkeypatch.setattr(cueco, "features", lambda *a, **k: feats.append(real_features(*a, **k)) or feats[-1])
    cueco.main(tiny_args(folder, tmp_path / "r", "--epochs", "1", "--tsne-points", "0", "--device", "cpu"))
    data = cueco.load_folder(folder)
    images, names, path = grids[1]
    f_train, f_test = feats[-1]
    pick = cueco.balanced_subset(data.test_y, 2, seed=0).tolist()
    assert path.endswith("neighbours_d.png") and len(images) == 2 and all(len(row) == 9 for row in images)
    for row, name, i in zip(images, names, pick):
        cos = F.normalize(f_train, dim=1) @ F.normalize(f_test[i], dim=0)
        near = sorted(range(len(cos)), key=lambda j: -cos[j].item())[:8]
        assert torch.equal(row[0][:, 2:-2, 2:-2], data.test[i]) and (row[0][:, 0, 0] == 128).all()
        hits = 0
        for tile, j in zip(row[1:], near):
            same = data.train_y[j] == data.test_y[i]
            hits += int(same)
            assert torch.equal(tile[:, 2:-2, 2:-2], data.train[j])
            assert tile[:, 0, 0].tolist() == ([0, 60, 200] if same else [255, 255, 255])
        assert name == f"{data.classes[data.test_y[i]]}: {hits} of 8"


@pytest.mark.parametrize("tsne, drawn", [("20", {"tsne", "clusters", "neighbours", "curves"}),
                                         ("0", {"clusters", "neighbours", "curves"})])
def test_a_run_draws_four_figures_or_three_without_the_tsne(tmp_path, tsne, drawn):
    cueco.main(tiny_args(make_folder(tmp_path / "d", n_per_class=8), tmp_path / "r", "--epochs", "1",
                         "--tsne-points", tsne))
    assert {f.split("_")[0] for f in os.listdir(tmp_path / "r" / "fig")} == drawn


@pytest.mark.parametrize("extra, rows, groups", [(["--lambda-clu", "0"], 0, False), (["--head-clusters", "0"], 0, True),
                                                 ([], 2, True)], ids=["moco-v2", "no-centroids", "default"])
def test_moco_v2_has_no_centroids_and_no_groups(tmp_path, monkeypatch, extra, rows, groups):
    """MoCo-v2 (lambda 0) has neither C nor groups and computes no clustering; --head-clusters 0 keeps the
    groups and drops C. Only a run with centroids reports the own clusters (head_)."""
    calls, real_sinkhorn, real_groups = [], cueco.sinkhorn, cueco.batch_groups
    monkeypatch.setattr(cueco, "sinkhorn", lambda *a, **k: calls.append("sinkhorn") or real_sinkhorn(*a, **k))
    monkeypatch.setattr(cueco, "batch_groups", lambda *a, **k: calls.append("groups") or real_groups(*a, **k))
    folder = make_folder(tmp_path / "d", n_per_class=8)
    final = cueco.main(tiny_args(folder, tmp_path / "r", "--epochs", "1", "--tsne-points", "0", *extra))
    state = cueco.load_checkpoint(str(tmp_path / "r" / "checkpoint.pt"))["model"]
    assert state["encoder_q.C"].shape == (rows, 16) and state["encoder_k.C"].shape == (rows, 16)
    assert ("sinkhorn" in calls) == bool(rows) and ("groups" in calls) == groups
    assert any(k.startswith("head_") for k in final) == bool(rows)


def test_epochs_zero_evaluates_the_untrained_network(tmp_path, monkeypatch, capsys):
    """No training, no checkpoint: the last line does not claim one."""
    folder, steps = make_folder(tmp_path / "d", n_per_class=8), []
    monkeypatch.setattr(cueco, "train_step", lambda *a, **k: steps.append(1))
    final = cueco.main(tiny_args(folder, tmp_path / "r", "--epochs", "0"))
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert steps == [] and metrics["epochs"] == [] and metrics["final"] == final
    assert set(final) >= {"knn", "linear", "nmi", "ari", "acc"} and not (tmp_path / "r" / "checkpoint.pt").exists()
    assert capsys.readouterr().out.splitlines()[-1].startswith(f"wrote metrics.json to {tmp_path / 'r'}, the figures")


def test_features_improve_over_the_untrained_network_on_real_cifar(cifar_dir, tmp_path):
    """A short real run: kNN accuracy of the trained backbone must beat the same backbone untrained."""
    common = ["--preset", "full", "--dataset", "folder", "--data-dir", cifar_dir, "--width", "8",
              "--limit-train", "2000", "--limit-test", "1000", "--batch-size", "128", "--num-workers", "0",
              "--eval-every", "0", "--tsne-points", "0", "--num-groups", "20", "--figures-dir", str(tmp_path / "fig")]
    before = cueco.main(common + ["--epochs", "0", "--out", str(tmp_path / "a")])
    after = cueco.main(common + ["--epochs", "8", "--out", str(tmp_path / "b")])
    print(f"kNN untrained {before['knn']:.1f}% -> trained {after['knn']:.1f}%")
    assert after["knn"] > before["knn"] + 3

def make_shapes(root, n_per_class, size=32, seed=0):
    """An ImageFolder of 4 classes that a view keeps (horizontal and vertical stripes, a disc, a square)
    at random places, sizes and periods, in random shades of grey (colour would offer a shortcut)."""
    from torchvision.transforms.v2.functional import to_pil_image
    g = torch.Generator().manual_seed(seed)

    def r(lo, hi):
        return lo + (hi - lo) * torch.rand((), generator=g).item()

    yy, xx = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    for split, n in (("train", n_per_class), ("test", n_per_class // 2)):
        for c in ("hstripes", "vstripes", "disc", "square"):
            os.makedirs(os.path.join(root, split, c), exist_ok=True)
            for i in range(n):
                cy, cx, radius, period = r(10, 22), r(10, 22), r(5, 9), r(4, 7)
                mask = {"hstripes": (yy / period + r(0, 1)) % 1 < 0.5, "vstripes": (xx / period + r(0, 1)) % 1 < 0.5,
                        "disc": (yy - cy) ** 2 + (xx - cx) ** 2 < radius ** 2,
                        "square": ((yy - cy).abs() < 0.85 * radius) & ((xx - cx).abs() < 0.85 * radius)}[c]
                dark = r(0, 0.4)
                shades = (dark, dark + r(0.4, 0.6))
                fg, bg = shades if r(0, 1) < 0.5 else shades[::-1]
                img = torch.where(mask, fg, bg) + 0.05 * torch.randn(3, size, size, generator=g)   # [3, S, S]
                to_pil_image((img.clamp(0, 1) * 255).to(torch.uint8)).save(os.path.join(root, split, c, f"{i}.png"))
    return str(root)


def test_features_improve_over_the_untrained_network_on_made_up_shapes(tmp_path):
    """Without ../shared: 8 short epochs on 512 images of 4 shapes that the test draws must beat the
    untrained network's kNN clearly."""
    folder = make_shapes(tmp_path / "d", 128)
    common = tiny_args(folder, tmp_path / "r", "--width", "8", "--batch-size", "64", "--queue-size", "256",
                       "--num-groups", "8", "--lr", "0.24", "--eval-every", "0", "--tsne-points", "0")
    before = cueco.main(common + ["--epochs", "0"])
    after = cueco.main(common + ["--epochs", "8"])
    print(f"kNN untrained {before['knn']:.1f}% -> trained {after['knn']:.1f}%")
    assert after["knn"] > before["knn"] + 5

def test_imagenet_size_folder_trains(tmp_path):
    """Images above 64 px take the ImageNet stem (7x7 stride-2 convolution, max-pool)."""
    folder = make_folder(tmp_path / "d", n_per_class=8, size=80)
    cueco.main(tiny_args(folder, tmp_path / "r", "--image-size", "96", "--epochs", "1", "--tsne-points", "0"))
    model = cueco.load_checkpoint(str(tmp_path / "r" / "checkpoint.pt"))["model"]
    assert model["encoder_q.backbone.stem.0.weight"].shape == (4, 3, 7, 7)


def test_image_size_of_a_folder(tmp_path):
    assert cueco.load_folder(make_folder(tmp_path / "s", size=28)).image_size == 28
    assert cueco.load_folder(make_folder(tmp_path / "l", n_per_class=1, size=300)).image_size == 224
    assert cueco.load_folder(make_folder(tmp_path / "m", n_per_class=1, size=100), image_size=96).image_size == 96


def test_class_list_and_val_folder(tmp_path):
    folder = make_folder(tmp_path / "d", n_per_class=8, classes=("a", "b", "c"), splits=("train", "val"))
    (tmp_path / "list.txt").write_text("a\nc\n")
    data = cueco.load_folder(folder, class_list=str(tmp_path / "list.txt"))
    assert data.classes == ["a", "c"] and sorted(data.train_y.unique().tolist()) == [0, 1]
    assert len(data.test_y) == 16

def test_balanced_subset():
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    idx = cueco.balanced_subset(labels, 31, seed=0)
    assert len(idx) == len(set(idx.tolist())) == 31 and torch.equal(idx, idx.sort().values)
    assert sorted(torch.bincount(labels[idx]).tolist()) == [10, 10, 11]
    assert torch.equal(idx, cueco.balanced_subset(labels, 31, seed=0))
    assert not torch.equal(idx, cueco.balanced_subset(labels, 31, seed=1))
    assert torch.bincount(labels[cueco.balanced_subset(labels, 70, seed=0)]).tolist() == [25, 25, 20]


# ---------------------------------------------------------------------------------------------------------
# the GPU path, tested on a CPU: precision, torch.compile, fake CUDA tensors
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("capability, expected", [((7, 5), "fp16"), ((8, 0), "bf16"), ((9, 0), "bf16")])
def test_precision_per_cuda_card(monkeypatch, capability, expected):
    """T4 (7.5): fp16 with a gradient scaler; A100 (8.0) and H100 (9.0): bf16. A flag overrides auto."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert cueco.pick_precision(torch.device("cuda"), "auto")[0] == expected
    assert cueco.pick_precision(torch.device("cuda"), "fp32")[0] == "fp32"


@pytest.mark.parametrize("avx512_bf16, amx, expected", [(True, False, "bf16"), (False, True, "bf16"),
                                                        (False, False, "fp32")])
def test_precision_on_cpus_is_bf16_only_where_it_is_native(monkeypatch, avx512_bf16, amx, expected):
    """oneDNN runs bf16 on any AVX-512 CPU, emulated where the CPU lacks AVX512-BF16 and AMX (Skylake and
    Cascade Lake Xeons; on this project's AVX2 EPYC, 10x slower than fp32): auto takes it only where native."""
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    precision, why = cueco.pick_precision(torch.device("cpu"), "auto")
    assert precision == expected and why.startswith("native") == (expected == "bf16")
    assert cueco.pick_precision(torch.device("mps"), "auto")[0] == "fp32"
    assert cueco.pick_precision(torch.device("cpu"), "fp16")[0] == "fp16"


def test_a_named_gpu_becomes_the_current_one(monkeypatch):
    """--device cuda:1 must also make that card current (else CUDA puts some tensors on card 0), and
    cuDNN's autotuner is on (every batch has the same shape)."""
    made_current, real_ones = [], torch.ones
    monkeypatch.setattr(torch, "ones", lambda *a, device=None: real_ones(*a))   # pretend that the card works
    monkeypatch.setattr(torch.cuda, "set_device", made_current.append)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    assert cueco.setup_device("cuda:1") == torch.device("cuda", 1)
    assert made_current == [torch.device("cuda", 1)] and torch.backends.cudnn.benchmark


def low_precision_step(model, precision, x1, x2):
    model = copy.deepcopy(model)
    torch.manual_seed(0)   # the same key shuffles
    with cueco.autocast(torch.device("cpu"), precision):
        l_con, l_clu, keys, _ = model(x1, x2)
    loss = l_con + l_clu
    loss.backward()
    grad = torch.cat([p.grad.flatten() for p in model.encoder_q.parameters()])
    return loss, keys, grad


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_one_step_in_low_precision_agrees_with_fp32(precision):
    """Under CPU autocast the convolutions and linear layers run in bf16 (8 bits of mantissa) or fp16 (11);
    the embeddings, logits and losses stay float32. Rounding errors of about 2^-9 (bf16) per layer, through
    ~20 layers renormalised by batch norm, move the unit-length keys by a few tenths of a percent and the
    loss (about 2 ln(1 + K)) by well under 1%; a step in the wrong precision (or float16 logits / T
    overflowing) would not pass."""
    model = tiny_model(width=8, dim=16, K=64)
    x1, x2 = fixed_views(16, 16)
    loss32, keys32, grad32 = low_precision_step(model, "fp32", x1, x2)
    loss, keys, grad = low_precision_step(model, precision, x1, x2)
    assert loss.dtype == keys.dtype == torch.float32
    assert abs(loss.item() - loss32.item()) < 0.01 * loss32.item()
    assert (keys * keys32).sum(1).min() > 0.99                                   # cosine of each key
    assert F.cosine_similarity(grad, grad32, dim=0) > 0.95

def test_the_losses_stay_float32_under_autocast(monkeypatch):
    """Under autocast the networks run in bf16 (or fp16) but the losses do not: each contrastive loss the model
    computes equals the same loss computed outside autocast from its float32 inputs (bf16 logits / T would
    be off by about 1e-3)."""
    model, (x1, x2) = tiny_model(width=8, dim=16, K=64), fixed_views(16, 16)
    seen, real = [], cueco.contrastive_loss
    monkeypatch.setattr(cueco, "contrastive_loss", lambda q, k, queue, T: seen.append(
        (q, k, queue.clone(), T, real(q, k, queue, T))) or seen[-1][-1])
    with cueco.autocast(torch.device("cpu"), "bf16"):
        model(x1, x2)
    assert len(seen) == 2
    for q, k, queue, T, loss in seen:
        assert q.dtype == k.dtype == torch.float32 and abs(loss.item() - real(q, k, queue, T).item()) < 1e-5


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_the_command_line_trains_in_each_precision(tmp_path, precision, capsys, monkeypatch):
    """Each precision end to end; fp16 (and only fp16) scales the loss against gradient underflow."""
    folder, scaled, real = make_folder(tmp_path / "d", n_per_class=8), [], torch.amp.GradScaler.scale
    monkeypatch.setattr(torch.amp.GradScaler, "scale", lambda self, loss: (
        scaled.append(self.is_enabled()), real(self, loss))[1])
    final = cueco.main(tiny_args(folder, tmp_path / "r", "--epochs", "2", "--precision", precision,
                                 "--tsne-points", "0"))
    first = capsys.readouterr().out.splitlines()[0]
    assert f", {precision} (--precision)" in first and math.isfinite(final["linear"])
    assert scaled == [precision == "fp16"] * 4   # 2 epochs x 2 steps


def test_the_compiled_model_computes_what_the_eager_one_does():
    """torch.compile (with the aot_eager backend: the same graph capture and autograd as Inductor, without
    minutes of C++ compilation) of the whole forward, networks and losses: the same losses, keys, gradients
    and batch-norm statistics as eager, and changing lambda or the learning rate compiles nothing again."""
    torch._dynamo.reset()
    eager = tiny_model(bn_splits=2)
    compiled = copy.deepcopy(eager)
    net = torch.compile(compiled, backend="aot_eager", dynamic=False)
    x1, x2 = fixed_views(16, 16)
    outs = []
    for model, run in ((eager, eager), (compiled, net)):
        torch.manual_seed(0)   # the same key shuffle
        l_con, l_clu, keys, s1 = run(x1, x2)
        (l_con + 0.5 * l_clu).backward()
        outs.append((l_con.item(), l_clu.item(), keys, s1))
    assert outs[0][:2] == pytest.approx(outs[1][:2], rel=1e-5)
    assert torch.allclose(outs[0][2], outs[1][2], atol=1e-5) and torch.allclose(outs[0][3], outs[1][3], atol=1e-5)
    for (name, a), b in zip(eager.encoder_q.named_parameters(), compiled.encoder_q.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-5), name
    for a, b in zip(eager.buffers(), compiled.buffers()):   # running statistics of both networks, queue
        assert torch.allclose(a.float(), b.float(), atol=1e-6)
    opt = cueco.make_optimizer(compiled, 0.1, 5e-4)
    schedule, scaler = cueco.cosine_schedule(opt, 4), torch.amp.GradScaler("cpu", enabled=False)
    torch._dynamo.utils.counters.clear()
    for lam in (0.1, 0.5, 1.0):
        cueco.train_step(compiled, opt, scaler, x1, x2, lam, 0.99, lambda a, b: net(a, b))
        schedule.step()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 0   # no graph compiled again

def tensors(tree):
    return [a for a in torch.utils._pytree.tree_leaves(tree) if isinstance(a, torch.Tensor)]


class NoHostSync(torch.utils._python_dispatch.TorchDispatchMode):
    """Records every operation that reads a GPU value on the host (.item(), .tolist(), .cpu(), if tensor:)
    or copies host memory to the GPU (.to(device) of a CPU tensor): each makes the CPU wait for the GPU, or
    the GPU for the CPU, in the middle of a step."""
    def __init__(self):
        super().__init__()
        self.syncs, self.pinned = [], set()   # pinned: host tensors allocated page-locked

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        kwargs = kwargs or {}
        inputs, outputs = tensors((args, kwargs)), tensors(out)
        if kwargs.get("pin_memory"):
            self.pinned.add(id(out))
        if func is torch.ops.aten._local_scalar_dense.default or (
                any(a.device.type == "cuda" for a in inputs) and any(o.device.type == "cpu" for o in outputs)):
            self.syncs.append(f"to the host: {func}")
        waits = not (kwargs.get("non_blocking") and all(id(a) in self.pinned for a in inputs))
        if waits and any(a.device.type == "cpu" and a.dim() > 0 for a in inputs) and any(
                o.device.type == "cuda" for o in outputs):
            self.syncs.append(f"from the host: {func}")
        return out


class NoGenerator:
    """Stands in for torch.Generator(device="cuda"), which needs a real GPU: the default generator draws."""
    def __init__(self, device=None):
        pass

    def manual_seed(self, seed):
        return None


def test_tsne_bisects_on_the_host_in_float64_and_optimises_on_the_device():
    """Apple's MPS has no float64: t-SNE's bisection runs on the host; its 750 steps on the features' device
    (a pretend GPU here) in float32."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    class Float64OnDevice(torch.utils._python_dispatch.TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.found, self.ops = [], []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.found += [str(func) for o in tensors(out) if o.dtype == torch.float64 and o.device.type != "cpu"]
            self.ops += [(str(func), o.device.type) for o in tensors(out)]
            return out

    with FakeTensorMode(allow_non_fake_inputs=True):
        f = torch.empty(40, 8, device="cuda")
        with Float64OnDevice() as mode:
            y = cueco.tsne(f, iters=2)
    assert mode.found == [] and y.shape == (40, 2) and y.device.type == "cuda" and y.dtype == torch.float32
    # and the optimisation runs there: each of its steps computes the pairwise distances on the device
    assert sum("_euclidean_dist" in op for op, device in mode.ops if device == "cuda") == 2


def to_fake_cuda(module):
    """Every parameter and buffer replaced by a fake CUDA tensor of its layout (no memory, no GPU)."""
    for m in module.modules():
        for name, p in list(m.named_parameters(recurse=False)):
            fake = torch.empty_strided(p.shape, p.stride(), device="cuda")
            setattr(m, name, torch.nn.Parameter(fake, requires_grad=p.requires_grad))
        for name, b in list(m.named_buffers(recurse=False)):
            m.register_buffer(name, torch.empty_strided(b.shape, b.stride(), dtype=b.dtype, device="cuda"))
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="a real GPU runs the real step")
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_the_step_on_fake_cuda_tensors(monkeypatch, precision):
    """The forward half of a training step on a pretend GPU (FakeTensorMode computes shapes, dtypes, devices
    and memory layouts, not values), as run() puts it there: augmentation on the device, both encoders under
    CUDA autocast, both losses, the momentum update and enqueue. Every convolution and batch norm runs in the
    low precision, the embeddings and losses are float32, and nothing reads a GPU value back to the host.
    Backward needs a real CUDA runtime: the CPU tests cover it."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    monkeypatch.setattr(torch.cuda.amp.common, "amp_definitely_not_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    # FakeTensorMode picks the output layout of a convolution by the backend a real GPU would use: cuDNN
    monkeypatch.setattr(torch._C, "_select_conv_backend", lambda *a, **k: torch._C._ConvBackend.Cudnn)
    layers, device = [], torch.device("cuda")
    model = cueco.CueCo(width=8, dim=16, K=64, K_c=10, G=4, bn_splits=2)
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = to_fake_cuda(model)   # as run() puts it on a GPU
        for m in model.modules():
            if isinstance(m, (torch.nn.Conv2d, cueco.SplitBatchNorm)):
                m.register_forward_hook(lambda mod, inp, out: layers.append(
                    (out.dtype, out.device.type)))
        monkeypatch.setattr(torch, "Generator", NoGenerator)
        images = torch.empty(16, 3, 32, 32, dtype=torch.uint8, device=device)
        with NoHostSync() as mode:   # the views of a step, drawn as the training loop draws them
            x1, x2 = next(cueco.epoch_views(images, 1, 8, 0, device, 32))
            with cueco.autocast(device, precision):
                l_con, l_clu, keys, q1 = model(x1, x2)
                embedding = model.encoder_q(x1).dtype   # z [N, D]
            loss = l_con + 0.5 * l_clu
            model.momentum_update(0.99)
            model.enqueue(keys)
    low = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    assert len(layers) == 5 * 40 and set(layers) == {(low, "cuda")}   # 5 passes x 20 conv + 20 BN
    assert x1.shape == (8, 3, 32, 32) and x1.device.type == "cuda" and x1.dtype == torch.float32
    assert loss.dtype == keys.dtype == q1.dtype == embedding == torch.float32 and loss.device.type == "cuda"
    assert mode.syncs == []


# ---------------------------------------------------------------------------------------------------------
# a GPU student's first run: the preset it gets, an honest time left, and every failure one line
# ---------------------------------------------------------------------------------------------------------

def test_the_first_line_names_the_gpu_preset_why_and_the_full_run(tmp_path, monkeypatch, capsys):
    """On a CUDA machine (pretended; the run itself on the CPU) the first line says gpu, why, and how to
    ask for the full 800 epochs."""
    monkeypatch.setattr(cueco, "setup_device", lambda name: torch.device("cpu"))
    argv = tiny_args(make_folder(tmp_path / "d", n_per_class=4), tmp_path / "r", "--tsne-points", "0")
    argv[argv.index("full")] = "auto"
    cueco.main(argv + ["--epochs", "0", "--device", "cuda", "--no-compile"])
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("preset gpu (a CUDA GPU): --epochs 200; yours: ")


def test_time_left_comes_from_the_epochs_own_rate_not_a_slow_start(tmp_path, monkeypatch, capsys):
    """A first step of 100 s (autotuning) and then 1 s a step, on a pretend clock: from the second progress
    line on, the time left is the steps left at 1 s each, and the speed 8 images/s."""
    clock, steps, real = [0.0], [], cueco.train_step

    def timed(*args, **kw):
        clock[0] += 100.0 if not steps else 1.0
        steps.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(cueco.time, "time", lambda: clock[0])
    monkeypatch.setattr(cueco, "train_step", timed)
    folder = make_folder(tmp_path / "d", n_per_class=16)   # 32 images, batch 8: 4 steps an epoch
    cueco.main(tiny_args(folder, tmp_path / "r", "--epochs", "3", "--log-every", "1", "--eval-every", "0",
                         "--tsne-points", "0"))
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("epoch ") and " step " in l]
    assert len(lines) == 12
    assert lines[0].endswith("| 0:18:20 left")                         # 11 steps at the 100 s seen so far
    for i, line in enumerate(lines[1:], start=2):   # step i of 12 done, at 1 s a step
        assert line.endswith(f"32 px, 8 img/s | 0:00:{12 - i:02d} left"), line


def test_out_of_memory_in_training_or_evaluation_is_one_line_and_keeps_the_checkpoint(tmp_path, monkeypatch,
                                                                                      capsys):
    """CUDA's out-of-memory error, raised inside a step of epoch 2 or in the final evaluation: one line
    that suggests a smaller batch, exit 2, and the checkpoint of the last finished epoch kept."""
    folder, out = make_folder(tmp_path / "d", n_per_class=8), tmp_path / "r"
    real, calls = cueco.train_step, []

    def oom(*args, **kw):
        calls.append(1)
        if len(calls) > 2:   # 2 steps an epoch: the first step of epoch 2
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(*args, **kw)

    monkeypatch.setattr(cueco, "train_step", oom)
    fails(tiny_args(folder, out, "--epochs", "3", "--eval-every", "0", "--device", "cpu"),
          "out of memory on cpu: try --batch-size 4 or a smaller --width; the "
          "checkpoint of epoch 1", capsys)
    assert cueco.load_checkpoint(str(out / "checkpoint.pt"))["epoch"] == 1

    monkeypatch.setattr(cueco, "train_step", real)
    monkeypatch.setattr(cueco, "linear_probe", lambda *a, **k: (_ for _ in ()).throw(
        torch.cuda.OutOfMemoryError("CUDA out of memory")))
    fails(tiny_args(folder, out, "--epochs", "1", "--eval-every", "0"), "finish the evaluation with", capsys)
    assert cueco.load_checkpoint(str(out / "checkpoint.pt"))["epoch"] == 1

def test_auto_precision_on_mps_is_fp32():
    """fp16 and bf16 fail inside PyTorch on MPS (a float64 in the gradient scaler, batch norm under autocast)."""
    assert cueco.pick_precision(torch.device("mps"), "auto")[0] == "fp32"
    assert cueco.pick_precision(torch.device("mps"), "fp32")[0] == "fp32"


def test_a_device_without_kernels_for_it_fails_at_the_probe_and_names_a_wheel(tmp_path, monkeypatch, capsys):
    """A V100 with a PyTorch built without sm_70 allocates memory fine and fails at its first kernel: the
    probe runs one, and the line says so (the README's table names the build to install)."""
    def no_kernel(*args, **kwargs):
        raise RuntimeError("CUDA error: no kernel image is available for execution on the device\nmore")

    monkeypatch.setattr(torch.Tensor, "sum", no_kernel)
    fails(["--device", "cpu", "--out", str(tmp_path)], "--device cpu cannot be used here (CUDA error: no kernel "
          "image is available for execution on the device)", capsys)


def test_the_training_set_goes_to_the_device_only_up_to_memory_gb(tmp_path, monkeypatch, capsys):
    """The training images are copied to the device when they fit in --memory-gb, else they stay in host
    memory (a pretend GPU: the run stops where it places them), and the data line says where they are."""
    class Placed(Exception):
        pass

    placed, real_to = [], torch.Tensor.to

    def to(self, *a, **kw):
        if self.dtype == torch.uint8 and self.dim() == 4 and len(self) == 16:   # the 16 training images
            placed.append(str(a[0] if a else kw["device"]))
            raise Placed
        return real_to(self, *a, **kw)

    folder = make_folder(tmp_path / "d", n_per_class=8)
    monkeypatch.setattr(cueco, "setup_device", lambda name: torch.device("cuda"))
    monkeypatch.setattr(cueco, "pick_precision", lambda device, precision="auto": ("fp32", "pretended"))
    monkeypatch.setattr(torch.Tensor, "to", to)
    for gb in ("0", "4"):
        with pytest.raises(Placed):
            cueco.run(tiny_args(folder, tmp_path / "r", "--epochs", "0", "--memory-gb", gb, "--no-compile"))
    assert placed == ["cpu", "cuda"]
    monkeypatch.undo()
    cueco.main(tiny_args(folder, tmp_path / "r", "--epochs", "0", "--tsne-points", "0", "--device", "cpu"))
    assert "the training set on cpu, 0.0 GB" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------------
# the README and the prepared GPU check
# ---------------------------------------------------------------------------------------------------------

def test_every_flag_the_readmes_guide_names_is_one_that_help_lists():
    """The student part of README.md (before "## Experiments", which may name a removed flag beside the
    commit that had it) names only flags that exist."""
    with open(os.path.join(HERE, "README.md")) as f:
        guide = f.read().split("\n## Experiments")[0]
    named = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", guide)) - {"--index-url"}   # pip's
    known = set(re.findall(r"--[a-z][a-z0-9-]*", cueco.build_parser().format_help()))
    assert named and named <= known, named - known


def test_the_gpu_check_runs_at_toy_size_on_the_cpu(tmp_path):
    """.ci/gpu-check, which a session with a GPU runs once, works end to end at toy size on the CPU: the
    speed part (eager, compiled, a profile), the accuracy part with its evaluation, metrics.json and the
    figures in $OUT."""
    folder = make_folder(tmp_path / "d", n_per_class=16)
    env = {**os.environ, "CUECO_GPU_CHECK_TOY": "1", "CUECO_GPU_CHECK_DATA": folder, "OUT": str(tmp_path / "out")}
    r = subprocess.run([sys.executable, os.path.join(HERE, ".ci", "gpu-check")], env=env, capture_output=True,
                       text=True, timeout=600, cwd=HERE)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for words in ("device:", "eager:", "compiled:", "img/s", "peak", "where 10 eager steps spend their time",
                  "kNN by epoch:", "linear probe", "k-means NMI", "own clusters NMI"):
        assert words in r.stdout, (words, r.stdout[-3000:])
    written = os.listdir(tmp_path / "out")
    assert "metrics.json" in written and {"tsne_d.png", "curves_d.png", "neighbours_d.png"} <= set(written)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_the_gpu_check_ends_its_training_when_it_is_killed(tmp_path):
    """A time limit that kills .ci/gpu-check (SIGKILL: no handler runs) kills the cueco.py it started too."""
    folder = make_folder(tmp_path / "d", n_per_class=16)
    env = {**os.environ, "CUECO_GPU_CHECK_TOY": "1", "CUECO_GPU_CHECK_DATA": folder}
    check = subprocess.Popen([sys.executable, os.path.join(HERE, ".ci", "gpu-check")], env=env, cwd=HERE,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def children():
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/stat") as f:
                    stat = f.read()
                if int(stat.rsplit(")", 1)[1].split()[1]) == check.pid:
                    found.append(int(pid))
            except (OSError, ValueError, IndexError):
                pass
        return found
    deadline = time.time() + 120
    while not children() and time.time() < deadline:
        time.sleep(0.2)
    kids = children()
    assert kids, "gpu-check started no cueco.py"
    check.kill()
    check.wait()
    time.sleep(2)
    alive = [k for k in kids if os.path.exists(f"/proc/{k}") and
             open(f"/proc/{k}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"]
    assert alive == [], alive


# ---------------------------------------------------------------------------------------------------------
# coursework: a clustering loss of one's own, wrong input, what the lab measures
# ---------------------------------------------------------------------------------------------------------


def readme_plugin():
    """The README's example clustering loss, run as a student would copy it (without its cueco.main line)."""
    text = open(os.path.join(HERE, "README.md")).read()
    block = next(b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "clustering_loss=" in b)
    assert len(block.strip().splitlines()) <= 10, block
    namespace = {}
    exec("\n".join(line for line in block.splitlines() if not line.startswith("cueco.main(")), namespace)
    return next(f for name, f in namespace.items() if callable(f) and name not in ("F", "cueco", "torch"))


def test_a_students_clustering_loss_trains_through_main_with_every_figure_and_metric(tmp_path, capsys):
    """The README's plug-in gets the queries (with gradient) and keys (without) of both views, moves C, and
    the run keeps its name (metrics.json, the titles); --resume asks for it again and goes on with it."""
    plugin, calls = readme_plugin(), []

    def spy(q1, q2, k1, k2, model):
        calls.append((q1.shape, q1.requires_grad, k2.shape, k2.requires_grad))
        return plugin(q1, q2, k1, k2, model)
    spy.__name__ = plugin.__name__
    folder, out = make_folder(tmp_path / "d", n_per_class=8), tmp_path / "r"
    final = cueco.main(tiny_args(folder, out, "--epochs", "1"), clustering_loss=spy)
    assert calls[0] == ((8, 16), True, (8, 16), False) and len(calls) == 2   # 16 images, batch 8: 2 steps
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["args"]["clustering_loss"] == plugin.__name__ and saved["final"] == final
    assert {"knn", "linear", "compactness", "separation", "nmi", "head_nmi"} <= set(final)
    assert sorted(os.listdir(out / "fig")) == [f"{f}_d.png" for f in ("clusters", "curves", "neighbours", "tsne")]
    assert f"CueCo with {plugin.__name__} on d" in capsys.readouterr().out
    fails(["--resume", str(out / "checkpoint.pt"), "--epochs", "2"], f"trained with the clustering loss "
          f"{plugin.__name__}: pass it again, main(argv, clustering_loss={plugin.__name__})", capsys)
    cueco.main(["--resume", str(out / "checkpoint.pt"), "--epochs", "2"], clustering_loss=spy)
    assert len(calls) == 4 and len(json.loads((out / "metrics.json").read_text())["epochs"]) == 2


def test_a_plugin_without_a_name_of_its_own_runs_under_its_class_name(tmp_path):
    """functools.partial and callable objects have no __name__: the run names the plug-in by its class."""
    folder, out = make_folder(tmp_path / "d", n_per_class=8), tmp_path / "r"
    plugin = functools.partial(cueco.cueco_clustering_loss)
    cueco.main(tiny_args(folder, out, "--epochs", "1", "--tsne-points", "0"), clustering_loss=plugin)
    assert json.loads((out / "metrics.json").read_text())["args"]["clustering_loss"] == "partial"


def test_the_default_clustering_loss_is_the_models_own_and_lambda_scales_a_plugin():
    """CueCo() uses cueco_clustering_loss; a plug-in's value is L_clu, which the step weighs by lambda."""
    assert tiny_model().clustering_loss is cueco.cueco_clustering_loss
    model, (x1, x2) = tiny_model(clustering_loss=lambda q1, q2, k1, k2, model: (q1 * q2).sum() * 0 + 3.0), \
        fixed_views(8, 16)
    loss, l_con, l_clu, _ = cueco.train_step(model, cueco.make_optimizer(model), None, x1, x2, 0.5, 0.99)
    assert l_clu.item() == 3.0 and loss.item() == pytest.approx(l_con.item() + 1.5)


def test_a_plugin_compiles_with_the_rest_of_the_forward():
    """torch.compile (the aot_eager backend, on the CPU) traces a plug-in with the model: the same losses as
    eager, in one graph."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    plugin = readme_plugin()
    eager = tiny_model(bn_splits=2, clustering_loss=plugin)
    net = torch.compile(copy.deepcopy(eager), backend="aot_eager", dynamic=False, fullgraph=True)
    x1, x2 = fixed_views(16, 16)
    out = []
    for run in (eager, net):
        torch.manual_seed(0)
        out.append([t.item() for t in run(x1, x2)[:2]])
    assert out[0] == pytest.approx(out[1], rel=1e-5)


def test_a_clustering_loss_that_returns_nan_stops_the_run_in_one_line_naming_it(tmp_path, capsys):
    def broken(q1, q2, k1, k2, model):
        return (q1 * float("nan")).sum()
    argv = tiny_args(make_folder(tmp_path / "d", n_per_class=8), tmp_path / "r", "--epochs", "1", "--log-every", "1")
    with pytest.raises(SystemExit) as e:
        cueco.main(argv, clustering_loss=broken)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "the loss became NaN/inf in epoch 1 (L_clu, from broken)" in err
    assert len(err.splitlines()) == 1


def wrong_inputs():
    u8, views = torch.zeros(8, 3, 16, 16, dtype=torch.uint8), fixed_views(8, 16)
    odd = torch.randn(3, 3, 16, 16)
    return [
        ("augment: floats in [0, 1]", lambda: cueco.augment(torch.rand(2, 3, 8, 8), 8, None, random.Random(0)),
         TypeError, "augment expected uint8 images [B, 3, H, W], got float32 [2, 3, 8, 8]"),
        ("augment: channels last", lambda: cueco.augment(u8.permute(0, 2, 3, 1), 8, None, random.Random(0)),
         ValueError, "augment expected uint8 images [B, 3, H, W], got uint8 [8, 16, 16, 3]"),
        ("augment: one image", lambda: cueco.augment(u8[0], 8, None, random.Random(0)),
         ValueError, "augment expected uint8 images [B, 3, H, W], got uint8 [3, 16, 16]"),
        ("model: uint8 images", lambda: tiny_model()(u8, u8), TypeError,
         "ResNet18 expected normalised float images [N, 3, S, S], got uint8 [8, 3, 16, 16]"),
        ("model: a batch of 3 with bn_splits 2", lambda: tiny_model(bn_splits=2)(odd, odd), ValueError,
         "SplitBatchNorm expected a training batch of a multiple of 2, got float32 [3, 4, 16, 16]"),
        ("enqueue: more keys than K", lambda: tiny_model().enqueue(unit(33, 8)), ValueError,
         "enqueue expected at most K=32 keys [B, 8], got float32 [33, 8]"),
        ("sinkhorn: 1-D scores", lambda: cueco.sinkhorn(torch.randn(5)), ValueError,
         "sinkhorn expected scores [N, K_c], got float32 [5]"),
        ("contrastive_loss: q and k differ", lambda: cueco.contrastive_loss(unit(4, 8), unit(5, 8), unit(16, 8), 0.1),
         ValueError, "contrastive_loss expected q, k [N, D] and queue [K, D], got float32 [4, 8], float32 [5, 8], "
         "float32 [16, 8]"),
        ("centroid_loss: s_q and s_k differ", lambda: cueco.centroid_loss(torch.randn(4, 3), torch.randn(4, 5), 0.2,
                                                                          0.05),
         ValueError, "centroid_loss expected s_q, s_k [N, K_c] of one shape, got float32 [4, 3], float32 [4, 5]"),
        ("batch_groups: q and z differ", lambda: cueco.batch_groups(unit(4, 8), unit(4, 6), 2), ValueError,
         "batch_groups expected q, z [N, D] of one shape, got float32 [4, 8], float32 [4, 6]"),
        ("a clustering loss of shape [N]", lambda: tiny_model(clustering_loss=lambda q1, *rest: q1.sum(1))(*views),
         ValueError, "CueCo expected clustering_loss to return a scalar, got float32 [8]"),
        ("knn_accuracy: labels [N, 1]", lambda: cueco.knn_accuracy(odd[0], torch.zeros(3, 1), odd[0], torch.zeros(3)),
         ValueError, "knn_accuracy expected train_x [N, F], train_y [N], test_x [N_test, F], test_y [N_test], got "
         "float32 [3, 16, 16], float32 [3, 1], float32 [3, 16, 16], float32 [3]"),
        ("class_geometry: fewer labels", lambda: cueco.class_geometry(unit(5, 8), torch.arange(4)), ValueError,
         "class_geometry expected features x [N, F], labels y [N], got float32 [5, 8], int64 [4]"),
    ]


@pytest.mark.parametrize("case", range(13))
def test_wrong_input_to_a_reusable_piece_says_in_one_line_what_it_expected(case):
    name, call, error, message = wrong_inputs()[case]
    with pytest.raises(error) as e:
        call()
    assert str(e.value) == message, name


def test_the_pieces_take_a_device_as_a_string_or_a_torch_device():
    data = cueco.Data(torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8), torch.arange(6) % 2,
                      torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8), torch.arange(4) % 2, ["a", "b"], 8)
    backbone = cueco.ResNet18(4)
    by_name, by_device = cueco.features(backbone, data, "cpu"), cueco.features(backbone, data, torch.device("cpu"))
    assert all(torch.equal(a, b) for a, b in zip(by_name, by_device))
    model = tiny_model()
    torch.manual_seed(0)
    assert torch.isfinite(cueco.make_forward(model, "cpu", "fp32")(*fixed_views(8, 16))[0])


def test_make_optimizer_takes_the_model_with_the_command_lines_defaults():
    """make_optimizer(model) is the script's optimizer: --lr, --weight-decay and --centroid-lr's defaults; the
    script scales --lr by batch / 512 with scaled_lr, the function a student calls too."""
    flags, model = cueco.build_parser().parse_args([]), tiny_model()
    opt = cueco.make_optimizer(model)
    assert (opt.defaults["lr"], opt.defaults["weight_decay"]) == (flags.lr, flags.weight_decay)
    assert opt.param_groups[1]["lr"] == pytest.approx(flags.lr * flags.centroid_lr)
    assert cueco.scaled_lr(0.06, 256) == pytest.approx(0.03) and cueco.scaled_lr(0.06, 1024) == pytest.approx(0.12)


def test_sgd_keeps_a_momentum_of_0_9():
    """Heavy ball in PyTorch's form, v <- 0.9 v + g, p <- p - lr v: two steps of a constant gradient g move a
    weight by lr g (1 + 1.9)."""
    model = tiny_model()
    opt = cueco.make_optimizer(model, lr=0.1, weight_decay=0.0)
    p = model.encoder_q.projector[0].bias
    start = p.detach().clone()
    for _ in range(2):
        p.grad = torch.ones_like(p)
        opt.step()
    assert torch.allclose(p, start - 0.1 * 2.9, atol=1e-6)


def test_the_loop_hands_the_step_two_different_views_of_the_same_images(tmp_path, monkeypatch):
    """With MoCo-v2's augmentation the two views differ; with a deterministic stand-in for it they are equal:
    the same images, augmented twice."""
    seen, real = [], cueco.train_step

    def spy(model, optimizer, scaler, x1, x2, *rest):
        seen.append(torch.equal(x1, x2))
        return real(model, optimizer, scaler, x1, x2, *rest)
    monkeypatch.setattr(cueco, "train_step", spy)
    folder = make_folder(tmp_path / "d", n_per_class=8)
    train_only(monkeypatch, folder, tmp_path / "r", "--epochs", "1")
    monkeypatch.setattr(cueco, "augment", lambda x, size, g, rng: cueco.normalize(x.float()[..., :size, :size] / 255, 32))
    train_only(monkeypatch, folder, tmp_path / "r2", "--epochs", "1")
    assert seen == [False, False, True, True]


def test_the_colour_jitters_order_is_drawn_per_batch():
    """ColorJitter applies its four parts in a random order: the same per-image draws (g) come out in other
    colours under other orders (rng, which 32-px images use for nothing else)."""
    x = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    views = [cueco.augment(x, 8, torch.Generator().manual_seed(0), random.Random(seed)) for seed in range(6)]
    assert len({v.numpy().tobytes() for v in views}) > 2


def test_grayscale_is_drawn_apart_from_the_jitter():
    """RandomGrayscale(p=0.2) after RandomApply(ColorJitter, p=0.8), each drawn for itself: about 0.2 x 0.2 = 4%
    of the views of a coloured image are grey with its unjittered luminance."""
    colour = torch.tensor([200, 60, 20], dtype=torch.uint8).view(1, 3, 1, 1)
    v = denorm(cueco.augment(colour.expand(4000, 3, 8, 8).contiguous(), 8, torch.Generator().manual_seed(0),
                             random.Random(0)))                        # [4000, 3, 8, 8] in [0, 1]
    luminance = (0.2989 * 200 + 0.587 * 60 + 0.114 * 20) / 255
    grey = (v - luminance).abs().amax((1, 2, 3)) < 2e-3
    assert 0.025 < grey.float().mean().item() < 0.06


def brute_force_geometry(x, y):
    x = [row / row.norm() for row in x.double()]
    classes = sorted(set(y.tolist()))
    mean = {c: sum(x[i] for i in range(len(x)) if y[i] == c) for c in classes}
    mean = {c: m / m.norm() for c, m in mean.items()}
    compact = sum(float(x[i] @ mean[int(y[i])]) for i in range(len(x))) / len(x)
    pairs = [(a, b) for a in classes for b in classes if a != b]
    return compact, sum(float(mean[a] @ mean[b]) for a, b in pairs) / len(pairs)


def test_compactness_and_separation_against_a_worked_example_and_brute_force():
    """Class 0 at (1, 0) and (0, 1), class 1 at (-1, 0) and (0, -1): the means point to +-(1, 1)/sqrt 2, each
    image is at 45 degrees from its class's mean (cos 0.707) and the means are opposite (cos -1)."""
    x, y = torch.tensor([[1.0, 0], [0, 1], [-1, 0], [0, -1]]), torch.tensor([0, 0, 1, 1])
    assert cueco.class_geometry(x, y) == pytest.approx((0.5 ** 0.5, -1.0))
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(60, 5, generator=g) * 3, torch.tensor([0, 2, 5]).repeat(20)   # classes 0, 2 and 5
    assert cueco.class_geometry(x, y) == pytest.approx(brute_force_geometry(x, y), abs=1e-5)


def test_every_run_reports_compactness_and_separation_of_the_test_features(tmp_path, monkeypatch, capsys):
    seen = []
    real = cueco.class_geometry
    monkeypatch.setattr(cueco, "class_geometry", lambda x, y: seen.append((x.shape, y.shape)) or real(x, y))
    folder = make_folder(tmp_path / "d", n_per_class=12, splits=("train",))
    make_folder(tmp_path / "d", n_per_class=4, splits=("test",))
    final = cueco.main(tiny_args(folder, tmp_path / "r", "--epochs", "0", "--tsne-points", "0"))
    assert seen == [((8, 32), (8,))]   # the 8 test images' backbone features, kNN's (not the 24 training ones)
    last = [line for line in capsys.readouterr().out.splitlines() if line.startswith("final:")][0]
    assert f"compactness {final['compactness']:.3f}, separation {final['separation']:.3f}" in last


def test_the_lab_preset():
    """The lab's short runs: a ResNet-18 of width 8 for 5 epochs of 24-px views, evaluated once at the end."""
    assert cueco.PRESETS["lab"] == {"width": 8, "batch_size": 256, "epochs": 5, "view_scale": 0.75, "eval_every": 0}
    args = cueco.parse_args(["--preset", "lab", "--seed", "1"])
    assert (args.width, args.epochs, args.eval_every, args.lambda_clu, args.out) == (8, 5, 0, 1.0, "runs/cifar10")


def test_the_readmes_reuse_snippet_loads_a_checkpoint_and_gives_backbone_features(tmp_path):
    """The README's lines that load checkpoint.pt and take the backbone's features run as written."""
    folder = make_folder(tmp_path / "d", n_per_class=8)
    cueco.main(tiny_args(folder, tmp_path / "r", "--epochs", "1", "--tsne-points", "0"))
    text = open(os.path.join(HERE, "README.md")).read()
    block = next(b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "load_state_dict" in b)
    namespace = {}
    exec(block.replace("runs/cifar10/checkpoint.pt", str(tmp_path / "r" / "checkpoint.pt")), namespace)
    assert namespace["features"].shape == (4, 8 * 4)   # width 4
