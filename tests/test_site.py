"A labelled site sample: `train --site` (history columns, best epoch, early stopping, resume, DDP), thresholds from the site."
import json
import numpy as np, pandas as pd, pytest, torch
from xray_fastai.core import load_json, XrayError
from xray_fastai.config import RunConfig
from xray_fastai.learner import train, resume
from xray_fastai.runs import load_model_dir
from xray_fastai.sites import SITE_METRICS
from xray_fastai.evaluate import threshold_for_rule, binary_metrics

pytestmark = pytest.mark.slow


def _kw(mini_npz, **kw):
    return dict(source=str(mini_npz), verify=False, pretrained=False, bs=64, seed=0, arch='resnet18', **kw)

def _stop_after(values, patience:int, lower:bool) -> int:
    "How many epochs fastai's `EarlyStoppingCallback` runs on `values` (min_delta 0)."
    best, wait = None, 0
    for i, v in enumerate(values):
        if best is None or (v < best if lower else v > best): best, wait = v, 0
        else:
            wait += 1
            if wait >= patience: return i + 1
    return len(values)

def test_site_columns_best_epoch_and_early_stopping(mini_npz, shared_data, tmp_path):
    "Frozen, cached features: the site's columns are logged, and the site metric (not validation) picks and stops."
    site = shared_data/'pneumoniamnist_site_A'
    kw = _kw(mini_npz, frozen=True, aug=False, epochs=8, lr=3e-2, site=str(site))
    run = train(out=tmp_path/'full', monitor='site_roc_auc_score', **kw)
    hist, m = pd.read_csv(run/'history.csv'), load_json(run/'metrics.json')
    assert load_json(run/'config.json')['cached_features']
    assert list(hist.columns[hist.columns.str.startswith('site_')]) == list(SITE_METRICS)
    assert hist.site_accuracy.between(0, 1).all() and (hist.site_loss > 0).all() and hist.site_roc_auc_score.nunique() > 1
    best = int(np.argmax(hist.site_roc_auc_score))
    assert best != int(np.argmax(hist.roc_auc_score)) and best != int(np.argmin(hist.valid_loss))  # the case under test
    assert m['best_epoch'] == best and m['best']['site_roc_auc_score'] == pytest.approx(hist.site_roc_auc_score.max())
    # the exported model is that epoch's: its site AUC, recomputed from `predict`, is the history's
    from xray_fastai.predict import predict
    df = predict(run, site, bs=128)
    auc = binary_metrics(df.p_pneumonia, df.path.str.contains('/PNEUMONIA/'))['roc_auc']
    assert auc == pytest.approx(hist.site_roc_auc_score[best], abs=1e-3)
    # early stopping on a site metric: the same training, stopped where the site's values say
    stopped = train(out=tmp_path/'stopped', monitor='site_specificity', patience=2, **kw)
    n, spec = len(pd.read_csv(stopped/'history.csv')), hist.site_specificity.values
    assert n == _stop_after(spec, 2, lower=False) < 8
    assert n != _stop_after(hist.valid_loss.values, 2, lower=True)  # validation would have stopped elsewhere
    np.testing.assert_allclose(pd.read_csv(stopped/'history.csv').site_specificity, spec[:n])

def test_site_leaves_training_unchanged(mini_npz, shared_data, tmp_path):
    "Fine-tuning with augmentation: a run with --site trains to the same weights as one without."
    from xray_fastai.distributed import model_checksum
    kw = _kw(mini_npz, epochs=2, lr=1e-2)
    plain, watched = train(out=tmp_path/'plain', **kw), train(out=tmp_path/'site', site=str(shared_data/'pneumoniamnist_site_A'), **kw)
    a, b = pd.read_csv(plain/'history.csv'), pd.read_csv(watched/'history.csv')
    pd.testing.assert_frame_equal(a.drop(columns='seconds'), b[a.columns].drop(columns='seconds'))
    assert b.site_roc_auc_score.between(0, 1).all()
    assert model_checksum(load_model_dir(plain)[0]) == model_checksum(load_model_dir(watched)[0])

