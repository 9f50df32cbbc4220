#!/usr/bin/python3
"""Draws perplexity against effective bits per method from antkv-eval's results.json (one panel per text).

    /usr/bin/python3 scripts/plot_results.py runs/<name>/results.json [-o plot.png] [--with-codebooks]

Uses Debian's python3-matplotlib. Effective bits leave the codebooks out unless --with-codebooks (at short
contexts the amortized codebooks dominate and hide the differences between methods).
"""
import argparse
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def option_keys(method):
    """The option names of a method string: "antkv:bits=1,anchors=off" -> {"bits", "anchors"}."""
    if ":" not in method:
        return set()
    return {kv.split("=", 1)[0] for kv in method.split(":", 1)[1].split(",") if kv}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results")
    ap.add_argument("-o", "--out", help="PNG to write (default: beside results.json)")
    ap.add_argument("--with-codebooks", action="store_true", help="x axis counts the amortized codebooks")
    a = ap.parse_args()
    try:
        with open(a.results) as f:
            data = json.load(f)
        rows = data["results"]
    except (OSError, ValueError, KeyError) as e:
        sys.exit(f"plot_results: {a.results}: not an antkv-eval results.json ({e})")
    xkey = "effective_bits" if a.with_codebooks else "effective_bits_without_codebooks"
    texts = sorted({r["text"] for r in rows})
    fig, axes = plt.subplots(1, len(texts), figsize=(6 * len(texts), 4.5), squeeze=False)
    colors = {"fp16": "black", "uniform": "tab:blue", "vq": "tab:orange", "antkv": "tab:green"}
    for ax, text in zip(axes[0], texts):
        fp16 = [r["ppl"] for r in rows if r["text"] == text and r["kind"] == "fp16"]
        for kind in ["uniform", "vq", "antkv"]:
            pts = sorted((r[xkey], r["ppl"], r["method"]) for r in rows if r["text"] == text and r["kind"] == kind)
            # the main curve: methods whose only options are bits and group ("antkv", "vq:bits=0.5",
            # "uniform:bits=2,group=128"); ablations ("antkv:anchors=off") as single marks
            main = [p for p in pts if kind == "uniform" or option_keys(p[2]) <= {"bits", "group"}]
            other = [p for p in pts if p not in main]
            if main:
                ax.plot([p[0] for p in main], [p[1] for p in main], "o-", color=colors[kind], label=kind)
            for x, y, m in other:
                ax.plot([x], [y], "x", color=colors[kind])
                ax.annotate(m.split(":", 1)[-1], (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        if fp16:
            ax.axhline(fp16[0], color="black", linestyle="--", linewidth=1, label=f"fp16 ({fp16[0]:.2f})")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("effective bits per channel" + (" (with codebooks)" if a.with_codebooks else ""))
        ax.set_ylabel("perplexity")
        ax.set_title(os.path.basename(text))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{os.path.basename(str(data.get('model', '')))}: perplexity vs effective bits")
    fig.tight_layout()
    out = a.out or os.path.join(os.path.dirname(os.path.abspath(a.results)), "results.png")
    fig.savefig(out + ".tmp.png", dpi=120)
    os.replace(out + ".tmp.png", out)
    print(out)


if __name__ == "__main__":
    main()
