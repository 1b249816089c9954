"Evaluation: metrics from a confusion matrix, the threshold for a target recall, and `evaluate` on a tiny trained run."
import json, shutil
from pathlib import Path
import numpy as np, pandas as pd, pytest, torch
from xray_fastai.core import XrayError, load_json, save_json
from xray_fastai.evaluate import binary_metrics, threshold_for_recall, evaluate, eval_dir, format_eval, decide, ensemble
from xray_fastai.learner import train
from xray_fastai.runs import load_model_dir

PNG = b'\x89PNG\r\n\x1a\n'


def test_binary_metrics_hand_computed():
    # 12 cases, 5 positive. At 0.5: TP = .95 .7 .5 (3), FN = .4 .1 (2), FP = .8 .6 (2), TN = the other 5.
    probs   = [0.95, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.2, 0.1, 0.1, 0.0]
    targets = [1,    0,   1,   0,   1,   1,   0,   0,   0,   1,   0,   0]
    m = binary_metrics(probs, targets, 0.5)
    assert (m['tn'], m['fp'], m['fn'], m['tp'], m['n']) == (5, 2, 2, 3, 12)
    assert m['accuracy'] == pytest.approx(8 / 12)
    assert m['precision'] == pytest.approx(3 / 5)
    assert m['recall'] == pytest.approx(3 / 5)
    assert m['specificity'] == pytest.approx(5 / 7)
    assert m['f1'] == pytest.approx(2 * 3 / (2 * 3 + 2 + 2))
    # AUC = share of (positive, negative) pairs ranked right, ties counting half: by hand 24.5 of 35
    assert m['roc_auc'] == pytest.approx(24.5 / 35)
    p, t = np.clip(probs, 1e-7, 1 - 1e-7), np.array(targets)
    assert m['loss'] == pytest.approx(-np.mean(t * np.log(p) + (1 - t) * np.log(1 - p)))
    # another threshold moves only the counts: 0.65 calls .95 .8 .7 positive
    m = binary_metrics(probs, targets, 0.65)
    assert (m['tn'], m['fp'], m['fn'], m['tp']) == (6, 1, 3, 2) and m['roc_auc'] == pytest.approx(24.5 / 35)


def test_binary_metrics_edge_cases():
    m = binary_metrics(torch.tensor([0.1, 0.2, 0.3]), torch.tensor([0, 0, 0]))  # tensors, no positive at all
    assert (m['tn'], m['fp'], m['fn'], m['tp']) == (3, 0, 0, 0)
    assert m['precision'] == m['recall'] == m['f1'] == 0 and m['specificity'] == 1 and m['roc_auc'] is None
    with pytest.raises(XrayError, match='as many'): binary_metrics([0.1, 0.2], [1])


def test_threshold_for_recall_is_highest_reaching_target():
    rng = np.random.default_rng(0)
    t = rng.integers(0, 2, 300)
    p = np.round(np.clip(0.3 * t + rng.normal(0.4, 0.2, 300), 0, 1), 2)  # rounded: many ties
    cands = np.unique(p)
    for target in (0.5, 0.8, 0.9, 0.95, 0.99, 1.0):
        thr = threshold_for_recall(p, t, target)
        assert binary_metrics(p, t, thr)['recall'] >= target
        # brute force over every distinct score: none higher reaches the target
        assert thr == max(c for c in cands if binary_metrics(p, t, c)['recall'] >= target)
        assert binary_metrics(p, t, np.nextafter(thr, 1))['recall'] < target
    with pytest.raises(XrayError, match='no positive'): threshold_for_recall(p, np.zeros_like(t))
    with pytest.raises(XrayError, match='target recall'): threshold_for_recall(p, t, 0)


def test_decide_threshold():
    preds = torch.tensor([[0.7, 0.3], [0.4, 0.6], [0.9, 0.1]])
    assert decide(preds, 1, 0.5).tolist() == [0, 1, 0]
    assert decide(preds, 1, 0.2).tolist() == [1, 1, 0]


@pytest.fixture(scope='module')
def tiny_run(mini_npz, tmp_path_factory):
    "One epoch of a fixed-feature resnet34 from scratch, without augmentation (cached features): a few seconds."
    return train(out=tmp_path_factory.mktemp('runs')/'tiny', source=str(mini_npz), verify=False, pretrained=False,
                 arch='resnet34', frozen=True, aug=False, epochs=1, lr=1e-2, bs=64, seed=0)


