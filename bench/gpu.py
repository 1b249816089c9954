"""The GPU rows of issue 17, as one prepared script for a session that is lent a GPU (it has not run on one yet).

    python bench/gpu.py                                 # cuda: resnet34, 224 px, batch 64; appends to bench/RESULTS.md
    python bench/gpu.py --device cpu --quick --no-record  # smoke run of the same code on the CPU: not a result

Side by side, taking turns (see bench/README.md): model-only loops (forward, backward, Adam step on real images already
on the device) in float32 and in bf16 autocast + channels_last, and the library's fine-tuning (`xray_learner`, library
defaults, augmentation on the GPU) with `--precision auto` and `fp32`. Targets: fine-tune `auto` >= 0.8x its model-only
row (bf16 + channels_last); the model-only rate set against timm's published resnet34 training rate, about 2,000 img/s
at 224 px with AMP and channels_last on an RTX 3090. Every step ends with `torch.cuda.synchronize()`, so that a step is
timed when the GPU has done it, not when it was queued.

On the project's device machine: its image has Python 3.12, torch, torchvision, timm and typer, but not fastai nor some
of what fastai imports (fastprogress's python-fasthtml among them), and `../shared/data` does not travel.
`bash bench/gpu_carry.sh` builds `.gpu/` here (the data, and those packages as Python 3.12 wheels, 45 MB in all) and
prints the one `run` command that installs them there and runs this script."""
from __future__ import annotations
import argparse, datetime, sys, time, warnings
from pathlib import Path

warnings.filterwarnings('ignore', category=FutureWarning)
import torch
sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import DATA, Row, ClockCallback, ModelOnly, take_turns, machine, append_results, _verdict, REPO
from xray_fastai.data import load_source, xray_dataloaders
from xray_fastai.learner import xray_learner
from xray_fastai.precision import autocast_to

TIMM_RESNET34_IMG_S = 2000  # timm's resnet34 training rate, 224 px, AMP + channels_last, RTX 3090 (issue 17)


def synced(device):
    "A function that waits for `device` to finish its queued work (nothing on a CPU)."
    return torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)


class SyncedClock(ClockCallback):
    "`ClockCallback` that waits for the GPU before it stamps the end of a step."
    def __init__(self, clock, sync): super().__init__(clock); self.sync = sync
    def after_batch(self):
        if self.training: self.sync()
        super().after_batch()


class DeviceModel(ModelOnly):
    "Model-only loop on `device`: `precision` autocast, channels_last or not; batches already on the device."
    def __init__(self, a, files, device, precision='fp32', channels_last=False):
        super().__init__(a, files)
        self.device, self.precision, self.cl, self.sync = device, precision, channels_last, synced(device)
        self.model = self.model.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-3)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        batches = [next(self.batches) for _ in range(4)]
        self.batches = [(x.to(device).contiguous(memory_format=fmt), y.to(device)) for x, y in batches]
        self.info = dict(precision=precision, memory_format='channels_last' if channels_last else 'contiguous', device=str(device))
    def run(self, clock):
        clock.start()
        while True:
            for xb, yb in self.batches:
                clock.got_batch()
                with autocast_to(self.precision, self.device.type): out = self.model(xb)
                self.loss_func(out.float(), yb).backward(); self.opt.step(); self.opt.zero_grad()
                self.sync()
                if clock.step_done(): return


class DeviceFit(Row):
    "`xray_learner(...).fit(1)` on `device` at a `precision` (library defaults, augmentation on), stopped after the timed batches."
    def __init__(self, a, src, device, precision):
        super().__init__(a.bs)
        self.dls = xray_dataloaders(src, size=a.size, bs=a.bs, device=device)
        self.learn = xray_learner(self.dls, a.arch, pretrained=False, precision=precision)
        self.info, self.sync = self.learn.precision_info, synced(device)
    def run(self, clock): self.learn.fit(1, 1e-3, cbs=SyncedClock(clock, self.sync))


