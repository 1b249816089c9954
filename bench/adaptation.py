"""Adaptation without labels, measured on site sample A (never on half B): AdaBN and EM prior correction.

For each seed, trains `--recipe pneumoniamnist` from scratch at 28 px (unless its run folder exists), then evaluates it
on validation and on `pneumoniamnist_site_A` plainly, with AdaBN on the evaluated images, with prior correction, and
with both, and prints a Markdown table (mean +- std over seeds) of ACC, AUC, recall and specificity at threshold 0.5
and at the threshold chosen on validation for recall >= 0.95. Half B is never read.

    python bench/adaptation.py --runs /tmp/adapt --seeds 1 2 3        # ~3 min of training per seed here, then ~2 min
"""
import argparse, json, os, subprocess, sys, time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = (REPO/'..'/'shared'/'data').resolve()
sys.path.insert(0, str(REPO))

VARIANTS = {'plain': {}, 'AdaBN': dict(adabn='same'), 'prior': dict(prior_correction=True),
            'AdaBN + prior': dict(adabn='same', prior_correction=True)}
KEYS = [('accuracy', 'ACC'), ('roc_auc', 'AUC'), ('recall', 'recall'), ('specificity', 'spec')]


def train_run(path:Path, seed:int):
    "Train `--recipe pneumoniamnist` with `seed` into `path` with the real CLI, unless it is there already."
    if (path/'model.safetensors').is_file(): return 0.
    t0 = time.perf_counter()
    subprocess.run([sys.executable, '-m', 'xray_fastai.cli', 'train', '--recipe', 'pneumoniamnist', '--seed', str(seed),
                    '--out', str(path)], check=True, cwd=REPO, env={**os.environ, 'XRAY_FASTAI_DATA': str(DATA)})
    return time.perf_counter() - t0


def measure(run:Path) -> dict:
    "Every variant's `evaluate` result on validation and on site A."
    from xray_fastai.evaluate import evaluate
    res = {}
    for name, kw in VARIANTS.items():
        res[('valid', name)] = evaluate(run, split='valid', data_dir=DATA, **kw)
        res[('site A', name)] = evaluate(run, source=DATA/'pneumoniamnist_site_A', split='test', **kw)
    return res


def fmt(vals): return f"{np.mean(vals):.4f} ± {np.std(vals):.4f}" if len(vals) > 1 else f"{vals[0]:.4f}"


def table(all_res:list, at:str) -> str:
    head = '| split | variant | ' + ' | '.join(h for _, h in KEYS) + ' |'
    rows = [head, '| --- | --- |' + ' ---: |' * len(KEYS)]
    for split in ('valid', 'site A'):
        for name in VARIANTS:
            ms = [r[(split, name)][at] for r in all_res]
            rows.append(f"| {split} | {name} | " + ' | '.join(fmt([m[k] for m in ms]) for k, _ in KEYS) + ' |')
    return '\n'.join(rows)


def adapted_threshold(all_res:list) -> str:
    "Site A with AdaBN at the threshold chosen (recall >= 0.95) on validation with AdaBN on itself: a row of mean +- std."
    import pandas as pd
    from xray_fastai.evaluate import threshold_for_recall, binary_metrics
    ms = []
    for r in all_res:
        v = pd.read_csv(Path(r[('valid', 'AdaBN')]['folder'])/'preds.csv')
        a = pd.read_csv(Path(r[('site A', 'AdaBN')]['folder'])/'preds.csv')
        ms.append(binary_metrics(a.prob, a.target, threshold_for_recall(v.prob, v.target, r[('valid', 'AdaBN')]['target_recall'])))
    return '| site A | AdaBN, threshold from AdaBN on validation | ' + ' | '.join(fmt([m[k] for m in ms]) for k, _ in KEYS) + ' |'


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--runs', type=Path, default=Path('/tmp/xray-adaptation'), help="folder for the seeds' run folders")
    ap.add_argument('--seeds', type=int, nargs='+', default=[1, 2, 3])
    ap.add_argument('--json', type=Path, help="also write every result here")
    a = ap.parse_args()
    all_res, times, priors = [], [], []
    for s in a.seeds:
        run = a.runs/f"seed-{s}"
        times.append(train_run(run, s))
        r = measure(run)
        all_res.append(r)
        priors.append({split: r[(split, 'prior')]['prior_correction']['estimated_prior']['PNEUMONIA'] for split in ('valid', 'site A')}
                      | {f"{split} AdaBN": r[(split, 'AdaBN + prior')]['prior_correction']['estimated_prior']['PNEUMONIA'] for split in ('valid', 'site A')})
    print(f"# Adaptation without labels: `--recipe pneumoniamnist`, seeds {a.seeds}\n")
    print("## At threshold 0.5\n"); print(table(all_res, 'default'))
    print("\n## At the threshold chosen on validation (recall >= 0.95 there)\n"); print(table(all_res, 'chosen'))
    print("\nThe threshold chosen instead on validation adapted to itself (AdaBN on the validation images):\n")
    print(table(all_res, 'chosen').splitlines()[0] + '\n' + table(all_res, 'chosen').splitlines()[1]); print(adapted_threshold(all_res))
    print("\n## EM estimate of the PNEUMONIA prior (true: valid 389/524 = 0.742, site A 195/312 = 0.625; training 0.742)\n")
    print('| seed | ' + ' | '.join(priors[0]) + ' |'); print('| --- |' + ' ---: |' * len(priors[0]))
    for s, p in zip(a.seeds, priors): print(f"| {s} | " + ' | '.join(f"{v:.3f}" for v in p.values()) + ' |')
    print(f"\ntraining seconds per seed (0: run folder reused): {[round(t) for t in times]}")
    if a.json:
        a.json.write_text(json.dumps([{f"{k[0]}/{k[1]}": {x: v[x] for x in ('default', 'chosen', 'valid', 'adabn', 'prior_correction') if x in v}
                                       for k, v in r.items()} for r in all_res], indent=1, default=str))


if __name__ == '__main__': main()
