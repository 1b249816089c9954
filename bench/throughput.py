"""Training, data and inference throughput of xray-fastai on real chest X-rays, against the model-only limit.

    python bench/throughput.py --arch resnet34 --size 224 --bs 16     # the full benchmark (appends to bench/RESULTS.md)
    python bench/throughput.py --quick --no-record                    # a fast smoke run (64 px, few batches)

Every rate is images/second, measured after `--warmup` batches, and printed with its ratio to row 1.
See bench/README.md for what each row means."""
from __future__ import annotations
import argparse, datetime, gc, itertools, json, math, os, platform, shutil, subprocess, sys, tempfile, time, warnings
from pathlib import Path

warnings.filterwarnings('ignore', category=FutureWarning)
import numpy as np, pandas as pd, torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent/'shared'/'data'
sys.path.insert(0, str(REPO))

from fastai.vision.all import Callback, CancelFitException, set_seed
import xray_fastai.learner as xl
from xray_fastai.core import load_json
from xray_fastai.data import load_source, xray_dataloaders, open_xray, presize_cache, XraySource
from xray_fastai.models import build_model
from xray_fastai.learner import xray_learner, train

# --- timing helpers -----------------------------------------------------------------------------------------

class StepClock:
    "End time of each step and the data wait before it; the first `warmup` steps are not timed."
    def __init__(self, n:int, warmup:int=1): self.n, self.warmup, self.ends, self.waits, self.last = n, warmup, [], [], None
    def start(self): self.last = time.perf_counter()
    def got_batch(self): self.waits.append(time.perf_counter() - self.last)
    def step_done(self) -> bool:
        "Record a finished step; True when enough steps were timed."
        self.last = time.perf_counter(); self.ends.append(self.last)
        return len(self.ends) >= self.warmup + self.n
    @property
    def intervals(self) -> list: return list(np.diff(self.ends[self.warmup - 1:]))
    @property
    def timed_waits(self) -> list: return self.waits[self.warmup:]


class ClockCallback(Callback):
    "Feed a `StepClock` from fastai's training loop; stop the fit once it has timed enough batches."
    order = 100  # after every other callback: a step ends when all of them are done
    def __init__(self, clock:StepClock): self.clock = clock
    def before_fit(self): self.clock.start()
    def before_batch(self):
        if self.training: self.clock.got_batch()
    def after_batch(self):
        if self.training and self.clock.step_done(): raise CancelFitException()


class Row:
    "A loop that runs `n` more timed steps when asked (`chunk`), so that rows can take turns and share the machine's drift."
    def __init__(self, bs:int): self.bs, self.times, self.waits, self.rounds = bs, [], [], []
    def run(self, clock:StepClock): raise NotImplementedError
    def warm(self, n:int):
        "`n` untimed steps: lazy initialisation, optimizer state, worker start-up."
        if n: self.run(StepClock(n, warmup=0))
    def chunk(self, n:int):
        "One untimed step (refills any pipeline), then `n` timed ones."
        clock = StepClock(n); self.run(clock)
        self.times += clock.intervals; self.waits += clock.timed_waits; self.rounds.append(sum(clock.intervals))
    @property
    def rate(self) -> float: return self.bs * len(self.times) / sum(self.times)
    @property
    def wait_share(self) -> float: return sum(self.waits) / sum(self.times)
    def round_rates(self, n:int) -> list: return [self.bs * n / t for t in self.rounds]


def load_images(files, size:int) -> torch.Tensor:
    "Real images as a `(n, 1, size, size)` float tensor in [0, 1]."
    return torch.stack([torch.from_numpy(np.asarray(open_xray(f).resize((size, size)), np.float32) / 255)[None]
                        for f in files])


# --- the rows -----------------------------------------------------------------------------------------------