def test_resume_keeps_site_columns(mini_npz, shared_data, tmp_path):
    "A frozen run with augmentation (no cached features) resumed for a third epoch: the replayed rows keep their site values."
    run = train(out=tmp_path/'run', keep_checkpoints=True, **_kw(mini_npz, frozen=True, epochs=2, lr=1e-2,
                                                                monitor='site_loss', site=str(shared_data/'pneumoniamnist_site_A')))
    before = pd.read_csv(run/'history.csv')
    cfg = load_json(run/'config.json')
    (run/'config.json').write_text(json.dumps({**cfg, 'epochs': 3}))  # as a run stopped after its second epoch
    resume(run)
    after, m = pd.read_csv(run/'history.csv'), load_json(run/'metrics.json')
    assert list(after.epoch) == [0, 1, 2] and after[list(SITE_METRICS)].notna().all().all()
    pd.testing.assert_frame_equal(after.iloc[:2][list(SITE_METRICS)], before[list(SITE_METRICS)])
    assert m['best_epoch'] == int(np.argmin(after.site_loss)) and m['monitor'] == 'site_loss'

def test_site_options_checked(mini_npz, shared_data, tmp_path):
    with pytest.raises(XrayError, match='needs a site sample'): RunConfig(**_kw(mini_npz, monitor='site_loss'))
    one = tmp_path/'one'/'NORMAL'
    one.mkdir(parents=True)
    for f in sorted((shared_data/'pneumoniamnist_site_A'/'NORMAL').glob('*.png'))[:3]: (one/f.name).write_bytes(f.read_bytes())
    with pytest.raises(XrayError, match='only one class'):
        train(out=tmp_path/'run', **_kw(mini_npz, frozen=True, aug=False, epochs=1, site=str(one.parent)))
    assert not (tmp_path/'run').exists()

def test_threshold_rules_by_hand():
    "Ties: every case at a probability counts as positive at that threshold; the highest of equally good ones wins."
    probs   = [0.9, 0.7, 0.7, 0.4, 0.4, 0.2]
    targets = [1,   1,   0,   1,   0,   0]
    # threshold: recall, specificity -> J; |recall - spec|
    # 0.9: 1/3, 1 -> 1/3; 2/3     0.7: 2/3, 2/3 -> 1/3; 0     0.4: 1, 1/3 -> 1/3; 2/3     0.2: 1, 0 -> 0; 1
    assert threshold_for_rule(probs, targets, 'youden') == 0.9  # three ties at J = 1/3: the highest
    assert threshold_for_rule(probs, targets, 'balanced') == 0.7
    assert threshold_for_rule(probs, targets, 'recall', 0.6) == 0.7
    assert threshold_for_rule(probs, targets, 'recall', 1.0) == 0.4

def test_threshold_on_a_site_recorded_and_used_by_predict(run_cli, mini_npz, shared_data, tmp_path):
    site = shared_data/'pneumoniamnist_site_A'
    run = tmp_path/'run'
    r = run_cli('train', '--data', mini_npz, '--arch', 'resnet18', '--no-pretrained', '--frozen', '--no-aug', '--epochs', '2',
                '--lr', '3e-2', '--no-verify', '--site', site, '--monitor', 'site_roc_auc_score', '--out', run)
    assert r.returncode == 0, r.stderr
    assert 'site_roc_auc_score' in r.stdout and 'site_specificity' in pd.read_csv(run/'history.csv')
    r = run_cli('predict', run, site, '--out', tmp_path/'plain.csv', '--threshold', 'site')
    assert r.returncode == 2 and 'has no site threshold' in r.stderr
    r = run_cli('evaluate', run, '--threshold-on', site, '--threshold-rule', 'youden', '--json')
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout)
    s = m['threshold_on']
    assert (s['rule'], s['source'], s['site']['n']) == ('youden', str(site), 312)
    assert m['chosen']['threshold'] == s['value'] and load_json(run/'site_threshold.json')['value'] == s['value']
    assert load_json(run/'eval-test'/'metrics.json')['threshold_on'] == s
    # the rule, recomputed by hand from predict's probabilities of the same images
    r = run_cli('predict', run, site, '--out', tmp_path/'preds.csv')
    assert r.returncode == 0, r.stderr
    df = pd.read_csv(tmp_path/'preds.csv')
    p, t = df.p_pneumonia.values, df.path.str.contains('/PNEUMONIA/').values
    cand = np.unique(p)
    j = [(p[t] >= c).mean() + (p[~t] < c).mean() - 1 for c in cand]
    assert s['value'] == pytest.approx(cand[np.argmax(j)], abs=1e-5)
    assert s['site']['recall'] + s['site']['specificity'] - 1 == pytest.approx(max(j), abs=0.01)
    # predict decides at it when asked; by default at the likelier class
    r = run_cli('predict', run, site, '--out', tmp_path/'site.csv', '--threshold', 'site')
    assert r.returncode == 0, r.stderr
    at = pd.read_csv(tmp_path/'site.csv')
    assert ((at.label == 'PNEUMONIA') == (at.p_pneumonia >= s['value'])).all()
    assert ((df.label == 'PNEUMONIA') == (df.p_pneumonia >= 0.5)).all()
    assert (at.label != df.label).any()  # the threshold changes decisions here (it is not 0.5)

