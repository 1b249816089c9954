"Shared fixtures: the project's test data in ../shared/data, a clean environment, and running the real CLI."
import os, shutil, subprocess, sys, time
from pathlib import Path

import numpy as np
import pytest
from fastai.callback.core import Callback

REPO = Path(__file__).resolve().parents[1]
_PROXY_VARS = ('http_proxy', 'https_proxy', 'all_proxy', 'HTTP_PROXY', 'HTTPS_PROXY', 'ALL_PROXY')


@pytest.fixture(scope='session')
def shared_data() -> Path:
    "The project's test data folder, `../shared/data` next to the repository; fails (never skips) without it."
    path = (REPO/'..'/'shared'/'data').resolve()
    if not ((path/'pneumoniamnist.npz').is_file() and (path/'chest_xray_224').is_dir()):
        pytest.fail(f"test data missing: expected {path} holding pneumoniamnist.npz and chest_xray_224/ "
                    "(see its README.md); the tests need it and must not download anything", pytrace=False)
    return path


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    "No test sees the user's XRAY_FASTAI_* settings or a proxy (the local HTTP server must be reached directly)."
    for k in [k for k in os.environ if k.startswith('XRAY_FASTAI_')] + list(_PROXY_VARS):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv('NO_PROXY', '127.0.0.1,localhost')
    monkeypatch.setenv('no_proxy', '127.0.0.1,localhost')
    monkeypatch.setenv('XRAY_FASTAI_CHECKS', 'off')  # image verdicts are not remembered across tests (test_check_cache does)


@pytest.fixture(scope='session')
def cli_env(shared_data) -> dict:
    "Environment for CLI subprocesses: no XRAY_FASTAI_* or proxy settings, the dataset cache is `shared_data`."
    env = {k: v for k, v in os.environ.items() if not k.startswith('XRAY_FASTAI_') and k not in _PROXY_VARS}
    return {**env, 'XRAY_FASTAI_DATA': str(shared_data), 'NO_PROXY': '127.0.0.1,localhost',
            'no_proxy': '127.0.0.1,localhost', 'COLUMNS': '200', 'XRAY_FASTAI_CHECKS': 'off',
            # several CLI processes overlap on a 2-core machine: one thread each, or OpenMP threads thrash
            'OMP_NUM_THREADS': '1'}


class CliProcess:
    "`python -m xray_fastai.cli ARGS...` started in the background; `result()` waits for it."
    def __init__(self, args, env:dict, timeout:float=600):
        self.timeout = timeout
        self.proc = subprocess.Popen([sys.executable, '-m', 'xray_fastai.cli', *map(str, args)], cwd=REPO, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)

    def result(self) -> subprocess.CompletedProcess:
        "The finished process, with its text stdout and stderr."
        out, err = self.proc.communicate(timeout=self.timeout)
        return subprocess.CompletedProcess(self.proc.args, self.proc.returncode, out, err)

    def kill(self):
        if self.proc.poll() is None: self.proc.kill(); self.proc.communicate()


@pytest.fixture(scope='session')
def start_cli(cli_env):
    "Start the real CLI in a subprocess (`start_cli(*args, env={...})`), so that slow runs can overlap other tests."
    procs = []
    def start(*args, env:dict=None):
        procs.append(CliProcess(args, {**cli_env, **(env or {})}))
        return procs[-1]
    yield start
    for p in procs: p.kill()


@pytest.fixture
def run_cli(start_cli):
    "Run the real CLI in a subprocess and wait for it: `run_cli(*args, env={...})` -> `CompletedProcess`."
    return lambda *args, env=None: start_cli(*args, env=env).result()


@pytest.fixture(scope='session')
def mini_npz(shared_data, tmp_path_factory):
    "A small PneumoniaMNIST (28 px) with the official splits subsampled (stratified): quick training in tests."
    src = np.load(shared_data/'pneumoniamnist.npz')
    rng, out = np.random.default_rng(0), {}
    for split, n in (('train', 512), ('val', 128), ('test', 128)):
        y = src[f'{split}_labels'].reshape(-1)
        idx = np.sort(np.concatenate([rng.choice(np.flatnonzero(y == c), n // 2, replace=False) for c in (0, 1)]))
        out[f'{split}_images'], out[f'{split}_labels'] = src[f'{split}_images'][idx], src[f'{split}_labels'][idx]
    path = tmp_path_factory.mktemp('data')/'mini_pneumoniamnist.npz'
    np.savez(path, **out)
    return path


def copy_class_folders(shared_data:Path, root:Path, n:int) -> Path:
    "A folder-per-class dataset in `root`: the first `n` real 224 px Kermany images of each class."
    for cls in ('NORMAL', 'PNEUMONIA'):
        (root/cls).mkdir(parents=True)
        for f in sorted((shared_data/'chest_xray_224'/'train'/cls).glob('*.jpeg'))[:n]: shutil.copy(f, root/cls)
    return root


def wait_for(path:Path, proc, timeout:float=300):
    "Wait until `path` exists, failing if the process `proc` (a `Popen`) ends first or `timeout` seconds pass."
    t0 = time.time()
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < timeout, f'{path} never appeared'
        time.sleep(0.1)


class Crash(Callback):
    "Die (like a killed process) once `n` epochs of the run are complete and checkpointed."
    order = 100
    def __init__(self, n): self.n, self.done = n, 0
    def after_epoch(self):
        if getattr(self.learn, 'replaying', False): return
        self.done += 1
        if self.done == self.n: raise RuntimeError('simulated crash')