class ModelOnly(Row):
    "(1) forward+backward+step of `build_model` on real images already in memory (Adam, cross-entropy); `train=False`: forward only."
    def __init__(self, a, files, train:bool=True):
        super().__init__(a.bs)
        set_seed(0)
        self.train = train
        self.model = build_model(a.arch, n_in=1, pretrained=False).train(train)
        self.opt, self.loss_func = torch.optim.Adam(self.model.parameters(), lr=1e-3), nn.CrossEntropyLoss()
        x = (load_images(files[:4 * a.bs], a.size) - 0.5) / 0.25
        self.batches = itertools.cycle(list(zip(x.split(a.bs), (torch.arange(len(x)) % 2).split(a.bs))))
        self.note = '4 batches of real images, cycled'
    def run(self, clock):
        clock.start()
        with torch.inference_mode(not self.train):
            for xb, yb in self.batches:
                clock.got_batch()
                if self.train:
                    self.loss_func(self.model(xb), yb).backward(); self.opt.step(); self.opt.zero_grad()
                else: self.model(xb)
                if clock.step_done(): return


class SeedLoop(Row):
    "(2) The seed notebook's loop: ImageFolder + CPU torchvision transforms + 2 workers, 1-channel resnet, BCE."
    def __init__(self, a):
        super().__init__(a.bs)
        import torchvision
        from torchvision import transforms as T
        tfms = T.Compose([T.Resize((a.size, a.size), interpolation=T.InterpolationMode.BICUBIC), T.Grayscale(1),
                          T.ColorJitter(brightness=0.2, contrast=0.2),
                          T.RandomAffine(degrees=10, translate=(0.05, 0.05), scale=(0.95, 1.05)),
                          T.GaussianBlur(3, sigma=(0.1, 1.0)), T.ToTensor(), T.Normalize([0.5], [0.5])])
        ds = torchvision.datasets.ImageFolder(str(DATA/'chest_xray_224'/'train'), transform=tfms)
        dl = torch.utils.data.DataLoader(ds, batch_size=a.bs, shuffle=True, num_workers=2, drop_last=True)
        self.batches = (b for _ in itertools.count() for b in dl)  # one iterator throughout: its workers stay up
        set_seed(0)
        self.model = getattr(torchvision.models, a.arch)(weights=None)
        self.model.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)  # random 1-channel stem, as the seed
        self.model.fc = nn.Linear(self.model.fc.in_features, 1)
        self.model.train()
        self.opt, self.loss_func = torch.optim.Adam(self.model.parameters(), lr=1e-4), nn.BCEWithLogitsLoss()
        self.note = f"ImageFolder {len(ds)} images, num_workers=2"
    def run(self, clock):
        clock.start()
        for xb, yb in self.batches:
            clock.got_batch()
            self.loss_func(self.model(xb).squeeze(1), yb.float()).backward(); self.opt.step(); self.opt.zero_grad()
            if clock.step_done(): return


class FastaiFit(Row):
    "(3)/(4) `xray_learner(...).fit(1)` on `xray_dataloaders` (augmentation on), stopped after the timed batches."
    def __init__(self, a, src, frozen:bool, num_workers=None):
        super().__init__(a.bs)
        self.dls = xray_dataloaders(src, size=a.size, bs=a.bs, num_workers=a.num_workers if num_workers is None else num_workers)
        self.learn = xray_learner(self.dls, a.arch, frozen=frozen, pretrained=False)
        self.note = f"num_workers={self.dls.train.fake_l.num_workers}, batch aug on {self.dls.device}"
        self.batch_tfms = None
    def run(self, clock):
        # each fit is a new epoch: fastai forks the DataLoader workers again, so the untimed first step absorbs that
        self.learn.fit(1, 1e-3, cbs=ClockCallback(clock))
    def close(self):
        self.batch_tfms = batch_tfms_seconds(self.dls.train)
        del self.learn, self.dls; gc.collect()


