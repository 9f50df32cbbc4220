#!/usr/bin/env python3
"""Per-layer anchor ratios from measured benefit, at the same total (the lratio= method option).

  scripts/anchor_budget.py DIAG.json --with METHOD --without METHOD --ratio R [--floor F]

DIAG.json is `antkv-eval diagnose --json` (its "texts" list) run on *calibration* text (never on an evaluation text) with both
methods: METHOD_WITH keeps anchors at ratio R in every layer, METHOD_WITHOUT is the same method and codebooks
with anchors=off. Layer l's benefit is the drop of its attention-output error that the anchors buy,
b_l = max(0, err_without_l - err_with_l). The anchor budget R x layers is shared in proportion to b_l (plus a
floor F x R per layer, default 0, so that no layer loses all of them when F > 0), which keeps the average
ratio, i.e. the effective bits, the same as R in every layer. Prints the `lratio=` option (and the
benefits on stderr). Python standard library only."""
import argparse
import json
import sys


def layer_errors(diag, method):
    """The method's per-layer output error, averaged over the texts of the diagnostics."""
    per_text = []
    for t in diag.get('texts', []):
        for m in t['diagnostics']:
            if m['method'] == method:
                per_text.append([l['output_error'] for l in sorted(m['layers'], key=lambda l: l['layer'])])
    if not per_text:
        names = sorted({m['method'] for t in diag.get('texts', []) for m in t['diagnostics']})
        sys.exit(f"anchor_budget: method '{method}' is not in the diagnostics (they have: {', '.join(names)})")
    return [sum(col) / len(col) for col in zip(*per_text)]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('diag')
    ap.add_argument('--with', dest='with_m', required=True)
    ap.add_argument('--without', required=True)
    ap.add_argument('--ratio', type=float, required=True)
    ap.add_argument('--floor', type=float, default=0.0)
    a = ap.parse_args()
    if not (0 < a.ratio <= 1) or not (0 <= a.floor <= 1):
        sys.exit('anchor_budget: --ratio must be in (0, 1] and --floor in [0, 1]')
    try:
        diag = json.load(open(a.diag))
    except (OSError, ValueError) as e:
        sys.exit(f'anchor_budget: {a.diag}: {e}')
    w, wo = layer_errors(diag, a.with_m), layer_errors(diag, a.without)
    if len(w) != len(wo) or not w:
        sys.exit(f'anchor_budget: {a.diag}: the two methods have {len(w)} and {len(wo)} layers')
    n = len(w)
    benefit = [max(0.0, x - y) for x, y in zip(wo, w)]
    total = a.ratio * n
    spare = total - a.floor * a.ratio * n
    s = sum(benefit)
    if s <= 0:
        ratios = [a.ratio] * n  # no layer measured a benefit: keep the uniform budget
    else:
        ratios = [a.floor * a.ratio + spare * b / s for b in benefit]
    # a layer cannot keep more than all of its tokens: clip and hand the excess to the others by benefit
    for _ in range(n):
        over = sum(max(0.0, r - 1.0) for r in ratios)
        if over <= 1e-12:
            break
        free = [i for i, r in enumerate(ratios) if r < 1.0]
        bs = sum(benefit[i] for i in free)
        ratios = [min(r, 1.0) for r in ratios]
        for i in free:  # by benefit, or evenly when none of them measured one
            ratios[i] += over * (benefit[i] / bs if bs > 0 else 1.0 / len(free))
    for l in range(n):
        print(f'layer {l}: error without anchors {wo[l]:.5f}, with {w[l]:.5f}, benefit {benefit[l]:.5f} '
              f'-> ratio {ratios[l]:.5f}', file=sys.stderr)
    print('lratio=' + '/'.join(f'{r:.5g}' for r in ratios))


if __name__ == '__main__':
    main()
