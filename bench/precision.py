"""Precision and memory format on this machine (issue 17): model-only rows fp32, fp32+channels_last, bf16, bf16+channels_last
side by side, the library's fine-tune / fixed-feature / predict with `--precision auto` against them, `torch.compile`, and the
start-up cost of checking image files (first check against a second start) for 1k-100k images.

    python bench/precision.py                          # resnet34, 224 px, batch 16; appends to bench/RESULTS.md
    python bench/precision.py --quick --no-record      # smoke run: 64 px, 1 turn, 1k/2k images
    python bench/precision.py --parts startup          # only the start-up scaling rows

Every rate is images/second after warm-up steps; the rows take turns (see bench/README.md), so a machine whose speed drifts
slows all of them alike and the ratios stay comparable."""
from __future__ import annotations
import argparse, datetime, gc, os, shutil, sys, tempfile, time, warnings
from pathlib import Path

warnings.filterwarnings('ignore', category=FutureWarning)
import numpy as np, torch
sys.path.insert(0, str(Path(__file__).resolve().parent))
import throughput as tp  # the timing helpers and rows of the main benchmark
from throughput import REPO, DATA, Row, StepClock, ClockCallback, ModelOnly, take_turns, machine, append_results
from check_processes import old_check
from fastai.vision.all import set_seed
from xray_fastai.data import load_source, xray_dataloaders, check_images, presize_cache
from xray_fastai.learner import xray_learner, train
from xray_fastai.precision import autocast_to, resolve_precision, memory_format_for, cpu_has_bf16


class ModelPrec(ModelOnly):
    "Row (1) of throughput.py under `precision` autocast and a memory format; `compile`: `torch.compile`d."
    def __init__(self, a, files, precision='fp32', channels_last=False, train=True, compile=False):
        super().__init__(a, files, train=train)
        self.precision, self.cl = precision, channels_last
        if channels_last: self.model = self.model.to(memory_format=torch.channels_last)
        if compile: self.model = torch.compile(self.model)
    def run(self, clock):
        clock.start()
        with torch.inference_mode(not self.train):
            for xb, yb in self.batches:
                clock.got_batch()
                if self.cl: xb = xb.contiguous(memory_format=torch.channels_last)
                with autocast_to(self.precision, 'cpu'): out = self.model(xb)
                if self.train:
                    self.loss_func(out.float(), yb).backward(); self.opt.step(); self.opt.zero_grad()
                if clock.step_done(): return


class FitPrec(Row):
    "`xray_learner(...).fit(1)` (library defaults, augmentation on) at a `precision`, stopped after the timed batches."
    def __init__(self, a, src, frozen, precision, channels_last=None):
        super().__init__(a.bs)
        self.dls = xray_dataloaders(src, size=a.size, bs=a.bs)
        self.learn = xray_learner(self.dls, a.arch, frozen=frozen, pretrained=False, precision=precision, channels_last=channels_last)
        self.info = self.learn.precision_info
    def run(self, clock): self.learn.fit(1, 1e-3, cbs=ClockCallback(clock))


