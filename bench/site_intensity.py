"""Per-image intensity of PneumoniaMNIST's train and validation splits and of site sample A, by class (issue 13: is the
shift in intensity?). Half B is not read: nothing is chosen on it.

    python bench/site_intensity.py       # prints only

For each split and class: the mean over images of each image's mean pixel and of its standard deviation (pixels in
[0, 1]), +- their spread across images. Per-image standardisation can only undo a shift that shows here."""
from pathlib import Path
import numpy as np
from PIL import Image

DATA = Path(__file__).resolve().parents[2]/'shared'/'data'

def summary(ims) -> str:
    x = ims.astype(np.float32) / 255
    m, s = x.mean((1, 2)), x.std((1, 2))
    return f"{len(x):5d} images: mean {m.mean():.3f} ± {m.std():.3f}, std {s.mean():.3f} ± {s.std():.3f}"

if __name__ == '__main__':
    d = np.load(DATA/'pneumoniamnist.npz')
    for split in ('train', 'val'):
        ims, ys = d[f'{split}_images'], d[f'{split}_labels'].ravel()
        for y, c in enumerate(('NORMAL', 'PNEUMONIA')): print(f"{split:7s} {c:9s} {summary(ims[ys == y])}")
    for c in ('NORMAL', 'PNEUMONIA'):
        files = sorted((DATA/'pneumoniamnist_site_A'/c).glob('*.png'))
        print(f"site A  {c:9s} {summary(np.stack([np.array(Image.open(f).convert('L')) for f in files]))}")
