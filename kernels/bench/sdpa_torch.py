#!/usr/bin/env python3
"""PyTorch scaled_dot_product_attention on the decode shapes of `antkv-eval bench` (compared with ours in kernels/NOTES.md).

One new query token per sequence over a bf16 KV cache: q [B, 32, 1, 128], k/v [B, 8, T, 128] (LLaMA-3-8B,
GQA 4), every SDPA backend PyTorch offers for it (default dispatch, flash, memory-efficient, cuDNN, math),
timed with CUDA events over back-to-back calls after warm-up, several cache copies rotated so that no call
finds its data in L2 (as antkv's benchmark). GQA through enable_gqa=True where this PyTorch has it;
otherwise K/V are expanded to 32 heads beforehand and the bytes counted are the expanded ones (what the
kernel reads). Roofline: a 2 GiB device-to-device copy in the same run (bytes read + written).

  python3 kernels/bench/sdpa_torch.py --batch 1 16 --context 32768 131072 --json sdpa.json
"""
import argparse
import json
import math

import torch
import torch.nn.functional as F


def copy_bandwidth_gbps(nbytes=2 << 30, iters=10):
    a = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(iters):
        b.copy_(a)
    e.record()
    torch.cuda.synchronize()
    return 2.0 * nbytes * iters / (s.elapsed_time(e) * 1e-3) / 1e9


def has_enable_gqa():
    # a builtin: no signature to inspect, so try it on a tiny problem
    q = torch.zeros(1, 4, 1, 8, device="cuda", dtype=torch.bfloat16)
    kv = torch.zeros(1, 2, 3, 8, device="cuda", dtype=torch.bfloat16)
    try:
        F.scaled_dot_product_attention(q, kv, kv, enable_gqa=True)
        return True
    except (TypeError, RuntimeError):
        return False


def backends():
    out = [("default", None)]
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        for name in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"):
            if hasattr(SDPBackend, name):
                out.append((name.lower(), lambda n=name: sdpa_kernel(getattr(SDPBackend, n))))
    except ImportError:
        pass
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--context", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--json")
    a = ap.parse_args()
    torch.manual_seed(0)
    gqa = has_enable_gqa()
    copy = copy_bandwidth_gbps()
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, copy bandwidth {copy:.0f} GB/s, "
          f"enable_gqa {'yes' if gqa else 'no (K/V expanded)'}")
    print(f"{'batch':>5} {'context':>8} {'backend':<20} {'ms':>8} {'GB/s':>7} {'%copy':>6}")
    rows = []
    G = a.heads // a.kv_heads
    for B in a.batch:
        for T in a.context:
            kv_heads = a.kv_heads if gqa else a.heads
            kv_bytes = 2 * B * kv_heads * T * a.head_dim * 2
            copies = max(1, min(8, math.ceil((1 << 30) / kv_bytes)))
            free = torch.cuda.mem_get_info()[0]
            if copies * kv_bytes > 0.8 * free:
                copies = max(1, int(0.8 * free // kv_bytes))
            if copies * kv_bytes > 0.8 * free:
                print(f"{B:>5} {T:>8} skipped: {kv_bytes / 1e9:.1f} GB of K/V do not fit")
                continue
            q = torch.randn(B, a.heads, 1, a.head_dim, device="cuda", dtype=torch.bfloat16)
            ks, vs = [], []
            for _ in range(copies):
                k = torch.randn(B, a.kv_heads, T, a.head_dim, device="cuda", dtype=torch.bfloat16)
                v = torch.randn_like(k)
                if not gqa:
                    k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)
                ks.append(k)
                vs.append(v)
            kw = {"enable_gqa": True} if gqa else {}
            for name, ctx in backends():
                def call(i):
                    return F.scaled_dot_product_attention(q, ks[i % copies], vs[i % copies], **kw)
                try:
                    cm = ctx() if ctx else None
                    if cm:
                        cm.__enter__()
                    try:
                        for i in range(3):
                            call(i)
                        torch.cuda.synchronize()
                        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                        iters = max(a.iters, int(0.1 / (kv_bytes / (copy * 1e9))) + 1)
                        s.record()
                        for i in range(iters):
                            call(i)
                        e.record()
                        torch.cuda.synchronize()
                        ms = s.elapsed_time(e) / iters
                    finally:
                        if cm:
                            cm.__exit__(None, None, None)
                except Exception as ex:  # a backend that does not take these shapes
                    print(f"{B:>5} {T:>8} {name:<20} not available: {str(ex).splitlines()[0][:80]}")
                    rows.append({"batch": B, "context": T, "backend": name, "error": str(ex).splitlines()[0]})
                    continue
                gbps = kv_bytes / (ms * 1e-3) / 1e9
                print(f"{B:>5} {T:>8} {name:<20} {ms:>8.4f} {gbps:>7.0f} {100 * gbps / copy:>5.1f}%")
                rows.append({"batch": B, "context": T, "backend": name, "ms": ms, "gbps": gbps,
                             "frac_of_copy": gbps / copy})
            del ks, vs, q
            torch.cuda.empty_cache()
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"torch": torch.__version__, "copy_gbps": copy, "enable_gqa": gqa, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
