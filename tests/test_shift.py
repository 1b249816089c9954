"Adaptation without labels (AdaBN, EM prior correction) and the `shift` report, on real 28 px data and a tiny run."
import json, shutil
from pathlib import Path
import numpy as np, pandas as pd, pytest, torch
from PIL import Image
from torch import nn
from xray_fastai.core import XrayError, load_json
from xray_fastai.config import RunConfig
from xray_fastai.evaluate import ensemble
from xray_fastai.evaluate import binary_metrics, evaluate
from xray_fastai.learner import train
from xray_fastai.models import build_model
from xray_fastai.predict import predict
from xray_fastai.shift import (adabn, bn_layers, em_prior, train_prior, calibration, feature_shift, shift_report,
                               format_adaptation)


def _trained_like(seed=0):
    "A resnet18 whose BatchNorm layers hold non-trivial running statistics, as after training."
    torch.manual_seed(seed)
    m = build_model('resnet18', n_out=2, n_in=1, pretrained=False).eval()
    for bn in bn_layers(m):
        bn.running_mean.uniform_(-1, 1); bn.running_var.uniform_(0.5, 2); bn.num_batches_tracked.fill_(100)
        if bn.affine: bn.weight.data.uniform_(0.5, 1.5); bn.bias.data.uniform_(-0.5, 0.5)
    return m


def test_adabn_changes_batchnorm_running_statistics_only():
    model = _trained_like()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(24, 1, 28, 28) * 2 + 3  # a "site" whose inputs are shifted and scaled
    seen, dropout_training = {}, []
    first_bn = bn_layers(model)[0]
    drops = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert drops, "the head should hold dropout, to check it stays off"
    adapted = adabn(model, [x])  # one batch: the statistics are exactly that batch's
    # the original is untouched
    for k, v in model.state_dict().items(): assert torch.equal(v, before[k]), k
    after = adapted.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed and {k.rsplit('.', 1)[1] for k in changed} <= {'running_mean', 'running_var', 'num_batches_tracked'}
    assert sum(k.endswith('running_mean') for k in changed) == len(bn_layers(model))  # every BatchNorm layer
    for name, p in adapted.named_parameters(): assert torch.equal(p, before[name]), name  # affine weights too
    # the first BatchNorm's statistics are the batch statistics of its input (the stem conv's output)
    acts = adapted[0][0](x)  # conv1, unchanged
    bn = bn_layers(adapted)[0]
    torch.testing.assert_close(bn.running_mean, acts.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bn.running_var, acts.var((0, 2, 3), unbiased=True), rtol=1e-4, atol=1e-5)
    # everything is back in eval mode with its momentum; no module but BatchNorm ran in train mode (dropout off)
    assert not any(m.training for m in adapted.modules())
    assert all(b.momentum == 0.1 for b in bn_layers(adapted))
    hooks = [d.register_forward_hook(lambda m, i, o: dropout_training.append(m.training)) for d in drops]
    adabn(model, [x])
    for h in hooks: h.remove()
    assert dropout_training and not any(dropout_training)


def test_adabn_averages_batches_cumulatively():
    model = _trained_like(1)
    a, b = torch.randn(8, 1, 28, 28), torch.randn(8, 1, 28, 28) + 1
    two = adabn(model, [a, b, torch.randn(1, 1, 28, 28)])  # a single image is skipped
    bn, conv = bn_layers(two)[0], two[0][0]
    want = (conv(a).mean((0, 2, 3)) + conv(b).mean((0, 2, 3))) / 2  # momentum None: the mean over batches
    torch.testing.assert_close(bn.running_mean, want, rtol=1e-4, atol=1e-5)
    assert two.adabn_images == 16
    with pytest.raises(XrayError, match='no target images'): adabn(model, [torch.randn(1, 1, 28, 28)])
    with pytest.raises(XrayError, match='no BatchNorm'): adabn(nn.Sequential(nn.Linear(3, 2)), [torch.randn(4, 3)])


def _calibrated(n, prior, train_pi, seed):
    "Probabilities from the exact posterior of a two-Gaussian problem learnt with prior `train_pi`, on a site with `prior`."
    rng = np.random.default_rng(seed)
    y = rng.random(n) < prior
    x = rng.normal(np.where(y, 1.0, -1.0), 1.0)
    odds = np.exp(2 * x) * train_pi / (1 - train_pi)
    p1 = odds / (1 + odds)
    return np.stack([1 - p1, p1], 1), y, x


