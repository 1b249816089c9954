"""One optimiser step of fastai's `Adam`, `FusedAdam` (what `xray_learner` uses) and torch's Adam, plain, foreach and fused (issue 17).

    python bench/optimizer_step.py            # resnet18 and resnet34, the CPU; prints only
    python bench/optimizer_step.py --fit      # and one epoch of the pneumoniamnist recipe with each
    python bench/optimizer_step.py --divergence  # only: how far runs of the recipe drift apart in 1-20 steps
    python bench/optimizer_step.py --agreement   # only: FusedAdam against fastai's step from the same state, 16 steps
    python bench/optimizer_step.py --zero-grad   # only: a resnet34 224 px bf16 step, gradients zeroed against dropped

Random gradients on every parameter; each optimiser takes 2 warm-up steps, then 5 rounds of 5 steps, taking turns;
the range of the rounds' milliseconds per step is printed. `--fit`: the recipe's `Learner` (real data, 28 px) fits one
epoch with fastai's `Adam` and with `FusedAdam`, taking turns, twice; wall seconds a fit. `--divergence`: the recipe
trained for 1, 2, 5, 10 and 20 steps (real batches, its augmentation and schedule) with fastai's step on 1 and on 2 threads and with
`FusedAdam` on 1 thread: for each pair, the largest over parameters of max|a - b| / max|a|, and the distance between the two
runs' weights over how far training moved them, |a - b| / |a - start|. `--agreement`: at each of the recipe's first 16
steps, fastai's step is applied to a copy of what `FusedAdam` was given (weights, gradients, state, hyper-parameters);
the largest difference between the two new weights, over the step's largest update, is printed. `--zero-grad`: a whole
training step (forward under bf16 autocast, channels_last, backward, `FusedAdam`) ending in fastai's `zero_grad` (zeros)
or `FusedAdam.zero_grad` (dropped), taking turns, 6 rounds of 2 steps each."""
import statistics, sys, tempfile, time, warnings
from pathlib import Path
import torch
from fastai.optimizer import Adam
from fastai.callback.core import Callback, CancelFitException

warnings.filterwarnings('ignore')
from xray_fastai.models import build_model
from xray_fastai.optimizer import FusedAdam
from xray_fastai.config import RunConfig
from xray_fastai.learner import _build

DATA = Path(__file__).resolve().parents[2]/'shared'/'data'/'pneumoniamnist.npz'

def step_ms(arch:str, rounds:int=5, steps:int=5) -> dict:
    torch.manual_seed(0)
    ps = list(build_model(arch, pretrained=False).parameters())
    for p in ps: p.grad = torch.randn_like(p) * 1e-3
    opts = {'fastai Adam': Adam(ps, lr=1e-3), 'FusedAdam': FusedAdam(ps, lr=1e-3), 'torch Adam': torch.optim.Adam(ps, lr=1e-3),
            'torch Adam foreach': torch.optim.Adam(ps, lr=1e-3, foreach=True),
            'torch Adam fused': torch.optim.Adam(ps, lr=1e-3, fused=True)}
    for o in opts.values(): o.step(); o.step()
    res = {k: [] for k in opts}
    for _ in range(rounds):
        for k, o in opts.items():
            t0 = time.perf_counter()
            for _ in range(steps): o.step()
            res[k].append((time.perf_counter() - t0) / steps * 1000)
    return dict(params=sum(p.numel() for p in ps), ms=res)

def fit_seconds(rounds:int=2) -> dict:
    "Wall seconds of one `fit_one_cycle` epoch of the pneumoniamnist recipe with each optimiser, taking turns."
    learn = _build(RunConfig.from_recipe('pneumoniamnist', source=str(DATA), epochs=1), Path(tempfile.mkdtemp()))
    res = {'fastai Adam': [], 'FusedAdam': []}
    for _ in range(rounds):
        for name, opt_func in (('fastai Adam', Adam), ('FusedAdam', FusedAdam)):
            learn.opt_func, learn.opt = opt_func, None
            t0 = time.perf_counter(); learn.fit_one_cycle(1, 3e-3); res[name].append(time.perf_counter() - t0)
    return res


class StopAfter(Callback):
    "End the fit after `n` training batches."
    def __init__(self, n:int): self.n = n
    def after_batch(self):
        if self.training and self.iter + 1 >= self.n: raise CancelFitException()

def recipe_weights(steps:int, fused:bool, threads:int) -> tuple:
    "The pneumoniamnist recipe's weights before and after `steps` training steps (its seed and schedule) on `threads` threads."
    torch.set_num_threads(threads)
    c = RunConfig.from_recipe('pneumoniamnist', source=str(DATA), fused_step=fused)
    learn = _build(c, Path(tempfile.mkdtemp()))
    start = torch.cat([p.detach().flatten() for p in learn.model.parameters()])
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(c.epochs, c.lr, cbs=StopAfter(steps))
    return start, [p.detach().clone() for p in learn.model.parameters()]

