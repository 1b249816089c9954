"Image-check cache (issue 17): verdicts remembered by path, size and mtime; a changed file or a damaged cache is checked again."
import json, os, shutil, time
from pathlib import Path
import numpy as np, pytest
from PIL import Image
import xray_fastai.data as xd
from xray_fastai.data import load_source, check_images, check_cache_dir
from conftest import copy_class_folders


@pytest.fixture
def counted(monkeypatch):
    "Count the files `check_image` decodes (from every thread)."
    calls, orig = [], xd.check_image
    monkeypatch.setattr(xd, 'check_image', lambda fn: calls.append(str(fn)) or orig(fn))
    return calls

def test_second_start_decodes_nothing(shared_data, tmp_path, monkeypatch, counted):
    root = copy_class_folders(shared_data, tmp_path/'data', 8)
    monkeypatch.setenv('XRAY_FASTAI_CHECKS', str(tmp_path/'checks'))
    bad = root/'NORMAL'/'zz-bad.jpeg'; bad.write_bytes(b'not a jpeg')
    with pytest.warns(UserWarning, match='skipping 1 unreadable'): src = load_source(root, for_training=False)
    assert len(counted) == 17 and len(src.df) == 16
    assert len(list((tmp_path/'checks').glob('checks-*.json'))) == 1
    counted.clear()
    with pytest.warns(UserWarning, match='skipping 1 unreadable'): again = load_source(root, for_training=False)
    assert counted == [] and list(again.df.item) == list(src.df.item)  # unchanged: nothing decoded, the same verdicts
    # a changed file is checked again (new content, size and time), the others are not
    f = sorted((root/'PNEUMONIA').glob('*.jpeg'))[0]
    Image.open(f).convert('L').rotate(90).save(f, quality=70)
    bad.unlink(); shutil.copy(f, bad)  # the unreadable file replaced by a good one
    assert load_source(root, for_training=False).df.item.str.endswith('zz-bad.jpeg').any()
    assert sorted(counted) == sorted([str(f), str(bad)])

def test_damaged_cache_is_ignored_and_rebuilt(shared_data, tmp_path, counted):
    root = copy_class_folders(shared_data, tmp_path/'data', 4)
    files = sorted(map(str, root.rglob('*.jpeg')))
    assert check_images(files, tmp_path/'checks') == {} and len(counted) == 8
    cache, = (tmp_path/'checks').glob('checks-*.json')
    for junk in ('{"version": 1, "checks": [', '[1, 2]', '{"version": 1, "checks": {"x": 3}}'):
        cache.write_text(junk); counted.clear()
        assert check_images(files, tmp_path/'checks') == {} and len(counted) == 8
        assert len(json.loads(cache.read_text())['checks']) == 8  # written anew
    counted.clear(); check_images(files, tmp_path/'checks'); assert counted == []
    os.utime(files[0], ns=(time.time_ns(), time.time_ns() + 10**9))  # touched: same bytes, another time
    check_images(files, tmp_path/'checks'); assert counted == [files[0]]

def test_threads_agree_and_off_remembers_nothing(shared_data, tmp_path, monkeypatch):
    root = copy_class_folders(shared_data, tmp_path/'data', 6)
    (root/'NORMAL'/'a.jpeg').write_text('x'); (root/'PNEUMONIA'/'b.png').write_bytes(b'\x89PNG\r\n')
    files = sorted(map(str, root.rglob('*.*')))
    one, two = check_images(files, num_workers=1), check_images(files, tmp_path/'c', num_workers=4)
    assert one.keys() == two.keys() == {str(root/'NORMAL'/'a.jpeg'), str(root/'PNEUMONIA'/'b.png')}
    assert check_cache_dir() is None  # tests run with XRAY_FASTAI_CHECKS=off
    monkeypatch.setenv('XRAY_FASTAI_CHECKS', ''); monkeypatch.setenv('XRAY_FASTAI_DATA', str(tmp_path/'home'))
    assert check_cache_dir() == tmp_path/'home'/'checks'  # by default: in the data cache folder