@pytest.mark.parametrize('prior', [0.3, 0.5, 0.95])
def test_em_recovers_a_known_prior(prior):
    train_pi = 0.74  # PneumoniaMNIST's training share of pneumonia
    probs, y, x = _calibrated(3000, prior, train_pi, seed=int(prior * 100))
    fixed, est, it = em_prior(probs, [1 - train_pi, train_pi])
    assert abs(est[1] - y.mean()) < 0.05 and it > 1
    assert abs(probs[:, 1].mean() - y.mean()) > 0.08  # the uncorrected mean probability is off: EM does the work
    # the corrected probabilities are the posterior under the estimated prior
    odds = np.exp(2 * x) * est[1] / est[0]
    np.testing.assert_allclose(fixed[:, 1], odds / (1 + odds), rtol=1e-6)
    # no shift: the prior stays
    probs, y, _ = _calibrated(3000, train_pi, train_pi, seed=1)
    assert abs(em_prior(probs, [1 - train_pi, train_pi])[1][1] - train_pi) < 0.05


def test_train_prior():
    c = dict(classes=['NORMAL', 'PNEUMONIA'], counts={'train': {'NORMAL': 1, 'PNEUMONIA': 3}})
    assert train_prior(RunConfig.from_dict(c)) == [0.25, 0.75]
    assert train_prior(RunConfig.from_dict({**c, 'class_weights': True})) == [0.5, 0.5]  # inverse-frequency weights: uniform
    with pytest.raises(XrayError, match='class counts'): train_prior(RunConfig.from_dict(dict(classes=['a', 'b'])))


def test_calibration_and_feature_shift():
    c = calibration([0.05, 0.15, 0.9, 0.95], [0, 0, 1, 0], bins=10)
    assert c['ece'] == pytest.approx((0.05 + 0.15 + 2 * abs(0.925 - 0.5)) / 4) and c['n'][9] == 2
    g = np.random.default_rng(0)
    ref = g.normal(size=(400, 24))
    assert feature_shift(ref, g.normal(size=(200, 24)))['ratio'] < 2
    assert feature_shift(ref, g.normal(0.5, 1, size=(200, 24)))['ratio'] > 4


@pytest.fixture(scope='module')
def small_run(mini_npz, tmp_path_factory):
    "One epoch of resnet18 from scratch, fine-tuned (BatchNorm statistics that AdaBN can change), on the mini npz."
    return train(out=tmp_path_factory.mktemp('runs')/'small', source=str(mini_npz), verify=False, pretrained=False,
                 arch='resnet18', aug=False, epochs=1, lr=1e-2, bs=64, seed=0)


@pytest.fixture(scope='module')
def flat_folders(shared_data, tmp_path_factory):
    "Unlabelled folders: 200 PneumoniaMNIST training images, as they are and inverted (a clearly shifted export)."
    root = tmp_path_factory.mktemp('flat')
    with np.load(shared_data/'pneumoniamnist.npz') as f: imgs = f['train_images'][-200:]
    for name, fn in (('like', lambda a: a), ('inverted', lambda a: 255 - a)):
        (root/name).mkdir()
        for i, a in enumerate(imgs): Image.fromarray(fn(a)).save(root/name/f"{i:03d}.png")
    return root


def test_shift_report_labelled(small_run, shared_data, tmp_path):
    site = shared_data/'pneumoniamnist_site_A'
    r = shift_report(small_run, site, tmp_path/'rep')
    out = tmp_path/'rep'
    for f in ('report.md', 'shift.json', 'preds.csv', 'scores.png', 'intensity.png', 'reliability.png'):
        assert (out/f).is_file() and (out/f).stat().st_size > 0, f
    df = pd.read_csv(out/'preds.csv')
    assert len(df) == r['n_site'] == 312 and df.target.sum() == 195
    m = binary_metrics(df.prob, df.target)
    for k in ('accuracy', 'roc_auc', 'recall', 'specificity', 'tn', 'fp', 'fn', 'tp'): assert r['site'][k] == pytest.approx(m[k]), k
    assert r['site']['calibration']['ece'] == pytest.approx(calibration(df.prob, df.target)['ece'])
    assert load_json(out/'shift.json')['site']['accuracy'] == r['site']['accuracy']
    # validation's side matches `evaluate`'s validation metrics (the same model, split and pipeline)
    v = evaluate(small_run, split='valid')['valid']
    for k in ('accuracy', 'roc_auc', 'recall', 'specificity'): assert r['valid'][k] == pytest.approx(v[k], abs=1e-6), k
    md = (out/'report.md').read_text()
    assert f"| accuracy | {r['valid']['accuracy']:.4f} | {r['site']['accuracy']:.4f} |" in md and 'reliability.png' in md
    assert r['prior']['site_true'] == pytest.approx(195 / 312)
    with pytest.raises(XrayError, match='already exists and is not empty'): shift_report(small_run, site, out)


