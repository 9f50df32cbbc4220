#!/usr/bin/env python3
"""scripts/bit_budget.py on hand-made results files: the probe list, the greedy allocation (largest benefit per bit
first, the budget respected, the eff-cb default, narrower widths funding wider ones) and one-line errors.
Python standard library only."""
import json
import math
import os
import subprocess
import sys
import tempfile

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'scripts', 'bit_budget.py')
M = 'vq:gain=kv,rotate=pca,norm=fp8'


def run(*args):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True)


def name(kw, vw):
    return f"{M},lkbits={'/'.join(f'{w:g}' for w in kw)},lvbits={'/'.join(f'{w:g}' for w in vw)}"


def results(layers, base, benefits, base_ppl=100.0, texts=('a.txt', 'b.txt'), overhead=0.0625, extra=()):
    """A results file: the base at base_ppl and, for each ((l, t, w), b), the probe at base_ppl * exp(-b)."""
    rows = []

    def add(kw, vw, ppl):
        for t in texts:
            rows.append({'method': name(kw, vw), 'text': t, 'ppl': ppl, 'nominal_bits': base,
                         'effective_bits_without_codebooks': base + overhead})
    add([base] * layers, [base] * layers, base_ppl)
    for (l, t, w), b in benefits.items():
        ws = [[base] * layers, [base] * layers]
        ws[t][l] = w
        add(ws[0], ws[1], base_ppl * math.exp(-b))
    rows.extend(extra)
    return {'results': rows}


def allocate(d, *extra):
    with tempfile.NamedTemporaryFile('w', suffix='.json', delete=False) as f:
        json.dump(d, f)
    try:
        return run('allocate', f.name, '--method', M, *extra)
    finally:
        os.unlink(f.name)


def widths(p):
    assert p.returncode == 0, p.stderr
    line = p.stdout.strip()
    assert line.startswith('lkbits=') and ',lvbits=' in line, line
    k, v = line[len('lkbits='):].split(',lvbits=')
    return [float(x) for x in k.split('/')], [float(x) for x in v.split('/')]


