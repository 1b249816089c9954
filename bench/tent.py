"""Test-time entropy minimisation (TENT, Wang et al. 2021) on site sample A, beside AdaBN and the plain model (issue 13).

    python bench/tent.py RUN [RUN ...]            # runs trained on PneumoniaMNIST; prints A's metrics, records nothing

Label-free, like `evaluate --adabn same`: the model adapts to A's own images without their labels, then predicts them.
TENT starts from AdaBN (BatchNorm statistics re-estimated on A) and then trains only the BatchNorm scales and shifts to
lower the mean entropy of its predictions on A (Adam, lr 1e-3, `--epochs` passes over A in batches of 64), with the
statistics of each batch, as the paper does; it predicts with the statistics re-estimated after adapting. A's labels
only score the result (ROC AUC, and accuracy / specificity at 0.5). Half B is not read."""
import argparse, sys, warnings
from pathlib import Path
import torch

warnings.filterwarnings('ignore')
REPO = Path(__file__).resolve().parents[1]
SITE_A = REPO.parent/'shared'/'data'/'pneumoniamnist_site_A'
sys.path.insert(0, str(REPO))
from xray_fastai.config import RunConfig
from xray_fastai.evaluate import eval_learner, _external_source, binary_metrics
from xray_fastai.shift import adabn, bn_layers, model_outputs

def tent(model, dl, epochs=1, lr=1e-3):
    "A copy of `model` (AdaBN'd first) whose BatchNorm affine parameters minimised the prediction entropy on `dl`'s images."
    m = adabn(model, dl)
    for p in m.parameters(): p.requires_grad_(False)
    bns = bn_layers(m)
    params = [p for bn in bns for p in (bn.weight, bn.bias)]
    for p in params: p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    m.eval()
    for bn in bns: bn.train()  # each batch's own statistics while adapting
    for _ in range(epochs):
        for xb, _y in dl:
            logp = m(xb.as_subclass(torch.Tensor)).float().log_softmax(1)
            loss = -(logp.exp() * logp).sum(1).mean()
            opt.zero_grad(); loss.backward(); opt.step()
    for p in params: p.requires_grad_(False)
    return adabn(m, dl, inplace=True)

def scores(o) -> dict:
    p, t = o['probs'][:, 1].numpy(), o['targets'].numpy() == 1
    return binary_metrics(p, t, 0.5)

if __name__ == '__main__':
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('runs', nargs='+'); ap.add_argument('--epochs', type=int, default=1)
    a = ap.parse_args()
    print("| run | A AUC: plain / AdaBN / TENT | A acc @0.5: plain / AdaBN / TENT | A spec @0.5: plain / AdaBN / TENT |")
    print("| --- | --- | --- | --- |")
    for run in a.runs:
        c = RunConfig.load(run)
        slearn = eval_learner(run, _external_source(c, SITE_A, 'valid'), precision='fp32')
        assert list(slearn.dls.vocab).index(c.positive) == 1, "the positive class is expected second"
        dl = slearn.dls.valid
        torch.manual_seed(0)
        outs = {k: model_outputs(m, dl, c.stats) for k, m in
                (('plain', slearn.model), ('adabn', adabn(slearn.model, dl)), ('tent', tent(slearn.model, dl, a.epochs)))}
        s = {k: scores(o) for k, o in outs.items()}
        f = lambda key: ' / '.join(f"{s[k][key]:.4f}" for k in ('plain', 'adabn', 'tent'))
        print(f"| {Path(run).name} | {f('roc_auc')} | {f('accuracy')} | {f('specificity')} |", flush=True)
