"""Test-split accuracy of a training recipe, over several seeds: train, evaluate once on the test split, report mean ± std.

    python bench/accuracy.py                                   # recipe pneumoniamnist, seeds 0 1 2, + their ensemble
    python bench/accuracy.py --seeds 0 --epochs 1 --no-record  # smoke run

Every choice in a recipe is made on the validation split (bench/ACCURACY.md); this script is the one place that looks
at the test split. It trains from scratch (the recipe's pretrained=False) on the project's copy of PneumoniaMNIST in
../shared/data, evaluates each run at threshold 0.5 and at the validation-chosen threshold, and appends the table to
bench/ACCURACY.md unless given --no-record."""
from __future__ import annotations
import argparse, datetime, os, statistics, sys, warnings
from pathlib import Path

warnings.filterwarnings('ignore', category=FutureWarning)
REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent/'shared'/'data'
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO/'bench'))
from throughput import machine


def _row(name, wall, m):
    v, d, ch = m['valid'], m['default'], m['chosen']
    return (f"| {name} | {wall:.0f} s | {v['accuracy']:.4f} | {v['roc_auc']:.4f} | {d['accuracy']:.4f} | {d['roc_auc']:.4f} "
            f"| {d['precision']:.4f} | {d['recall']:.4f} | {d['f1']:.4f} | {ch['threshold']:.3g}: {ch['accuracy']:.4f} |")


def _machine() -> str:
    m = machine()
    return f"{m['cores']} cores ({m['cpu']}){', ' + m['gpu'] if m['gpu'] else ''}, torch {m['torch']}, fastai {m['fastai']}"


def _mean_std(xs): return f"{statistics.mean(xs):.4f} ± {statistics.stdev(xs) if len(xs) > 1 else 0:.4f}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--recipe', default='pneumoniamnist')
    p.add_argument('--source', default=str(DATA/'pneumoniamnist.npz'))
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    p.add_argument('--epochs', type=int, default=None, help="override the recipe's epochs (smoke runs)")
    p.add_argument('--tta', action='store_true', help="evaluate with test-time augmentation")
    p.add_argument('--no-ensemble', action='store_true', help="skip the ensemble of the seeds' runs")
    p.add_argument('--runs', default=None, help="folder for the runs (default: a new bench/runs/accuracy-<time>)")
    p.add_argument('--out', default=str(REPO/'bench'/'ACCURACY.md')); p.add_argument('--no-record', action='store_true')
    a = p.parse_args(argv)
    from xray_fastai.learner import train
    from xray_fastai.config import RECIPES
    from xray_fastai.evaluate import evaluate, ensemble
    from xray_fastai.core import load_json
    started, load_start = datetime.datetime.now(), os.getloadavg()
    runs = Path(a.runs or REPO/'bench'/'runs'/f"accuracy-{started:%Y%m%d-%H%M%S}")
    over = dict(source=a.source, verify=False)  # the shared copy's MD5 is not the official one (see its README)
    if a.epochs: over['epochs'] = a.epochs
    rows, test, walls, done = [], [], [], []
    for seed in a.seeds:
        run = runs/f"{a.recipe}-seed{seed}"
        if not (run/'model.safetensors').is_file(): train(out=run, recipe=a.recipe, seed=seed, **over)
        m, wall = evaluate(run, tta=a.tta), load_json(run/'metrics.json')['wall_seconds']
        rows.append(_row(f"seed {seed}", wall, m)); test.append(m['default']); walls.append(wall); done.append(run)
        print(rows[-1], flush=True)
    summary = (f"| **mean ± std ({len(test)} seeds)** | {statistics.mean(walls):.0f} s | | | "
               f"**{_mean_std([t['accuracy'] for t in test])}** | **{_mean_std([t['roc_auc'] for t in test])}** | "
               f"{_mean_std([t['precision'] for t in test])} | {_mean_std([t['recall'] for t in test])} | "
               f"{_mean_std([t['f1'] for t in test])} | |")
    rows.append(summary)
    if len(done) > 1 and not a.no_ensemble:
        rows.append(_row(f"ensemble of the {len(done)} runs", sum(walls), ensemble(done, runs/'ensemble', tta=a.tta)))
    settings = {**RECIPES[a.recipe], **{k: v for k, v in over.items() if k == 'epochs'}}
    cmd = 'python bench/accuracy.py' + ''.join(f' {o}' for o in (argv if argv is not None else sys.argv[1:]))
    table = '\n'.join([
        f"\n## {started:%Y-%m-%d %H:%M} — recipe `{a.recipe}` on the test split{' with TTA' if a.tta else ''}\n",
        f"Command: `{cmd}` (the runs: `{runs.relative_to(REPO) if runs.is_relative_to(REPO) else runs}`). "
        f"Settings: `{settings}`.",
        f"Machine: {_machine()}; load average {load_start[0]:.2f} at start, {os.getloadavg()[0]:.2f} at the end.\n",
        "| run | training wall time | val acc | val AUC | **test acc** | **test AUC** | test precision | test recall "
        "| test F1 | test acc at the val-chosen threshold (recall ≥ 0.95 on val) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |", *rows])
    print(table)
    if not a.no_record:
        with open(a.out, 'a') as f: f.write(table + '\n')


if __name__ == '__main__': main()
