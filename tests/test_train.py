"Training core: fixed-feature mode, discriminative LRs, lr_find, early stopping, resume, reproducibility."
from pathlib import Path
import numpy as np, pandas as pd, pytest, torch
from xray_fastai.core import load_json, XrayError
from xray_fastai.data import GREY_IMAGENET_STATS
from xray_fastai.config import RunConfig
from xray_fastai.learner import train, resume, _build
from xray_fastai.optimizer import FusedAdam
from conftest import Crash

pytestmark = pytest.mark.slow


def _kw(mini_npz, **kw):
    return dict(source=str(mini_npz), verify=False, pretrained=False, bs=64, seed=0, **kw)

def test_resume_where_the_data_moved(mini_npz, tmp_path):
    "A named dataset moved to another --data-dir: `resume` is told where, and the run records it."
    import json, shutil
    a = tmp_path/'a'
    a.mkdir(); shutil.copy(mini_npz, a/'pneumoniamnist.npz')
    run = train(out=tmp_path/'run', keep_checkpoints=True, **{**_kw(mini_npz, arch='resnet18', frozen=True, aug=False, epochs=1, lr=1e-2),
                                       'source': 'pneumoniamnist', 'data_dir': str(a)})
    cfg = load_json(run/'config.json')
    (run/'config.json').write_text(json.dumps({**cfg, 'epochs': 2}))  # as a run stopped after its first epoch
    b = a.rename(tmp_path/'b')
    changed = {**cfg, 'epochs': 2, 'counts': {**cfg['counts'], 'valid': {k: v + 1 for k, v in cfg['counts']['valid'].items()}}}
    (run/'config.json').write_text(json.dumps(changed))  # as if images had been added to the data since
    with pytest.raises(XrayError, match='has changed since the run trained'): resume(run, data_dir=b)
    (run/'config.json').write_text(json.dumps({**cfg, 'epochs': 2}))
    resume(run, data_dir=b)
    assert load_json(run/'config.json')['data_dir'] == str(b)
    assert list(pd.read_csv(run/'history.csv').epoch) == [0, 1]

def test_exported_model_is_the_best_epoch_across_stages(mini_npz, tmp_path):
    "A fine-tune stage worse than the head-only one: the exported model is still the epoch metrics.json calls best."
    from xray_fastai.evaluate import evaluate
    run = train(out=tmp_path/'run', **_kw(mini_npz, arch='resnet18', freeze_epochs=1, epochs=1, lr=1e-2,
                                          lr_mult=1e-3))  # the body trains at lr 10: the second stage gets worse
    m, loss = load_json(run/'metrics.json'), pd.read_csv(run/'history.csv').valid_loss
    assert not loss.iloc[1] <= loss.iloc[0], list(loss)  # the case under test (NaN counts as worse)
    assert m['best_epoch'] == 0
    assert evaluate(run, split='valid')['default']['loss'] == pytest.approx(m['best']['valid_loss'], abs=1e-4)

def test_run_works_from_another_directory(mini_npz, tmp_path, monkeypatch):
    "Relative paths given to `train` are stored absolute: the run evaluates from anywhere."
    import shutil
    from xray_fastai.evaluate import evaluate
    (tmp_path/'data').mkdir(); (tmp_path/'elsewhere').mkdir()
    shutil.copy(mini_npz, tmp_path/'data'/'mini.npz')
    monkeypatch.chdir(tmp_path)
    run = train(out='run', **{**_kw(mini_npz, arch='resnet18', frozen=True, aug=False, epochs=1, lr=1e-2), 'source': 'data/mini.npz'})
    assert load_json(run/'config.json')['source'] == str(tmp_path/'data'/'mini.npz')
    monkeypatch.chdir(tmp_path/'elsewhere')
    assert Path(evaluate(tmp_path/'run', split='valid')['folder']) == tmp_path/'run'/'eval-valid'  # the run's own

def test_run_folders_are_never_shared_nor_taken(mini_npz, tmp_path):
    from xray_fastai.runs import new_run_dir
    made = [new_run_dir(root=tmp_path/'runs') for _ in range(3)]  # within one second: the timestamp repeats
    assert len(set(made)) == 3 and all(p.is_dir() for p in made)
    mine = tmp_path/'mine'
    mine.mkdir()  # the user's empty folder, given as --out: a failed start leaves it where it was
    with pytest.raises(XrayError, match='does not exist'): train(out=mine, **{**_kw(mini_npz), 'source': str(tmp_path/'no.npz')})
    assert mine.is_dir() and not any(mine.iterdir())
    with pytest.raises(XrayError, match='does not exist'): train(out=tmp_path/'new', **{**_kw(mini_npz), 'source': str(tmp_path/'no.npz')})
    assert not (tmp_path/'new').exists()

def test_failed_clean_up_keeps_the_real_error(mini_npz, tmp_path, monkeypatch):
    "A run folder that cannot be removed (a busy mount) leaves the start's own error in front of the user."
    import errno, xray_fastai.learner as lm
    def busy(p, *a, **k): raise OSError(errno.EBUSY, 'Device or resource busy', str(p))
    monkeypatch.setattr(lm.shutil, 'rmtree', busy)
    with pytest.raises(XrayError, match='does not exist'): train(out=tmp_path/'new', **{**_kw(mini_npz), 'source': str(tmp_path/'no.npz')})

