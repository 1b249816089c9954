"""Recipes chosen on site sample A, then evaluated once on half B, beside stock fastai (bench/GENERALISATION.md).

    python bench/generalisation.py screen                      # candidates, 1 seed: validation + site A only
    python bench/generalisation.py final --candidate NAME      # the chosen one, 3 seeds, on half B + stock fastai on B
    python bench/generalisation.py screen --epochs 1 --only recipe --no-record   # smoke run

`screen` trains every candidate of CANDIDATES from scratch on PneumoniaMNIST (28 px, ../shared/data) while watching
site sample A (`train --site`), and reports validation and A metrics only: nothing looks at half B. `final` trains
the chosen candidate with seeds 0, 1, 2, and evaluates each run on half B once, at threshold 0.5 and at the
threshold chosen on A by the Youden rule (`evaluate --source B --threshold-on A --threshold-rule youden`); then
the ensemble of the three; then stock fastai (resnet34 from scratch, fastai's default augmentation, 5 epochs of
fit_one_cycle at lr 3e-3, last epoch, argmax) with the same seeds, on B, in the same run of this script. The final
trainings run --workers at a time (one thread each), so their wall times are longer than alone.
Each section is appended to bench/GENERALISATION.md (and its numbers to bench/generalisation-<mode>.json) unless
--no-record."""
from __future__ import annotations
import argparse, datetime, json, os, statistics, sys, time, warnings
from pathlib import Path

warnings.filterwarnings('ignore')
REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent/'shared'/'data'
NPZ, SITE_A, SITE_B = DATA/'pneumoniamnist.npz', DATA/'pneumoniamnist_site_A', DATA/'pneumoniamnist_site_B'
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO/'bench'))

BASE = dict(arch='resnet18', pretrained=False, epochs=10, bs=128, lr=1e-2)  # RECIPES['pneumoniamnist'] before this issue
STRONG_AUG = dict(max_rotate=15., max_zoom=1.25, max_lighting=0.4, max_warp=0.1)
CANDIDATES = {
    'recipe': BASE,
    'class-weights': {**BASE, 'class_weights': True},
    'flips': {**BASE, 'aug_kwargs': dict(do_flip=True)},
    'short-gentle': {**BASE, 'epochs': 5, 'lr': 3e-3, 'bs': 64},
    'strong-aug': {**BASE, 'aug_kwargs': STRONG_AUG},
    'class-weights-flips': {**BASE, 'class_weights': True, 'aug_kwargs': dict(do_flip=True)},
}
MONITOR = 'site_roc_auc_score'  # every run keeps the epoch with the best ROC AUC on site A
RULE = 'youden'  # the threshold rule on A (max balanced accuracy there)


def _f(v): return '-' if v is None else f"{v:.4f}"
def _ms(xs): return f"{statistics.mean(xs):.4f} ± {statistics.stdev(xs) if len(xs) > 1 else 0:.4f}"


def _train(run, kw, seed, epochs=None):
    from xray_fastai.learner import train
    from xray_fastai.core import load_json
    if not (run/'model.safetensors').is_file():
        train(out=run, source=str(NPZ), verify=False, seed=seed, site=str(SITE_A), monitor=MONITOR,
              **{**kw, **({'epochs': epochs} if epochs else {})})
    return load_json(run/'metrics.json')


def screen(a, runs):
    import pandas as pd
    from xray_fastai.evaluate import evaluate
    rows, res = [], {}
    for name in a.only or CANDIDATES:
        kw = CANDIDATES[name]
        run = runs/f"{name}-seed{a.seed}"
        m = _train(run, kw, a.seed, a.epochs)
        h = pd.read_csv(run/'history.csv')
        vb = h.iloc[int(h.valid_loss.idxmin())]  # the epoch validation would pick
        out = dict(settings=kw, wall=m['wall_seconds'], epochs=len(h), best_epoch=m['best_epoch'],
                   val_best=dict(epoch=int(vb.epoch), valid_loss=vb.valid_loss, accuracy=vb.accuracy, roc_auc=vb.roc_auc_score,
                                 site_roc_auc=vb.site_roc_auc_score, site_accuracy=vb.site_accuracy,
                                 site_specificity=vb.site_specificity),
                   last=dict(site_roc_auc=h.site_roc_auc_score.iloc[-1], site_accuracy=h.site_accuracy.iloc[-1]))
        for tta in (False, True):  # the exported model (best site AUC epoch) on A, at 0.5 and at A's Youden threshold
            e = evaluate(run, source=str(SITE_A), tta=tta, threshold_on=str(SITE_A), threshold_rule=RULE)
            out['tta' if tta else 'plain'] = dict(auc=e['default']['roc_auc'], acc=e['default']['accuracy'],
                                                  spec=e['default']['specificity'], thr=e['chosen']['threshold'],
                                                  acc_thr=e['chosen']['accuracy'], spec_thr=e['chosen']['specificity'],
                                                  recall_thr=e['chosen']['recall'], valid_loss=e['valid']['loss'],
                                                  valid_auc=e['valid']['roc_auc'])
        res[name] = out
        p, t, v = out['plain'], out['tta'], out['val_best']
        rows.append(f"| {name} | {out['wall']:.0f} s | {v['epoch'] + 1}: {_f(v['valid_loss'])} / {_f(v['roc_auc'])} / "
                    f"{_f(v['site_roc_auc'])} | {out['best_epoch'] + 1}/{out['epochs']} | {_f(p['valid_auc'])} | {_f(p['auc'])} | "
                    f"{_f(p['acc'])} | {_f(p['spec'])} | {p['thr']:.3g}: {_f(p['acc_thr'])} / {_f(p['spec_thr'])} | "
                    f"{_f(t['auc'])} | {t['thr']:.3g}: {_f(t['acc_thr'])} / {_f(t['spec_thr'])} |")
        print(rows[-1], flush=True)
    head = ["| candidate | train wall | best-val-loss epoch: val loss / val AUC / A AUC | best-A-AUC epoch | val AUC | "
            "A AUC | A acc @0.5 | A spec @0.5 | A Youden thr: A acc / spec | TTA: A AUC | TTA: thr: A acc / spec |",
            "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | --- |"]
    return head + rows, res


