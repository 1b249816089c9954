"""`tune` with and without pruning in one run, against the library's defaults, on PneumoniaMNIST 28 px from scratch.

    python bench/tune.py                                   # 20 trials x up to 5 epochs per arm; appends to bench/RESULTS.md
    python bench/tune.py --trials 6 --max-epochs 3 --train-images 1024   # a smaller version (label says so)

Three parts, in one process, one after the other on the same data: (a) 20 trials with pruning off, (b) the same sweep
(same sampler seed, so the same first suggestions) with the median pruner, (c) one run with the library's defaults
(resnet18 from scratch: lr 1e-2, bs 64, augmentation on, --max-epochs epochs). The objective is the best validation
loss of a run (the default monitor); validation accuracy of that epoch is reported too. Only the validation split is
used: the test split is not looked at. Wall times on a shared CPU are noisy: the ratio (b)/(a) is the figure to read."""
from __future__ import annotations
import argparse, datetime, os, shutil, sys, tempfile, time, warnings
from pathlib import Path

import numpy as np
warnings.filterwarnings('ignore')
REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent/'shared'/'data'
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO/'bench'))
from throughput import machine, append_results

SPACE = ['lr=loguniform:1e-4:1e-1', 'bs=choice:64,128,256', 'wd=loguniform:1e-4:1e-1', 'mixup=choice:0,0.2,0.4',
         'aug.max_rotate=uniform:0:15']


def _data(n_train:int|None, tmp:Path) -> Path:
    "PneumoniaMNIST 28 px; with `n_train`, its train split subsampled (stratified), validation and test kept whole."
    src = DATA/'pneumoniamnist.npz'
    if not n_train: return src
    d, rng = dict(np.load(src)), np.random.default_rng(0)
    y = d['train_labels'].reshape(-1)
    idx = np.sort(np.concatenate([rng.choice(np.flatnonzero(y == c), n_train // 2, replace=False) for c in (0, 1)]))
    d['train_images'], d['train_labels'] = d['train_images'][idx], d['train_labels'][idx]
    np.savez(tmp/'pneumoniamnist_sub.npz', **d)
    return tmp/'pneumoniamnist_sub.npz'


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--trials', type=int, default=20); p.add_argument('--max-epochs', type=int, default=5)
    p.add_argument('--train-images', type=int, default=None, help="subsample the train split (smaller version)")
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--out', default=str(REPO/'bench'/'RESULTS.md')); p.add_argument('--no-record', action='store_true')
    a = p.parse_args(argv)
    from xray_fastai.tune import tune
    from xray_fastai.learner import train
    from xray_fastai.core import load_json
    started, load_start = datetime.datetime.now(), os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix='xray-tune-bench-'))
    res = {}
    try:
        src = _data(a.train_images, tmp)
        fixed = dict(source=str(src), verify=False, arch='resnet18', pretrained=False, seed=0)
        space = SPACE + [f'epochs=int:1:{a.max_epochs}']
        for arm, pruner in (('no pruning', 'none'), ('median pruning', 'median')):
            t0 = time.perf_counter()
            r = tune(space, n_trials=a.trials, out=tmp/arm.replace(' ', '-'), study=arm.replace(' ', '-'),
                     pruner=pruner, sampler_seed=a.seed, **fixed)
            wall = time.perf_counter() - t0
            best = load_json(Path(r['best']['run'])/'metrics.json')
            epochs = sum(len(open(Path(f)/'history.csv').readlines()) - 1 for f in (tmp/arm.replace(' ', '-')).glob('trial-*'))
            res[arm] = dict(wall=wall, trials=r['trials'], best=r['best'], acc=best['best']['accuracy'], epochs=epochs)
            print(arm, res[arm], flush=True)
        t0 = time.perf_counter()
        run = train(out=tmp/'defaults', epochs=a.max_epochs, **fixed)
        m = load_json(run/'metrics.json')
        res['defaults'] = dict(wall=time.perf_counter() - t0, value=m['best']['valid_loss'], acc=m['best']['accuracy'])
    finally: shutil.rmtree(tmp, ignore_errors=True)
    load_end, mach = os.getloadavg(), machine()
    a0, b0, d0 = res['no pruning'], res['median pruning'], res['defaults']
    small = a.trials != 20 or a.max_epochs != 5 or a.train_images
    cmd = f"python bench/tune.py {' '.join(sys.argv[1:] if argv is None else argv)}".strip()
    row = lambda name, r: (f"| {name} | {r['wall']:.0f} s | {r['trials'].get('complete', 0)} / {r['trials'].get('pruned', 0)} | "
                           f"{r['epochs']} | {r['best']['value']:.4f} | {r['acc']:.4f} | trial {r['best']['number']}: "
                           + ', '.join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in r['best']['params'].items()) + " |")
    md = (f"\n## {started:%Y-%m-%d %H:%M} — tune: {a.trials} trials x up to {a.max_epochs} epochs, with and without pruning"
          + (" (SMALLER VERSION)" if small else '') + "\n\n"
          f"- command: `{cmd}`\n"
          f"- data: PneumoniaMNIST 28 px, {'train split subsampled to ' + str(a.train_images) + ' images' if a.train_images else 'all train images'}, "
          f"validation split whole; resnet18 from scratch; search space {' '.join('`' + s + '`' for s in space)}; objective best validation loss\n"
          f"- machine: {mach['cores']} cores, CPU `{mach['cpu']}`; GPU: {mach['gpu'] or '—'}; torch {mach['torch']} "
          f"({mach['torch_threads']} threads); load average at start {tuple(round(x, 2) for x in load_start)}, at end "
          f"{tuple(round(x, 2) for x in load_end)} (the CPU is shared with other processes: wall times are noisy)\n\n"
          "| arm | wall | complete / pruned | epochs trained | best valid_loss | its accuracy | best trial |\n"
          "| --- | ---: | ---: | ---: | ---: | ---: | --- |\n"
          + row('(a) no pruning', a0) + '\n' + row('(b) median pruning', b0) + '\n'
          + f"| (c) library defaults (lr 1e-2, bs 64, aug on, {a.max_epochs} epochs) | {d0['wall']:.0f} s | 1 run | {a.max_epochs} | "
            f"{d0['value']:.4f} | {d0['acc']:.4f} | - |\n\n"
          f"- wall-time ratio (b)/(a): **{b0['wall'] / a0['wall']:.2f}x** (epochs trained {b0['epochs']} vs {a0['epochs']})\n"
          f"- best validation loss: (a) {a0['best']['value']:.4f}, (b) {b0['best']['value']:.4f}, defaults {d0['value']:.4f}\n")
    print(md)
    if not a.no_record: append_results(a.out, md)


if __name__ == '__main__': main()