class PipelineOnly(Row):
    "(6) The train DataLoader of `xray_dataloaders` alone (no model): decode, item resize, collate, batch transforms."
    def __init__(self, a, src, cache, num_workers=None, aug:bool=True):
        super().__init__(a.bs)
        self.dls = xray_dataloaders(src, size=a.size, bs=a.bs, num_workers=a.num_workers if num_workers is None else num_workers,
                                    cache=cache, aug=aug)
        self.workers = self.dls.train.fake_l.num_workers
    def run(self, clock):
        clock.start()
        for _ in self.dls.train:  # a new iterator per chunk, as per epoch in training (the untimed step absorbs the fork)
            clock.got_batch()
            if clock.step_done(): return
        raise RuntimeError('an epoch of the full-res pipeline is shorter than a chunk: raise --repeat')


def take_turns(rows:dict, rounds:int, n:int, log=print):
    "Run `n` timed steps of every row in turn, `rounds` times: slow drifts of the machine's speed hit every row alike."
    for r in range(rounds):
        for name, row in rows.items():
            row.chunk(n)
        log(f"  round {r + 1}/{rounds}: " + ', '.join(f"{k} {v.round_rates(n)[-1]:.2f}" for k, v in rows.items()), flush=True)


def batch_tfms_seconds(dl, reps:int=5) -> float:
    "Seconds the batch transforms (augmentation, normalisation) take on one collated batch of `dl`, in this process."
    raw = dl.do_batch([dl.do_item(i) for i in range(dl.bs)])
    dl.after_batch(raw)
    t0 = time.perf_counter()
    for _ in range(reps): dl.after_batch(raw)
    return (time.perf_counter() - t0) / reps


def cached_features(a, files, tmp:Path) -> dict:
    "(5) `train(frozen=True, aug=False)` (cached features): epoch 1 = feature extraction + head epoch; later epochs."
    csv = tmp/'subset.csv'
    pd.DataFrame(dict(path=[str(f) for f in files], label=[Path(f).parent.name for f in files])).to_csv(csv, index=False)
    spent, workers = [], []
    def timed(learn, *args, **kwargs):  # time the feature extraction, which happens before the fit (and history.csv)
        t0 = time.perf_counter(); res = feature_learner(learn, *args, **kwargs); spent.append(time.perf_counter() - t0)
        workers.append(res.dls.train.fake_l.num_workers)
        return res
    feature_learner, xl.feature_learner = xl.feature_learner, timed
    try: run = train(out=tmp/'run', source=csv, arch=a.arch, frozen=True, aug=False, epochs=a.feature_epochs, bs=a.bs,
                     size=a.size, pretrained=False, num_workers=a.num_workers)
    finally: xl.feature_learner = feature_learner
    hist = pd.read_csv(run/'history.csv')
    assert load_json(run/'config.json')['cached_features'], 'train() did not use cached features'
    first = spent[0] + hist.seconds.iloc[0]
    later = hist.seconds.iloc[1:].mean()
    return dict(rate=len(files) / first, first=first, extraction=spent[0], later=later, ratio=first / later, run=run,
                epochs=list(hist.seconds), n=len(files), head_workers=workers[0])


def fullres_rows(a, tmp:Path) -> tuple:
    "(6) The full-resolution sample, each file listed `a.repeat` times: rows without and with the presize cache."
    src = load_source(DATA/'chest_xray_fullres_sample')
    files = list(dict.fromkeys(src.df.item))
    # each file listed `repeat` times, so that one epoch holds a whole chunk (every listed file is still decoded each time)
    repeat = math.ceil((a.fullres_batches + 2) * a.bs / len(src.items('train')))
    big = XraySource(src.name, pd.concat([src.df] * repeat, ignore_index=True), valid_origin=src.valid_origin)
    t0 = time.perf_counter(); presize_cache(files, round(a.size * 1.15), tmp/'presize', src.name); build = time.perf_counter() - t0
    rows = {'uncached': PipelineOnly(a, big, False), 'cached': PipelineOnly(a, big, tmp/'presize')}
    if a.extras:
        for w in (0, 1, 2):
            if w != rows['cached'].workers: rows[f'cached_w{w}'] = PipelineOnly(a, big, tmp/'presize', num_workers=w)
        # without batch augmentation (what is left on the CPU when a GPU augments the batches)
        rows['uncached_noaug'], rows['cached_noaug'] = PipelineOnly(a, big, False, aug=False), PipelineOnly(a, big, tmp/'presize', aug=False)
    info = dict(build=build, build_n=len(files), n_train=len(big.items('train')), repeat=repeat,
                batch_tfms=batch_tfms_seconds(rows['cached'].dls.train))
    return rows, info


