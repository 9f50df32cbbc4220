#!/usr/bin/env python3
"""Ratios of dPPL against CQ-style vq of the same key RoPE placement and width, from antkv-eval results.json files.

  scripts/ratio_table.py runs/x/results.json [more.json ...]

Each method's baseline is `vq` with the same bits (nominal, K and V averaged, per layer) and key_rope, listed in the
same file; methods without one print '-'. Python standard library only."""
import json
import re
import sys


def placement(m):
    return 'pre' if 'key_rope=pre' in m else 'post'


def main(paths):
    for p in paths:
        d = json.load(open(p))
        rows = d['results']
        texts = sorted({r['text'] for r in rows})
        print(f"{p}  ({rows[0]['protocol']}, seq_len {rows[0]['seq_len']}, windows {rows[0]['windows']})")
        base = {}
        for r in rows:
            m = r['method']
            if r['kind'] == 'vq' and re.fullmatch(r'vq(:(bits=[0-9.]+,?)?(key_rope=(pre|post))?)?', m):
                base[(r['text'], placement(m), round(r['nominal_bits'], 6))] = r['delta_ppl']
        hdr = f"{'method':58s} {'bits':>6s} {'eff':>6s} {'eff-cb':>6s}"
        for t in texts:
            n = t.split('/')[-1][:14]
            hdr += f" {n:>14s} {'dPPL':>8s} {'ratio':>6s}"
        print(hdr)
        for m in dict.fromkeys(r['method'] for r in rows):
            line = None
            for t in texts:
                r = next((x for x in rows if x['method'] == m and x['text'] == t), None)
                if r is None:
                    continue
                if line is None:
                    line = f"{m:58s} {r['nominal_bits']:6.3f} {r['effective_bits']:6.3f} {r['effective_bits_without_codebooks']:6.3f}"
                # the vq of the method's placement at its nominal width; for per-layer/uneven widths the 1-bit vq
                b = base.get((t, placement(m), round(r['nominal_bits'], 6)))
                if b is None and r['kind'] in ('vq', 'antkv', 'rsq'):
                    b = base.get((t, placement(m), 1.0)) if abs(r['nominal_bits'] - 1) < 0.35 else None
                ratio = f"{r['delta_ppl'] / b:6.2f}" if b and r['kind'] != 'fp16' else '     -'
                line += f" {r['ppl']:14.3f} {r['delta_ppl']:+8.3f} {ratio}"
            print(line)
        print()


if __name__ == '__main__':
    main(sys.argv[1:])