def test_shift_report_unlabelled_warns_for_a_shifted_folder(small_run, flat_folders, tmp_path, shared_data):
    like = shift_report(small_run, flat_folders/'like', tmp_path/'like')
    assert not like['labelled'] and like['site'] is None and like['n_site'] == 200
    assert like['warnings'] == [], like['warnings']
    assert like['features']['ratio'] < 2 and abs(like['intensity_z']) < 1
    inv = shift_report(small_run, flat_folders/'inverted', tmp_path/'inv')
    assert inv['features']['ratio'] > 2 and len(inv['warnings']) >= 1
    assert any('look different to the model' in w for w in inv['warnings'])
    assert 'reliability.png' not in (tmp_path/'inv'/'report.md').read_text() and not (tmp_path/'inv'/'reliability.png').exists()
    assert 'look different' in (tmp_path/'inv'/'report.md').read_text()
    assert list(pd.read_csv(tmp_path/'inv'/'preds.csv').columns) == ['item', 'prob']
    # --unlabelled ignores class folders; full-resolution JPEGs (L and RGB, any size) and an unreadable file
    fr = tmp_path/'fullres'
    shutil.copytree(shared_data/'chest_xray_fullres_sample', fr)
    (fr/'train'/'NORMAL'/'broken.jpeg').write_bytes(b'not an image')
    r = shift_report(small_run, fr, tmp_path/'fr', unlabelled=True)
    assert not r['labelled'] and r['n_site'] == 23 and r['skipped'] == 1 and len(pd.read_csv(tmp_path/'fr'/'preds.csv')) == 23


def test_evaluate_and_predict_adapted(small_run, shared_data, tmp_path):
    site = shared_data/'pneumoniamnist_site_A'
    plain = evaluate(small_run, source=site)
    ad = evaluate(small_run, source=site, adabn='same')
    pc = evaluate(small_run, source=site, prior_correction=True)
    folders = {Path(m['folder']).name for m in (plain, ad, pc)}
    assert len(folders) == 3 and Path(ad['folder']).name.endswith('-adabn') and Path(pc['folder']).name.endswith('-prior')
    assert ad['adabn'] == {'target': 'same', 'images': 312} and 'adabn' not in plain
    assert format_adaptation(ad) == 'adapted without labels: AdaBN on same (312 images)' and format_adaptation(plain) == ''
    assert ad['default'] != plain['default'] and ad['valid'] == plain['valid']  # validation keeps the trained model
    assert load_json(Path(pc['folder'])/'metrics.json')['prior_correction']['iterations'] >= 1
    assert pc['default']['roc_auc'] == pytest.approx(plain['default']['roc_auc'])  # monotone correction
    est = pc['prior_correction']['estimated_prior']['PNEUMONIA']
    # (a one-epoch model is badly calibrated: its EM estimate may run to 0 or 1, see bench/ADAPTATION.md)
    assert 0 <= est <= 1 and sum(pc['prior_correction']['estimated_prior'].values()) == pytest.approx(1)
    p = pd.read_csv(Path(pc['folder'])/'preds.csv')
    assert binary_metrics(p.prob, p.target)['accuracy'] == pytest.approx(pc['default']['accuracy'])  # corrected preds
    files = sorted(site.rglob('*.png'))[::10]
    df = predict(small_run, files, adabn='same', prior_correction=True)
    raw = predict(small_run, files)
    assert (df.adabn == 'same').all() and 'prior_pneumonia' in df and 'p_pneumonia_uncorrected' in df
    ad_raw = predict(small_run, files, adabn='same')
    np.testing.assert_allclose(df.p_pneumonia_uncorrected, ad_raw.p_pneumonia)
    assert not np.allclose(ad_raw.p_pneumonia, raw.p_pneumonia)
    fixed, prior, _ = em_prior(np.stack([1 - ad_raw.p_pneumonia, ad_raw.p_pneumonia], 1), train_prior(RunConfig.load(small_run)))
    np.testing.assert_allclose(df.p_pneumonia, fixed[:, 1], rtol=1e-6)
    assert (df.label == np.where(fixed[:, 1] >= 0.5, 'PNEUMONIA', 'NORMAL')).all()