def predict_rate(a, run:Path, files, forward:Row) -> dict:
    "(7) `predict` over real JPEGs: the marginal rate of N more files, taking turns with forward-only chunks."
    try: from xray_fastai.predict import predict
    except ImportError: return dict(rate=None, note='xray_fastai.predict not available')
    n, marginal, e2e = a.predict_n, [], []
    fwd = Row(a.bs); fwd.run = forward.run  # forward-only steps timed in this window only
    for _ in range(a.rounds):
        times = {}
        for k in (n, 2 * n):
            t0 = time.perf_counter(); df = predict(run, files[:k], bs=a.bs); times[k] = time.perf_counter() - t0
            assert (df.error == '').all(), df.error.unique()
            fwd.chunk(max(1, a.batches // 2))
        marginal.append(times[2 * n] - times[n]); e2e.append(times[2 * n])
    return dict(rate=n * len(marginal) / sum(marginal), end_to_end=2 * n * len(e2e) / sum(e2e), forward=fwd.rate)


def _policy() -> str: return os.environ.get('OMP_WAIT_POLICY', '').upper() or 'ACTIVE'

def other_policy_rows(a, tmp:Path) -> dict:
    "Rows (1) and (3) again in a subprocess with the other OpenMP wait policy (PASSIVE: idle threads sleep, not spin)."
    out, policy = tmp/'policy.json', 'ACTIVE' if _policy() == 'PASSIVE' else 'PASSIVE'
    args = [sys.executable, __file__, '--rows', '1,3', '--no-extras', '--no-record', '--json', str(out), '--arch', a.arch,
            '--size', str(a.size), '--bs', str(a.bs), '--warmup', '1', '--batches', str(min(a.batches, 2)), '--rounds', '1']
    if a.threads: args += ['--threads', str(a.threads)]
    if a.num_workers is not None: args += ['--num-workers', str(a.num_workers)]
    env = {k: v for k, v in os.environ.items() if k != 'OMP_WAIT_POLICY'}
    subprocess.run(args, check=True, capture_output=True, env={**env, 'OMP_WAIT_POLICY': policy})
    return dict(json.loads(out.read_text()), policy=policy)


def cli_help() -> dict:
    "Wall time of `xray-fastai --help` and `xray-fastai train --help` in a subprocess, best of 3."
    exe = shutil.which('xray-fastai', path=str(Path(sys.executable).parent)) or shutil.which('xray-fastai')
    res = {}
    for args in ([], ['train']):
        best = float('inf')
        for _ in range(3):
            t0 = time.perf_counter()
            subprocess.run([exe, *args, '--help'], check=True, capture_output=True)
            best = min(best, time.perf_counter() - t0)
        res[' '.join(['xray-fastai', *args, '--help'])] = best
    return res


# --- machine and report ---------------------------------------------------------------------------------------

def machine() -> dict:
    cpu = next((l.split(':', 1)[1].strip() for l in Path('/proc/cpuinfo').read_text().splitlines()
                if l.startswith('model name')), platform.processor())
    import fastai
    return dict(cores=os.cpu_count(), cpu=cpu, gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else '',
                torch=torch.__version__, fastai=fastai.__version__, torch_threads=torch.get_num_threads(),
                omp_wait_policy=os.environ.get('OMP_WAIT_POLICY', '(unset: ACTIVE)'),
                python=platform.python_version())


def _verdict(ratio, minimum, lower_better=False) -> str:
    if ratio is None: return 'not measured'
    ok = ratio < minimum if lower_better else ratio >= minimum
    return 'met' if ok else 'MISSED'


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--arch', default='resnet34'); p.add_argument('--size', type=int, default=224)
    p.add_argument('--bs', type=int, default=16)
    p.add_argument('--warmup', type=int, default=2, help='untimed steps when a row starts (each turn also drops its first step)')
    p.add_argument('--rounds', type=int, default=3, help='turns every row takes (rows 1-4, 6, 7)')
    p.add_argument('--batches', type=int, default=3, help='timed training batches per row and turn')
    p.add_argument('--num-workers', type=int, default=None, help="xray-fastai DataLoader workers (default: the library's)")
    p.add_argument('--feature-n', type=int, default=160, help='images in the cached-features run (row 5)')
    p.add_argument('--feature-epochs', type=int, default=4)
    p.add_argument('--fullres-batches', type=int, default=8, help='timed batches per full-res pipeline row and turn (row 6)')
    p.add_argument('--predict-n', type=int, default=32, help='images per predict call (row 7: N and 2N)')
    p.add_argument('--rows', default='1,2,3,4,5,6,7,help', help='rows to run, e.g. 1,3,help')
    p.add_argument('--no-extras', dest='extras', action='store_false',
                   help='skip the diagnostic variants (other worker counts, the proposed feature_learner fix, the other OpenMP wait policy)')
    p.add_argument('--quick', action='store_true', help='smoke run: 64 px, 1 round, small subsets')
    p.add_argument('--threads', type=int, default=None, help="torch intra-op threads (default: torch's, the cores)")
    p.add_argument('--json', default=None, help='also write the measured rates to this JSON file')
    p.add_argument('--out', default=str(REPO/'bench'/'RESULTS.md')); p.add_argument('--no-record', action='store_true')
    a = p.parse_args(argv)
    if a.quick: a.__dict__.update(size=64, warmup=1, rounds=1, batches=2, feature_n=48, feature_epochs=2, fullres_batches=4, predict_n=16)
    rows = set(a.rows.split(','))
    if a.threads: torch.set_num_threads(a.threads)
    load_start, t_start, started = os.getloadavg(), time.perf_counter(), datetime.datetime.now()
    mach = machine()
    print(f"machine: {mach}\nload average at start: {load_start}", flush=True)
    src = load_source(DATA/'chest_xray_224')
    files = list(src.items('train').item.sample(frac=1, random_state=0))
    tmp = Path(tempfile.mkdtemp(prefix='xray-bench-'))
    os.environ['XRAY_FASTAI_DATA'] = str(tmp/'data')  # never write into the user's dataset cache
    R, turns = {}, {}

    def show(label, rate, extra=''):
        M = R.get('model')
        ratio = f"{rate / M:6.2f}x (1)" if M and rate else ' ' * 11
        print(f"{label:<60} {rate:9.2f} img/s  {ratio}  {extra}" if rate else f"{label:<60} not measured  {extra}", flush=True)

    try:
        # rows 1-4 and forward-only take turns, so that the machine's drift hits them alike
        if rows - {'help'}: turns['model'] = ModelOnly(a, files)  # every ratio is to row 1
        if '2' in rows: turns['seed'] = SeedLoop(a)
        if '3' in rows:
            turns['finetune'] = FastaiFit(a, src, frozen=False)
            if a.extras and turns['finetune'].dls.train.fake_l.num_workers: turns['finetune_w0'] = FastaiFit(a, src, False, num_workers=0)
        if '4' in rows: turns['fixed'] = FastaiFit(a, src, frozen=True)
        if rows & {'4', '7'}: turns['forward'] = ModelOnly(a, files, train=False)
        for row in turns.values(): row.warm(a.warmup)
        print(f"rows 1-4 and forward-only: {a.rounds} turns of {a.batches} timed batches each", flush=True)
        take_turns(turns, a.rounds, a.batches)
        for k, row in turns.items():
            if isinstance(row, FastaiFit): row.close()
            R[k] = row.rate
        labels = dict(model='(1) model only: fwd+bwd+step, in-memory tensors', seed='(2) seed-style loop (ImageFolder, CPU tfms, 2 workers)',
                      finetune='(3) xray-fastai fine-tune, learn.fit', finetune_w0='    same, num_workers=0',
                      fixed='(4) xray-fastai fixed-feature, aug on, learn.fit', forward='    forward only (eval, inference_mode), in-memory')
        for k, row in turns.items():
            show(labels[k], row.rate, f"data wait {row.wait_share:.0%}" if k in ('seed', 'finetune', 'finetune_w0', 'fixed') else '')
        if '5' in rows:
            r = R['features'] = cached_features(a, files[:a.feature_n], tmp)
            print(f"(5) cached features, {r['n']} images: epoch 1 {r['first']:.2f} s (extraction {r['extraction']:.2f} s + "
                  f"head {r['epochs'][0]:.2f} s), later epochs {r['later']:.3f} s -> {r['ratio']:.1f}x faster "
                  f"(head DataLoaders: {r['head_workers']} workers)", flush=True)
        if '6' in rows:
            pipes, info = fullres_rows(a, tmp)
            R['fullres_info'] = info
            for row in pipes.values(): row.warm(a.warmup)
            print(f"(6) full-res presize cache build: {info['build']:.2f} s for {info['build_n']} files; "
                  f"{a.rounds} turns of {a.fullres_batches} batches", flush=True)
            take_turns(pipes, a.rounds, a.fullres_batches)
            for k, row in pipes.items():
                R['fullres_' + k], R['fullres_' + k + '_workers'] = row.rate, row.workers
                show(f"(6) full-res train pipeline, {k} (no model)", row.rate,
                     f"workers {row.workers}; {row.rate / pipes['uncached'].rate:.1f}x uncached")
            del pipes; gc.collect()
        if '7' in rows:
            run = R.get('features', {}).get('run')
            if run is None:
                b = argparse.Namespace(**{**a.__dict__, 'feature_epochs': 1})
                run = cached_features(b, files[:32], tmp)['run']
            r = R['predict'] = predict_rate(a, run, files, turns['forward'])
            show('(7) predict(): marginal rate of N more files', r['rate'],
                 f"{r['rate'] / r['forward']:.2f}x forward-only (same window)" if r['rate'] else r.get('note', ''))
            if r['rate']:
                show('    predict(): end to end (2N files, incl. model load)', r['end_to_end'])
                show('    forward only, in the same window', r['forward'])
        if 'help' in rows:
            R['help'] = cli_help()
            for k, v in R['help'].items(): print(f"{k:<60} {v:9.3f} s (best of 3)", flush=True)
        if a.extras and {'1', '3'} <= rows:
            r = R['policy'] = other_policy_rows(a, tmp)
            show(f"(1) model only, OMP_WAIT_POLICY={r['policy']} (subprocess)", r['model'])
            show(f"(3) fine-tune, OMP_WAIT_POLICY={r['policy']} (subprocess)", r['finetune'])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    load_end, wall = os.getloadavg(), time.perf_counter() - t_start
    print(f"load average at end: {load_end}; wall {wall:.0f} s")
    if a.json: Path(a.json).write_text(json.dumps({k: v for k, v in R.items() if isinstance(v, float)}))
    md = report(a, mach, R, turns, started, load_start, load_end, wall)
    print(md)
    if not a.no_record: append_results(a.out, md)


def append_results(out, md:str):
    "Append the section `md` to the results file `out` (created with a title if needed)."
    out = Path(out)
    head = '' if out.exists() else '# xray-fastai benchmark results\n\nAppended by `bench/throughput.py` and `bench/experiment_time.py`; see bench/README.md.\n'
    with open(out, 'a') as f: f.write(head + md)
    print(f"appended to {out}")


def report(a, mach, R, turns, started, load_start, load_end, wall) -> str:
    "The dated Markdown section for bench/RESULTS.md: every rate, its ratio to (1), and each target's verdict."
    M = R.get('model')
    fmt = lambda v: f"{v:.2f}" if v else '-'
    rat = lambda v: f"{v / M:.2f}x" if v and M else '-'
    ms = lambda s: f"{s * 1e3:.0f} ms"
    spread = lambda k: (lambda rs: f"per turn {min(rs):.2f}-{max(rs):.2f}x")(
        [x / m for x, m in zip(turns[k].round_rates(a.batches), turns['model'].round_rates(a.batches))])
    L = [f"\n## {started:%Y-%m-%d %H:%M} — {a.arch}, {a.size} px, batch {a.bs}{' (QUICK smoke run: not a result)' if a.quick else ''}\n",
         f"- command: `{'OMP_WAIT_POLICY=' + os.environ['OMP_WAIT_POLICY'] + ' ' if 'OMP_WAIT_POLICY' in os.environ else ''}"
         f"python bench/throughput.py {' '.join(sys.argv[1:])}`",
         f"- machine: {mach['cores']} cores, CPU `{mach['cpu']}`; GPU: {mach['gpu'] or '— (not available on this machine)'}; "
         f"torch {mach['torch']} ({mach['torch_threads']} intra-op threads, OMP_WAIT_POLICY {mach['omp_wait_policy']}), "
         f"fastai {mach['fastai']}, Python {mach['python']}",
         f"- load average (1/5/15 min): at start {tuple(round(x, 2) for x in load_start)}, at end "
         f"{tuple(round(x, 2) for x in load_end)} (other processes share these {mach['cores']} cores); wall time {wall:.0f} s",
         f"- timing: rows 1-4 and forward-only took {a.rounds} turns of {a.batches} timed batches each ({a.warmup} untimed steps "
         "when a row starts, one more at each turn); real images (chest_xray_224, chest_xray_fullres_sample); pretrained=False\n",
         "| row | images/s | vs (1) | notes |", "| --- | ---: | ---: | --- |"]
    add = lambda name, v, note='': L.append(f"| {name} | {fmt(v)} | {rat(v)} | {note} |")
    if 'model' in turns: add('(1) model only: fwd+bwd+step on in-memory tensors (Adam, CE)', M,
                             f"{turns['model'].note}; per turn {', '.join(f'{x:.2f}' for x in turns['model'].round_rates(a.batches))} img/s")
    names = dict(seed='(2) seed-style loop', finetune='(3) xray-fastai fine-tune, `learn.fit`',
                 finetune_w0='(3) same, num_workers=0 (diagnostic)', fixed='(4) xray-fastai fixed-feature, aug on, `learn.fit`')
    for k, name in names.items():
        if k not in turns: continue
        row, note = turns[k], f"{turns[k].note}; data wait {turns[k].wait_share:.0%} of wall time; {spread(k)}"
        if getattr(row, 'batch_tfms', None): note += f"; batch tfms {ms(row.batch_tfms)}/batch"
        add(name, R[k], note)
    if 'forward' in turns: add('forward only (eval, `inference_mode`, in-memory tensors)', R['forward'], spread('forward'))
    if 'features' in R:
        r, name = R['features'], '(5) cached features'
        add(f"{name}: epoch 1 (extraction + head)", r['rate'],
            f"{r['n']} images: {r['first']:.2f} s = extraction {r['extraction']:.2f} s + head epoch {r['epochs'][0]:.3f} s")
        L.append(f"| {name}: later epochs | {r['n'] / r['later']:.0f} | {rat(r['n'] / r['later'])} | "
                 f"{r['later']:.3f} s/epoch (history.csv seconds: {', '.join(f'{s:.3f}' for s in r['epochs'])}); "
                 f"**{r['ratio']:.1f}x** faster than epoch 1; head DataLoaders with {r['head_workers']} workers |")
    if 'fullres_info' in R:
        i, u = R['fullres_info'], R['fullres_uncached']
        add('(6) full-res pipeline, uncached', u, f"train DataLoader alone, {i['n_train']} items/epoch "
            f"(the 23 files x {i['repeat']}, patient-grouped split), {R['fullres_uncached_workers']} workers")
        add('(6) full-res pipeline, presize cache', R['fullres_cached'],
            f"{R['fullres_cached_workers']} workers; **{R['fullres_cached'] / u:.1f}x** uncached; one-time build {i['build']:.2f} s "
            f"for {i['build_n']} files; batch tfms (aug on the CPU) {ms(i['batch_tfms'])}/batch")
        for w in (0, 1, 2):
            if f'fullres_cached_w{w}' in R:
                add(f"(6) presize cache, num_workers={w} (diagnostic)", R[f'fullres_cached_w{w}'], f"{R[f'fullres_cached_w{w}'] / u:.1f}x uncached")
        if 'fullres_cached_noaug' in R:
            un, cn = R['fullres_uncached_noaug'], R['fullres_cached_noaug']
            add('(6) uncached, aug off (diagnostic)', un, f"{R['fullres_uncached_noaug_workers']} workers; item resize to {a.size} px, no batch augmentation")
            add('(6) presize cache, aug off (diagnostic)', cn, f"{R['fullres_cached_noaug_workers']} workers; **{cn / un:.1f}x** the uncached aug-off row")
    if 'predict' in R:
        r = R['predict']
        if r['rate']:
            add('(7) `predict()`, marginal rate (N more files)', r['rate'],
                f"N={a.predict_n}, bs {a.bs}, {a.rounds} turns; **{r['rate'] / r['forward']:.2f}x** forward-only of the same window")
            add('(7) `predict()`, end to end (2N files)', r['end_to_end'], 'includes loading the model and the first batch')
            add('forward only, measured between the predict calls', r['forward'])
        else: L.append(f"| (7) predict() | - | - | {r['note']} |")
    if 'policy' in R:
        r = R['policy']
        add(f"(1) model only, OMP_WAIT_POLICY={r['policy']} (diagnostic, subprocess)", r['model'])
        add(f"(3) fine-tune, OMP_WAIT_POLICY={r['policy']} (diagnostic, subprocess)", r['finetune'],
            f"{r['finetune'] / r['model']:.2f}x the row (1) of the same subprocess")
    if 'help' in R:
        for k, v in R['help'].items(): L.append(f"| `{k}` | {v:.3f} s | | subprocess wall time, best of 3 |")

    L += ['', '| target | measured | verdict |', '| --- | ---: | --- |']
    def tgt(t, v, minimum, lower=False):
        L.append(f"| {t} | {v:.2f} | {_verdict(v, minimum, lower)} |" if v is not None else f"| {t} | - | not measured |")
    if M and 'finetune' in R: tgt('fine-tune >= 0.95x model-only', R['finetune'] / M, 0.95)
    if M and 'fixed' in R: tgt('fixed-feature >= 2.5x model-only', R['fixed'] / M, 2.5)
    if 'features' in R: tgt('cached features: every later epoch >= 20x faster than epoch 1',
                            R['features']['first'] / max(R['features']['epochs'][1:]), 20)
    if 'fullres_info' in R:
        tgt('full-res: presize cache >= 10x uncached', R['fullres_cached'] / R['fullres_uncached'], 10)
        if M: tgt('full-res: presize cache >= 5x model-only', R['fullres_cached'] / M, 5)
    if 'predict' in R and R['predict']['rate']: tgt('predict >= 0.9x forward-only', R['predict']['rate'] / R['predict']['forward'], 0.9)
    if 'help' in R:
        for k, v in R['help'].items(): tgt(f"`{k}` < 1 s", v, 1, lower=True)
    return '\n'.join(L) + '\n'


if __name__ == '__main__': main()