def report(a, mach, rows, res, started, wall) -> str:
    best = max(res['model fp32'], res['model bf16+cl'])
    fast = res['model bf16+cl']
    L = [f"\n## {started:%Y-%m-%d %H:%M} — GPU (bench/gpu.py): {a.arch}, {a.size} px, batch {a.bs}, device {a.device}"
         f"{' (QUICK smoke run: not a result)' if a.quick else ''}\n",
         f"- command: `python bench/gpu.py {' '.join(sys.argv[1:])}`",
         f"- machine: {mach['cores']} cores, {mach['cpu']}, GPU {mach['gpu'] or 'none'}; torch {mach['torch']}, fastai {mach['fastai']}",
         f"- {a.rounds} rounds of {a.batches} timed steps per row, after {a.warmup} warm-up steps; wall {wall:.0f} s", '',
         '| row | img/s | x model-only fp32 (per-turn range) | x model-only bf16+cl |', '| --- | ---: | ---: | ---: |']
    for k, r in rows.items():
        s = [x / m for x, m in zip(r.round_rates(a.batches), rows['model fp32'].round_rates(a.batches))]
        L.append(f"| {k} ({', '.join(r.info.values())}) | {res[k]:.1f} | {res[k] / res['model fp32']:.2f}x "
                 f"({min(s):.2f}-{max(s):.2f}) | {res[k] / fast:.2f}x |")
    L += ['', '| target | measured | verdict |', '| --- | ---: | --- |',
          f"| fine-tune auto >= 0.8x model-only bf16+cl | {res['finetune auto'] / fast:.3f}x | {_verdict(res['finetune auto'] / fast, 0.8)} |",
          f"| fastest model-only row against timm's resnet34 (~{TIMM_RESNET34_IMG_S} img/s, RTX 3090, AMP + channels_last) | "
          f"{best:.0f} img/s ({best / TIMM_RESNET34_IMG_S:.2f}x) | - |", '']
    return '\n'.join(L)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--device', default='cuda'); p.add_argument('--arch', default='resnet34')
    p.add_argument('--size', type=int, default=224); p.add_argument('--bs', type=int, default=64)
    p.add_argument('--warmup', type=int, default=5); p.add_argument('--rounds', type=int, default=3); p.add_argument('--batches', type=int, default=20)
    p.add_argument('--data', default=str(DATA), help='the folder holding chest_xray_224 (default: ../shared/data)')
    p.add_argument('--quick', action='store_true'); p.add_argument('--no-record', action='store_true')
    p.add_argument('--out', default=str(REPO/'bench'/'RESULTS.md'))
    a = p.parse_args(argv)
    if a.quick: a.size, a.bs, a.warmup, a.rounds, a.batches = 64, 8, 1, 1, 2
    device = torch.device(a.device)
    if device.type == 'cuda' and not torch.cuda.is_available(): sys.exit("bench/gpu.py: no CUDA device here (--device cpu --quick for a smoke run)")
    torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels, as timm's benchmark does
    started, t0, log = datetime.datetime.now(), time.perf_counter(), lambda *x, **k: print(*x, **{**k, 'file': sys.stderr})
    data = Path(a.data)/'chest_xray_224'
    files = sorted((data/'train').rglob('*.jpeg'))
    src = load_source(data, verify=False)
    # fine-tune auto means bf16 + channels_last where the GPU supports bf16 (fp16 + channels_last where it does not)
    rows = {'model fp32': DeviceModel(a, files, device), 'model bf16+cl': DeviceModel(a, files, device, 'bf16', True),
            'finetune auto': DeviceFit(a, src, device, 'auto'), 'finetune fp32': DeviceFit(a, src, device, 'fp32')}
    for k, r in rows.items(): log(f"warming {k}", flush=True); r.warm(a.warmup)
    take_turns(rows, a.rounds, a.batches, log=log)
    md = report(a, machine(), rows, {k: r.rate for k, r in rows.items()}, started, time.perf_counter() - t0)
    print(md)
    if not a.no_record: append_results(a.out, md)


if __name__ == '__main__': main()
