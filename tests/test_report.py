"Comparison of runs (stability, table, findings, plots) and the experiment grid."
import shutil
import pandas as pd, pytest
from xray_fastai.core import XrayError, load_json, save_json
from xray_fastai.report import stability, compare, format_compare
from xray_fastai.experiment import experiment
from xray_fastai.learner import train

PNG = b'\x89PNG\r\n\x1a\n'

HISTORY = """epoch,stage,stage_epoch,train_loss,valid_loss,accuracy,precision_score,recall_score,f1_score,roc_auc_score,seconds
0,0,0,0.80,0.62,0.70,0.7,0.7,0.7,0.8,1.5
1,0,1,0.60,0.48,0.80,0.8,0.8,0.8,0.9,1.4
2,1,0,0.50,0.55,0.75,0.8,0.7,0.7,0.9,2.5
3,1,1,0.40,0.41,0.85,0.9,0.8,0.8,0.9,2.6
4,1,2,0.30,0.44,0.90,0.9,0.9,0.9,0.95,2.4
"""

def test_stability_known_history(tmp_path):
    (tmp_path/'history.csv').write_text(HISTORY)
    s = stability(pd.read_csv(tmp_path/'history.csv'))
    # accuracy .70 .80 .75 .85 .90: mean .80, squared deviations .01 0 .0025 .0025 .01 -> variance .025/5
    assert s['val_acc_best'] == pytest.approx(0.90)
    assert s['val_acc_median'] == pytest.approx(0.80)
    assert s['val_acc_std'] == pytest.approx(0.005 ** 0.5)
    # valid_loss .62 .48 .55 .41 .44: mean .50, squared deviations .0144 .0004 .0025 .0081 .0036 -> .029/5
    assert s['val_loss_best'] == pytest.approx(0.41)
    assert s['val_loss_median'] == pytest.approx(0.48)
    assert s['val_loss_std'] == pytest.approx(0.0058 ** 0.5)
    assert stability(pd.read_csv(tmp_path/'history.csv').head(1))['val_acc_std'] == 0  # one epoch: no spread


def _fake_run(path, spe, params, trainable, accs, losses, best_epoch, ev=None):
    "A run folder as `train` (and optionally `evaluate`) leave it, with chosen numbers."
    path.mkdir(parents=True)
    n = len(accs)
    pd.DataFrame(dict(epoch=range(n), stage=0, stage_epoch=range(n), train_loss=0.5, valid_loss=losses, accuracy=accs,
                      seconds=spe)).to_csv(path/'history.csv', index=False)
    save_json(dict(arch='resnet34', mode='frozen', epochs=n, best_epoch=best_epoch, wall_seconds=spe * n + 1,
                   seconds_per_epoch=spe, params=params, trainable_params=trainable), path/'metrics.json')
    if ev:
        f1, auc, spec, rec = ev
        row = dict(threshold=0.5, n=4, tn=1, fp=1, fn=1, tp=1, loss=0.6, accuracy=0.5, precision=0.5, recall=0.5,
                   specificity=0.5, f1=f1, roc_auc=auc)
        save_json(dict(target_recall=0.95, default=row, chosen={**row, 'threshold': 0.1, 'recall': rec, 'specificity': spec}),
                  path/'eval-test'/'metrics.json')
        pd.DataFrame(dict(item=range(4), label='x', target=[0, 0, 1, 1], prob=[0.1, 0.6, 0.4, 0.9], loss=0.1)
                     ).to_csv(path/'eval-test'/'preds.csv', index=False)
    return path


@pytest.fixture
def fake_runs(tmp_path):
    return [_fake_run(tmp_path/'a', 2.0, 1_000_000, 1_000_000, [0.6, 0.7, 0.8], [0.7, 0.6, 0.5], 2, (0.8, 0.9, 0.5, 0.96)),
            _fake_run(tmp_path/'b', 0.5, 1_000_000, 250_000, [0.75, 0.75, 0.76], [0.55, 0.56, 0.57], 0, (0.7, 0.85, 0.6, 0.95)),
            _fake_run(tmp_path/'c', 1.0, 1_000_000, 500_000, [0.5], [0.9], 0)]


