"Distributed training on 2 CPU processes (gloo): `train --distributed 2` and plain torchrun, exact validation, rank 0 writes."
import json, subprocess, sys
import numpy as np, pandas as pd
from conftest import REPO

def _odd_valid_npz(mini_npz, path):
    "`mini_npz` with one test image moved to val: 129 validation images, shared 65 / 64 (2 batches / 1 of 64)."
    d = dict(np.load(mini_npz))
    d['val_images'], d['val_labels'] = np.concatenate([d['val_images'], d['test_images'][:1]]), np.concatenate([d['val_labels'], d['test_labels'][:1]])
    np.savez(path, **d)
    return path

def _checksums(folder):
    sums = {p.name: p.read_text().strip() for p in folder.glob('rank*.sha256')}
    assert set(sums) == {'rank0.sha256', 'rank1.sha256'}, sums
    return set(sums.values())

def test_train_distributed_2_cpu(run_cli, mini_npz, tmp_path):
    data, ck, runs = _odd_valid_npz(mini_npz, tmp_path/'odd.npz'), tmp_path/'ck', tmp_path/'runs'
    r = run_cli('train', '--data', data, '--arch', 'resnet18', '--no-pretrained', '--epochs', '1', '--no-verify',
                '--out', runs/'ddp', '--distributed', '2', env={'XRAY_FASTAI_RANK_CHECKSUM_DIR': str(ck)})
    assert r.returncode == 0, r.stderr
    assert [l.split()[1] for l in r.stdout.splitlines() if l.startswith('epoch ')] == ['1/1']  # rank 0 prints alone
    assert [p.name for p in runs.iterdir()] == ['ddp']  # one run folder
    out = runs/'ddp'
    names = {p.name for p in out.iterdir()}
    assert {'config.json', 'history.csv', 'metrics.json', 'model.safetensors'} <= names and not {'last.pth', 'best.pth'} & names  # lean
    hist, m = pd.read_csv(out/'history.csv'), json.loads((out/'metrics.json').read_text())
    assert len(hist) == 1 and list(hist.epoch) == [0] and hist.accuracy.between(0, 1).all()
    # metrics over exactly the 129 validation images, not a shard (65 / 64) and no padding (130)
    assert list(hist.n_valid) == [129] and m['n_valid'] == 129
    assert json.loads((out/'config.json').read_text())['processes'] == 2
    sums = _checksums(ck)
    assert len(sums) == 1  # every rank ends with the same weights...
    from xray_fastai.runs import load_model_dir
    from xray_fastai.distributed import model_checksum
    assert model_checksum(load_model_dir(out)[0]) in sums  # ...which are the exported model's

def _torchrun(*args, env):
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc-per-node', '2', '-m', 'xray_fastai.cli', *map(str, args)]
    return subprocess.run(cmd, cwd=REPO, env=env, text=True, capture_output=True, timeout=120)

def test_torchrun_frozen_cached_features_and_resume(cli_env, mini_npz, tmp_path):
    out, ck = tmp_path/'frozen', tmp_path/'ck'
    env = {**cli_env, 'XRAY_FASTAI_RANK_CHECKSUM_DIR': str(ck)}
    r = _torchrun('train', '--data', mini_npz, '--arch', 'resnet18', '--no-pretrained', '--frozen', '--no-aug',
                  '--epochs', '1', '--no-verify', '--out', out, '--keep-checkpoints', env=env)
    assert r.returncode == 0, r.stderr
    cfg = json.loads((out/'config.json').read_text())
    assert cfg['cached_features'] and cfg['processes'] == 2
    # continue it for a second epoch, as a run stopped after its first would be
    (out/'config.json').write_text(json.dumps({**cfg, 'epochs': 2}))
    r = _torchrun('train', '--resume', out, env=env)
    assert r.returncode == 0, r.stderr
    hist = pd.read_csv(out/'history.csv')
    assert list(hist.epoch) == [0, 1] and list(hist.n_valid) == [128, 128]
    assert len(_checksums(ck)) == 1

def test_a_rank_without_validation_items(run_cli, mini_npz, tmp_path):
    "3 processes, 2 validation images: the third rank validates nothing, and the metrics still cover both images."
    d = dict(np.load(mini_npz))
    for sp in ('train', 'val'):  # 10 images in all, 5 per class: the carved validation split (1/5) has 2
        lab, n = d[f'{sp}_labels'][:, 0], 4 if sp == 'train' else 1
        keep = np.r_[np.flatnonzero(lab == 0)[:n], np.flatnonzero(lab == 1)[:n]]
        d[f'{sp}_images'], d[f'{sp}_labels'] = d[f'{sp}_images'][keep], d[f'{sp}_labels'][keep]
    np.savez(tmp_path/'ten.npz', **d)
    r = run_cli('train', '--data', tmp_path/'ten.npz', '--arch', 'resnet18', '--no-pretrained', '--epochs', '1',
                '--bs', '2', '--no-verify', '--out', tmp_path/'ddp', '--distributed', '3')
    assert r.returncode == 0, r.stderr
    hist = pd.read_csv(tmp_path/'ddp'/'history.csv')
    assert list(hist.n_valid) == [2] and hist.accuracy.isin([0, 0.5, 1]).all()
