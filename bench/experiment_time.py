"""Wall time of `xray_fastai.experiment.experiment` on PneumoniaMNIST 28 px: 2 architectures x {frozen, finetune}, 3 epochs each.

    python bench/experiment_time.py                 # appends a row to bench/RESULTS.md (target: < 6 min)
    python bench/experiment_time.py --epochs 1 --archs resnet18 --modes frozen --no-record   # smoke run

Runs with pretrained=False, the experiment's other defaults (augmentation on, evaluation on the test split), and the
project's copy of PneumoniaMNIST in ../shared/data (used as a user-supplied file: its MD5 differs from the official one)."""
from __future__ import annotations
import argparse, datetime, os, shutil, sys, tempfile, time, warnings
from pathlib import Path

warnings.filterwarnings('ignore', category=FutureWarning)
REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent/'shared'/'data'
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO/'bench'))
from throughput import machine, append_results

TARGET_S = 360


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--archs', default='resnet34,mobilenet_v2'); p.add_argument('--modes', default='frozen,finetune')
    p.add_argument('--epochs', type=int, default=3)
    p.add_argument('--out', default=str(REPO/'bench'/'RESULTS.md')); p.add_argument('--no-record', action='store_true')
    a = p.parse_args(argv)
    started, load_start = datetime.datetime.now(), os.getloadavg()
    try: from xray_fastai.experiment import experiment
    except ImportError: experiment = None
    if experiment is None:
        line = (f"\n## {started:%Y-%m-%d %H:%M} — experiment wall time\n\n| `experiment` ({a.archs} x {a.modes}, {a.epochs} epochs, "
                "PneumoniaMNIST 28 px) | not measured (experiment command not yet available) |\n")
    else:
        tmp = Path(tempfile.mkdtemp(prefix='xray-exp-'))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter('ignore')  # the shared copy's MD5 warning
                t0 = time.perf_counter()
                experiment('pneumoniamnist', archs=a.archs, modes=a.modes, out=tmp/'exp', epochs=a.epochs,
                           pretrained=False, data_dir=str(DATA))
                wall = time.perf_counter() - t0
        finally: shutil.rmtree(tmp, ignore_errors=True)
        load_end, mach = os.getloadavg(), machine()
        n = len(a.archs.split(',')) * len(a.modes.split(','))
        verdict = 'met' if wall < TARGET_S else 'MISSED'
        line = (f"\n## {started:%Y-%m-%d %H:%M} — experiment wall time\n\n"
                f"- command: `{'OMP_WAIT_POLICY=' + os.environ['OMP_WAIT_POLICY'] + ' ' if 'OMP_WAIT_POLICY' in os.environ else ''}"
                f"python bench/experiment_time.py {' '.join(sys.argv[1:])}`\n"
                f"- machine: {mach['cores']} cores, CPU `{mach['cpu']}`; GPU: {mach['gpu'] or '— (not available on this machine)'}; "
                f"torch {mach['torch']} ({mach['torch_threads']} intra-op threads, OMP_WAIT_POLICY {mach['omp_wait_policy']}), "
                f"fastai {mach['fastai']}\n"
                f"- load average (1/5/15 min): at start {tuple(round(x, 2) for x in load_start)}, "
                f"at end {tuple(round(x, 2) for x in load_end)}\n\n"
                f"| what | wall time | target | verdict |\n| --- | ---: | ---: | --- |\n"
                f"| `experiment.experiment`: {a.archs} x {a.modes} ({n} runs), {a.epochs} epochs each, PneumoniaMNIST 28 px, "
                f"train + evaluate + compare | {wall:.0f} s ({wall / 60:.1f} min) | < {TARGET_S // 60} min | {verdict} |\n")
    print(line)
    if not a.no_record: append_results(a.out, line)


if __name__ == '__main__': main()
