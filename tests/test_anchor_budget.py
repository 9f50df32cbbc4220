#!/usr/bin/env python3
"""scripts/anchor_budget.py on small diagnostics files: the budget keeps the total, follows the measured benefit,
clips at 1 and hands the excess on, and a missing method is a clear error. Python standard library only."""
import json
import os
import subprocess
import sys
import tempfile

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'scripts', 'anchor_budget.py')


def diag(errors_with, errors_without, texts=1):
    def method(name, errs):
        return {'method': name, 'layers': [{'layer': l, 'output_error': e} for l, e in enumerate(errs)]}
    t = {'diagnostics': [method('antkv', errors_with), method('antkv:anchors=off', errors_without)]}
    return {'tool': 'antkv-eval diagnose', 'texts': [t] * texts}


def budget(d, ratio, *extra):
    with tempfile.NamedTemporaryFile('w', suffix='.json', delete=False) as f:
        json.dump(d, f)
    try:
        p = subprocess.run([sys.executable, SCRIPT, f.name, '--with', 'antkv', '--without', 'antkv:anchors=off',
                            '--ratio', str(ratio), *extra], capture_output=True, text=True)
    finally:
        os.unlink(f.name)
    return p


def ratios(p):
    assert p.returncode == 0, p.stderr
    line = p.stdout.strip()
    assert line.startswith('lratio='), line
    return [float(x) for x in line[len('lratio='):].split('/')]


def close(a, b, tol=1e-4):
    return abs(a - b) <= tol * max(1.0, abs(b))


def main():
    # benefits 0.1, 0, 0.2: the total 3 x 0.01 shared 1 : 0 : 2
    r = ratios(budget(diag([0.1, 0.2, 0.3], [0.2, 0.2, 0.5]), 0.01))
    assert len(r) == 3 and close(sum(r), 0.03) and close(r[0], 0.01) and r[1] == 0 and close(r[2], 0.02), r
    # a layer where anchors made it worse gets nothing (benefit clipped at 0); two texts are averaged
    r = ratios(budget(diag([0.1, 0.3], [0.2, 0.2], texts=2), 0.05))
    assert close(r[0], 0.1) and r[1] == 0, r
    # no benefit anywhere: the uniform budget
    r = ratios(budget(diag([0.2, 0.2], [0.2, 0.1]), 0.02))
    assert r == [0.02, 0.02], r
    # one layer would need more than all of its tokens: clipped at 1, the excess to the others by benefit
    r = ratios(budget(diag([0.0, 0.9, 0.95], [1.0, 1.0, 1.0]), 0.5))
    # (benefits 1, 0.1, 0.05: 1.5 x [1, 0.1, 0.05] / 1.15 = [1.304, 0.130, 0.065]; the 0.304 over 1 goes 2 : 1)
    assert close(r[0], 1.0) and close(r[1], 1 / 3) and close(r[2], 1 / 6) and close(sum(r), 1.5), r
    # the floor keeps a share in every layer
    r = ratios(budget(diag([0.1, 0.2], [0.2, 0.2]), 0.01, '--floor', '0.5'))
    assert close(r[1], 0.005) and close(sum(r), 0.02), r
    # a method that is not in the file: an error naming it and the methods there
    p = subprocess.run([sys.executable, SCRIPT, os.devnull, '--with', 'x', '--without', 'y', '--ratio', '0.01'],
                       capture_output=True, text=True)
    assert p.returncode != 0 and os.devnull in p.stderr, p.stderr
    with tempfile.NamedTemporaryFile('w', suffix='.json', delete=False) as f:
        json.dump(diag([0.1], [0.2]), f)
    p = subprocess.run([sys.executable, SCRIPT, f.name, '--with', 'nope', '--without', 'antkv', '--ratio', '0.01'],
                       capture_output=True, text=True)
    os.unlink(f.name)
    assert p.returncode != 0 and "'nope'" in p.stderr and 'antkv:anchors=off' in p.stderr, p.stderr
    # a bad ratio
    p = budget(diag([0.1], [0.2]), 1.5)
    assert p.returncode != 0 and '--ratio' in p.stderr, p.stderr
    print('anchor_budget: all checks passed')


if __name__ == '__main__':
    main()
