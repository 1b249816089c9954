"""Where a fine-tune step's time goes beyond the model-only loop, and whether a DataLoader worker hides it (issue 17).

    python bench/finetune_overhead.py            # resnet34, 224 px, batch 16, `--precision auto`, chest_xray_224
    python bench/finetune_overhead.py --data     # only the data pipeline: a whole batch, its items, each batch transform

Prints (it does not record) the milliseconds per batch of `Learner.fit` split by fastai's events (data: from the end
of one step to the next batch; forward; loss; backward; optimiser step), beside the model-only step on a batch
already in memory (torch's Adam, as `bench/precision.py`'s rows), then the whole fit step with 0 and 1 DataLoader
workers, taking turns. Batches 3-10 of each fit are timed. `--data`: milliseconds per training batch of
`xray_dataloaders` (20 batches after 3), of its items and collation alone, and of each batch transform in turn, with
torch's `affine_grid` timed apart on the same batch shape; then one epoch of the 28 px pneumoniamnist training
DataLoader (items squished to 32 px) with `SquishResize` and with fastai's `Resize`, taking turns, twice."""
import argparse, time, warnings
from collections import defaultdict
from pathlib import Path
import torch
from fastai.callback.core import Callback, CancelFitException

warnings.filterwarnings('ignore')
DATA = Path(__file__).resolve().parents[2]/'shared'/'data'/'chest_xray_224'
from xray_fastai.data import load_source, xray_dataloaders
from xray_fastai.learner import xray_learner
from xray_fastai.precision import autocast_to

class PhaseClock(Callback):
    "Seconds between fastai's training events, summed over the timed batches; stops the fit after them."
    order = 100
    def __init__(self, skip=2, timed=8): self.skip, self.timed = skip, timed
    def before_fit(self): self.n, self.last, self.t = 0, None, defaultdict(float)
    def _mark(self, phase):
        now = time.perf_counter()
        if self.last is not None and self.n >= self.skip: self.t[phase] += now - self.last
        self.last = now
    def before_batch(self): self._mark('data')  # since the last step ended
    def after_pred(self): self._mark('forward')
    def after_loss(self): self._mark('loss')
    def before_step(self): self._mark('backward')
    def after_step(self): self._mark('step')
    def after_batch(self):
        self.n += 1
        if self.n == self.skip + self.timed: raise CancelFitException()
    def ms(self): return {k: v / self.timed * 1000 for k, v in self.t.items()}

def model_only_ms(learn, xb, yb, n=8) -> float:
    "The model-only step (autocast as `learn` trains, torch's Adam) on one batch in memory, ms per batch."
    m, opt = learn.model, torch.optim.Adam(learn.model.parameters(), lr=1e-3)
    prec = learn.precision_info['precision']
    if learn.precision_info['memory_format'] == 'channels_last': xb = xb.contiguous(memory_format=torch.channels_last)
    def step():
        with autocast_to(prec, 'cpu'): out = m(xb)
        torch.nn.functional.cross_entropy(out.float(), yb).backward(); opt.step(); opt.zero_grad()
    for _ in range(2): step()
    t0 = time.perf_counter()
    for _ in range(n): step()
    return (time.perf_counter() - t0) / n * 1000

def data_ms(dl, n:int=20) -> dict:
    "Milliseconds per batch: a whole batch of `dl`, its items and collation, and each of its batch transforms."
    def per_batch(f):
        f(); t0 = time.perf_counter()
        for _ in range(n): r = f()
        return r, (time.perf_counter() - t0) / n * 1000
    it = iter(dl); [next(it) for _ in range(3)]
    res = {'whole batch': per_batch(lambda: next(it))[1]}
    b, res['items + collation'] = per_batch(lambda: dl.do_batch([dl.do_item(i) for i in range(dl.bs)]))
    for t in dl.after_batch.fs: b, res[type(t).__name__] = per_batch(lambda: t(b))
    theta = torch.randn(dl.bs, 2, 3)
    res["  of which torch's affine_grid"] = per_batch(lambda: torch.nn.functional.affine_grid(theta, b[0].shape, align_corners=True))[1]
    return res

def resize_epoch_s(rounds:int=2) -> dict:
    "Seconds to iterate the 28 px recipe's training DataLoader once with each item resize, taking turns."
    from fastai.vision.all import Pipeline, Resize, ResizeMethod, ToTensor
    from xray_fastai.data import SquishResize
    dl = xray_dataloaders(load_source(DATA.parent/'pneumoniamnist.npz', verify=False), size=28, bs=64).train
    resizes, res = {'SquishResize': SquishResize(32), "fastai's Resize": Resize(32, ResizeMethod.Squish)}, {}
    for _ in range(rounds):
        for name, r in resizes.items():
            dl.after_item = Pipeline([r, ToTensor()], split_idx=0)
            t0 = time.perf_counter()
            for _ in dl: pass
            res.setdefault(name, []).append(time.perf_counter() - t0)
    return res

if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--arch', default='resnet34'); p.add_argument('--size', type=int, default=224)
    p.add_argument('--bs', type=int, default=16); p.add_argument('--rounds', type=int, default=2)
    p.add_argument('--data', action='store_true', help='only the data pipeline')
    a = p.parse_args()
    src = load_source(DATA, verify=False)
    if a.data:
        for k, v in data_ms(xray_dataloaders(src, size=a.size, bs=a.bs).train).items(): print(f"{k}: {v:.1f} ms/batch")
        for k, v in resize_epoch_s().items(): print(f"28 px recipe, one pass of the training DataLoader, {k}: " + ', '.join(f"{t:.2f} s" for t in v))
        raise SystemExit
    learners = {nw: xray_learner(xray_dataloaders(src, size=a.size, bs=a.bs, num_workers=nw), a.arch, pretrained=False)
                for nw in (0, 1)}
    print(f"{a.arch}, {a.size} px, batch {a.bs}: {learners[0].precision_info}")
    for r in range(a.rounds):
        for nw, learn in learners.items():
            clock = PhaseClock(); learn.fit(1, 1e-3, cbs=clock); ms = clock.ms(); total = sum(ms.values())
            line = f"round {r}, {nw} workers: fit {total:.0f} ms/batch (" + ', '.join(f"{k} {v:.0f}" for k, v in ms.items()) + ")"
            if nw == 0:
                xb, yb = (t.as_subclass(torch.Tensor) for t in learn.dls.one_batch())
                mo = model_only_ms(learn, xb, yb)
                line += f"; model-only {mo:.0f} ms/batch: fit at {mo / total:.3f}x model-only"
            print(line, flush=True)