def test_compare_fake_runs(fake_runs, tmp_path):
    res = compare(fake_runs, out=tmp_path/'cmp')
    a, b, c = res['rows']
    assert (a['epochs_to_best'], b['epochs_to_best'], c['epochs_to_best']) == (3, 1, 1)
    assert a['val_acc_std'] == pytest.approx((0.02 / 3) ** 0.5) and b['val_acc_median'] == pytest.approx(0.75)
    assert a['test_f1'] == 0.8 and a['test_chosen_recall'] == 0.96 and c['test_f1'] is None
    assert res['findings'] == [
        'fastest: b (0.50 s/epoch, 4.0x faster than a at 2.00 s/epoch)',
        'fewest trainable parameters: b (0.25M of 1.00M; 4.0x fewer than a)',
        'fewest epochs to the best one: b (1; most: a, 3)',
        'most stable (lowest std of validation accuracy over epochs): b (0.0047; least stable: a, 0.0816)',
        'best validation accuracy: a (0.8000; lowest: c, 0.5000)',
        'lowest validation loss: a (0.5000; highest: c, 0.9000)',
        'best test F1 (threshold 0.5): a (0.8000; lowest: b, 0.7000)',
        'best test ROC AUC: a (0.9000; lowest: b, 0.8500)',
        'best test specificity at the threshold chosen for validation recall >= 0.95: b (specificity 0.6000 at recall '
        '0.9500; lowest: a, 0.5000 at recall 0.9600)',
        'not evaluated on the test split: c']
    out = tmp_path/'cmp'
    for f in ('curves.png', 'roc.png'): assert (out/f).read_bytes()[:8] == PNG
    # runs trained on other data: said first, since every ranking below compares different images
    for r, src, n in zip(fake_runs, ('/d/one.npz', 'one', '/d/two.npz'), (1, 1, 2)):
        save_json(dict(source=src, counts={'train': {'NORMAL': n}}), r/'config.json')
    assert compare(fake_runs)['findings'][0] == ("the runs were trained on different data, so their validation and test "
        "metrics are on different images and do not compare like for like: a, b: /d/one.npz; c: /d/two.npz")
    (fake_runs[2]/'config.json').write_text('{"damaged')  # unknown data: a group of its own, no traceback
    assert compare(fake_runs)['findings'][0].endswith('a, b: /d/one.npz; c: None')
    csv = pd.read_csv(out/'comparison.csv')
    assert list(csv.run) == ['a', 'b', 'c'] and csv.seconds_per_epoch.tolist() == [2.0, 0.5, 1.0]
    assert load_json(out/'comparison.json')['findings'] == res['findings']
    md = (out/'report.md').read_text()
    assert '![ROC curves](roc.png)' in md and '![validation accuracy and loss per epoch](curves.png)' in md
    assert all(f in md for f in res['findings'])
    table = [l for l in md.splitlines() if l.startswith('| ') and not l.startswith('| run')]
    assert len(table) == 3 and table[2].endswith('| - | - | - |')  # c: no test metrics
    assert 'fastest: b' in format_compare(res)
    # without `out`, nothing is written
    assert compare(fake_runs)['files'] == {}


def test_compare_errors(fake_runs, tmp_path):
    with pytest.raises(XrayError, match='not a finished run'): compare([tmp_path])
    with pytest.raises(XrayError, match='twice'): compare([fake_runs[0], fake_runs[0]])
    with pytest.raises(XrayError, match='at least one'): compare([])
    ev = fake_runs[1]/'eval-test'/'metrics.json'
    save_json({**load_json(ev), 'target_recall': 0.98}, ev)
    with pytest.raises(XrayError, match=r'different --target-recall \(0.95, 0.98\)'): compare(fake_runs)


def test_compare_split_names_and_out(fake_runs, tmp_path):
    assert compare(fake_runs, split='val')['split'] == 'valid'  # as `evaluate` names it (its folders: eval-valid/)
    with pytest.raises(XrayError, match='unknown split'): compare(fake_runs, split='tst')
    mine = tmp_path/'mine'
    mine.mkdir(); (mine/'report.md').write_text('my notes')
    with pytest.raises(XrayError, match='holds no earlier report'): compare(fake_runs, out=mine)
    assert (mine/'report.md').read_text() == 'my notes' and len(list(mine.iterdir())) == 1
    with pytest.raises(XrayError, match='is a file'): compare(fake_runs, out=mine/'report.md')
    out = tmp_path/'cmp'
    assert 'roc' in compare(fake_runs, out=out)['files']
    again = compare(fake_runs[2:], out=out)  # an earlier comparison is replaced, its ROC too (c is not evaluated)
    assert 'roc' not in again['files'] and not (out/'roc.png').exists()
    assert list(pd.read_csv(out/'comparison.csv').run) == ['c']