def test_ensemble_threshold_on_a_site(mini_npz, shared_data, tmp_path):
    from xray_fastai.evaluate import ensemble, format_eval
    site = shared_data/'pneumoniamnist_site_A'
    runs = [train(out=tmp_path/f's{seed}', **{**_kw(mini_npz, frozen=True, aug=False, epochs=1, lr=3e-2), 'seed': seed})
            for seed in (0, 1)]
    m = ensemble(runs, tmp_path/'ens', split='valid', threshold_on=site, threshold_rule='balanced')
    s = m['threshold_on']
    assert s['rule'] == 'balanced' and m['chosen']['threshold'] == s['value'] and s['site']['n'] == 312
    assert abs(s['site']['recall'] - s['site']['specificity']) < 0.05
    assert load_json(tmp_path/'ens'/'metrics.json')['threshold_on'] == s
    assert 'by the balanced rule' in format_eval(m)
    assert not (runs[0]/'site_threshold.json').exists()  # an ensemble's threshold is not one run's

def test_site_under_ddp(run_cli, mini_npz, shared_data, tmp_path):
    "Two CPU processes: every rank gets rank 0's site values, so early stopping agrees and the weights end equal."
    out, ck = tmp_path/'ddp', tmp_path/'ck'
    r = run_cli('train', '--data', mini_npz, '--arch', 'resnet18', '--no-pretrained', '--frozen', '--no-aug', '--epochs', '4',
                '--lr', '3e-2', '--no-verify', '--site', shared_data/'pneumoniamnist_site_A', '--monitor', 'site_specificity',
                '--patience', '1', '--out', out, '--distributed', '2', env={'XRAY_FASTAI_RANK_CHECKSUM_DIR': str(ck)})
    assert r.returncode == 0, r.stderr
    hist = pd.read_csv(out/'history.csv')
    assert len(hist) == _stop_after(hist.site_specificity.values, 1, lower=False)
    assert hist[list(SITE_METRICS)].notna().all().all()
    sums = {p.read_text() for p in ck.glob('rank*.sha256')}
    assert len(list(ck.glob('rank*.sha256'))) == 2 and len(sums) == 1


def test_add_train_adds_the_sample_to_training_only(mini_npz, shared_data, tmp_path):
    "`add_train`: the sample's images join the training split only; the run evaluates on its data; it cannot be the watched site."
    from xray_fastai.core import ConfigError
    from xray_fastai.data import load_source
    from xray_fastai.evaluate import evaluate
    site = shared_data/'pneumoniamnist_site_A'
    run = train(out=tmp_path/'run', add_train=str(site), epochs=1, **_kw(mini_npz))
    c, base = RunConfig.load(run), load_source(mini_npz, verify=False, seed=0).counts()
    assert c.add_train == str(site)
    assert c.counts['train'] == {'NORMAL': base['train']['NORMAL'] + 117, 'PNEUMONIA': base['train']['PNEUMONIA'] + 195}
    assert c.counts['valid'] == base['valid']
    e = evaluate(run)  # its own data, the sample added again: the counts match the run's
    m = e['default']  # one epoch need not learn: the counts show it evaluated the run's own test split
    assert m['tp'] + m['fp'] + m['tn'] + m['fn'] == sum(base['test'].values())
    with pytest.raises(ConfigError, match='no longer measure an unseen site'):
        RunConfig(source=str(mini_npz), site=str(site), add_train=str(site))