@pytest.mark.slow
def test_evaluate_writes_everything(tiny_run, mini_npz):
    m = evaluate(tiny_run)
    out = eval_dir(tiny_run)
    assert out == tiny_run/'eval-test'
    for f in ('confusion_matrix.png', 'confusion_matrix_chosen.png', 'top_losses.png', 'roc.png'):
        assert (out/f).read_bytes()[:8] == PNG, f
    assert 'PNEUMONIA' in (out/'classification_report.txt').read_text()
    saved = load_json(out/'metrics.json')
    assert saved['default'] == m['default'] and saved['chosen'] == m['chosen']
    assert saved['split'] == 'test' and saved['n'] == 128 and saved['positive'] == 'PNEUMONIA'
    for row in ('default', 'chosen'):
        r = saved[row]
        assert r['tn'] + r['fp'] + r['fn'] + r['tp'] == 128
        assert r['tp'] + r['fn'] == 64  # the subset is class-balanced
        assert r['accuracy'] == pytest.approx((r['tp'] + r['tn']) / 128)
    assert saved['default']['threshold'] == 0.5
    assert saved['chosen']['valid_recall'] >= 0.95
    # the metrics follow from the saved probabilities
    preds = pd.read_csv(out/'preds.csv')
    assert len(preds) == 128 and set(preds.label) == {'NORMAL', 'PNEUMONIA'}
    assert binary_metrics(preds.prob, preds.target, saved['chosen']['threshold']) == \
        {k: v for k, v in saved['chosen'].items() if k != 'valid_recall'}
    # ... and those are the deployable model's, on the raw pixels normalised with the run's stats
    model, meta = load_model_dir(tiny_run)
    with np.load(mini_npz) as f:  # an npz item is its index in train + val + test
        images = np.concatenate([f[f'{s}_images'] for s in ('train', 'val', 'test')])
    x = torch.tensor(images[preds.item.values], dtype=torch.float32) / 255
    (mean,), (std,) = meta['stats']
    with torch.no_grad(): probs = model(((x - mean) / std)[:, None]).softmax(1)[:, 1]
    np.testing.assert_allclose(probs.numpy(), preds.prob.values, atol=1e-5)
    text = format_eval(m)
    assert '0.5' in text and '*' in text and 'recall' in text


@pytest.mark.slow
def test_threshold_is_chosen_on_validation(tiny_run):
    v, t = evaluate(tiny_run, split='valid'), load_json(eval_dir(tiny_run)/'metrics.json')
    thr = v['chosen']['threshold']
    assert t['chosen']['threshold'] == thr  # the test evaluation used the validation split's threshold
    assert t['valid'] == v['valid'] == v['default']  # ... and reports the validation metrics it computed for it
    preds = pd.read_csv(eval_dir(tiny_run, 'valid')/'preds.csv')
    assert binary_metrics(preds.prob, preds.target, thr)['recall'] >= 0.95
    assert binary_metrics(preds.prob, preds.target, np.nextafter(thr, 1))['recall'] < 0.95
    # the rebuilt learner is the trained one: training logged the same loss and accuracy for its best epoch
    best = load_json(tiny_run/'metrics.json')['best']
    assert v['default']['loss'] == pytest.approx(best['valid_loss'], abs=1e-4)
    assert v['default']['accuracy'] == pytest.approx(best['accuracy'])


@pytest.mark.slow
def test_evaluate_tta(tiny_run):
    if not (eval_dir(tiny_run)/'preds.csv').is_file(): evaluate(tiny_run)
    m = evaluate(tiny_run, tta=True)
    assert m['tta'] and eval_dir(tiny_run, tta=True) == tiny_run/'eval-test-tta'
    assert (tiny_run/'eval-test-tta'/'top_losses.png').read_bytes()[:8] == PNG
    plain, tta = (pd.read_csv(eval_dir(tiny_run, tta=t)/'preds.csv') for t in (False, True))
    assert sum(m['default'][k] for k in ('tn', 'fp', 'fn', 'tp')) == 128
    # the run had no augmentation: TTA adds XRAY_AUG's, and the augmented passes change the probabilities
    assert (plain.item == tta.item).all() and not np.allclose(plain.prob, tta.prob)


@pytest.mark.slow
def test_evaluate_user_errors(tiny_run, shared_data, tmp_path):
    # the Kermany folder ships without test/: one clear line, before any model is built
    with pytest.raises(XrayError, match=r'has no test split'):
        evaluate(tiny_run, source=shared_data/'chest_xray_224')
    with pytest.raises(XrayError, match='not a run folder'): evaluate(tmp_path)
    with pytest.raises(XrayError, match='unknown split'): evaluate(tiny_run, split='holdout')
    with pytest.raises(XrayError, match='target-recall'): evaluate(tiny_run, target_recall=1.5)

@pytest.mark.slow
def test_evaluate_cli_bad_target_recall(tiny_run, run_cli):
    r = run_cli('evaluate', tiny_run, '--target-recall', '1.5')
    assert r.returncode == 2 and r.stderr.splitlines() == ['error: --target-recall must be in (0, 1], got 1.5'], r.stderr