def stock_fastai(seed:int, epochs:int=5) -> dict:
    "Stock fastai: resnet34 from scratch, default aug_transforms, fit_one_cycle(5, 3e-3), last epoch, argmax; metrics on B."
    import numpy as np, torch
    from PIL import Image
    from fastai.vision.all import (DataBlock, ImageBlock, CategoryBlock, IndexSplitter, PILImage, aug_transforms,
                                   vision_learner, resnet34, accuracy, set_seed)
    from xray_fastai.evaluate import binary_metrics
    d = np.load(NPZ)
    files = sorted(SITE_B.glob('*/*.png'))
    ims = [*d['train_images'], *d['val_images'], *[np.array(Image.open(f).convert('L')) for f in files]]
    labels = ['NORMAL', 'PNEUMONIA']
    ys = [labels[int(y)] for y in d['train_labels'].ravel()] + [labels[int(y)] for y in d['val_labels'].ravel()] + \
         [f.parent.name for f in files]
    n_tr, n_va = len(d['train_images']), len(d['val_images'])
    set_seed(seed, reproducible=True)
    dblock = DataBlock(blocks=(ImageBlock, CategoryBlock), get_x=lambda i: PILImage.create(np.repeat(ims[i][..., None], 3, -1)), get_y=lambda i: ys[i],
                       splitter=IndexSplitter(list(range(n_tr, n_tr + n_va))), batch_tfms=aug_transforms())
    dls = dblock.dataloaders(list(range(n_tr + n_va)), bs=64, num_workers=0)
    learn = vision_learner(dls, resnet34, pretrained=False, metrics=accuracy)
    learn.remove_cb(learn.progress) if hasattr(learn, 'progress') else None
    t0 = time.perf_counter()
    with learn.no_logging(): learn.fit_one_cycle(epochs, 3e-3)
    wall = time.perf_counter() - t0
    probs, targs = learn.get_preds(dl=dls.test_dl(list(range(n_tr + n_va, len(ims))), with_labels=True))
    pos = list(dls.vocab).index('PNEUMONIA')
    return dict(wall=wall, **binary_metrics(probs[:, pos], targs == pos, 0.5))


def _final_seed(name, seed, runs, tta, epochs):
    "One seed of the chosen candidate: trained watching A, evaluated on B at 0.5 and at A's threshold (a worker process)."
    import torch; torch.set_num_threads(int(os.environ.get('OMP_NUM_THREADS', 1)))
    from xray_fastai.evaluate import evaluate
    run = runs/f"{name}-seed{seed}"
    m = _train(run, CANDIDATES[name], seed, epochs)
    e = evaluate(run, source=str(SITE_B), tta=tta, threshold_on=str(SITE_A), threshold_rule=RULE)
    return dict(run=str(run), wall=m['wall_seconds'], best_epoch=m['best_epoch'], default=e['default'], chosen=e['chosen'],
                threshold_on=e['threshold_on'])

def _stock_seed(seed, epochs):
    import torch; torch.set_num_threads(int(os.environ.get('OMP_NUM_THREADS', 1)))
    return stock_fastai(seed, epochs)