def main():
    # probes: the base and one (layer, tensor, width) changed at a time, 1 + 2 x 3 x 2 methods
    p = run('probes', '--method', M, '--layers', '3', '--base', '1', '--widths', '2,0.5')
    assert p.returncode == 0, p.stderr
    ms = json.loads(p.stdout)
    assert len(ms) == 13 and ms[0] == name([1, 1, 1], [1, 1, 1]) and name([1, 1, 1], [1, 2, 1]) in ms, ms
    assert name([0.5, 1, 1], [1, 1, 1]) in ms and len(set(ms)) == 13, ms

    # 3 layers, 1 -> 2 bits; each upgrade costs 1 / 6 of the mean width. Budget 1 + 2/6: the two largest benefits
    # (layer 2 V 0.30, layer 0 K 0.20), not layer 1 V (0.10) nor the others
    b = {(0, 0, 2.0): 0.20, (0, 1, 2.0): 0.05, (1, 0, 2.0): 0.01, (1, 1, 2.0): 0.10, (2, 0, 2.0): 0.02,
         (2, 1, 2.0): 0.30}
    k, v = widths(allocate(results(3, 1.0, b), '--bits', str(1 + 2 / 6)))
    assert k == [2, 1, 1] and v == [1, 1, 2], (k, v)
    # just under 2 upgrades: only one fits; the budget is never exceeded
    k, v = widths(allocate(results(3, 1.0, b), '--bits', str(1 + 2 / 6 - 0.01)))
    assert k == [1, 1, 1] and v == [1, 1, 2], (k, v)
    # the default budget: eff-cb <= 1.3 with an overhead of 1/16 -> mean width <= 1.2375 -> one upgrade (1.1667)
    k, v = widths(allocate(results(3, 1.0, b)))
    assert sum(k) + sum(v) == 7, (k, v)
    # with --max-eff-cb 1.4: two upgrades (1.3333 + 0.0625 <= 1.4)
    k, v = widths(allocate(results(3, 1.0, b), '--max-eff-cb', '1.4'))
    assert sum(k) + sum(v) == 8, (k, v)
    # a probe that made it worse is never bought, even with room to spare
    b2 = {(0, 0, 2.0): -0.1, (0, 1, 2.0): 0.2}
    k, v = widths(allocate(results(1, 1.0, b2), '--bits', '2'))
    assert k == [1] and v == [2], (k, v)

    # equal total bits with narrower widths: base 0.5, probes at 0.375 and 0.75 in 2 layers, budget 0.5. Layer 0
    # loses little at 0.375 (-0.01, -0.02), layer 1 much (-0.3); layer 1 V gains 0.2 at 0.75. Every (l, t) starts at
    # 0.375; the steepest steps are layer 1's back to 0.5 (0.3 / 0.125 each), then layer 1 V to 0.75 (0.2 / 0.25),
    # paid for by layer 0 staying at 0.375: mean (0.375 + 0.5 + 0.375 + 0.75) / 4 = 0.5
    b3 = {(0, 0, 0.375): -0.01, (0, 1, 0.375): -0.02, (1, 0, 0.375): -0.3, (1, 1, 0.375): -0.3,
          (0, 0, 0.75): 0.01, (0, 1, 0.75): 0.01, (1, 0, 0.75): 0.01, (1, 1, 0.75): 0.2}
    k, v = widths(allocate(results(2, 0.5, b3), '--bits', '0.5'))
    assert k == [0.375, 0.5] and v == [0.375, 0.75], (k, v)

    # --widths: only upgrades (no 0.375 allowed) at mean 0.5 -> everything stays at the base 0.5
    k, v = widths(allocate(results(2, 0.5, b3), '--bits', '0.5', '--widths', '0.75'))
    assert k == [0.5, 0.5] and v == [0.5, 0.5], (k, v)

    # an allocation evaluated in the same file (more than one tensor off the base) is ignored, not a probe
    extra = [{'method': name([2, 1, 1], [1, 1, 2]), 'text': t, 'ppl': 1.0, 'nominal_bits': 1.333,
              'effective_bits_without_codebooks': 1.4} for t in ('a.txt', 'b.txt')]
    k, v = widths(allocate(results(3, 1.0, b, extra=extra), '--bits', str(1 + 2 / 6)))
    assert k == [2, 1, 1] and v == [1, 1, 2], (k, v)

    # probes around two bases in one file: --base picks one; without it, an error
    two = results(3, 1.0, b)
    two['results'] += results(3, 0.5, b3)['results']  # layer 2 has no probes: it keeps the base width
    k, v = widths(allocate(two, '--base', '1', '--bits', str(1 + 2 / 6)))
    assert k == [2, 1, 1] and v == [1, 1, 2], (k, v)
    k, v = widths(allocate(two, '--base', '0.5', '--bits', '0.5'))
    assert k == [0.375, 0.5, 0.5] and v == [0.375, 0.75, 0.5], (k, v)

    # errors: one line, non-zero exit
    def bad(p, *words):
        assert p.returncode != 0 and p.stderr.count('\n') == 1, p.stderr
        for w in words:
            assert w in p.stderr, (w, p.stderr)
    bad(allocate({'results': []}), 'base probes')
    bad(allocate(two), '2 base probes')
    bad(allocate(results(2, 1.0, {})), 'no single-tensor probes')
    bad(allocate(results(2, 1.0, {(0, 0, 2.0): 0.1}), '--bits', '0.4'), 'over the budget')
    bad(run('allocate', os.devnull, '--method', M), os.devnull)
    bad(run('probes', '--method', M + ',bits=1', '--layers', '2', '--base', '1', '--widths', '2'), 'bits')
    bad(run('probes', '--method', M, '--layers', '2', '--base', '3', '--widths', '2'), 'named width')
    nan = results(1, 1.0, {(0, 0, 2.0): 0.1})
    nan['results'][0]['ppl'] = float('nan')
    bad(allocate(nan), 'perplexity nan')
    print('bit_budget: all checks passed')


if __name__ == '__main__':
    main()