@pytest.mark.slow
def test_ensemble_cli(tiny_run, mini_npz, run_cli, tmp_path):
    # another backbone at another input size: each member predicts through its own pipeline
    second = train(out=tmp_path/'seed1', source=str(mini_npz), verify=False, pretrained=False, arch='resnet18',
                   size=32, frozen=True, aug=False, epochs=1, lr=1e-2, bs=64, seed=1)
    out = tmp_path/'ens'
    r = run_cli('ensemble', tiny_run, second, '--out', out)
    assert r.returncode == 0, r.stderr
    assert 'ensemble of 2' in r.stdout and f'written: {out}' in r.stderr
    m, preds = load_json(out/'metrics.json'), pd.read_csv(out/'preds.csv')
    assert m['members'] == [str(tiny_run), str(second)] and m['n'] == 128 and m['arch'] == 'resnet34+resnet18'
    # the ensemble's probability is the members' mean, and each member's is what `evaluate` gives it alone
    np.testing.assert_allclose(preds.prob, (preds.prob_0 + preds.prob_1) / 2, atol=1e-6)
    evaluate(second)
    np.testing.assert_allclose(preds.prob_1, pd.read_csv(eval_dir(second)/"preds.csv").prob, atol=1e-6)
    assert binary_metrics(preds.prob, preds.target, m['chosen']['threshold']) == \
        {k: v for k, v in m['chosen'].items() if k != 'valid_recall'}
    assert (out/'roc.png').read_bytes()[:8] == PNG and not (out/'top_losses.png').exists()
    # running it again replaces its own output; a folder it did not write is never written into
    assert run_cli('ensemble', tiny_run, second, '--out', out).returncode == 0
    r = run_cli('ensemble', tiny_run, second, '--out', tiny_run)
    assert r.returncode == 2 and r.stderr.strip() == f"error: folder {tiny_run} already exists and is not empty: it is not an ensemble's output; choose another --out"
    r = run_cli('ensemble', tiny_run, '--out', tmp_path/'one')
    assert r.returncode == 2 and 'at least two run folders' in r.stderr and not (tmp_path/'one').exists()


@pytest.mark.slow
def test_ensemble_needs_the_same_validation_split(tiny_run, tmp_path):
    other = tmp_path/'other'
    other.mkdir()
    for f in ('config.json', 'model.safetensors'): (other/f).write_bytes((tiny_run/f).read_bytes())
    c = load_json(other/'config.json')
    (other/'config.json').write_text(json.dumps({**c, 'valid_origin': 'carved from train (stratified, 1/5, seed 7)'}))
    with pytest.raises(XrayError, match='validated on the same split'): ensemble([tiny_run, other], tmp_path/'ens')
    # a dataset with its own val split: the same valid_origin text, other images (a subset, or another dataset)
    (other/'config.json').write_text(json.dumps({**c, 'counts': {**c['counts'], 'valid': {'NORMAL': 1, 'PNEUMONIA': 1}}}))
    with pytest.raises(XrayError, match='with other images per split: an ensemble'): ensemble([tiny_run, other], tmp_path/'ens')
    assert not (tmp_path/'ens').exists()


@pytest.mark.slow
def test_a_changed_source_is_refused(tiny_run, tmp_path):
    "The run's data gained images since training: its validation split is no longer the one the run used."
    run = Path(shutil.copytree(tiny_run, tmp_path/'run', ignore=shutil.ignore_patterns('*.pth', 'eval-*')))
    c = load_json(run/'config.json')
    save_json({**c, 'counts': {**c['counts'], 'train': {k: v - 1 for k, v in c['counts']['train'].items()}}}, run/'config.json')
    with pytest.raises(XrayError, match=r'has changed since the run trained \(train .* then, .* now\)'): evaluate(run)
    assert not any(run.glob('eval-*'))


@pytest.mark.slow
def test_external_test_only_csv(tiny_run, shared_data, tmp_path):
    "Another hospital's labelled test images, listed in a CSV: only predicted; the threshold is the run's own."
    rows = [(str(f), c, 'test') for c in ('NORMAL', 'PNEUMONIA')
            for f in sorted((shared_data/'chest_xray_224'/'train'/c).glob('*.jpeg'))[:6]]
    pd.DataFrame(rows, columns=['path', 'label', 'split']).to_csv(tmp_path/'other.csv', index=False)
    m = evaluate(tiny_run, source=tmp_path/'other.csv')
    assert m['n'] == 12 and m['default']['tn'] + m['default']['fp'] == 6
    assert Path(m['folder']).parent == tiny_run and Path(m['folder']).name.startswith('eval-test-on-other.csv-')
    assert m['chosen']['threshold'] == evaluate(tiny_run, split='valid')['chosen']['threshold']
    assert sorted(pd.read_csv(Path(m['folder'])/'preds.csv').item) == sorted(r[0] for r in rows)
    with pytest.raises(XrayError, match='has no valid split'): evaluate(tiny_run, source=tmp_path/'other.csv', split='valid')
