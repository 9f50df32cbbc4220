#!/usr/bin/env python3
"""Per-layer, per-tensor (K / V) widths from measured benefit at a stated total (the lkbits= / lvbits= options).

The anchor budget's method (scripts/anchor_budget.py) applied to bits. Two steps, both on *calibration* text
(never on an evaluation text):

  1. scripts/bit_budget.py probes --method M --layers L --base B --widths W1[,W2...]
     prints the methods to evaluate, as a list for `--set 'eval.methods=[...]'`: M with every layer's keys and values
     at width B (the base), and for each layer l, tensor t (K or V) and width W the base with only (l, t) at W.
  2. antkv-eval run ... --set 'eval.texts=[<held-out calibration text>]' --set 'eval.methods=<that list>'
     (e.g. a slice of books-calib.txt past the calibration tokens; see recipes/options-results.md), then
     scripts/bit_budget.py allocate RESULTS.json --method M [--base B] [--widths W,...] [--max-eff-cb 1.3 | --bits AVG]
     reads each probe's benefit b(l, t, W) = ln PPL(base) - ln PPL(probe) (mean over the file's texts; the base
     width's benefit is 0, a narrower width's is usually negative) and spends the budget greedily: every (l, t)
     starts at the narrowest width it was measured at, and the step (to a wider measured width, along the upper
     convex hull of its (width, benefit) points) with the largest benefit per bit that still fits is taken until
     none fits (--widths: only those widths and the base, e.g. `--widths 2` for upgrades without narrower
     tensors to pay for them). Benefits are taken as additive over (l, t). The budget is the mean width over layers and K / V
     (`--bits`), or by default the largest mean width whose effective bits without codebooks stay <= --max-eff-cb
     (1.3): the base probe's eff-cb minus its nominal bits (the gain norms, anchors) is the overhead added to
     the mean width. Prints `lkbits=.../lvbits=...` on stdout (and the table of benefits and choices on stderr).

Widths are the named ones of docs/METHODS.md (4, 2, 1.5, 1.25, 1, 0.75, 0.5, 0.375, 0.25); every distinct (key,
value) width pair of a layer needs its own codebook file, which `antkv-eval run` trains. M must not name bits,
kbits, vbits, lkbits or lvbits. Errors are one line and exit non-zero. Python standard library only."""
import argparse
import json
import math
import sys

WIDTHS = (4.0, 2.0, 1.5, 1.25, 1.0, 0.75, 0.5, 0.375, 0.25)


def fail(msg):
    sys.exit(f'bit_budget: {msg}')


def width(text, what):
    try:
        w = float(text)
    except ValueError:
        fail(f'{what}: "{text}" is not a width')
    if w not in WIDTHS:
        fail(f'{what}: {text} is not a named width ({", ".join(f"{x:g}" for x in WIDTHS)})')
    return w


def check_method(m):
    if ':' not in m:
        fail(f'--method "{m}" needs a kind and options (e.g. vq:gain=kv,rotate=pca)')
    for opt in m.split(':', 1)[1].split(','):
        if opt.split('=')[0] in ('bits', 'kbits', 'vbits', 'lkbits', 'lvbits'):
            fail(f'--method "{m}" must not name {opt.split("=")[0]} (the widths are what bit_budget sets)')


def layered(m, kw, vw):
    f = lambda ws: '/'.join(f'{w:g}' for w in ws)
    return f'{m},lkbits={f(kw)},lvbits={f(vw)}'


def probe_methods(m, layers, base, widths):
    out = [layered(m, [base] * layers, [base] * layers)]
    for l in range(layers):
        for t in (0, 1):
            for w in widths:
                ws = [[base] * layers, [base] * layers]
                ws[t][l] = w
                out.append(layered(m, *ws))
    return out


def parse_layered(m, name):
    """(keys, values) width lists of a probe `name` of method m, or None when it is not one."""
    prefix = m + ',lkbits='
    if not name.startswith(prefix):
        return None
    rest = name[len(prefix):]
    if ',lvbits=' not in rest:
        return None
    k, v = rest.split(',lvbits=', 1)
    try:
        kw, vw = [float(x) for x in k.split('/')], [float(x) for x in v.split('/')]
    except ValueError:
        return None
    return (kw, vw) if len(kw) == len(vw) else None