def final(a, runs):
    "The chosen candidate's seeds and stock fastai's, `--workers` at a time (each worker one thread), then the ensemble."
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor
    from xray_fastai.evaluate import ensemble
    res = dict(candidate=a.candidate, settings=CANDIDATES[a.candidate], workers=a.workers)
    with ProcessPoolExecutor(a.workers, mp_context=mp.get_context('spawn')) as pool:
        ours = {s: pool.submit(_final_seed, a.candidate, s, runs, a.tta, a.epochs) for s in a.seeds}
        stock = {s: pool.submit(_stock_seed, s, a.stock_epochs) for s in a.seeds}
        res['seeds'] = {s: f.result() for s, f in ours.items()}
        res['stock'] = {s: f.result() for s, f in stock.items()}
    for s in a.seeds: print(s, json.dumps(res['seeds'][s]['default']), json.dumps(res['stock'][s]), flush=True)
    if len(a.seeds) > 1:
        e = ensemble([Path(res['seeds'][s]['run']) for s in a.seeds], runs/'ensemble', source=str(SITE_B), tta=a.tta,
                     threshold_on=str(SITE_A), threshold_rule=RULE)
        res['ensemble'] = dict(default=e['default'], chosen=e['chosen'], threshold_on=e['threshold_on'])
    S, T = res['seeds'], res['stock']
    def line(name, ms, key):
        g = lambda k: [m[key][k] for m in ms]
        return (f"| {name} | {_ms(g('accuracy'))} | {_ms(g('roc_auc'))} | {_ms(g('specificity'))} | {_ms(g('recall'))} | "
                f"{_ms([m[key]['threshold'] for m in ms])} |")
    rows = ["| on half B (312 images) | ACC | AUC | specificity | recall | threshold |", "| --- | ---: | ---: | ---: | ---: | ---: |",
            line(f"`{a.candidate}`, {len(S)} seeds, threshold 0.5", list(S.values()), 'default'),
            line(f"`{a.candidate}`, {len(S)} seeds, threshold chosen on A ({RULE})", list(S.values()), 'chosen')]
    if 'ensemble' in res:
        for key, what in (('default', 'threshold 0.5'), ('chosen', f'threshold chosen on A ({RULE})')):
            rows.append(line(f"ensemble of the {len(S)} runs, {what}", [res['ensemble']], key))
    rows.append("| stock fastai (resnet34, 5 epochs, lr 3e-3, last epoch), threshold 0.5 (argmax) | " +
                ' | '.join(_ms([m[k] for m in T.values()]) for k in ('accuracy', 'roc_auc', 'specificity', 'recall')) + " | 0.5 |")
    rows.append('')
    rows.append("| seed | train wall (recipe) | best epoch (by A AUC) | B ACC @0.5 | B ACC @A thr | B spec @A thr | A thr | "
                "stock train wall | stock B ACC | stock B AUC | stock B spec |")
    rows.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for seed in a.seeds:
        s, t = S[seed], T[seed]
        rows.append(f"| {seed} | {s['wall']:.0f} s | {s['best_epoch'] + 1} | {_f(s['default']['accuracy'])} | "
                    f"{_f(s['chosen']['accuracy'])} | {_f(s['chosen']['specificity'])} | {s['chosen']['threshold']:.3g} | "
                    f"{t['wall']:.0f} s | {_f(t['accuracy'])} | {_f(t['roc_auc'])} | {_f(t['specificity'])} |")
    return rows, res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('mode', choices=['screen', 'final'])
    p.add_argument('--only', nargs='+', choices=list(CANDIDATES), help="screen: only these candidates")
    p.add_argument('--seed', type=int, default=42, help="screen: the seed")
    p.add_argument('--candidate', choices=list(CANDIDATES), help="final: the candidate chosen on A")
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2], help="final: the seeds")
    p.add_argument('--tta', action='store_true', help="final: evaluate with test-time augmentation")
    p.add_argument('--epochs', type=int, default=None, help="override the epochs (smoke runs)")
    p.add_argument('--stock-epochs', type=int, default=5)
    p.add_argument('--workers', type=int, default=3, help="final: trainings at a time (one thread each)")
    p.add_argument('--runs', default=None, help="folder for the runs (default: bench/runs/generalisation-<mode>)")
    p.add_argument('--no-record', action='store_true')
    a = p.parse_args(argv)
    if a.mode == 'final' and not a.candidate: p.error("final needs --candidate (the one chosen on A)")
    from throughput import machine
    started, load0 = datetime.datetime.now(), os.getloadavg()
    runs = Path(a.runs or REPO/'bench'/'runs'/f"generalisation-{a.mode}")
    rows, res = (screen if a.mode == 'screen' else final)(a, runs)
    m = machine()
    cmd = 'python bench/generalisation.py' + ''.join(f' {o}' for o in (argv if argv is not None else sys.argv[1:]))
    text = '\n'.join([f"\n### {started:%Y-%m-%d %H:%M} — `{a.mode}`\n",
                      f"Command: `{cmd}`. Machine: {m['cores']} cores ({m['cpu']}), torch {m['torch']}, fastai {m['fastai']}; "
                      f"load average {load0[0]:.2f} at start, {os.getloadavg()[0]:.2f} at the end; "
                      f"{(datetime.datetime.now() - started).total_seconds() / 60:.0f} min in all.\n", *rows])
    print(text)
    if not a.no_record:
        with open(REPO/'bench'/'GENERALISATION.md', 'a') as f: f.write(text + '\n')
        (REPO/'bench'/f"generalisation-{a.mode}.json").write_text(json.dumps(res, indent=1, default=str) + '\n')


if __name__ == '__main__': main()
