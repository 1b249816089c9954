"`tune` (Optuna sweeps), `--track mlflow` (read back with MlflowClient) and lean run folders, end to end at 28 px."
import shlex
from pathlib import Path
import numpy as np, pandas as pd, pytest
import optuna
from mlflow.tracking import MlflowClient
from xray_fastai.core import load_json
from xray_fastai.tune import tune

pytestmark = pytest.mark.slow

def _fixed(mini_npz, **kw):
    "Every trial: resnet18 from scratch as a fixed feature extractor on cached features (seconds per trial)."
    return dict(source=str(mini_npz), verify=False, pretrained=False, arch='resnet18', frozen=True, aug=False, bs=64,
                seed=0, epochs=2, **kw)

def _folder_bytes(run: Path) -> int: return sum(p.stat().st_size for p in run.rglob('*') if p.is_file())

def _metric_steps(client, run_id, key) -> list:
    return [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]

@pytest.fixture(scope='module')
def sweep(mini_npz, tmp_path_factory):
    "Two trials, then the same sweep again with a pruner that must prune: one study of three trials, tracked in MLflow."
    d = tmp_path_factory.mktemp('tune')
    uri = f"sqlite:///{d}/mlruns.db"
    space = ['lr=loguniform:1e-3:1e-1']
    first = tune(space, n_trials=2, out=d/'sweep', pruner='none', sampler_seed=0, track='mlflow', tracking_uri=uri,
                 **_fixed(mini_npz))
    again = tune(space, n_trials=1, out=d/'sweep', pruner=optuna.pruners.ThresholdPruner(upper=0.0), sampler_seed=1,
                 track='mlflow', tracking_uri=uri, **_fixed(mini_npz))  # valid_loss > 0 always: pruned after epoch 1
    return d/'sweep', first, again, uri

def test_resume_adds_trials_and_one_is_pruned(sweep):
    out, first, again, _ = sweep
    assert first['trials']['complete'] == 2
    study = optuna.load_study(study_name='xray-fastai', storage=f"sqlite:///{out/'tune.db'}")
    states = [t.state for t in study.trials]
    assert states == [optuna.trial.TrialState.COMPLETE] * 2 + [optuna.trial.TrialState.PRUNED]
    assert again['trials'] == {**again['trials'], 'complete': 2, 'pruned': 1}
    assert len(pd.read_csv(out/'trials.csv')) == 3
    assert len(pd.read_csv(out/'trial-0002'/'history.csv')) == 1  # stopped after its first epoch
    assert [len(pd.read_csv(out/f'trial-000{i}'/'history.csv')) for i in (0, 1)] == [2, 2]
    best = min((t for t in study.trials[:2]), key=lambda t: t.value)
    assert again['best']['number'] == best.number and again['best']['value'] == best.value
    for f in ('history.png', 'importance.png'): assert (out/f).read_bytes()[:4] == b'\x89PNG', f
    assert (out/'best_command.txt').read_text().strip() == again['best']['command']

def test_trials_are_lean(sweep):
    out = sweep[0]
    for run in sorted(out.glob('trial-*')):
        names = {p.name for p in run.iterdir()}
        assert 'model.safetensors' in names and not {'best.pth', 'last.pth'} & names, names
        assert _folder_bytes(run) <= 1.1 * (run/'model.safetensors').stat().st_size

def test_trials_tracked_in_mlflow(sweep):
    out, _, _, uri = sweep
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name('xray-fastai').experiment_id])
    assert sorted(r.data.tags['trial'] for r in runs) == ['0', '1', '2'] and {r.info.status for r in runs} == {'FINISHED'}
    for r in runs:
        hist = pd.read_csv(out/f"trial-{int(r.data.tags['trial']):04d}"/'history.csv')
        for k in ('valid_loss', 'accuracy', 'train_loss'):
            np.testing.assert_allclose(_metric_steps(client, r.info.run_id, k), hist[k].values, rtol=1e-6)
        assert r.data.tags['arch'] == 'resnet18' and r.data.tags['mode'] == 'frozen' and r.data.params['epochs'] == '2'

def test_best_command_reproduces_its_metric(sweep, run_cli, tmp_path):
    out, _, again, _ = sweep
    args = shlex.split((out/'best_command.txt').read_text())
    assert args[:2] == ['xray-fastai', 'train']
    r = run_cli(*args[1:], '--out', tmp_path/'again')
    assert r.returncode == 0, r.stderr
    m = load_json(tmp_path/'again'/'metrics.json')
    assert m['best']['valid_loss'] == pytest.approx(again['best']['value'], rel=1e-5)

