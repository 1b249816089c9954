"Faults injected for real (issue 16): SIGTERM, full disks (tmpfs), damaged files, concurrent runs, read-only mounts, a lost DDP process."
import json, os, shutil, signal, subprocess, sys, time, warnings
from pathlib import Path

import numpy as np, pandas as pd, pytest, torch
from safetensors.torch import load_file

from xray_fastai.core import XrayError, md5sum
from conftest import REPO, copy_class_folders, wait_for

pytestmark = pytest.mark.slow

# ---------------------------------------------------------------------------------------------------- helpers

def _errline(r) -> str:
    lines = [l for l in r.stderr.splitlines() if l.startswith('error: ')]
    assert r.returncode == 2 and len(lines) == 1 and 'Traceback' not in r.stderr, r.stderr
    return lines[0]

def _tmp_files(folder) -> list:
    return [p.name for p in Path(folder).rglob('.*.tmp')]

def _mount(*args):
    "Run `mount ARGS`; these tests inject faults with real mounts, which need root (CI runs as root): fail, never skip."
    r = subprocess.run(['mount', *map(str, args)], capture_output=True, text=True)
    if r.returncode:
        pytest.fail(f"mount {' '.join(map(str, args))} failed ({r.stderr.strip()}; uid {os.geteuid()}): the fault "
                    "injection tests need root to mount a small tmpfs and read-only binds", pytrace=False)

@pytest.fixture
def mounts():
    "`tmpfs(dir, size)` and `read_only(src, dir)` mounts, unmounted afterwards."
    made = []
    class M:
        def tmpfs(self, path, size='256m'):
            path.mkdir(parents=True, exist_ok=True)
            _mount('-t', 'tmpfs', '-o', f'size={size}', 'tmpfs', path); made.append(path)
            return path
        def read_only(self, src, path):
            path.mkdir(parents=True, exist_ok=True)
            _mount('--bind', src, path); made.append(path)
            _mount('-o', 'remount,ro,bind', path)
            return path
    yield M()
    for p in reversed(made): subprocess.run(['umount', '-l', str(p)], capture_output=True)

def _fill(folder, leave:int=0) -> Path:
    "Take all the free space of `folder`'s file system but `leave` bytes, with one file."
    filler = Path(folder)/'filler'
    fd = os.open(filler, os.O_CREAT | os.O_WRONLY)
    try: os.posix_fallocate(fd, 0, max(1, shutil.disk_usage(folder).free - leave))
    finally: os.close(fd)
    assert shutil.disk_usage(folder).free <= leave + 4096
    return filler

def _train_args(data, *more):
    return ['train', '--data', data, '--no-pretrained', '--no-verify', '--arch', 'resnet18', '--seed', '1', *map(str, more)]

@pytest.fixture(scope='module')
def run_dir(mini_npz, tmp_path_factory):
    "A finished 1-epoch run (frozen resnet18, 28 px) that keeps its checkpoints: every file a run folder can hold."
    from xray_fastai.learner import train
    return train(out=tmp_path_factory.mktemp('runs')/'tiny', source=str(mini_npz), verify=False, pretrained=False,
                 arch='resnet18', frozen=True, aug=False, epochs=1, lr=1e-2, bs=64, seed=0, keep_checkpoints=True)

def _unfinished(run_dir, dest) -> Path:
    "A copy of `run_dir` as a 2-epoch run stopped after its first epoch (what --resume continues)."
    dest.mkdir(parents=True, exist_ok=True)
    for f in ('config.json', 'history.csv', 'last.pth', 'best.pth'): shutil.copy(run_dir/f, dest/f)
    c = json.loads((dest/'config.json').read_text())
    (dest/'config.json').write_text(json.dumps({**c, 'epochs': 2}))
    return dest

# ------------------------------------------------------------------------------------------------ preemption

