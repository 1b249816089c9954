"The presize cache of `xray_dataloaders`: same batches as without it, rebuilt when files or size change, off by default."
import os, shutil

import numpy as np
import pytest
import torch
from PIL import Image
from fastai.vision.all import defaults, set_seed

from xray_fastai.data import load_source, xray_dataloaders, presize_cache, PresizedReader

STATS = ([0.5], [0.25])  # fixed, so that both pipelines normalise alike
GREY = STATS[1][0] * 255  # one grey level, in normalised units


@pytest.fixture
def fullres(shared_data, tmp_path):
    "A copy of the full-resolution sample (23 real JPEGs, 399x164 to 1672x1432 px) in a temporary folder."
    return shutil.copytree(shared_data/'chest_xray_fullres_sample', tmp_path/'fullres')


def _dls(path, cache, **kwargs):
    return xray_dataloaders(load_source(path), **{**dict(size=64, bs=8, stats=STATS, num_workers=0), **kwargs}, cache=cache)


def _batch(dl, seed=1):
    set_seed(seed)  # the same shuffle and the same random augmentation for both pipelines
    return dl.one_batch()


@pytest.mark.parametrize('aug', [True, False])
def test_cached_batches_match_uncached(fullres, tmp_path, aug):
    plain, cached = _dls(fullres, False, aug=aug), _dls(fullres, tmp_path/'cache', aug=aug)
    for a, b in ((_batch(plain.train), _batch(cached.train)), (_batch(plain.valid), _batch(cached.valid))):
        assert torch.equal(a[1], b[1])  # same items, same order
        diff = (a[0] - b[0]).abs() / GREY  # reduced-scale JPEG decoding moves pixels by a grey level or so
        assert diff.mean() < 1.5 and diff.quantile(0.99) < 8, (diff.mean(), diff.quantile(0.99))
    (f,) = (tmp_path/'cache').glob('*.npy')
    item_size = round(64 * 1.15) if aug else 64
    assert np.load(f, mmap_mode='r').shape == (23, item_size, item_size)


def test_cached_batches_in_workers(fullres, tmp_path):
    "Worker processes map the cache file themselves and give the batches the main process gives."
    a = _batch(_dls(fullres, tmp_path/'cache').valid)
    b = _batch(_dls(fullres, tmp_path/'cache', num_workers=2).valid)
    assert torch.equal(a[0], b[0])


def test_default_workers(fullres, tmp_path):
    "Worker processes feed a GPU; without one every source is read in the main process (workers would compete with the model)."
    src = load_source(fullres)
    cached = xray_dataloaders(src, size=64, bs=8, stats=STATS, cache=tmp_path/'cache')
    plain = xray_dataloaders(src, size=64, bs=8, stats=STATS)
    expected = min(defaults.cpus, 8) if torch.cuda.is_available() else 0
    assert plain.train.fake_l.num_workers == cached.train.fake_l.num_workers == expected


def test_touched_or_changed_file_rebuilds(fullres, tmp_path):
    cache = tmp_path/'cache'
    _dls(fullres, cache)
    (first,) = cache.glob('*.npy')
    mtime = first.stat().st_mtime_ns
    _dls(fullres, cache)
    assert list(cache.glob('*.npy')) == [first] and first.stat().st_mtime_ns == mtime  # nothing changed: reused

    f = sorted((fullres/'train'/'NORMAL').glob('*.jpeg'))[0]
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched: same bytes, newer mtime
    _dls(fullres, cache)
    (second,) = cache.glob('*.npy')  # the stale cache of this source and size is gone
    assert second != first

    row = list(dict.fromkeys(load_source(fullres).df.item)).index(str(f))
    assert not (np.load(second)[row] == 255).all()
    Image.new('L', (300, 200), 255).save(f, format='JPEG')  # changed content
    dls = _dls(fullres, cache)
    (third,) = cache.glob('*.npy')
    assert third not in (first, second)
    assert (np.load(third)[row] == 255).all()
    ds = dls.train_ds if str(f) in set(dls.train_ds.items.item) else dls.valid_ds
    im, _ = ds[list(ds.items.item).index(str(f))]
    assert (np.asarray(im) == 255).all()  # the DataLoaders read the new cache


def test_presize_change_builds_another(fullres, tmp_path):
    cache = tmp_path/'cache'
    _dls(fullres, cache, presize=80)
    _dls(fullres, cache, presize=96)
    sizes = sorted(np.load(f, mmap_mode='r').shape[1] for f in cache.glob('*.npy'))
    assert sizes == [80, 96]  # one file per size: switching back and forth rebuilds nothing


def test_off_by_default_writes_nothing(fullres, tmp_path, monkeypatch):
    home = tmp_path/'data_home'
    monkeypatch.setenv('XRAY_FASTAI_DATA', str(home))
    xray_dataloaders(load_source(fullres), size=64, bs=8, stats=STATS, num_workers=0).one_batch()
    assert not home.exists()
    xray_dataloaders(load_source(fullres), size=64, bs=8, stats=STATS, num_workers=0, cache=True)
    assert len(list((home/'presize').glob('*.npy'))) == 1  # cache=True: under the data cache folder


def test_array_source_ignores_cache(shared_data, tmp_path):
    src = load_source(shared_data/'pneumoniamnist.npz', verify=False)
    xray_dataloaders(src, size=28, bs=8, num_workers=0, cache=tmp_path/'cache')
    assert not (tmp_path/'cache').exists()  # already an in-memory array: nothing to presize


def test_uncached_items_are_presized_on_the_fly(fullres, tmp_path):
    "An item the cache lacks (e.g. in a test DataLoader over another source) is decoded and presized the same way."
    files = sorted(str(f) for f in fullres.rglob('*.jpeg'))
    fname = presize_cache(files[:3], 32, tmp_path)
    reader = PresizedReader(fname, files[:3], 32)
    assert reader(dict(item=files[0])).shape == (32, 32)
    np.testing.assert_array_equal(reader(dict(item=files[5])), np.load(presize_cache(files[5:6], 32, tmp_path))[0])


def test_unreadable_file_is_a_user_error(fullres, tmp_path):
    from xray_fastai.core import XrayError
    bad = fullres/'train'/'NORMAL'/'broken.jpeg'
    bad.write_bytes(b'not a jpeg')
    with pytest.raises(XrayError, match='broken.jpeg'):
        presize_cache([str(bad)], 32, tmp_path/'cache')
    assert not list((tmp_path/'cache').glob('*'))  # nothing half-written


def test_two_file_lists_with_one_name_keep_their_caches(fullres, tmp_path):
    "Cross-validation folds: two lists named alike over one image tree must not evict each other's cache."
    from xray_fastai.data import presize_cache
    files = sorted(str(f) for f in fullres.rglob('*.jpeg'))
    folds = files[0::2], files[1::2]  # both span NORMAL/ and PNEUMONIA/: one common root
    a, b = (presize_cache(f, 32, tmp_path/'cache', name='data.csv', num_workers=1) for f in folds)
    assert a != b and a.exists() and b.exists()
    assert presize_cache(folds[0], 32, tmp_path/'cache', name='data.csv') == a  # reused, not rebuilt