def test_two_processes_share_one_study(start_cli, mini_npz, tmp_path):
    storage = f"sqlite:///{tmp_path/'shared.db'}"
    args = ['tune', '--data', mini_npz, '--no-verify', '--no-pretrained', '--arch', 'resnet18', '--frozen', '--no-aug',
            '--epochs', '1', '--param', 'lr=loguniform:1e-3:1e-1', '--n-trials', '1', '--storage', storage,
            '--study', 'shared', '--pruner', 'none']
    procs = [start_cli(*args, '--out', tmp_path/name, '--sampler-seed', str(i)) for i, name in enumerate('ab')]
    for p in procs:
        r = p.result()
        assert r.returncode == 0, r.stderr
        assert 'study shared:' in r.stdout and 'xray-fastai train' in r.stdout
    study = optuna.load_study(study_name='shared', storage=storage)
    assert sorted(t.number for t in study.trials) == [0, 1]
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    assert {Path(t.user_attrs['run']).parent.name for t in study.trials} == {'a', 'b'}
    kw = study.trials[0].user_attrs['train_kwargs']  # the options given are every trial's fixed settings
    assert (kw['verify'], kw['frozen'], kw['aug'], kw['epochs'], kw['arch']) == (False, True, False, 1, 'resnet18')
    assert 'lr_mult' not in kw and 'bs' not in kw  # options left at their defaults are train's defaults

def test_train_track_mlflow_cli(run_cli, mini_npz, tmp_path):
    uri = f"sqlite:///{tmp_path/'mlruns.db'}"
    run = tmp_path/'run'
    r = run_cli('train', '--data', mini_npz, '--no-verify', '--no-pretrained', '--arch', 'resnet18', '--epochs', '2',
                '--bs', '64', '--out', run, '--track', 'mlflow', '--track-model', env={'MLFLOW_TRACKING_URI': uri})
    assert r.returncode == 0, r.stderr
    client = MlflowClient(uri)
    [mr] = client.search_runs([client.get_experiment_by_name('xray-fastai').experiment_id])
    hist = pd.read_csv(run/'history.csv')
    for k in ('valid_loss', 'accuracy', 'roc_auc_score'):
        np.testing.assert_allclose(_metric_steps(client, mr.info.run_id, k), hist[k].values, rtol=1e-6)
    assert mr.data.tags['mode'] == 'finetune' and mr.data.params['arch'] == 'resnet18'
    arts = {a.path for a in client.list_artifacts(mr.info.run_id)} | {a.path for a in client.list_artifacts(mr.info.run_id, 'model')}
    assert {'metrics.json', 'loss.png', 'history.csv', 'model/model.safetensors', 'model/model.json'} <= arts
    # lean: the finished folder holds its best model once
    assert not (run/'best.pth').exists() and not (run/'last.pth').exists()
    assert _folder_bytes(run) <= 1.1 * (run/'model.safetensors').stat().st_size

def test_missing_extra_is_one_line(run_cli, tmp_path):
    fake = tmp_path/'fake'/'optuna'
    fake.mkdir(parents=True)
    (fake/'__init__.py').write_text("raise ImportError('No module named optuna')\n")
    import os
    r = run_cli('tune', '--param', 'lr=loguniform:1e-3:1e-1', '--out', tmp_path/'t',
                env={'PYTHONPATH': os.pathsep.join([str(fake.parent), os.environ.get('PYTHONPATH', '')])})
    assert r.returncode == 2 and r.stderr.strip().splitlines() == ["error: optuna is not installed: pip install 'xray-fastai[tune]'"], r.stderr

def test_a_finished_lean_run_is_not_resumed(tmp_path):
    "A finished run without its checkpoints: `resume` says there is nothing to resume, rather than 'no checkpoint yet'."
    from xray_fastai.core import XrayError, save_json
    from xray_fastai.learner import resume
    save_json({'arch': 'resnet18'}, tmp_path/'config.json'); save_json({'epochs': 1}, tmp_path/'metrics.json')
    with pytest.raises(XrayError, match='is a finished run .*nothing to resume'): resume(tmp_path)