def test_sigterm_saves_the_batch_and_resume_matches_an_uninterrupted_run(start_cli, run_cli, mini_npz, tmp_path):
    "SIGTERM mid-epoch: the batch is saved within 10 s, exit 143; --resume ends with the weights of a run never stopped."
    args = _train_args(mini_npz, '--epochs', 2, '--bs', 32)  # 16 batches an epoch, augmentation on: every random state counts
    ref = start_cli(*args, '--out', tmp_path/'ref')
    out = tmp_path/'run'
    p = start_cli(*args, '--out', out, '--checkpoint-every', 3)
    wait_for(out/'last.pth', p.proc)
    every = torch.load(out/'last.pth', weights_only=True)
    assert every['epoch'] == -1 and every['batch'] % 3 == 0  # --checkpoint-every 3: saved within the first epoch
    t0 = time.time()
    p.proc.send_signal(signal.SIGTERM)
    r = p.result()
    assert r.returncode == 143, r.stderr
    assert (out/'last.pth').stat().st_mtime - t0 < 10  # the batch it stopped after is saved within 10 s
    assert f'xray-fastai train --resume {out}' in r.stderr and 'Traceback' not in r.stderr
    ck = torch.load(out/'last.pth', weights_only=True)
    assert 'batch' in ck and 0 < ck['batch'] and len(ck['idxs']) == 512, {k: ck.get(k) for k in ('epoch', 'batch')}
    assert not (out/'.lock').exists() and not (out/'metrics.json').exists()
    r = run_cli('train', '--resume', out)
    assert r.returncode == 0, r.stderr
    assert ref.result().returncode == 0
    a, b = load_file(tmp_path/'ref'/'model.safetensors'), load_file(out/'model.safetensors')
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit for bit
    ha, hb = (pd.read_csv(d/'history.csv').drop(columns='seconds') for d in (tmp_path/'ref', out))
    pd.testing.assert_frame_equal(ha, hb)

def _one_more_epoch(out) -> int:
    "Make the stopped run in `out` end after the epoch it is in (not 20 epochs); how many it had completed."
    done = len(pd.read_csv(out/'history.csv')) if (out/'history.csv').exists() else 0
    c = json.loads((out/'config.json').read_text())
    (out/'config.json').write_text(json.dumps({**c, 'epochs': done + 1}))
    return done

def _children(pid) -> list:
    kids = []
    for t in Path(f'/proc/{pid}/task').iterdir():
        kids += [int(k) for k in (t/'children').read_text().split()]
    return kids

def _rank_pid(launcher:int, rank:int, timeout=120) -> int:
    "The pid of the worker process of `rank` under the launcher `launcher`."
    t0 = time.time()
    while time.time() - t0 < timeout:
        for k in _children(launcher):
            try: env = Path(f'/proc/{k}/environ').read_bytes().split(b'\0')
            except OSError: continue
            if f'RANK={rank}'.encode() in env: return k
        time.sleep(0.2)
    raise AssertionError(f'no rank {rank} process under {launcher}')

def test_ddp_lost_process_then_sigterm(start_cli, run_cli, mini_npz, tmp_path):
    """Two DDP processes on the CPU. One killed (SIGKILL): the run exits non-zero within 60 s instead of hanging, and
    --resume continues it. SIGTERM to the launcher: both stop after the same batch, rank 0 saves it, exit 143."""
    out = tmp_path/'ddp'
    p = start_cli(*_train_args(mini_npz, '--epochs', 20, '--bs', 16, '--checkpoint-every', 2, '--out', out, '--distributed', 2))
    wait_for(out/'last.pth', p.proc)
    os.kill(_rank_pid(p.proc.pid, 1), signal.SIGKILL)
    t0 = time.time()
    r = p.result()
    assert r.returncode not in (0, 2) and time.time() - t0 < 60, (r.returncode, r.stderr[-2000:])
    saved = (out/'last.pth').stat().st_mtime
    p = start_cli('train', '--resume', out, '--distributed', 2)
    while (out/'last.pth').stat().st_mtime == saved:  # the resumed run saves again: it continues
        assert p.proc.poll() is None, p.result().stderr
        time.sleep(0.1)
    t0 = time.time()
    p.proc.send_signal(signal.SIGTERM)
    r = p.result()
    assert r.returncode == 143 and time.time() - t0 < 40, r.stderr  # within the launcher's 30 s grace period
    assert f'xray-fastai train --resume {out}' in r.stderr and 'Traceback' not in r.stderr, r.stderr
    assert 'batch' in torch.load(out/'last.pth', weights_only=True)  # mid-epoch: each process's share, less its batches done
    done = _one_more_epoch(out)
    r = run_cli('train', '--resume', out, '--distributed', 2)
    assert r.returncode == 0, r.stderr
    assert list(pd.read_csv(out/'history.csv').epoch) == list(range(done + 1))