def distances(start, a:list, b:list) -> tuple:
    "The largest, over parameters, of max|a - b| / max|a|; and |a - b| / |a - start| over all weights."
    flat_a, flat_b = torch.cat([x.flatten() for x in a]), torch.cat([x.flatten() for x in b])
    return (max(((x - y).abs().max() / x.abs().max()).item() for x, y in zip(a, b)),
            ((flat_a - flat_b).norm() / (flat_a - start).norm()).item())

def divergence(steps=(1, 2, 5, 10, 20)) -> dict:
    "For each number of steps: fastai's step on 1 against 2 threads, and fastai's step against `FusedAdam` (1 thread each)."
    res = {}
    for n in steps:
        (start, fastai1), (_, fastai2), (_, fused1) = [recipe_weights(n, f, t) for f, t in ((False, 1), (False, 2), (True, 1))]
        res[n] = {'fastai 1 vs 2 threads': distances(start, fastai1, fastai2), 'fastai vs FusedAdam': distances(start, fastai1, fused1)}
    return res

class CompareSteps(Callback):
    "At each training step of a `FusedAdam` learner, fastai's step from the same state; prints the largest difference."
    def before_step(self):
        copy = lambda v: v.clone() if torch.is_tensor(v) else v
        self.before = [(p.detach().clone(), p.grad.clone(), {k: copy(v) for k, v in state.items()}, dict(hyper))
                       for p, _, state, hyper in self.opt.all_params(with_grad=True)]
    def after_step(self):
        worst = 0.
        for (w, g, state, hyper), (p, *_) in zip(self.before, self.opt.all_params(with_grad=True)):
            q = w.clone().requires_grad_(); q.grad = g
            ref = Adam([q], lr=1.); ref.hypers, ref.state[q] = [hyper], state
            ref.step()
            worst = max(worst, ((q - p).abs().max() / (q - w).abs().max().clamp_min(1e-30)).item())
        print(f"step {self.iter}: lr {hyper['lr']:.2e}, largest difference / largest update {worst:.1e}", flush=True)

def agreement():
    torch.set_num_threads(1)
    c = RunConfig.from_recipe('pneumoniamnist', source=str(DATA), fused_step=True)
    learn = _build(c, Path(tempfile.mkdtemp()))
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(c.epochs, c.lr, cbs=[CompareSteps(), StopAfter(16)])

def zero_grad_ms(rounds:int=6, steps:int=2) -> dict:
    "Milliseconds a resnet34 training step (224 px, batch 16, bf16 + channels_last) ending in each `zero_grad`."
    from fastai.optimizer import Optimizer
    torch.manual_seed(0)
    m = build_model('resnet34', pretrained=False).to(memory_format=torch.channels_last)
    opt = FusedAdam(list(m.parameters()), lr=1e-4)
    x, y = torch.randn(16, 1, 224, 224).contiguous(memory_format=torch.channels_last), torch.randint(0, 2, (16,))
    ways = {'zeroed (fastai)': lambda: Optimizer.zero_grad(opt), 'dropped (FusedAdam)': opt.zero_grad}
    def step(zero_grad):
        with torch.autocast('cpu', dtype=torch.bfloat16): out = m(x)
        torch.nn.functional.cross_entropy(out.float(), y).backward(); opt.step(); zero_grad()
    for z in ways.values(): step(z); step(z)
    res = {k: [] for k in ways}
    for _ in range(rounds):
        for k, z in ways.items():
            t0 = time.perf_counter()
            for _ in range(steps): step(z)
            res[k].append((time.perf_counter() - t0) / steps * 1000)
    return res

if __name__ == '__main__':
    if '--zero-grad' in sys.argv[1:]:
        for k, v in zero_grad_ms().items(): print(f"{k}: median {statistics.median(v):.0f} ms, {min(v):.0f}-{max(v):.0f} ms a step")
        sys.exit()
    if '--agreement' in sys.argv[1:]: agreement(); sys.exit()
    if '--divergence' in sys.argv[1:]:
        print("| steps | fastai 1 vs 2 threads: largest param / all weights | fastai vs FusedAdam: largest param / all weights |")
        print("| ---: | ---: | ---: |")
        for n, d in divergence().items(): print(f"| {n} | " + ' | '.join(f"{a:.1e} / {b:.1e}" for a, b in d.values()) + " |", flush=True)
        sys.exit()
    for arch in ('resnet18', 'resnet34'):
        r = step_ms(arch)
        print(f"{arch}, {r['params'] / 1e6:.1f}M parameters: " +
              ', '.join(f"{k} {min(v):.0f}-{max(v):.0f} ms" for k, v in r['ms'].items()), flush=True)
    if '--fit' in sys.argv[1:]:
        r = fit_seconds()
        print("pneumoniamnist recipe (resnet18, 28 px, bs 64), one epoch: " +
              ', '.join(f"{k} {' '.join(f'{v:.1f}' for v in vs)} s" for k, vs in r.items()), flush=True)
