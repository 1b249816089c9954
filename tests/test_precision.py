"Precision (issue 17): bf16 autocast on the CPU, float32 weights and files, `auto`'s fallback, exact resume and seeds."
import numpy as np, pandas as pd, pytest, torch
from fastai.callback.core import Callback
from safetensors.torch import load_file
from conftest import Crash
from xray_fastai.core import load_json, XrayError
from xray_fastai.data import load_source, xray_dataloaders
from xray_fastai.config import RunConfig
from xray_fastai.learner import train, resume, xray_learner
from xray_fastai.checkpoints import load_checkpoint
from xray_fastai.precision import CPUAutocast, resolve_precision, cpu_has_bf16

pytestmark = pytest.mark.slow


@pytest.fixture(scope='module')
def tiny_npz(mini_npz, tmp_path_factory):
    "128 train and 128 val images (28 px): bf16 is slow at 28 px on a CPU, so these runs stay small."
    src, out = np.load(mini_npz), {}
    for split, n in (('train', 64), ('val', 64), ('test', 8)):
        y = src[f'{split}_labels'].reshape(-1)
        idx = np.sort(np.concatenate([np.flatnonzero(y == c)[:n] for c in (0, 1)]))
        out[f'{split}_images'], out[f'{split}_labels'] = src[f'{split}_images'][idx], src[f'{split}_labels'][idx]
    path = tmp_path_factory.mktemp('tiny')/'tiny.npz'
    np.savez(path, **out)
    return path

def _kw(npz, **kw):
    return dict(source=str(npz), verify=False, pretrained=False, arch='resnet18', bs=32, seed=1, lr=1e-3, **kw)


class DtypeHook(Callback):
    "Record the dtype of the first convolution's output (an activation) in every training batch."
    def __init__(self): self.seen = set()
    def before_fit(self):
        self.h = self.learn.model[0][0].register_forward_hook(lambda m, i, o: self.seen.add(o.dtype))
    def after_fit(self): self.h.remove()

def _float_dtypes(sd) -> set: return {v.dtype for v in sd.values() if torch.is_tensor(v) and v.is_floating_point()}

@pytest.mark.parametrize('precision', ['bf16', 'fp32'])
def test_autocast_and_float32_files(tiny_npz, tmp_path, precision):
    hook = DtypeHook()
    run = train(out=tmp_path/precision, cbs=[hook], epochs=1, precision=precision, keep_checkpoints=True, **_kw(tiny_npz))
    assert hook.seen == {torch.bfloat16 if precision == 'bf16' else torch.float32}
    c = load_json(run/'config.json')
    assert (c['precision'], c['memory_format'], c['device']) == (precision, 'contiguous', 'cpu')
    # autocast only: the weights, the optimizer state and every file stay float32
    ckpt = load_checkpoint(run/'last.pth')
    assert _float_dtypes(ckpt['model']) == {torch.float32}
    opt_state = {f"{i}{k}": v for i, s in enumerate(ckpt['opt']['state']) for k, v in (s or {}).items()}
    assert opt_state and _float_dtypes(opt_state) == {torch.float32}
    assert _float_dtypes(load_file(str(run/'model.safetensors'))) == {torch.float32}
    assert np.isfinite(pd.read_csv(run/'history.csv').valid_loss).all()


def test_auto_picks_bf16_only_where_native(mini_npz, monkeypatch):
    src = load_source(mini_npz, verify=False)
    def info(size):
        learn = xray_learner(xray_dataloaders(src, size=size, bs=16, aug=False), 'resnet18', pretrained=False)
        return learn.precision_info['precision'], any(isinstance(cb, CPUAutocast) for cb in learn.cbs)
    monkeypatch.setenv('XRAY_FASTAI_CPU_BF16', '0')  # a CPU without avx512_bf16/amx_bf16
    assert not cpu_has_bf16() and info(224) == ('fp32', False)
    monkeypatch.setenv('XRAY_FASTAI_CPU_BF16', '1')
    assert info(224) == ('bf16', True) and info(64) == ('bf16', True)
    assert info(28) == ('fp32', False)  # measured no faster than float32 end to end at 28 px
    assert resolve_precision('bf16', 'cpu', 28) == 'bf16'  # asked for: given
    with pytest.raises(XrayError, match='needs a GPU'): resolve_precision('fp16', 'cpu')
    with pytest.raises(XrayError, match='unknown `precision`'): RunConfig(precision='half')


def test_bf16_resumes_exactly_and_seed_reproduces(tiny_npz, tmp_path):
    kw = _kw(tiny_npz, epochs=2, precision='bf16', frozen=True)  # a frozen body still runs its forward in bf16; its backward (slow in bf16 at 28 px) is skipped
    cols = lambda df: df[[c for c in df.columns if c != 'seconds']]
    full = pd.read_csv(train(out=tmp_path/'full', **kw)/'history.csv')
    again = pd.read_csv(train(out=tmp_path/'again', **kw)/'history.csv')
    pd.testing.assert_frame_equal(cols(full), cols(again), rtol=0, atol=0)  # --seed: the same numbers, exactly
    with pytest.raises(RuntimeError, match='simulated crash'): train(out=tmp_path/'cut', cbs=[Crash(1)], **kw)
    resumed = pd.read_csv(resume(tmp_path/'cut')/'history.csv')
    assert load_json(tmp_path/'cut'/'config.json')['precision'] == 'bf16'
    pd.testing.assert_frame_equal(cols(full), cols(resumed), rtol=0, atol=0)
    a, b = (load_file(str(tmp_path/n/'model.safetensors')) for n in ('full', 'cut'))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_evaluate_and_predict_take_a_precision(tiny_npz, shared_data, tmp_path, run_cli):
    from xray_fastai.evaluate import evaluate
    from xray_fastai.predict import predict
    run = train(out=tmp_path/'run', epochs=1, precision='fp32', **_kw(tiny_npz))
    m32, m16 = (evaluate(run, split='valid', precision=p) for p in ('fp32', 'bf16'))
    assert (m32['precision'], m16['precision']) == ('fp32', 'bf16')
    assert abs(m32['default']['roc_auc'] - m16['default']['roc_auc']) < 0.05  # bf16 autocast: close, not equal
    files = sorted((shared_data/'pneumoniamnist_site_A'/'NORMAL').glob('*.png'))[:6]
    p32, p16 = (predict(run, files, precision=p).p_pneumonia.values for p in ('fp32', 'bf16'))
    assert np.abs(p32 - p16).max() < 0.05 and not np.array_equal(p32, p16)
    r = run_cli('predict', run, *files, '--precision', 'bf16', '--out', tmp_path/'p.csv')
    assert r.returncode == 0, r.stderr
    np.testing.assert_allclose(pd.read_csv(tmp_path/'p.csv').p_pneumonia.values, p16, atol=1e-6)
    r = run_cli('train', '--precision', 'fp16', '--epochs', '1', '--out', tmp_path/'x')
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith('error: --precision fp16 needs a GPU')
    assert not (tmp_path/'x').exists()