def test_experiment_checks_before_training(tmp_path):
    with pytest.raises(XrayError, match='modes are frozen and finetune'):
        experiment('x.npz', 'resnet34', 'frozen,scratch', out=tmp_path/'e')
    with pytest.raises(XrayError, match='unknown architecture'):
        experiment('x.npz', 'resnet34,nonet', 'frozen', out=tmp_path/'e', pretrained=False)
    assert not (tmp_path/'e').exists()


def test_experiment_checks_split_and_recall_before_training(shared_data, tmp_path):
    kw = dict(out=tmp_path/'e', pretrained=False, verify=False)
    fullres = shared_data/'chest_xray_fullres_sample'  # a train folder only: no test split
    with pytest.raises(XrayError, match='has no test split'): experiment(fullres, 'resnet18', 'frozen', **kw)
    npz = shared_data/'pneumoniamnist.npz'
    with pytest.raises(XrayError, match='target-recall'): experiment(npz, 'resnet18', 'frozen', target_recall=0, **kw)
    with pytest.raises(XrayError, match='unknown split'): experiment(npz, 'resnet18', 'frozen', split='tst', **kw)
    assert not (tmp_path/'e').exists()  # nothing trained, nothing written
    mine = tmp_path/'mine'
    mine.mkdir(); (mine/'notes.txt').write_text('mine')
    with pytest.raises(XrayError, match='holds no earlier report'): experiment(npz, 'resnet18', 'frozen', out=mine)
    assert [f.name for f in mine.iterdir()] == ['notes.txt']


@pytest.mark.slow
def test_experiment_grid(mini_npz, tmp_path):
    out = tmp_path/'exp'
    kw = dict(epochs=1, pretrained=False, verify=False, seed=0, lr=1e-3, freeze_epochs=1)
    res = experiment(mini_npz, ['resnet34', 'mobilenet_v2'], ['frozen', 'finetune'], out, **kw)
    names = ['resnet34-frozen', 'resnet34-finetune', 'mobilenet_v2-frozen', 'mobilenet_v2-finetune']
    assert [r['run'] for r in res['rows']] == names
    # the seed report's fine-tune (head-only epochs first) beside frozen runs, which have no such stage
    assert [load_json(out/n/'config.json')['freeze_epochs'] for n in names] == [0, 1, 0, 1]
    for n in names:
        ev = load_json(out/n/'eval-test'/'metrics.json')
        assert ev['split'] == 'test' and sum(ev['chosen'][k] for k in ('tn', 'fp', 'fn', 'tp')) == 128
        assert load_json(out/n/'metrics.json')['mode'] == n.split('-')[1]
    frozen, finetune = res['rows'][0], res['rows'][1]
    assert frozen['trainable_params'] < finetune['trainable_params'] == finetune['params']
    md = (out/'report.md').read_text()
    rows = [l for l in md.splitlines() if l.startswith('| ') and not l.startswith('| run')]
    assert [r.split(' | ')[0][2:] for r in rows] == names
    assert all('| - |' not in r for r in rows)  # every run has its test metrics
    assert (out/'roc.png').read_bytes()[:8] == PNG and (out/'curves.png').read_bytes()[:8] == PNG
    assert load_json(out/'experiment.json')['archs'] == ['resnet34', 'mobilenet_v2']

    # again: finished runs are reused, an interrupted one is resumed, other settings are refused
    mtime = (out/'resnet34-finetune'/'model.safetensors').stat().st_mtime_ns
    shutil.rmtree(out/'resnet34-frozen')  # finished runs are lean: make it again with its checkpoints, as if interrupted
    train(out=out/'resnet34-frozen', source=str(mini_npz), arch='resnet34', frozen=True, keep_checkpoints=True,
          **{k: v for k, v in kw.items() if k != 'freeze_epochs'})
    for f in ('metrics.json', 'model.safetensors'): (out/'resnet34-frozen'/f).unlink()
    again = experiment(mini_npz, 'resnet34,mobilenet_v2', 'frozen,finetune', out, **kw)
    assert (out/'resnet34-finetune'/'model.safetensors').stat().st_mtime_ns == mtime
    assert (out/'resnet34-frozen'/'model.safetensors').is_file()
    assert again['rows'][0]['test_accuracy'] == pytest.approx(frozen['test_accuracy'])
    with pytest.raises(XrayError, match=r'other settings \(epochs 1, not 2\)'):
        experiment(mini_npz, 'resnet34', 'frozen', out, **{**kw, 'epochs': 2})
