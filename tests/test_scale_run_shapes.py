#!/usr/bin/env python3
"""scripts/scale_run.py takes its shapes from `antkv-eval shapes` (the one table, lib/model/model_shapes.cpp): for
every shape, `scale_run.py checkpoint --tiny` writes a config.json with that shape's architecture (2 layers) that
antkv-eval loads and runs; an unknown shape is a clear error. Python standard library only.

  test_scale_run_shapes.py BIN_DIR [SHARED_DIR]   (BIN_DIR holds antkv-eval; the shared models from
  $ANTKV_SHARED_DIR, else SHARED_DIR, else ../shared beside the checkout)"""
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, '..', 'scripts', 'scale_run.py')
SKIP = 4  # CTest SKIP_RETURN_CODE, as the Catch2 tests


def main():
    bin_dir = sys.argv[1]
    shared = os.environ.get('ANTKV_SHARED_DIR') or (sys.argv[2] if len(sys.argv) > 2 else
                                                    os.path.join(HERE, '..', '..', 'shared'))
    tokenizers = {'bytelevel': os.path.join(shared, 'models', 'antkv-ref-18m', 'tokenizer.json'),
                  'sentencepiece': os.path.join(shared, 'models', 'stories260K', 'tokenizer.json')}
    missing = [t for t in tokenizers.values() if not os.path.exists(t)]
    if missing or os.environ.get('ANTKV_NO_SHARED_DATA'):
        print('SKIPPED: shared tokenizers missing:', missing or 'ANTKV_NO_SHARED_DATA set')
        return SKIP
    eval_bin = os.path.join(bin_dir, 'antkv-eval')
    shapes = json.loads(subprocess.run([eval_bin, 'shapes', '--format', 'json'], check=True, capture_output=True,
                                       text=True).stdout)
    assert [s['name'] for s in shapes] == ['llama3-8b', 'llama2-7b', 'mistral-7b', 'qwen2-7b'], shapes
    with tempfile.TemporaryDirectory() as tmp:
        text = os.path.join(tmp, 'text.txt')
        with open(text, 'w') as f:
            f.write('Once upon a time there was a little dog who liked to run in the park. ' * 8)
        for s in shapes:
            out = os.path.join(tmp, s['name'])
            p = subprocess.run([sys.executable, SCRIPT, 'checkpoint', '--shape', s['name'], '--tiny', '--bin', bin_dir,
                                '--out', out, '--tokenizer-from', tokenizers[s['tokenizer_family']]],
                               capture_output=True, text=True)
            assert p.returncode == 0, (s['name'], p.stderr)
            with open(os.path.join(out, 'config.json')) as f:
                cfg = json.load(f)
            want = s['config']
            # --tiny changes the sizes (2 layers, head_dim 64, the tokenizer's vocabulary), nothing else
            for key in ('model_type', 'max_position_embeddings', 'rope_theta', 'rms_norm_eps', 'tie_word_embeddings',
                        'attention_bias', 'rope_scaling', 'sliding_window', 'use_sliding_window'):
                assert cfg.get(key) == want.get(key), (s['name'], key, cfg.get(key), want.get(key))
            assert cfg['num_hidden_layers'] == 2 and cfg['head_dim'] == 64, (s['name'], cfg)
            p = subprocess.run([eval_bin, 'ppl', '--model', out, '--text', text, '--seq-len', '32', '--max-windows',
                                '1', '--device', 'cpu', '--quiet'], capture_output=True, text=True)
            assert p.returncode == 0 and 'ppl ' in p.stdout, (s['name'], p.stdout, p.stderr)
            print(f"{s['name']}: tiny checkpoint written and evaluated: {p.stdout.strip()}")
        p = subprocess.run([sys.executable, SCRIPT, 'checkpoint', '--shape', 'llama-9b', '--bin', bin_dir, '--out',
                            os.path.join(tmp, 'x'), '--tokenizer-from', tokenizers['bytelevel']],
                           capture_output=True, text=True)
        assert p.returncode != 0 and "unknown shape 'llama-9b'" in p.stderr and 'qwen2-7b' in p.stderr, p.stderr
        assert not os.path.exists(os.path.join(tmp, 'x')), 'an unknown shape wrote output'
    print('scale_run shapes: OK')
    return 0


if __name__ == '__main__':
    sys.exit(main())