def test_ensemble_adapted(small_run, mini_npz, shared_data, tmp_path):
    "`ensemble --adabn same`: every member adapted to the site's images, then averaged; prior correction on the mean."
    other = train(out=tmp_path/'other', source=str(mini_npz), verify=False, pretrained=False, arch='resnet18', aug=False,
                  epochs=1, lr=1e-2, bs=64, seed=1)
    site = shared_data/'pneumoniamnist_site_A'
    plain = ensemble([small_run, other], tmp_path/'plain', source=site)
    ad = ensemble([small_run, other], tmp_path/'ad', source=site, adabn='same', prior_correction=True)
    members = [pd.read_csv(Path(evaluate(r, source=site, adabn='same')['folder'])/'preds.csv').prob for r in (small_run, other)]
    mean = (members[0] + members[1]) / 2
    unc = pd.read_csv(tmp_path/'plain'/'preds.csv').prob
    assert not np.allclose(mean, unc)  # adapted members predict otherwise
    fixed, prior, _ = em_prior(np.stack([1 - mean, mean], 1), train_prior(RunConfig.load(small_run)))
    np.testing.assert_allclose(pd.read_csv(tmp_path/'ad'/'preds.csv').prob, fixed[:, 1], rtol=1e-5)
    assert ad['adabn'] == {'target': 'same', 'images': 312} and ad['prior_correction']['iterations'] >= 1
    assert 'adabn' not in plain and ad['valid'] == plain['valid']  # validation keeps the trained members


def _main(capsys, *args) -> tuple:
    "Run the CLI in this process: (exit status, stdout, stderr)."
    from xray_fastai.cli import main
    with pytest.raises(SystemExit) as e: main([str(a) for a in args])
    out, err = capsys.readouterr()
    return e.value.code, out, err


def test_shift_cli(small_run, flat_folders, run_cli, tmp_path, shared_data, capsys):
    r = run_cli('shift', small_run, '--source', flat_folders/'inverted', '--out', tmp_path/'rep')  # the real command
    assert r.returncode == 0, r.stderr
    assert 'unlabelled' in r.stdout and 'warning: ' in r.stdout and (tmp_path/'rep'/'report.md').is_file()
    for args, msg in ((('--source', tmp_path/'nope', '--out', tmp_path/'o1'), 'does not exist'),
                      (('--source', flat_folders/'like', '--out', tmp_path/'rep'), 'already exists and is not empty'),
                      (('--source', flat_folders/'like', '--out', tmp_path/'o2', '--split', 'bogus'), 'unknown split'),
                      (('--source', flat_folders/'like', '--out', tmp_path/'o3', '--bs', '0'), '--bs must be positive')):
        code, out, err = _main(capsys, 'shift', small_run, *args)
        assert code == 2 and err.startswith('error: ') and msg in err and len(err.strip().splitlines()) == 1, err
    code, _, err = _main(capsys, 'shift', tmp_path, '--source', flat_folders/'like', '--out', tmp_path/'o4')
    assert code == 2 and 'not a run folder' in err
    assert not any((tmp_path/o).exists() for o in ('o1', 'o2', 'o3', 'o4'))
    code, _, err = _main(capsys, 'predict', small_run, flat_folders/'like', '--adabn', tmp_path/'nope', '--out', tmp_path/'p.csv')
    assert code == 2 and err.startswith('error: ') and 'does not exist' in err and not (tmp_path/'p.csv').exists()
    code, _, err = _main(capsys, 'predict', small_run, flat_folders/'like', '--adabn', 'same', '--prior-correction',
                         '--out', tmp_path/'p.csv')
    assert code in (0, None), err
    df = pd.read_csv(tmp_path/'p.csv')
    assert len(df) == 200 and (df.adabn == 'same').all() and df.prior_pneumonia.nunique() == 1