def test_frozen_body_is_bit_identical(mini_npz, tmp_path):
    c = RunConfig(**_kw(mini_npz, arch='resnet34', frozen=True, epochs=1, lr=1e-2))
    learn = _build(c, tmp_path)
    before = {k: v.clone() for k, v in learn.model[0].state_dict().items()}
    learn.create_opt()
    head_ids = {id(p) for p in learn.model[1].parameters()}
    assert {id(p) for p, *_ in learn.opt.all_params()} == head_ids
    assert not any(p.requires_grad for p in learn.model[0].parameters())
    head_before = [p.detach().clone() for p in learn.model[1].parameters()]
    learn.fit_one_cycle(1, 1e-2)
    after = learn.model[0].state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BatchNorm running stats included
    assert any(not torch.equal(a, b) for a, b in zip(head_before, learn.model[1].parameters()))

def test_finetune_discriminative_lrs(mini_npz, tmp_path):
    c = RunConfig(**_kw(mini_npz, arch='mobilenet_v2', epochs=1, lr=1e-4, lr_mult=10))
    learn = _build(c, tmp_path)
    learn.create_opt()
    assert isinstance(learn.opt, FusedAdam)  # fastai's Adam, stepped by torch's fused kernel
    learn.opt.set_hyper('lr', slice(1e-4 / 10, 1e-4))
    lrs = [h['lr'] for h in learn.opt.hypers]
    assert len(lrs) == 4  # stem, early, late, head
    assert lrs == sorted(lrs) and lrs[0] == pytest.approx(1e-5) and lrs[-1] == pytest.approx(1e-4)

def test_runs_made_before_fused_adam_keep_fastais_step(mini_npz, tmp_path):
    "A config.json without `fused_step` (made before `FusedAdam`) builds fastai's own `Adam`, so it resumes as it ran."
    from fastai.optimizer import Optimizer
    c = RunConfig(**_kw(mini_npz, arch='resnet18', epochs=1))
    d = c.to_dict(); del d['fused_step']
    old = RunConfig.from_dict(d)
    assert c.fused_step and not old.fused_step
    learn = _build(old, tmp_path)
    learn.create_opt()
    assert type(learn.opt) is Optimizer  # what fastai's `Adam` returns

def test_pneumoniamnist_recipe_keeps_fastais_step(mini_npz, tmp_path):
    "The 28 px recipe steps with fastai's own `Adam`, as it was chosen on A (bench/GENERALISATION.md); the defaults fuse."
    from fastai.optimizer import Optimizer
    recipe = RunConfig.from_recipe('pneumoniamnist', **_kw(mini_npz, epochs=1))
    assert not recipe.fused_step and RunConfig().fused_step
    assert RunConfig.from_recipe('pneumoniamnist', fused_step=True).fused_step  # a setting still overrides the recipe
    learn = _build(recipe, tmp_path)
    learn.create_opt()
    assert type(learn.opt) is Optimizer

def test_train_writes_run_folder(mini_npz, tmp_path):
    run = train(out=tmp_path/'run', keep_checkpoints=True, **_kw(mini_npz, arch='resnet34', frozen=True, epochs=2, lr='auto'))
    names = {p.name for p in run.iterdir()}
    assert {'config.json', 'history.csv', 'best.pth', 'last.pth', 'lr_find.png', 'loss.png', 'metrics.json',
            'model.safetensors', 'model.json'} <= names
    mode = lambda f: oct((run/f).stat().st_mode & 0o777)
    assert mode('model.safetensors') == mode('config.json') == mode('last.pth')  # the umask's: others can read the model
    from safetensors.torch import load_file
    from xray_fastai.checkpoints import load_checkpoint
    best, exported = load_checkpoint(run/'best.pth')['model'], load_file(run/'model.safetensors')
    assert best.keys() == exported.keys() and all(torch.equal(best[k], exported[k]) for k in best)  # the best model, once
    c, m = load_json(run/'config.json'), load_json(run/'metrics.json')
    assert np.isfinite(c['lr']) and c['lr'] > 0 and set(c['lr_suggestions']) == {'valley', 'slide', 'minimum', 'steep'}
    assert (run/'lr_find.png').read_bytes()[:4] == b'\x89PNG'
    hist = pd.read_csv(run/'history.csv')
    assert list(hist.epoch) == [0, 1] and m['epochs'] == 2
    assert m['trainable_params'] < m['params'] / 10
    meta = load_json(run/'model.json')
    assert meta['classes'] == ['NORMAL', 'PNEUMONIA'] and meta['size'] == 28 and len(meta['stats'][0]) == 1
    with pytest.raises(XrayError, match='already exists'):
        train(out=run, **_kw(mini_npz, arch='resnet34', frozen=True, epochs=1))