def test_cli_data_verify_remembers_in_the_data_folder(shared_data, tmp_path, run_cli):
    root = copy_class_folders(shared_data, tmp_path/'data', 4)
    env = dict(XRAY_FASTAI_DATA=str(tmp_path/'home'), XRAY_FASTAI_CHECKS='')
    for _ in range(2):
        r = run_cli('data', 'verify', root, env=env)
        assert r.returncode == 0, r.stderr
    cache, = (tmp_path/'home'/'checks').glob('checks-*.json')
    assert len(json.loads(cache.read_text())['checks']) == 8

@pytest.fixture
def decoded(monkeypatch):
    "Count the files `open_xray` decodes (the check, the presize cache and `train_stats` all go through it)."
    calls, orig = [], xd.open_xray
    monkeypatch.setattr(xd, 'open_xray', lambda fn, **kw: calls.append(str(fn)) or orig(fn, **kw))
    return calls

def test_presize_cache_start_decodes_each_file_once(shared_data, tmp_path, monkeypatch, decoded):
    root = copy_class_folders(shared_data, tmp_path/'data', 8)
    monkeypatch.setenv('XRAY_FASTAI_CHECKS', str(tmp_path/'checks'))
    cache, stats = tmp_path/'presize', ([0.5], [0.25])
    src = load_source(root, cache=cache, item_size=xd.item_size(28, 32))
    assert sorted(decoded) == sorted(map(str, root.rglob('*.jpeg')))  # checked and presized in one decode each
    decoded.clear()
    dls = xd.xray_dataloaders(src, size=28, presize=32, bs=4, stats=stats, cache=cache, num_workers=0)
    assert decoded == [] and len(list(cache.glob('*.npy'))) == 1  # the check's cache is the pipeline's
    x, _ = dls.one_batch()
    assert x.shape == (4, 1, 28, 28) and decoded == []
    load_source(root, cache=cache, item_size=32)  # a second start: verdicts and cache remembered
    assert decoded == []

def test_presize_cache_check_lists_unreadable_files(shared_data, tmp_path, monkeypatch, decoded):
    root = copy_class_folders(shared_data, tmp_path/'data', 8)
    monkeypatch.setenv('XRAY_FASTAI_CHECKS', str(tmp_path/'checks'))
    bad = root/'NORMAL'/'zz-bad.jpeg'; bad.write_bytes(b'not a jpeg')
    with pytest.warns(UserWarning, match='skipping 1 unreadable'):
        src = load_source(root, cache=tmp_path/'presize', item_size=32)
    assert len(decoded) == 17 and src.skipped == [(str(bad), xd.check_image(bad))]  # what the plain check says
    assert str(bad) not in set(src.df.item)

def test_train_with_cache_decodes_each_file_once(shared_data, tmp_path, monkeypatch, decoded):
    from xray_fastai.learner import train
    root = copy_class_folders(shared_data, tmp_path/'data', 8)
    monkeypatch.setenv('XRAY_FASTAI_CHECKS', str(tmp_path/'checks'))
    train(out=tmp_path/'run', source=str(root), arch='resnet18', pretrained=False, size=28, epochs=1, bs=4,
          stats=[[0.5], [0.25]], cache=str(tmp_path/'presize'))  # fixed stats: `train_stats` would decode a sample
    assert sorted(decoded) == sorted(map(str, root.rglob('*.jpeg')))
    assert len(list((tmp_path/'presize').glob('*-32px-*.npy'))) == 1  # at the item size the pipeline reads

def test_long_lists_are_checked_in_processes_with_the_same_verdicts(shared_data, tmp_path):
    real = sorted((shared_data/'chest_xray_224'/'train'/'NORMAL').glob('*.jpeg'))[:50]
    (tmp_path/'x').mkdir()
    files = []
    for i in range(1200):  # links: 1,200 files without copying any
        f = tmp_path/'x'/f"{i:04d}.jpeg"; f.symlink_to(real[i % len(real)]); files.append(str(f))
    for i in (7, 700): Path(files[i]).unlink(); Path(files[i]).write_bytes(b'not a jpeg')
    one, many = check_images(files, num_workers=1), check_images(files, num_workers=2)
    assert list(one) == list(many) == [files[7], files[700]] and one == many

