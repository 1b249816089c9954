"""Label-free variants of the final `--recipe pneumoniamnist` runs: each measured on site sample A, the best on A
(by a rule fixed before B is read) evaluated once on half B.

    python bench/site_variants.py RUN [RUN ...]            # the final runs of `bench/generalisation.py final`

The variants need no labels from the site: AdaBN re-estimates BatchNorm statistics on the evaluated images
themselves (`--adabn same`), prior correction re-weights by the class prior EM estimates on them, and the
validation-chosen threshold (recall >= 0.95 on validation) uses no site labels. The rule: the variant with the
highest mean accuracy on A over the runs; ties go to the simpler (earlier) variant. Only that one is evaluated
on B, once. Results are printed as Markdown (appended to bench/GENERALISATION.md by hand).
"""
import argparse, sys
from pathlib import Path

import numpy as np
from xray_fastai.evaluate import evaluate

DATA = Path(__file__).resolve().parents[2]/'shared'/'data'
A, B = DATA/'pneumoniamnist_site_A', DATA/'pneumoniamnist_site_B'
# name -> (evaluate's options, which of its results: 'default' at 0.5, 'chosen' at the validation-chosen threshold)
VARIANTS = {
    'plain, threshold 0.5': (dict(), 'default'),
    'plain, threshold chosen on validation': (dict(), 'chosen'),
    'AdaBN, threshold 0.5': (dict(adabn='same'), 'default'),
    'AdaBN + prior correction, threshold 0.5': (dict(adabn='same', prior_correction=True), 'default'),
}
KEYS = ('accuracy', 'roc_auc', 'specificity', 'recall')

def measure(runs, source, options, which) -> list:
    "The metrics of every run on `source` with `options`, at `which` threshold."
    return [evaluate(r, source=str(source), split='test', **options)[which] for r in runs]

def row(name, ms) -> str:
    cells = [f"{np.mean([m[k] for m in ms]):.3f} ± {np.std([m[k] for m in ms]):.3f}" for k in KEYS]
    return f"| {name} | " + ' | '.join(cells) + ' |'

def main(runs):
    head = '| variant | ACC | AUC | specificity | recall |\n| --- | ---: | ---: | ---: | ---: |'
    on_a = {name: measure(runs, A, *v) for name, v in VARIANTS.items()}
    print(f"On site sample A ({len(runs)} runs; threshold rules use no A labels):\n\n{head}")
    for name, ms in on_a.items(): print(row(name, ms))
    chosen = max(on_a, key=lambda n: np.mean([m['accuracy'] for m in on_a[n]]))  # dicts keep order: ties go to the first
    print(f"\nChosen on A: {chosen}. On half B, once:\n\n{head}")
    print(row(chosen, measure(runs, B, *VARIANTS[chosen])))

if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('runs', nargs='+', type=Path)
    main(p.parse_args().runs)
