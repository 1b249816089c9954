"ONNX export: parity with PyTorch on real images, a dynamic batch axis, the model card, stale exports and the missing extra."
import json, shutil, sys
from pathlib import Path

import numpy as np, pandas as pd, pytest, torch
from safetensors.torch import load_file, save_file
from xray_fastai.core import XrayError, load_json
from xray_fastai.export import export_onnx, onnx_path, NormalisedModel
from xray_fastai.predict import predict
from test_predict import small, run  # noqa: F401 (the tiny 64 px run, its head tempered so probabilities spread)


@pytest.fixture(scope='module')
def images(shared_data) -> list:
    "Real X-rays: the full-resolution sample (L and RGB JPEGs) and 224 px site A images of both classes."
    site = shared_data/'chest_xray_224_site_A'
    return (sorted((shared_data/'chest_xray_fullres_sample').rglob('*.jpeg')) + sorted((site/'NORMAL').glob('*'))[:10]
            + sorted((site/'PNEUMONIA').glob('*'))[:10])


def test_onnx_parity_with_pytorch(run, images, run_cli, tmp_path):
    import onnx
    res = run_cli('export', run, '--format', 'onnx')
    assert res.returncode == 0, res.stderr
    assert Path(res.stdout.strip()) == run/'model.onnx' and (run/'model.onnx.json').is_file()
    graph = onnx.load(str(run/'model.onnx')).graph
    assert [i.name for i in graph.input] == ['image'] and [o.name for o in graph.output] == ['probs']
    dims = graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == 'batch' and [d.dim_value for d in dims[1:]] == [1, 64, 64]  # dynamic batch
    ref = predict(run, images, precision='fp32')  # onnxruntime computes in float32; `auto` is bf16 from 64 px on a bf16 CPU
    assert (ref.error == '').all() and ref.p_pneumonia.std() > 0.1  # spread out: a 1e-4 tolerance means something
    for bs in (7, 64):  # batches of 7 (and a last one of 3), then all 43 at once
        got = predict(run, images, bs=bs, engine='onnxruntime')
        assert list(got.path) == list(ref.path) and (got.label == ref.label).all()
        np.testing.assert_allclose(got.p_pneumonia, ref.p_pneumonia, atol=1e-4)
    # the CLI's CSV too
    res = run_cli('predict', run, *images[:5], '--engine', 'onnxruntime', '--out', tmp_path/'onnx.csv')
    assert res.returncode == 0, res.stderr
    np.testing.assert_allclose(pd.read_csv(tmp_path/'onnx.csv').p_pneumonia, ref.p_pneumonia[:5], atol=1e-4)


def test_onnx_card_and_refusals(run, images, tmp_path, monkeypatch):
    out = export_onnx(run, tmp_path/'m.onnx')
    card = load_json(tmp_path/'m.onnx.json')
    assert card['input']['shape'] == ['batch', 1, 64, 64] and card['normalisation']['inside_graph']
    assert card['normalisation']['mean'] == load_json(run/'model.json')['stats'][0] and card['classes'] == ['NORMAL', 'PNEUMONIA']
    assert 'squish-resize to 74x74' in card['input']['preprocessing']  # the run augments: presize 74, then 64
    with pytest.raises(XrayError, match='already exists'): export_onnx(run, out)
    assert export_onnx(run, out, overwrite=True) == out
    with pytest.raises(XrayError, match='must end in .onnx'): export_onnx(run, tmp_path/'m.bin')
    # a run exported, then changed: the stale model.onnx is refused
    copy = Path(shutil.copytree(run, tmp_path/'copy'))
    if not (copy/'model.onnx').exists(): export_onnx(copy)
    sd = load_file(str(copy/'model.safetensors')); sd['1.8.weight'] = sd['1.8.weight'] * 2
    save_file(sd, str(copy/'model.safetensors'))
    with pytest.raises(XrayError, match='exported from other weights'): predict(copy, images[:1], engine='onnxruntime')
    (copy/'model.onnx').unlink()
    with pytest.raises(XrayError, match='no model.onnx in .*xray-fastai export'): predict(copy, images[:1], engine='onnxruntime')
    with pytest.raises(XrayError, match='--gradcam needs --engine torch'): predict(run, images[:1], engine='onnxruntime', gradcam=tmp_path/'c')
    with pytest.raises(XrayError, match='--engine must be'): predict(run, images[:1], engine='tensorrt')
    # without the [onnx] extra: one line naming it
    monkeypatch.setitem(sys.modules, 'onnxruntime', None)
    monkeypatch.setitem(sys.modules, 'onnx', None)
    with pytest.raises(XrayError, match=r"onnxruntime package: pip install 'xray-fastai\[onnx\]'"):
        predict(run, images[:1], engine='onnxruntime')
    with pytest.raises(XrayError, match=r"onnx package: pip install 'xray-fastai\[onnx\]'"): export_onnx(run, tmp_path/'n.onnx')


def test_cli_export_errors(run, run_cli, tmp_path):
    res = run_cli('export', run, '--format', 'tflite')
    assert res.returncode == 2 and res.stderr.strip() == "error: --format must be onnx, got 'tflite'"
    res = run_cli('predict', run, tmp_path, '--engine', 'onnxruntime', '--gradcam', tmp_path/'cams')
    assert res.returncode == 2 and res.stderr.startswith('error: --gradcam needs --engine torch')