def test_a_checking_process_that_dies_leaves_the_check_to_this_one(shared_data, tmp_path, monkeypatch):
    "A forked checking process killed before it answers: the files are checked here instead, with the same verdicts."
    import os
    from xray_fastai import data
    real = sorted((shared_data/'chest_xray_224'/'train'/'NORMAL').glob('*.jpeg'))[:20]
    files = [str(real[i % len(real)]) for i in range(1000)]
    files[3] = str(tmp_path/'gone.jpeg')  # a verdict to compare: missing
    parent, check, checked_here = os.getpid(), data.check_image, []
    def dies_in_a_child(path):
        if os.getpid() != parent: os._exit(1)
        checked_here.append(path)
        return check(path)
    monkeypatch.setattr(data, 'check_image', dies_in_a_child)
    import threading
    thread_errors = []  # the pool's own thread must not fail on the way (Python 3.11's did, on cancelled futures)
    monkeypatch.setattr(threading, 'excepthook', thread_errors.append)
    verdicts = data._check_all(files, num_workers=2)
    assert len(checked_here) == len(files) and not thread_errors  # a child died: this process checked every file
    assert verdicts == [check(f) for f in files] and verdicts[3] and not any(verdicts[:3])

def test_this_process_takes_the_chunks_a_slow_forked_one_has_not_started(shared_data, monkeypatch):
    "The files are shared by speed, not in fixed halves: against a slow forked process, this one checks most of them."
    import os, time
    from xray_fastai import data
    real = sorted((shared_data/'chest_xray_224'/'train'/'NORMAL').glob('*.jpeg'))[:20]
    files = [str(real[i % len(real)]) for i in range(1600)]  # 64 chunks of 25
    parent, check, checked_here = os.getpid(), data.check_image, []
    def slow_in_a_child(path):
        if os.getpid() == parent: checked_here.append(path)
        else: time.sleep(0.01)
        return check(path)
    monkeypatch.setattr(data, 'check_image', slow_in_a_child)
    verdicts = data._check_all(files, num_workers=2)
    assert verdicts == [check(f) for f in files] and not any(verdicts)
    # the forked process claims a chunk at a time (0.25 s each): this one has checked the rest in order by then
    assert len(checked_here) >= 1200 and checked_here == files[:len(checked_here)]

def test_the_check_converts_to_grey_all_but_plain_jpegs(shared_data, tmp_path, monkeypatch):
    "`check_image` skips `open_xray`'s orientation and grey conversion only where they cannot fail: a JPEG without EXIF."
    from PIL import Image
    plain = sorted((shared_data/'chest_xray_224'/'train'/'NORMAL').glob('*.jpeg'))[0]
    exif = Image.Exif(); exif[0x0112] = 6  # orientation: rotated
    Image.open(plain).save(tmp_path/'exif.jpeg', exif=exif)
    Image.open(plain).save(tmp_path/'x.png')
    converted, to_grey = [], xd._to_grey
    monkeypatch.setattr(xd, '_to_grey', lambda im: converted.append(im.format) or to_grey(im))
    assert [xd.check_image(f) for f in (plain, tmp_path/'exif.jpeg', tmp_path/'x.png')] == [None] * 3
    assert converted == ['JPEG', 'PNG']

def test_the_check_runs_with_the_garbage_collector_paused(tmp_path, monkeypatch):
    "Full collections set off by 100k small lists made a start grow faster than its files: `check_images` pauses them."
    import gc
    seen = []
    monkeypatch.setattr(xd, 'check_image', lambda p: seen.append(gc.isenabled()))
    assert gc.isenabled()
    check_images([str(tmp_path/f"{i}.png") for i in range(5)], tmp_path/'c', num_workers=1)
    assert seen == [False] * 5 and gc.isenabled()