# ----------------------------------------------------------------------------------------------- concurrency

_HOLD = """
import sys, time
from xray_fastai.reliability import hold_run_lock
hold_run_lock(sys.argv[1]); print('held', flush=True); time.sleep(600)
"""

def test_one_run_per_folder(start_cli, cli_env, run_dir, mini_npz, tmp_path):
    "A second `train --out X` or `--resume X` while X is held is refused, naming the owner; a dead owner's lock is taken over."
    from xray_fastai.learner import resume
    out = _unfinished(run_dir, tmp_path/'run')
    owner = subprocess.Popen([sys.executable, '-c', _HOLD, str(out)], env=cli_env, stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout.readline().strip() == 'held'
        again, resumed = start_cli(*_train_args(mini_npz, '--epochs', 1, '--out', out)), start_cli('train', '--resume', out)
        for r in (again.result(), resumed.result()):
            line = _errline(r)
            assert f'run folder {out} is in use by pid {owner.pid} on ' in line, line
    finally: owner.kill(); owner.wait()  # SIGKILL: its lock file stays, naming a dead process
    assert f'pid {owner.pid}' in (out/'.lock').read_text()
    resume(out)
    assert not (out/'.lock').exists() and list(pd.read_csv(out/'history.csv').epoch) == [0, 1]

_BUILD_CACHE = """
import sys
from xray_fastai.data import presize_cache
files = sorted(str(p) for p in __import__('pathlib').Path(sys.argv[1]).rglob('*.jpeg'))
print(presize_cache(files, 64, sys.argv[2], 'same', num_workers=1))
"""

def test_two_processes_build_one_presize_cache(cli_env, shared_data, tmp_path):
    root = copy_class_folders(shared_data, tmp_path/'src', 40)
    procs = [subprocess.Popen([sys.executable, '-c', _BUILD_CACHE, str(root), str(tmp_path/'cache')], env=cli_env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert outs[0][0] == outs[1][0]  # the same file
    (f,) = (tmp_path/'cache').iterdir()
    from xray_fastai.data import presize_cache
    ref = presize_cache(sorted(str(p) for p in root.rglob('*.jpeg')), 64, tmp_path/'ref', 'same', num_workers=1)
    assert np.array_equal(np.load(f), np.load(ref))

def test_two_processes_download_one_dataset(start_cli, shared_data, tmp_path):
    from test_download import serve
    with serve(shared_data) as mirror:
        ps = [start_cli('data', 'download', 'pneumoniamnist', '--data-dir', tmp_path, '--mirror', mirror, '--no-verify')
              for _ in range(2)]
        rs = [p.result() for p in ps]
    assert [r.returncode for r in rs] == [0, 0], [r.stderr for r in rs]
    assert [p.name for p in tmp_path.iterdir()] == ['pneumoniamnist.npz']
    assert md5sum(tmp_path/'pneumoniamnist.npz') == md5sum(shared_data/'pneumoniamnist.npz')

# --------------------------------------------------------------------------------------------- damaged files

def _damage(f:Path, how:str):
    b = f.read_bytes()
    f.write_bytes(b[:len(b) // 2] if how == 'truncated' else b'\xff' * 16 + b[16:-16] + b'\xff' * 16)

def _read_run_file(name, run):
    from xray_fastai.learner import resume
    from xray_fastai.runs import load_model_dir
    if name in ('last.pth', 'history.csv', 'config.json'): resume(run)  # what --resume reads first
    else: load_model_dir(run)  # what predict and evaluate read

@pytest.mark.parametrize('how', ['truncated', 'garbled'])
@pytest.mark.parametrize('name', ['last.pth', 'history.csv', 'config.json', 'model.safetensors', 'model.json'])
def test_damaged_run_files_are_named(run_dir, name, how):
    f = run_dir/name
    good = f.read_bytes()
    try:
        _damage(f, how)
        with pytest.raises(XrayError) as e: _read_run_file(name, run_dir)
    finally: f.write_bytes(good)
    msg = str(e.value)
    assert str(f if name not in ('model.json',) else run_dir) in msg and '\n' not in msg, msg
    assert 'damaged' in msg and ('restore it' in msg or 'restore model.json' in msg), msg
    assert not (run_dir/'.lock').exists()  # a failed --resume gives its lock back

@pytest.mark.parametrize('how', ['truncated', 'garbled'])
def test_damaged_download_is_named(mini_npz, tmp_path, how):
    from xray_fastai.data import load_source
    f = tmp_path/'pneumoniamnist.npz'
    shutil.copy(mini_npz, f)
    _damage(f, how)
    with pytest.raises(XrayError, match='delete it, and it is downloaded again') as e:
        load_source('pneumoniamnist', data_dir=tmp_path, verify=False)
    assert str(f) in str(e.value)

@pytest.mark.parametrize('how', ['truncated', 'garbled', 'empty'])
def test_damaged_presize_cache_is_rebuilt(shared_data, tmp_path, how):
    from xray_fastai.data import presize_cache
    files = sorted(str(p) for p in copy_class_folders(shared_data, tmp_path/'src', 5).rglob('*.jpeg'))
    f = presize_cache(files, 32, tmp_path/'cache', num_workers=1)
    good, mtime = f.read_bytes(), f.stat().st_mtime_ns
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # a whole cache is used as it is: no warning, not rebuilt
        assert presize_cache(files, 32, tmp_path/'cache', num_workers=1) == f and f.stat().st_mtime_ns == mtime
    if how == 'empty': f.write_bytes(b'')
    else: _damage(f, how)
    with pytest.warns(UserWarning, match='is damaged .*building it again'):
        assert presize_cache(files, 32, tmp_path/'cache', num_workers=1) == f
    assert f.read_bytes() == good and _tmp_files(tmp_path) == []

# ------------------------------------------------------------------------------------------------- full disks

def _no_space(e, folder, name):
    msg = str(e.value)
    assert msg.startswith(f'no space left in {folder} for {name}: it needs ') and ' bytes' in msg and '\n' not in msg, msg

@pytest.fixture(scope='module')
def learn(mini_npz, tmp_path_factory):
    from xray_fastai.config import RunConfig
    from xray_fastai.learner import _build
    c = RunConfig(source=str(mini_npz), verify=False, pretrained=False, arch='resnet18', epochs=1, bs=64)
    l = _build(c, tmp_path_factory.mktemp('learn'))
    l.create_opt()
    return l, c

@pytest.mark.parametrize('what', ['checkpoint', 'model', 'history', 'evaluation', 'presize cache', 'download'])
def test_full_disk_while_writing(what, mounts, learn, run_dir, shared_data, tmp_path):
    "ENOSPC from a real full tmpfs: one line naming the folder and the bytes needed; earlier files intact, no partial file."
    from xray_fastai.checkpoints import save_checkpoint
    from xray_fastai.runs import export_model
    disk = mounts.tmpfs(tmp_path/'disk')
    l, c = learn
    if what == 'checkpoint':
        old = save_checkpoint(l, disk/'last.pth', 0).read_bytes()
        _fill(disk, 1 << 20)
        with pytest.raises(XrayError) as e: save_checkpoint(l, disk/'last.pth', 1)
        _no_space(e, disk, 'last.pth')
        assert (disk/'last.pth').read_bytes() == old
        assert f"it needs {len(old):,} bytes" in str(e.value)  # the real size, not a guess
    elif what == 'model':
        export_model(l, disk, c)
        old = (disk/'model.safetensors').read_bytes()
        _fill(disk, 1 << 20)
        with pytest.raises(XrayError) as e: export_model(l, disk, c)
        _no_space(e, disk, 'model.safetensors')
        assert (disk/'model.safetensors').read_bytes() == old and f"it needs {len(old):,} bytes" in str(e.value)
    elif what == 'history':  # `HistoryCallback` writes the whole table with `atomic_write_text` after every epoch
        from xray_fastai.core import atomic_write_text
        text = pd.DataFrame(dict(epoch=range(2000), valid_loss=np.linspace(1, 0, 2000))).to_csv(index=False)
        atomic_write_text(disk/'history.csv', text[:100])
        _fill(disk)
        with pytest.raises(XrayError) as e: atomic_write_text(disk/'history.csv', text)
        _no_space(e, disk, 'history.csv')
        assert (disk/'history.csv').read_text() == text[:100] and f"it needs {len(text):,} bytes" in str(e.value)
    elif what == 'evaluation':
        from xray_fastai.evaluate import evaluate
        run = disk/'run'; run.mkdir()
        for f in ('config.json', 'model.safetensors', 'model.json', 'metrics.json', 'history.csv'): shutil.copy(run_dir/f, run/f)
        _fill(disk)
        with pytest.raises(XrayError) as e: evaluate(run, split='valid')
        msg = str(e.value)
        assert msg.startswith(f'no space left in {run}/eval-valid for ') and ' bytes' in msg, msg
    elif what == 'presize cache':
        from xray_fastai.data import presize_cache
        files = sorted(str(p) for p in copy_class_folders(shared_data, tmp_path/'src', 10).rglob('*.jpeg'))
        _fill(disk, 10_000)  # less than 20 images of 32x32
        with pytest.raises(XrayError) as e: presize_cache(files, 32, disk/'cache', num_workers=1)
        msg = str(e.value)
        assert msg.startswith(f'no space left in {disk/"cache"} for ') and f'it needs {20 * 32 * 32 + 128:,} bytes' in msg, msg
    else:
        from xray_fastai.data import download
        from test_download import serve
        _fill(disk, 1 << 20)
        with serve(shared_data) as mirror, pytest.raises(XrayError) as e:
            download('pneumoniamnist', data_dir=disk/'data', verify=False, base_url=mirror)
        size = (shared_data/'pneumoniamnist.npz').stat().st_size
        _no_space(e, disk/'data', 'pneumoniamnist.npz')
        assert f'it needs {size:,} bytes' in str(e.value)
    assert _tmp_files(disk) == []

def test_full_disk_during_a_run_loses_nothing(mounts, run_dir, run_cli, tmp_path):
    "A run that fills its disk stops with one line; once space is freed, --resume continues from its last epoch."
    disk = mounts.tmpfs(tmp_path/'disk')
    run = _unfinished(run_dir, disk/'run')
    before = {f.name: f.read_bytes() for f in run.iterdir()}
    filler = _fill(disk)
    line = _errline(run_cli('train', '--resume', run))
    # the first write fails: config.json, which --resume rewrites with the --data-dir ($XRAY_FASTAI_DATA) given
    assert f'no space left in {run} for ' in line and ' bytes' in line, line
    assert {f.name: f.read_bytes() for f in run.iterdir()} == before  # nothing changed, nothing partial, no lock left
    filler.unlink()
    r = run_cli('train', '--resume', run)
    assert r.returncode == 0, r.stderr
    assert list(pd.read_csv(run/'history.csv').epoch) == [0, 1]

# ------------------------------------------------------------------------------------------ read-only places

def test_read_only_data_folder_trains(mounts, shared_data, tmp_path):
    from xray_fastai.learner import train
    src = mounts.read_only(copy_class_folders(shared_data, tmp_path/'src', 10), tmp_path/'ro')
    with pytest.raises(OSError): (src/'x').write_text('x')  # really read-only, even for root
    run = train(out=tmp_path/'run', source=str(src), pretrained=False, arch='resnet18', frozen=True, aug=False,
                epochs=1, size=32, bs=4, valid_pct=0.25, cache=str(tmp_path/'cache'), num_workers=0)
    assert (run/'model.safetensors').exists() and len(list((tmp_path/'cache').glob('*.npy'))) == 1

def test_read_only_cache_and_run_folder_are_one_line(mounts, run_dir, shared_data, tmp_path):
    from xray_fastai.data import presize_cache
    from xray_fastai.learner import resume
    files = sorted(str(p) for p in copy_class_folders(shared_data, tmp_path/'src', 3).rglob('*.jpeg'))
    (tmp_path/'empty').mkdir()
    cache = mounts.read_only(tmp_path/'empty', tmp_path/'cache')
    with pytest.raises(XrayError, match=f'cannot write in {cache} \\(Read-only file system\\)'):
        presize_cache(files, 32, cache, num_workers=1)
    run = mounts.read_only(_unfinished(run_dir, tmp_path/'copy'), tmp_path/'ro-run')
    with pytest.raises(XrayError, match=f'cannot write in {run} \\(Read-only file system\\)'): resume(run)
