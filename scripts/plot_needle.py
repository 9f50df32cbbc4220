#!/usr/bin/python3
"""Draws a needle-in-a-haystack heatmap per method (accuracy by context length and needle depth) from the
results.json of `antkv-eval needle` (or of `antkv-eval run` with eval.tasks [.., needle], in <out>/needle/).

    /usr/bin/python3 scripts/plot_needle.py runs/<name>/needle/results.json [-o DIR] [--task passkey]

One PNG per method (the NIAH convention: x = context length, y = needle depth from 0% at the top to 100%,
colour = accuracy averaged over the tasks, or over --task only): DIR/heatmap-<method>.png, DIR defaulting to
the folder of results.json. Methods through the real compressed cache get "-real" in the name. Uses Debian's
python3-matplotlib. Every PNG is written to a temporary file and renamed when complete.
"""
import argparse
import json
import os
import re
import sys
import tempfile

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def file_name(method, kv_cache):
    """A file-name-safe name of a method: "antkv:bits=1,gain=kv" -> "antkv_bits_1_gain_kv"."""
    s = re.sub(r"[^A-Za-z0-9.]+", "_", method).strip("_")
    return s + ("-real" if kv_cache == "real" else "")


def grids(rows, task=None):
    """{(method, kv_cache): (lengths, depths, accuracy[depth][length])}, cases-weighted over the tasks."""
    out = {}
    for key in dict.fromkeys((r["method"], r.get("kv_cache", "simulated")) for r in rows):
        mine = [r for r in rows if (r["method"], r.get("kv_cache", "simulated")) == key
                and (task is None or r["task"] == task)]
        if not mine:
            continue
        lengths = sorted({r["length"] for r in mine})
        depths = sorted({r["depth"] for r in mine})
        acc = [[None] * len(lengths) for _ in depths]
        for i, d in enumerate(depths):
            for j, n in enumerate(lengths):
                cell = [r for r in mine if r["depth"] == d and r["length"] == n]
                cases = sum(r["cases"] for r in cell)
                if cases:
                    acc[i][j] = sum(r["accuracy"] * r["cases"] for r in cell) / cases
        out[key] = (lengths, depths, acc)
    return out


def write_png(fig, path):
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".tmp-", dir=os.path.dirname(path) or ".")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=120, format="png")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results")
    ap.add_argument("-o", "--out", help="folder of the PNGs (default: the folder of results.json)")
    ap.add_argument("--task", help="one task only (passkey, single, multikey, multivalue, multiquery)")
    a = ap.parse_args()
    try:
        with open(a.results) as f:
            data = json.load(f)
        rows = data["results"]
        if data.get("tool") != "antkv-eval needle":
            raise KeyError("tool is not \"antkv-eval needle\"")
        for r in rows:
            for k in ("method", "task", "length", "depth", "cases", "accuracy"):
                if k not in r:
                    raise KeyError(f"a row has no \"{k}\"")
    except (OSError, ValueError, KeyError) as e:
        sys.exit(f"plot_needle: {a.results}: not the results.json of antkv-eval needle ({e})")
    if a.task and not any(r["task"] == a.task for r in rows):
        sys.exit(f"plot_needle: {a.results}: no row of task {a.task} "
                 f"(tasks: {', '.join(sorted({r['task'] for r in rows}))})")
    out_dir = a.out or os.path.dirname(os.path.abspath(a.results))
    os.makedirs(out_dir, exist_ok=True)
    for (method, kv_cache), (lengths, depths, acc) in grids(rows, a.task).items():
        fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(lengths), 1.2 + 0.5 * len(depths)))
        masked = [[float("nan") if v is None else 100 * v for v in row] for row in acc]
        im = ax.imshow(masked, cmap="RdYlGn", vmin=0, vmax=100, aspect="auto")
        for i in range(len(depths)):
            for j in range(len(lengths)):
                if acc[i][j] is not None:
                    ax.text(j, i, f"{100 * acc[i][j]:.0f}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{100 * d:.0f}%" for d in depths])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("needle depth")
        title = method + (" (real cache)" if kv_cache == "real" else "")
        ax.set_title(f"{title}\n{a.task or 'all tasks'}: accuracy %", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.05)
        fig.tight_layout()
        path = os.path.join(out_dir, f"heatmap-{file_name(method, kv_cache)}.png")
        write_png(fig, path)
        plt.close(fig)
        print(path)


if __name__ == "__main__":
    main()
