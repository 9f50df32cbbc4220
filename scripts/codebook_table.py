#!/usr/bin/env python3
"""Table of antkv-train-codebook reports: per configuration and trainer, the held-out quantization error of
K and V (relative: sum|x - x^|^2 / sum|x|^2, and MSE per element), mean over layers, the summed final k-means
objective, and the training time. When the same configuration was trained by two trainers (faiss-cpu and the
GPU), the objective ratio GPU/CPU is printed as well.

    python3 scripts/codebook_table.py runs/quick/every/*.report.json [--json table.json]
"""
import argparse
import json
import sys
from collections import defaultdict


def summarize(path):
    with open(path) as f:
        r = json.load(f)
    cfg = r["config"]
    layers = r["layers"]
    if not layers:
        raise SystemExit(f"{path}: the report holds no layers")

    def mean(kind, field):
        return sum(l[kind][field] for l in layers) / len(layers)

    def objective(kind):
        return sum(sum(l[kind]["objective_per_codebook"]) for l in layers)

    return {
        "file": path,
        "config": f"K c{cfg['key_c']}b{cfg['key_b']} V c{cfg['value_c']}b{cfg['value_b']}",
        "bits": cfg["key_bits"],
        "trainer": cfg["trainer"],
        "weighting": cfg["weighting"],
        # calibration anchors left out of training (antkv) or not (CQ-style vq); reports before it: out
        "anchors": "out" if cfg.get("exclude_anchors", True) else "in",
        "key_rope": cfg["key_rope"],
        "k_rel": mean("keys", "heldout_relative_error"),
        "v_rel": mean("values", "heldout_relative_error"),
        "k_mse": mean("keys", "heldout_mse"),
        "v_mse": mean("values", "heldout_mse"),
        "k_objective": objective("keys"),
        "v_objective": objective("values"),
        "reseeded": sum(sum(l[kind]["reseeded_per_codebook"]) for l in layers for kind in ("keys", "values")),
        "seconds": r["seconds"],
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("reports", nargs="+")
    ap.add_argument("--json", help="also write the rows as JSON")
    a = ap.parse_args()
    rows = sorted((summarize(p) for p in a.reports), key=lambda r: (-r["bits"], r["weighting"], r["anchors"], r["trainer"]))
    hdr = (f"{'bits':>6} {'config':<20} {'weighting':<9} {'anchors':<7} {'trainer':<10} {'K rel':>8} {'V rel':>8} "
           f"{'K mse':>10} {'V mse':>10} {'reseeded':>8} {'seconds':>8}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print(f"{r['bits']:>6g} {r['config']:<20} {r['weighting']:<9} {r['anchors']:<7} {r['trainer']:<10} {r['k_rel']:>8.4f} "
              f"{r['v_rel']:>8.4f} {r['k_mse']:>10.4g} {r['v_mse']:>10.4g} {r['reseeded']:>8d} {r['seconds']:>8.1f}")
    # same configuration, two trainers: objective ratio
    by_cfg = defaultdict(dict)
    for r in rows:
        by_cfg[(r["bits"], r["config"], r["weighting"], r["anchors"], r["key_rope"])][r["trainer"]] = r
    pairs = [(k, v) for k, v in by_cfg.items() if "faiss-cpu" in v and len(v) > 1]
    if pairs:
        print("\nfinal k-means objective (sum over codebooks), GPU / FAISS CPU:")
        for (bits, config, weighting, _, _), v in pairs:
            cpu = v["faiss-cpu"]
            for name, g in v.items():
                if name == "faiss-cpu":
                    continue
                print(f"  {bits:>6g} {config:<20} {weighting:<7} {name}: K {g['k_objective'] / cpu['k_objective']:.4f} "
                      f"V {g['v_objective'] / cpu['v_objective']:.4f}; held-out rel. error K {g['k_rel']:.4f} vs "
                      f"{cpu['k_rel']:.4f}, V {g['v_rel']:.4f} vs {cpu['v_rel']:.4f}; "
                      f"{cpu['seconds'] / g['seconds']:.1f}x faster")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
