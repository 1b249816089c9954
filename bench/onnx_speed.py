"""CPU inference speed of a run's model: onnxruntime (the `xray-fastai export --format onnx` graph) vs PyTorch, side by side.

    python bench/onnx_speed.py --arch resnet34 --size 224 --bs 16      # appends a section to bench/RESULTS.md
    python bench/onnx_speed.py --size 64 --turns 2 --no-record         # a quick look

Both engines get the same batches of real X-rays (chest_xray_224, resized to --size, in [0, 1]), the same number of
threads, and take turns (PyTorch, then onnxruntime, --turns times), so that load from other processes hits both
alike. PyTorch runs `NormalisedModel` (normalisation + softmax, as in the graph) in fp32 under `inference_mode`."""
from __future__ import annotations
import argparse, datetime, os, platform, sys, tempfile, time, warnings
from pathlib import Path

warnings.filterwarnings('ignore')
import numpy as np, torch

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent/'shared'/'data'
sys.path.insert(0, str(REPO))
from xray_fastai.models import build_model
from xray_fastai.export import NormalisedModel
from xray_fastai.data import open_xray


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--arch', default='resnet34'); ap.add_argument('--size', type=int, default=224)
    ap.add_argument('--bs', type=int, default=16); ap.add_argument('--batches', type=int, default=4, help="timed batches per turn")
    ap.add_argument('--turns', type=int, default=3); ap.add_argument('--no-record', action='store_true')
    a = ap.parse_args()
    import onnxruntime as ort
    threads = torch.get_num_threads()
    files = sorted((DATA/'chest_xray_224'/'train'/'PNEUMONIA').glob('*.jpeg'))[:a.bs * a.batches]
    imgs = np.stack([np.asarray(open_xray(f).resize((a.size, a.size)), np.float32) / 255 for f in files])[:, None]
    batches = [torch.from_numpy(imgs[i:i + a.bs]) for i in range(0, len(imgs), a.bs)]
    torch.manual_seed(0)
    model = NormalisedModel(build_model(a.arch, pretrained=False).eval(), [0.48], [0.24]).eval()
    onnx_file = Path(tempfile.mkdtemp())/'model.onnx'
    torch.onnx.export(model, (batches[0],), str(onnx_file), input_names=['image'], output_names=['probs'],
                      dynamic_axes={'image': {0: 'batch'}, 'probs': {0: 'batch'}}, opset_version=17, dynamo=False)
    opts = ort.SessionOptions(); opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(onnx_file), opts, providers=['CPUExecutionProvider'])
    run_torch = lambda xb: model(xb).numpy()
    run_ort = lambda xb: sess.run(None, {'image': xb.numpy()})[0]
    with torch.inference_mode():
        diff = max(np.abs(run_torch(xb) - run_ort(xb)).max() for xb in batches)
        for f in (run_torch, run_ort): f(batches[0])  # warm-up
        rates = {'torch': [], 'ort': []}
        load0 = os.getloadavg()
        for _ in range(a.turns):
            for name, f in (('torch', run_torch), ('ort', run_ort)):
                t = time.perf_counter()
                for xb in batches: f(xb)
                rates[name].append(len(imgs) / (time.perf_counter() - t))
        load1 = os.getloadavg()
    pt, ox = np.median(rates['torch']), np.median(rates['ort'])
    ratios = [o / p for p, o in zip(rates['torch'], rates['ort'])]
    env = ' '.join(f'{k}={os.environ[k]}' for k in ('OMP_WAIT_POLICY', 'OMP_NUM_THREADS') if k in os.environ)
    cmd = (env + ' ' if env else '') + 'python bench/onnx_speed.py ' + ' '.join(sys.argv[1:])
    lines = [f"## {datetime.datetime.now():%Y-%m-%d %H:%M} — ONNX: onnxruntime vs PyTorch CPU inference, {a.arch}, {a.size} px, batch {a.bs}", '',
             f"- command: `{cmd.strip()}`",
             f"- machine: {os.cpu_count()} cores, {platform.processor() or platform.machine()}; torch {torch.__version__} and onnxruntime "
             f"{ort.__version__}, both with {threads} intra-op threads; untrained {a.arch} (pretrained=False) with normalisation and softmax "
             "inside (`NormalisedModel`, as `xray-fastai export` writes it)",
             f"- load average (1/5/15 min): at start {tuple(round(x, 2) for x in load0)}, at end {tuple(round(x, 2) for x in load1)} "
             "(other processes share these cores: compare the ratio of each turn, not the absolute rates)",
             f"- timing: {a.turns} turns, each PyTorch then onnxruntime over the same {len(batches)} batches of real images "
             f"({len(imgs)} images); median of the turns; max |p_onnx - p_torch| = {diff:.2e}", '',
             '| engine | images/s | vs PyTorch | per turn |', '| --- | ---: | ---: | --- |',
             f"| PyTorch fp32, `inference_mode` | {pt:.2f} | 1.00x | {', '.join(f'{r:.2f}' for r in rates['torch'])} |",
             f"| onnxruntime (CPUExecutionProvider) | {ox:.2f} | {ox / pt:.2f}x | {', '.join(f'{r:.2f}' for r in rates['ort'])}; "
             f"per-turn ratio {min(ratios):.2f}-{max(ratios):.2f}x |", '']
    print('\n'.join(lines))
    if not a.no_record:
        with open(REPO/'bench'/'RESULTS.md', 'a') as f: f.write('\n' + '\n'.join(lines))


if __name__ == '__main__': main()
