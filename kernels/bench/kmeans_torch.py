#!/usr/bin/env python3
"""Plain PyTorch batched weighted k-means, the baseline for antkv-bench-kmeans (kernels/kmeans/kmeans_kernels.cu).

Same shapes as the antkv jobs: per codebook n points in R^c, k centroids, `iters` Lloyd iterations;
assignment with torch.cdist + argmin over a batch of codebooks, update with index_add_ (sum w x, sum w).
Data: a Gaussian mixture per codebook (32 components), log-normal weights with ~10% zeros; init: random
points of the codebook (k-means++ is not part of the timing). fp32 throughout (TF32 matmul off, PyTorch's
default). Times `--codebooks` codebooks in batches of `--batch` and extrapolates per codebook to `--job`.

  python3 kernels/bench/kmeans_torch.py --dim 8 --k 256 --codebooks 256 --batch 16 --job 8192
"""
import argparse
import json
import time

import torch


def make_data(b, n, c, gen, device):
    mix = 32
    mu = torch.randn(b, mix, c, generator=gen, device=device)
    sd = 0.1 + 0.5 * torch.rand(b, mix, 1, generator=gen, device=device)
    comp = torch.randint(0, mix, (b, n), generator=gen, device=device)
    x = torch.gather(mu, 1, comp[..., None].expand(b, n, c)) + torch.gather(sd, 1, comp[..., None]) * torch.randn(
        b, n, c, generator=gen, device=device)
    w = torch.exp(0.75 * torch.randn(b, n, generator=gen, device=device))
    w = torch.where(torch.rand(b, n, generator=gen, device=device) < 0.1, torch.zeros_like(w), w)
    return x.contiguous(), w.contiguous()


def kmeans_batch(x, w, k, iters, gen):
    b, n, c = x.shape
    idx = torch.randint(0, n, (b, k), generator=gen, device=x.device)
    cent = torch.gather(x, 1, idx[..., None].expand(b, k, c)).contiguous()
    offs = (torch.arange(b, device=x.device) * k)[:, None]
    wx = (w[..., None] * x).reshape(b * n, c)
    wf = w.reshape(b * n)
    for _ in range(iters):
        d = torch.cdist(x, cent)                      # [b, n, k]
        a = d.argmin(dim=2)                            # [b, n]
        flat = (a + offs).reshape(b * n)
        s = torch.zeros(b * k, c, device=x.device).index_add_(0, flat, wx)
        sw = torch.zeros(b * k, device=x.device).index_add_(0, flat, wf)
        new = s / sw.clamp_min(1e-30)[:, None]
        cent = torch.where((sw > 0)[:, None], new, cent.reshape(b * k, c)).reshape(b, k, c)
    d = torch.cdist(x, cent)
    obj = (w * d.min(dim=2).values.square()).sum(dim=1)
    return cent, obj


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--name", default="")
    ap.add_argument("--dim", type=int, default=8)
    ap.add_argument("--k", type=int, default=256)
    ap.add_argument("--points", type=int, default=262144)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--codebooks", type=int, default=64, help="codebooks timed")
    ap.add_argument("--batch", type=int, default=16, help="codebooks per batched launch")
    ap.add_argument("--job", type=int, default=8192, help="codebooks of the whole job (extrapolation)")
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev)
    gen.manual_seed(1)
    # warm-up on one small batch
    x, w = make_data(1, a.points, a.dim, gen, dev)
    kmeans_batch(x, w, a.k, 1, gen)
    torch.cuda.synchronize()
    total = 0.0
    objs = []
    done = 0
    while done < a.codebooks:
        b = min(a.batch, a.codebooks - done)
        x, w = make_data(b, a.points, a.dim, gen, dev)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        _, obj = kmeans_batch(x, w, a.k, a.iters, gen)
        torch.cuda.synchronize()
        total += time.perf_counter() - t0
        objs.append((obj / a.points).mean().item())
        done += b
        del x, w
    per_cb = total / a.codebooks
    flops = 2.0 * a.points * a.k * a.dim * (a.iters + 1) * a.codebooks
    res = {"name": a.name, "torch": torch.__version__, "device": torch.cuda.get_device_name(0), "dim": a.dim,
           "k": a.k, "points": a.points, "iters": a.iters, "codebooks_timed": a.codebooks, "batch": a.batch,
           "seconds_timed": total, "per_codebook_s": per_cb, "job_codebooks": a.job,
           "job_s_extrapolated": per_cb * a.job, "assign_tflops": flops / total * 1e-12,
           "mean_objective_per_point": sum(objs) / len(objs)}
    print(f"torch {a.name} c{a.dim} k{a.k}: {total:.2f} s for {a.codebooks} codebooks (batch {a.batch}) = "
          f"{per_cb * 1e3:.2f} ms/codebook -> {per_cb * a.job:.1f} s for {a.job} codebooks (extrapolated); "
          f"{flops / total * 1e-12:.1f} TFLOP/s (2nkc per pass)", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