def test_experiment_track_mlflow(mini_npz, tmp_path, monkeypatch):
    "`experiment(track='mlflow')`: one MLflow run per run trained, with its epochs and its test evaluation."
    from xray_fastai.experiment import experiment
    uri = f"sqlite:///{tmp_path/'mlruns.db'}"
    monkeypatch.setenv('MLFLOW_TRACKING_URI', uri)
    out = tmp_path/'exp'
    experiment(str(mini_npz), archs='resnet18', modes='frozen', out=out, epochs=2, track='mlflow', pretrained=False,
               aug=False, verify=False, bs=64)
    client = MlflowClient(uri)
    [mr] = client.search_runs([client.get_experiment_by_name('exp').experiment_id])
    hist, ev = pd.read_csv(out/'resnet18-frozen'/'history.csv'), load_json(out/'resnet18-frozen'/'eval-test'/'metrics.json')
    np.testing.assert_allclose(_metric_steps(client, mr.info.run_id, 'valid_loss'), hist.valid_loss.values, rtol=1e-6)
    assert mr.data.metrics['test_accuracy'] == pytest.approx(ev['default']['accuracy'])
    assert mr.data.tags['mode'] == 'frozen' and mr.info.status == 'FINISHED'
    experiment(str(mini_npz), archs='resnet18', modes='frozen', out=out, epochs=2, track='mlflow', pretrained=False,
               aug=False, verify=False, bs=64)  # again: the finished run is reused, and not logged twice
    assert len(client.search_runs([client.get_experiment_by_name('exp').experiment_id])) == 1


def test_ctrl_c_keeps_finished_trials_and_the_study_continues(start_cli, mini_npz, tmp_path):
    "SIGINT in the middle of a sweep: exit 130, every finished trial kept (and reported), then the same command continues."
    import signal, sys
    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import wait_for
    out = tmp_path/'sweep'
    args = ['tune', '--data', mini_npz, '--no-verify', '--no-pretrained', '--arch', 'resnet18', '--frozen', '--no-aug',
            '--epochs', '2', '--param', 'lr=loguniform:1e-3:1e-1', '--pruner', 'none', '--sampler-seed', '0', '--out', out]
    p = start_cli(*args, '--n-trials', '20')
    wait_for(out/'trial-0001', p.proc)  # trial 0 has finished, trial 1 is training
    p.proc.send_signal(signal.SIGINT)
    r = p.result()
    assert r.returncode == 130, r.stderr
    study = optuna.load_study(study_name='xray-fastai', storage=f"sqlite:///{out/'tune.db'}")
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert [t.number for t in done] == [0] and len(study.trials) == 2
    assert pd.read_csv(out/'trials.csv').number.tolist() == [0, 1]  # the report is written on the way out
    again = tune(['lr=loguniform:1e-3:1e-1'], n_trials=1, out=out, pruner='none', sampler_seed=1, **_fixed(mini_npz))
    assert again['trials']['complete'] == 2 and again['best'] is not None


def test_hyperband_prunes_from_per_epoch_reports(mini_npz, tmp_path):
    "Hyperband end to end: every trial reports each epoch, and a poor trial in a bracket that has a good one is stopped."
    # with 3 epochs Hyperband has 2 brackets; for the study name 'xray-fastai' trials 0 and 4 fall in bracket 0, whose
    # first rung is after epoch 2 (step 1): trial 0 trains well, trial 4 (lr 1e-5) cannot keep up there
    kw = dict(out=tmp_path/'hb', pruner='hyperband', **{**_fixed(mini_npz), 'epochs': 3})
    tune(['lr=choice:0.03'], n_trials=1, **kw)
    res = tune(['lr=1e-5', 'wd=choice:0.01'], n_trials=4, **kw)
    study = optuna.load_study(study_name='xray-fastai', storage=f"sqlite:///{tmp_path/'hb'/'tune.db'}")
    assert [t.state.name for t in study.trials] == ['COMPLETE'] * 4 + ['PRUNED']
    assert res['trials'] == {**res['trials'], 'complete': 4, 'pruned': 1}
    for t in study.trials:
        hist = pd.read_csv(Path(t.user_attrs['run'])/'history.csv')
        assert sorted(t.intermediate_values) == list(hist.epoch)  # one report per trained epoch
        assert list(hist.epoch) == ([0, 1] if t.number == 4 else [0, 1, 2])


def test_objective_on_a_site_sample(mini_npz, shared_data, tmp_path):
    "`--monitor site_roc_auc_score` with `--site`: each trial's value is the best epoch's AUC on the site sample, maximised."
    res = tune(['lr=loguniform:1e-3:1e-1'], n_trials=2, out=tmp_path/'site', pruner='none', monitor='site_roc_auc_score',
               site=str(shared_data/'pneumoniamnist_site_A'), **_fixed(mini_npz))
    study = optuna.load_study(study_name='xray-fastai', storage=f"sqlite:///{tmp_path/'site'/'tune.db'}")
    assert study.direction == optuna.study.StudyDirection.MAXIMIZE
    for t in study.trials:
        hist = pd.read_csv(Path(t.user_attrs['run'])/'history.csv')
        assert t.value == pytest.approx(hist.site_roc_auc_score.max())
    assert res['best']['value'] == max(t.value for t in study.trials) and '--site' in res['best']['command']