def read_benefits(path, m, base_width=None):
    """{(layer, tensor): {width: benefit}}, the base width, the layer count and the base's eff-cb - nominal."""
    try:
        rows = json.load(open(path))['results']
    except (OSError, ValueError, KeyError, TypeError) as e:
        fail(f'{path}: not an antkv-eval results file ({e})')
    probes = {}
    for r in rows:
        try:
            p = parse_layered(m, r['method'])
            if p is None:
                continue
            ppl = float(r['ppl'])
        except (KeyError, TypeError, ValueError) as e:
            fail(f'{path}: a result row lacks a field ({e})')
        if not (ppl > 0 and math.isfinite(ppl)):
            fail(f'{path}: {r["method"]} on {r.get("text")} has perplexity {ppl}')
        probes.setdefault((tuple(p[0]), tuple(p[1])), {})[r.get('text')] = (ppl, r)
    bases = [k for k in probes if len(set(k[0] + k[1])) == 1 and base_width in (None, k[0][0])]
    if len(bases) != 1:
        fail(f'{path}: {len(bases)} base probes of "{m}" (every layer at one width{"" if base_width is None else f" {base_width:g}"}) '
             f'where one is needed; run the list of `bit_budget.py probes` (--base picks one of several)')
    base = bases[0]
    L, bw = len(base[0]), base[0][0]
    base_ppl = probes[base]
    texts = sorted(base_ppl)
    row = base_ppl[texts[0]][1]
    overhead = float(row.get('effective_bits_without_codebooks', 0)) - float(row.get('nominal_bits', 0))
    table = {(l, t): {bw: 0.0} for l in range(L) for t in (0, 1)}
    for (kw, vw), by_text in probes.items():
        if len(kw) != L:
            fail(f'{path}: probes of "{m}" list {len(kw)} and {L} layers')
        diff = [(l, 0, kw[l]) for l in range(L) if kw[l] != bw] + [(l, 1, vw[l]) for l in range(L) if vw[l] != bw]
        if len(diff) != 1:
            continue  # the base, or an allocation evaluated in the same file
        if sorted(by_text) != texts:
            fail(f'{path}: probe {layered(m, kw, vw)} is on texts {sorted(by_text)}, the base on {texts}')
        l, t, w = diff[0]
        table[(l, t)][w] = sum(math.log(base_ppl[x][0]) - math.log(by_text[x][0]) for x in texts) / len(texts)
    if all(len(v) == 1 for v in table.values()):
        fail(f'{path}: no single-tensor probes of "{m}" besides the base; run the list of `bit_budget.py probes`')
    return table, bw, L, overhead


def allocate(table, L, budget):
    """Greedy: every (l, t) from its narrowest measured width; the best benefit per bit step that fits, until none.
    The cost of a width w at (l, t) is w / (2 L) of the mean width. Returns {(l, t): width}."""
    choice = {k: min(v) for k, v in table.items()}
    spent = sum(choice.values()) / (2 * L)
    if spent > budget + 1e-9:
        fail(f'the narrowest measured widths already average {spent:.4f} bits, over the budget {budget:.4f}')
    while True:
        best = None
        for k, ws in table.items():
            cw = choice[k]
            for w, b in ws.items():
                if w <= cw or spent + (w - cw) / (2 * L) > budget + 1e-9:
                    continue
                gain = b - ws[cw]
                rate = gain / (w - cw)
                # the steepest step of this item (the convex hull's next point); ties to the narrower width
                if gain > 0 and (best is None or rate > best[0] + 1e-12):
                    best = (rate, k, w)
        if best is None:
            return choice
        _, k, w = best
        spent += (w - choice[k]) / (2 * L)
        choice[k] = w


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest='cmd', required=True)
    p = sub.add_parser('probes', help='print the probe methods (a list for eval.methods)')
    p.add_argument('--method', required=True)
    p.add_argument('--layers', type=int, required=True)
    p.add_argument('--base', required=True)
    p.add_argument('--widths', required=True, help='comma-separated widths each (layer, tensor) is probed at')
    a_ = sub.add_parser('allocate', help='spend a budget greedily from measured probes')
    a_.add_argument('results')
    a_.add_argument('--method', required=True)
    a_.add_argument('--base', help="the base probes' width, where the file holds probes around several")
    a_.add_argument('--widths', help='comma-separated: only these measured widths (and the base) may be chosen')
    g = a_.add_mutually_exclusive_group()
    g.add_argument('--bits', type=float, help='mean width over layers and K / V')
    g.add_argument('--max-eff-cb', type=float, default=1.3, help='effective bits without codebooks (default 1.3)')
    a = ap.parse_args()
    check_method(a.method)
    if a.cmd == 'probes':
        if a.layers < 1:
            fail('--layers must be >= 1')
        base = width(a.base, '--base')
        ws = [width(x, '--widths') for x in a.widths.split(',')]
        if base in ws:
            fail(f'--widths lists the base width {a.base}')
        print(json.dumps(probe_methods(a.method, a.layers, base, ws)))
        return
    table, bw, L, overhead = read_benefits(a.results, a.method, None if a.base is None else width(a.base, '--base'))
    if a.widths is not None:
        keep = {width(x, '--widths') for x in a.widths.split(',')} | {bw}
        table = {k: {w: b for w, b in ws.items() if w in keep} for k, ws in table.items()}
    budget = a.bits if a.bits is not None else a.max_eff_cb - overhead
    if not (budget > 0 and math.isfinite(budget)):
        fail(f'the budget must be a positive mean width, got {budget}')
    choice = allocate(table, L, budget)
    mean = sum(choice.values()) / (2 * L)
    for l in range(L):
        for t, name in ((0, 'K'), (1, 'V')):
            ms = ', '.join(f'{w:g}: {b:+.4f}' for w, b in sorted(table[(l, t)].items()))
            print(f'layer {l} {name}: benefit (ln PPL drop) {ms} -> {choice[(l, t)]:g}', file=sys.stderr)
    pred = sum(table[k][w] for k, w in choice.items())
    print(f'mean width {mean:.4f} (budget {budget:.4f}), eff-cb {mean + overhead:.4f}, '
          f'predicted ln PPL drop vs the base {pred:+.4f}', file=sys.stderr)
    f = lambda t: '/'.join(f'{choice[(l, t)]:g}' for l in range(L))
    print(f'lkbits={f(0)},lvbits={f(1)}')


if __name__ == '__main__':
    main()