def predict_prec(a, run, files, fwd:Row, precision='auto') -> dict:
    "Marginal rate of `predict` (N more files) at `precision`; each round beside a forward-only chunk of row `fwd`."
    from xray_fastai.predict import predict
    def seconds(k):
        t0 = time.perf_counter(); df = predict(run, files[:k], bs=a.bs, precision=precision); t = time.perf_counter() - t0
        assert (df.error == '').all()
        return t
    n, k, marginal, ratios = a.predict_n, max(1, a.predict_n // a.bs), [], []
    for r in range(a.predict_rounds):
        if r % 2 == 0: fwd.chunk(k)  # the forward chunk before the predictions in even rounds, after them in odd ones
        t_n = seconds(n); marginal.append(seconds(2 * n) - t_n)
        if r % 2 == 1: fwd.chunk(k)
        ratios.append(n / marginal[-1] / (a.bs * k / fwd.rounds[-1]))
    return dict(rate=n * len(marginal) / sum(marginal), ratios=ratios)


def model_rows(a, log):
    files = sorted((DATA/'chest_xray_224'/'train').rglob('*.jpeg'))
    src = load_source(DATA/'chest_xray_224', verify=False)
    rows = {'fp32': ModelPrec(a, files), 'fp32+cl': ModelPrec(a, files, channels_last=True),
            'bf16': ModelPrec(a, files, 'bf16'), 'bf16+cl': ModelPrec(a, files, 'bf16', True),
            'finetune auto': FitPrec(a, src, False, 'auto'), 'finetune fp32': FitPrec(a, src, False, 'fp32', False),
            'frozen auto': FitPrec(a, src, True, 'auto'), 'frozen fp32': FitPrec(a, src, True, 'fp32', False),
            'forward fp32': ModelPrec(a, files, train=False), 'forward bf16+cl': ModelPrec(a, files, 'bf16', True, train=False)}
    infos = {k: r.info for k, r in rows.items() if hasattr(r, 'info')}
    for k, r in rows.items(): log(f"warming {k}", flush=True); r.warm(a.warmup)
    take_turns(rows, a.rounds, a.batches, log=log)
    res = {k: r.rate for k, r in rows.items()}
    spread = {k: [x / m for x, m in zip(r.round_rates(a.batches), rows['fp32'].round_rates(a.batches))] for k, r in rows.items()}
    # predict: a run trained for a few batches (the rate does not depend on the weights)
    with tempfile.TemporaryDirectory() as tmp:
        csv = Path(tmp)/'few.csv'
        import pandas as pd
        pick = [f for c in ('NORMAL', 'PNEUMONIA') for f in sorted((DATA/'chest_xray_224'/'train'/c).glob('*.jpeg'))[:24]]
        pd.DataFrame(dict(path=pick, label=[Path(f).parent.name for f in pick])).to_csv(csv, index=False)
        run = train(out=Path(tmp)/'run', source=csv, arch=a.arch, size=a.size, bs=a.bs, epochs=1, pretrained=False, aug=False,
                    frozen=True, precision='fp32')
        pfiles = files[:2 * a.predict_n]
        pred = {p: predict_prec(a, run, pfiles, rows['forward bf16+cl'] if p == 'auto' else rows['forward fp32'], p)
                for p in ('auto', 'fp32')}
    return res, spread, infos, pred


def compile_row(a, log) -> dict:
    "Compile time and steady rate of `torch.compile` on the fastest model-only row (bf16+cl), against it uncompiled."
    files = sorted((DATA/'chest_xray_224'/'train').rglob('*.jpeg'))
    plain, comp = ModelPrec(a, files, 'bf16', True), ModelPrec(a, files, 'bf16', True, compile=True)
    plain.warm(a.warmup)
    t0 = time.perf_counter(); comp.warm(1); first = time.perf_counter() - t0
    comp.warm(a.warmup - 1)
    take_turns(dict(plain=plain, compiled=comp), a.rounds, a.batches, log=log)
    step = a.bs / plain.rate
    return dict(first_step_s=first, compile_s=first - step, plain=plain.rate, compiled=comp.rate)


def size_rows(a, log) -> list:
    "Model-only fp32 / fp32+cl / bf16 / bf16+cl for resnet18 at smaller sizes (the PneumoniaMNIST recipe's model): where bf16 pays."
    files = sorted((DATA/'chest_xray_224'/'train').rglob('*.jpeg'))
    out = []
    for size, bs in a.sizes:
        b = argparse.Namespace(**{**a.__dict__, 'arch': 'resnet18', 'size': size, 'bs': bs})
        rows = {'fp32': ModelPrec(b, files), 'fp32+cl': ModelPrec(b, files, channels_last=True),
                'bf16': ModelPrec(b, files, 'bf16'), 'bf16+cl': ModelPrec(b, files, 'bf16', True)}
        for r in rows.values(): r.warm(1)
        take_turns(rows, a.rounds, a.batches, log=log)
        out.append(dict(size=size, bs=bs, **{k: r.rate for k, r in rows.items()}))
        log(f"  {out[-1]}", flush=True)
    return out


def startup_rows(a, log) -> list:
    "Seconds to load a folder of N images (links to real files): the old sequential check, the first check, a second start."
    by_class = [sorted((DATA/'chest_xray_224'/'train'/c).glob('*.jpeg')) for c in ('NORMAL', 'PNEUMONIA')]
    real = [f for pair in zip(*by_class) for f in pair]  # both classes in every prefix
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in a.startup_n:
            root = Path(tmp)/f'n{n}'
            for i in range(n):
                f = real[i % len(real)]
                d = root/f.parent.name; d.mkdir(parents=True, exist_ok=True)
                (d/f"{i:06d}-{f.name}").symlink_to(f)
            checks = Path(tmp)/f'checks{n}'
            os.environ['XRAY_FASTAI_CHECKS'] = str(checks)
            row = dict(n=n)
            files = sorted(map(str, root.rglob('*.jpeg')))
            if n <= a.sequential_max:  # what every start did before: one thread, nothing remembered
                t0 = time.perf_counter(); [old_check(f) for f in files]; row['sequential_check'] = time.perf_counter() - t0
            for k in ('first', 'second'):
                t0, c0 = time.perf_counter(), time.process_time()
                src = load_source(root, for_training=False)
                row[k], row[k + '_cpu'] = time.perf_counter() - t0, time.process_time() - c0
                assert len(src.df) == n
            t0, c0 = time.perf_counter(), time.process_time()  # the check alone, remembered
            check_images(files, checks); row['second_check'], row['second_check_cpu'] = time.perf_counter() - t0, time.process_time() - c0
            if n <= a.cached_max:  # a first start with --cache (64 px, item size 74): check then presize, or one decode for both
                for k in ('cached_apart', 'cached_folded'):
                    shutil.rmtree(checks, ignore_errors=True); cache = Path(tmp)/f'presize{n}-{k}'
                    t0 = time.perf_counter()
                    if k == 'cached_apart': load_source(root, for_training=False); presize_cache(files, 74, cache, root.name)
                    else: load_source(root, for_training=False, cache=cache, item_size=74)
                    row[k] = time.perf_counter() - t0
                    shutil.rmtree(cache)
            os.environ['XRAY_FASTAI_CHECKS'] = 'off'
            t0 = time.perf_counter(); load_source(root, verify=False, for_training=False); row['scan_only'] = time.perf_counter() - t0
            log(f"  {row}", flush=True)
            out.append(row)
            shutil.rmtree(root); shutil.rmtree(checks, ignore_errors=True)
    return out


def accuracy_rows(a, log) -> list:
    "The pneumoniamnist recipe (28 px) under fp32 and bf16: validation and site A, `--seeds` seeds. Never half B or test."
    from xray_fastai.evaluate import evaluate
    res = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in a.seeds:
            for p in ('fp32', 'bf16'):
                run = train(out=Path(tmp)/f"{p}-{seed}", recipe='pneumoniamnist', data_dir=str(DATA), verify=False,
                            seed=seed, precision=p, epochs=a.acc_epochs)
                m = tp.load_json(run/'metrics.json')
                site = evaluate(run, source=DATA/'pneumoniamnist_site_A', split='train', precision=p)
                res.append(dict(seed=seed, precision=p, valid_auc=m['best']['roc_auc_score'], valid_acc=m['best']['accuracy'],
                                site_a_auc=site['default']['roc_auc'], site_a_acc=site['default']['accuracy'],
                                s_per_epoch=m['seconds_per_epoch']))
                log(f"  {res[-1]}", flush=True)
    return res


def report(a, mach, R, started, load0, load1, wall) -> str:
    L = [f"\n## {started:%Y-%m-%d %H:%M} — precision (bench/precision.py): {a.arch}, {a.size} px, batch {a.bs}"
         f"{' (QUICK smoke run: not a result)' if a.quick else ''}\n",
         f"- command: `{'OMP_WAIT_POLICY=' + os.environ['OMP_WAIT_POLICY'] + ' ' if 'OMP_WAIT_POLICY' in os.environ else ''}"
         f"python bench/precision.py {' '.join(sys.argv[1:])}`",
         f"- machine: {mach['cores']} cores, {mach['cpu']}, native bf16 {cpu_has_bf16()}, GPU {mach['gpu'] or 'none'}; "
         f"torch {mach['torch']}, fastai {mach['fastai']}; OMP_WAIT_POLICY {mach['omp_wait_policy']}",
         f"- device cpu; `--precision auto` here means: {resolve_precision('auto', 'cpu', a.size)} + "
         f"{memory_format_for('cpu', None, a.size)} at {a.size} px; {resolve_precision('auto', 'cpu', 28)} + "
         f"{memory_format_for('cpu', None, 28)} at 28 px",
         f"- load average {load0:.1f} at the start, {load1:.1f} at the end (2 cores shared with other engineers' jobs: "
         f"rates are noisy, compare the ratios); wall {wall:.0f} s", '']
    if 'model' in R:
        res, spread, infos, pred = R['model']
        best = max(res[k] for k in ('fp32', 'fp32+cl', 'bf16', 'bf16+cl'))
        pr = pred['auto']['ratios']
        L += ['| row | img/s | x fp32 model-only (per-turn range) | x fastest model-only |', '| --- | ---: | ---: | ---: |']
        for k, v in res.items():
            s = spread[k]
            L.append(f"| {k}{' (' + ', '.join(infos[k].values()) + ')' if k in infos else ''} | {v:.2f} | {v / res['fp32']:.2f}x "
                     f"({min(s):.2f}-{max(s):.2f}) | {v / best:.2f}x |")
        for p, d in pred.items():
            L.append(f"| predict {p} (marginal) | {d['rate']:.2f} | {d['rate'] / res['fp32']:.2f}x | - |")
        L += ['', '| target | measured | verdict |', '| --- | ---: | --- |',
              f"| fastest model-only row is bf16+cl | {max(('fp32', 'fp32+cl', 'bf16', 'bf16+cl'), key=res.get)} | "
              f"{'met' if max(('fp32', 'fp32+cl', 'bf16', 'bf16+cl'), key=res.get) == 'bf16+cl' else 'MISSED'} |",
              f"| fine-tune auto >= 0.95x fastest model-only | {res['finetune auto'] / best:.3f}x | {tp._verdict(res['finetune auto'] / best, 0.95)} |",
              f"| fine-tune auto >= 1.6x fine-tune fp32 | {res['finetune auto'] / res['finetune fp32']:.3f}x | "
              f"{tp._verdict(res['finetune auto'] / res['finetune fp32'], 1.6)} |",
              f"| frozen auto / frozen fp32 | {res['frozen auto'] / res['frozen fp32']:.2f}x | - |",
              f"| predict auto >= 0.9x bf16 forward-only: median of {a.predict_rounds} rounds, each beside a forward chunk "
              f"(range) | {np.median(pr):.3f}x ({min(pr):.2f}-{max(pr):.2f}) | {tp._verdict(np.median(pr), 0.9)} |", '']
    if 'compile' in R:
        c = R['compile']
        gain = 1 / c['plain'] - 1 / c['compiled']  # seconds saved per image
        L += [f"torch.compile (bf16+cl model-only): first step {c['first_step_s']:.0f} s (compile ~{c['compile_s']:.0f} s); "
              f"{c['compiled']:.2f} img/s compiled vs {c['plain']:.2f} plain ({c['compiled'] / c['plain']:.2f}x); "
              + (f"pays off after {c['compile_s'] / gain:.0f} images ({c['compile_s'] / gain / 5216:.2f} Kermany epochs)"
                 if gain > 0 else "no gain: never pays off"), '']
    if 'startup' in R:
        L += ['Start-up (`load_source` of a folder of N links to real 224 px JPEGs; wall seconds, CPU seconds of the process in brackets):', '',
              '| images | scan, no check | old check: 1 thread, every start | first start (scan + check) | second start | its check alone | '
              'first start with --cache: check, then presize | the same, one decode for both |',
              '| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |']
        nan = float('nan')
        for r in R['startup']:
            L.append(f"| {r['n']} | {r['scan_only']:.2f} | {r.get('sequential_check', nan):.2f} | {r['first']:.2f} ({r['first_cpu']:.2f}) | "
                     f"{r['second']:.2f} ({r['second_cpu']:.2f}) | {r['second_check']:.2f} ({r['second_check_cpu']:.2f}) | "
                     f"{r.get('cached_apart', nan):.2f} | {r.get('cached_folded', nan):.2f} |")
        L.append('')
    if 'sizes' in R:
        L += ['Model-only, resnet18 (img/s, and x fp32):', '', '| size | batch | fp32 | fp32+cl | bf16 | bf16+cl |', '| ---: | ---: | ---: | ---: | ---: | ---: |']
        for r in R['sizes']:
            L.append(f"| {r['size']} | {r['bs']} | " + ' | '.join(f"{r[k]:.1f} ({r[k] / r['fp32']:.2f}x)" for k in ('fp32', 'fp32+cl', 'bf16', 'bf16+cl')) + ' |')
        L.append('')
    if 'accuracy' in R:
        L += ['| seed | precision | valid AUC | valid acc | site A AUC | site A acc | s/epoch |', '| ---: | --- | ---: | ---: | ---: | ---: | ---: |']
        for r in R['accuracy']:
            L.append(f"| {r['seed']} | {r['precision']} | {r['valid_auc']:.4f} | {r['valid_acc']:.4f} | {r['site_a_auc']:.4f} | "
                     f"{r['site_a_acc']:.4f} | {r['s_per_epoch']:.1f} |")
        L.append('')
    return '\n'.join(L)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--arch', default='resnet34'); p.add_argument('--size', type=int, default=224); p.add_argument('--bs', type=int, default=16)
    p.add_argument('--warmup', type=int, default=2); p.add_argument('--rounds', type=int, default=3); p.add_argument('--batches', type=int, default=3)
    p.add_argument('--predict-n', type=int, default=32); p.add_argument('--predict-rounds', type=int, default=8)
    p.add_argument('--parts', default='model,compile,sizes,startup', help='model, compile, sizes, startup, accuracy (comma-separated)')
    p.add_argument('--startup-n', default='1000,5000,20000,100000'); p.add_argument('--sequential-max', type=int, default=20000)
    p.add_argument('--cached-max', type=int, default=20000, help='the largest folder also started with a presize cache')
    p.add_argument('--sizes', default='28:128,64:64,128:32,224:16', help='SIZE:BATCH pairs of the resnet18 size rows')
    p.add_argument('--seeds', default='0,1'); p.add_argument('--acc-epochs', type=int, default=10)
    p.add_argument('--quick', action='store_true'); p.add_argument('--no-record', action='store_true')
    p.add_argument('--out', default=str(REPO/'bench'/'RESULTS.md'))
    a = p.parse_args(argv)
    a.sizes = [tuple(map(int, x.split(':'))) for x in a.sizes.split(',')]
    a.startup_n = [int(x) for x in a.startup_n.split(',')]; a.seeds = [int(x) for x in a.seeds.split(',')]
    if a.quick: a.size, a.rounds, a.batches, a.warmup, a.predict_n, a.predict_rounds, a.startup_n, a.acc_epochs = 64, 1, 2, 1, 8, 2, [1000, 2000], 1
    parts, R = a.parts.split(','), {}
    started, load0, t0 = datetime.datetime.now(), os.getloadavg()[0], time.perf_counter()
    log = lambda *x, **k: print(*x, **{**k, 'file': sys.stderr})
    if 'model' in parts: R['model'] = model_rows(a, log); gc.collect()
    if 'compile' in parts:
        try: R['compile'] = compile_row(a, log)
        except Exception as e: log(f"torch.compile failed: {type(e).__name__}: {str(e)[:200]}")
    if 'sizes' in parts: R['sizes'] = size_rows(a, log)
    if 'startup' in parts: R['startup'] = startup_rows(a, log)
    if 'accuracy' in parts: R['accuracy'] = accuracy_rows(a, log)
    md = report(a, machine(), R, started, load0, os.getloadavg()[0], time.perf_counter() - t0)
    print(md)
    if not a.no_record: append_results(a.out, md)


if __name__ == '__main__': main()