def test_early_stopping_stops(mini_npz, tmp_path):
    # a huge learning rate makes valid_loss worse after the first epoch; patience 1 stops the run early
    run = train(out=tmp_path/'es', keep_checkpoints=True, **_kw(mini_npz, arch='resnet34', frozen=True, epochs=6, lr=5.0, patience=1))
    n = len(pd.read_csv(run/'history.csv'))
    assert n < 6
    from xray_fastai.checkpoints import load_checkpoint
    assert load_checkpoint(run/'last.pth')['epoch'] == n - 1  # the stopping epoch is checkpointed too

def test_same_seed_same_history(mini_npz, tmp_path):
    kw = _kw(mini_npz, arch='resnet34', frozen=True, epochs=2, lr=1e-2)
    a, b = (pd.read_csv(train(out=tmp_path/n, **kw)/'history.csv').drop(columns='seconds') for n in 'ab')
    pd.testing.assert_frame_equal(a, b)

@pytest.mark.parametrize('crash_after', [1, 3])  # inside the head-only stage / inside the fine-tune stage
def test_resume_matches_uninterrupted(mini_npz, tmp_path, crash_after):
    kw = _kw(mini_npz, arch='resnet34', epochs=3, lr=1e-3, freeze_epochs=1, patience=5)
    full = pd.read_csv(train(out=tmp_path/'full', **kw)/'history.csv')
    with pytest.raises(RuntimeError, match='simulated crash'):
        train(out=tmp_path/'cut', cbs=[Crash(crash_after)], **kw)
    assert len(pd.read_csv(tmp_path/'cut'/'history.csv')) == crash_after
    resumed = pd.read_csv(resume(tmp_path/'cut')/'history.csv')
    assert list(resumed.epoch) == [0, 1, 2, 3] and list(resumed.stage) == [0, 1, 1, 1]
    # random states, optimizer and schedule position are restored: the numbers match too
    cols = [c for c in full.columns if c != 'seconds']
    pd.testing.assert_frame_equal(full[cols], resumed[cols], atol=1e-5, rtol=1e-4)
    assert load_json(tmp_path/'cut'/'metrics.json')['epochs'] == 4

def test_cached_features_train_the_head_on_fixed_features(mini_npz, tmp_path):
    from xray_fastai.learner import feature_learner
    c = RunConfig(**_kw(mini_npz, arch='resnet34', frozen=True, aug=False, epochs=2, lr=1e-2))
    assert c.cached_features
    learn = _build(c, tmp_path)
    body = {k: v.clone() for k, v in learn.model[0].state_dict().items()}
    flearn = feature_learner(learn)
    xb, yb = flearn.dls.train.one_batch()
    assert xb.shape == (64, 512, 1, 1) and flearn.model is learn.model[1]  # resnet34 body at 28 px -> 512x1x1
    n_train = len(learn.dls.train_ds)
    assert len(flearn.dls.train_ds) == n_train and len(flearn.dls.valid_ds) == len(learn.dls.valid_ds)
    flearn.fit_one_cycle(2, 1e-2)
    assert all(torch.equal(body[k], v) for k, v in learn.model[0].state_dict().items())
    valid_loss, acc = flearn.recorder.values[-1][1:3]
    assert valid_loss < 0.69 and acc > 0.6  # better than chance (ln 2; balanced classes): the head learned
    with pytest.raises(XrayError, match='need `frozen` and no `aug`'):
        RunConfig(**_kw(mini_npz, arch='resnet34', cached_features=True))

def test_class_weights(mini_npz, tmp_path):
    c = RunConfig(**_kw(mini_npz, arch='resnet34', frozen=True, epochs=1, class_weights=True))
    learn = _build(c, tmp_path)
    counts = learn.dls.src.items('train').label.value_counts()
    w = learn.loss_func.func.weight
    expected = [counts.sum() / (2 * counts[c]) for c in learn.dls.vocab]
    assert torch.allclose(w.cpu(), torch.tensor(expected, dtype=torch.float))

def test_weights_from_an_earlier_run(mini_npz, tmp_path):
    from xray_fastai.runs import load_model_dir
    first = train(out=tmp_path/'a', **_kw(mini_npz, arch='resnet34', frozen=True, epochs=1, lr=1e-2))
    c = RunConfig(**_kw(mini_npz, arch='resnet34', weights=first/'model.safetensors', epochs=1))
    assert (c.lr, c.lr_mult) == (1e-2, 1.0)  # --no-pretrained: not ImageNet weights, the from-scratch defaults
    # without --no-pretrained, local weights are taken for ImageNet's (the offline stand-in for the download)
    imagenet = RunConfig(**{**_kw(mini_npz, arch='resnet34', epochs=1), 'pretrained': True, 'weights': first/'model.safetensors'})
    assert (imagenet.lr, imagenet.lr_mult) == (2e-3, 100.0)
    assert _build(imagenet, tmp_path/'c').dls.stats == GREY_IMAGENET_STATS
    learn = _build(c, tmp_path/'b')
    saved, _ = load_model_dir(first)
    assert all(torch.equal(a, b) for a, b in zip(saved.state_dict().values(), learn.model.state_dict().values()))
