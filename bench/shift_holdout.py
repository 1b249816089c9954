"""Does holding out Kermany's earliest acquisitions reproduce PneumoniaMNIST's train → test gap? (bench/ACCURACY.md)

    python bench/shift_holdout.py OUT          # writes OUT/holdout.csv, trains, evaluates valid and the hold-out

Kermany's file names number patients and studies (`personN_...`, `IM-NNNN-...`, `NORMAL2-IM-NNNN-...`), and the
official test split holds the low numbers of each series (train's normal studies start at IM-0115 and
NORMAL2-IM-0383). So the lowest 12% of every series in train+val are held out as a 'test' split, a proxy for "earlier
acquisitions"; a patient-grouped tenth of the rest validates. The recipe then trains at 28 px, PneumoniaMNIST's size.
If the proxy showed the shift, the hold-out's specificity would fall as PneumoniaMNIST's test split's does (0.53-0.66
against 0.95 on validation)."""
from __future__ import annotations
import argparse, json, random, re, sys, warnings
from pathlib import Path
import pandas as pd

warnings.filterwarnings('ignore', category=FutureWarning)
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from xray_fastai.learner import train
from xray_fastai.evaluate import evaluate

SERIES = dict(person=r'person(\d+)_', normal2=r'NORMAL2-IM-(\d+)-', im=r'IM-(\d+)-')


def series_number(name:str) -> tuple:
    "(series, number) of a Kermany file name: the patient or study number within its series."
    for series, pat in SERIES.items():
        if m := re.match(pat, name): return series, int(m[1])
    raise ValueError(f"not a Kermany file name: {name}")


def holdout_csv(root:Path, out:Path, frac:float=0.12, valid_frac:float=0.1, seed:int=0) -> pd.DataFrame:
    "A path,label,split CSV of `root`'s train+val: the lowest `frac` of every series is 'test'."
    df = pd.DataFrame([dict(path=str(f), label=f.parent.name) for f in sorted(root.glob('*/*/*.jpeg'))])
    df['series'], df['number'] = zip(*(series_number(Path(p).name) for p in df.path))
    df['split'] = 'train'
    for _, g in df.groupby('series'): df.loc[g.index[g.number <= g.number.quantile(frac)], 'split'] = 'test'
    rest = df[df.split == 'train']
    groups = sorted(set(zip(rest.series, rest.number)))
    random.Random(seed).shuffle(groups)
    valid = set(groups[:round(len(groups)*valid_frac)])
    df.loc[[i for i, k in zip(rest.index, zip(rest.series, rest.number)) if k in valid], 'split'] = 'valid'
    df[['path', 'label', 'split']].to_csv(out, index=False)
    return df


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('out', type=Path)
    p.add_argument('--root', type=Path, default=REPO.parent/'shared'/'data'/'chest_xray_224')
    p.add_argument('--size', type=int, default=28)
    p.add_argument('--seed', type=int, default=42)
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    df = holdout_csv(a.root, a.out/'holdout.csv')
    print(df.groupby(['split', 'label']).size().to_string())
    run = train(out=a.out/'run', source=a.out/'holdout.csv', recipe='kermany', size=a.size, seed=a.seed)
    for split in ('valid', 'test'):
        d = evaluate(run, split=split)['default']
        print(split, json.dumps({k: round(d[k], 4) for k in ('loss', 'accuracy', 'roc_auc', 'specificity', 'recall')}))


if __name__ == '__main__': main()
