"Prediction: files/folders/CSVs, unreadable files, the validation pipeline reproduced, Grad-CAM, DICOM, safe loading."
import json, os, pickle, shutil, sys, warnings
from pathlib import Path

import numpy as np, pandas as pd, pytest, torch
from PIL import Image
from fastai.vision.all import Learner, CrossEntropyLossFlat
from xray_fastai.core import XrayError, load_json, save_json
from xray_fastai.data import load_source, xray_dataloaders
from safetensors.torch import save_file
from xray_fastai.learner import train
from xray_fastai.runs import load_model_dir
from xray_fastai.predict import (predict, open_dicom, is_dicom, validation_settings, load_predictor, XrayPreprocess,
                                 read_xray, grad_cam, cam_overlay, cam_figure, cam_layer, cam_stages)
from conftest import copy_class_folders

@pytest.fixture(scope='module')
def fullres(shared_data) -> list:
    files = sorted((shared_data/'chest_xray_fullres_sample').rglob('*.jpeg'))
    assert len(files) == 23
    return files

@pytest.fixture(scope='module')
def small(shared_data, tmp_path_factory) -> Path:
    "40 real 224 px images per class, one folder per class."
    return copy_class_folders(shared_data, tmp_path_factory.mktemp('small'), 40)

def _learner(small, run, aug:bool, **kwargs) -> Learner:
    "A `Learner` with the run's model and the training pipeline's `DataLoaders` (validation transforms for `aug`)."
    model, meta = load_model_dir(run)
    dls = xray_dataloaders(load_source(str(small), verify=False), size=meta['size'], aug=aug, presize=meta['presize'],
                           bs=16, stats=meta['stats'], num_workers=0, device='cpu', **kwargs)
    return Learner(dls, model, loss_func=CrossEntropyLossFlat())

def _valid_preds(small, run, aug:bool, **kwargs):
    "The training pipeline's validation probabilities of the positive class, and its validation files."
    learn = _learner(small, run, aug, **kwargs)
    return learn, learn.get_preds(dl=learn.dls.valid)[0][:, 1].numpy(), list(learn.dls.valid.items.item)

@pytest.fixture(scope='module')
def run(small, tmp_path_factory) -> Path:
    "A tiny 1-epoch frozen resnet34 run with augmentation at 64 px: validation resizes to 74 px, then resamples to 64."
    out = tmp_path_factory.mktemp('runs')/'aug'
    train(out=out, source=str(small), arch='resnet34', frozen=True, aug=True, epochs=1, lr=1e-2, size=64, bs=16,
          pretrained=False, verify=False, num_workers=0, seed=0)
    # One epoch on an untrained body saturates the softmax (the head's BatchNorm statistics are far from converged),
    # and probabilities of 0 and 1 would make any comparison pass. Temper the head so the validation logit differences
    # have mean 0 and std 2: the probabilities spread over (0, 1) and a 1e-4 tolerance means something.
    learn = _learner(small, out, aug=True)
    logits = learn.get_preds(dl=learn.dls.valid, act=lambda o: o)[0]
    d = logits[:, 1] - logits[:, 0]
    sd = {k: v.clone() for k, v in learn.model.state_dict().items()}
    sd['1.8.weight'] *= 2 / d.std()
    w = sd['1.8.weight'][1] - sd['1.8.weight'][0]
    sd['1.6.bias'] -= d.mean() * 2 / d.std() * w / w.dot(w)  # BatchNorm's shift feeds the last Linear directly
    save_file({k: v.contiguous() for k, v in sd.items()}, str(out/'model.safetensors'))
    return out


def test_fullres_sample_one_row_per_file(run, shared_data, fullres, tmp_path):
    df = predict(run, shared_data/'chest_xray_fullres_sample', out=tmp_path/'preds.csv')
    assert list(df.columns) == ['path', 'label', 'p_pneumonia', 'error']
    assert len(df) == 23 and sorted(df.path) == [str(f) for f in fullres]
    assert (df.error == '').all() and df.p_pneumonia.between(0, 1).all()
    assert set(df.label) <= {'NORMAL', 'PNEUMONIA'}
    assert ((df.p_pneumonia >= 0.5) == (df.label == 'PNEUMONIA')).all()
    back = pd.read_csv(tmp_path/'preds.csv')
    assert len(back) == 23 and np.allclose(back.p_pneumonia, df.p_pneumonia) and back.error.isna().all()
    assert [p.name for p in tmp_path.iterdir()] == ['preds.csv']  # no temporary file left behind


VARIANTS = {'aug': dict(aug=True), 'no_aug': dict(aug=False), 'aug_kwargs': dict(aug=True, aug_kwargs={'align_corners': False}),
            'draft': dict(aug=True, draft=True)}  # draft: items decoded at reduced scale, as the presize cache does

@pytest.mark.parametrize('variant', VARIANTS)
def test_matches_training_validation_preds(run, small, fullres, tmp_path, variant):
    "predict == learn.get_preds (the training pipeline's validation transforms) on the same files, for each resize path."
    v = VARIANTS[variant]
    if variant != 'aug':  # same weights, another validation path, recorded in model.json
        run = Path(shutil.copytree(run, tmp_path/variant))
        save_json({**load_json(run/'model.json'), **v}, run/'model.json')
    cache = dict(cache=tmp_path/'cache') if v.get('draft') else {}
    learn, p_valid, items = _valid_preds(small, run, v['aug'], **cache, **v.get('aug_kwargs', {}))
    df = predict(run, items, bs=7, precision='fp32')  # as `learn.get_preds` computes (`auto` is bf16 from 64 px)
    assert len(items) >= 10 and (df.error == '').all() and p_valid.std() > 0.1  # spread out, not saturated
    np.testing.assert_allclose(df.p_pneumonia, p_valid, atol=1e-4)
    # full-resolution JPEGs (L and RGB) through fastai's test_dl, i.e. the validation transforms
    p_test = learn.get_preds(dl=learn.dls.test_dl(pd.DataFrame(dict(item=[str(f) for f in fullres]))))[0][:, 1].numpy()
    if not cache: np.testing.assert_allclose(predict(run, fullres, precision='fp32').p_pneumonia, p_test, atol=1e-4)  # (cache: train files only)
    # the tolerance is meaningful: another resize path gives clearly different probabilities
    _, p_other, items_other = _valid_preds(small, run, aug=variant != 'aug')
    assert items_other == items and np.abs(p_other - p_valid).max() > 1e-3

def test_draft_decoding_is_close(run, fullres):
    exact, fast = predict(run, fullres), predict(run, fullres, draft=True)
    assert (fast.error == '').all() and np.abs(fast.p_pneumonia - exact.p_pneumonia).median() < 0.05

def test_validation_settings(run, tmp_path):
    meta = load_json(run/'model.json')
    assert validation_settings(meta, run) == dict(aug=True, aug_kwargs={}, draft=False)
    assert validation_settings({**meta, 'aug': False, 'aug_kwargs': {'max_rotate': 5}, 'draft': True}, run) == \
        dict(aug=False, aug_kwargs={'max_rotate': 5}, draft=True)  # model.json says
    old = {k: v for k, v in meta.items() if k not in ('aug', 'aug_kwargs', 'draft')}  # a model.json that does not say
    save_json({**load_json(run/'config.json'), 'cache': True}, tmp_path/'cached'/'config.json')
    assert validation_settings(old, tmp_path/'cached')['draft']  # config.json: trained through the presize cache
    assert validation_settings(old, tmp_path)['aug']  # no config.json: presize 74 != size 64 means augmentation
    assert not validation_settings({**old, 'presize': 64}, tmp_path)['aug']


def _bad_files(folder:Path, real:Path) -> list:
    (folder/'truncated.jpeg').write_bytes(real.read_bytes()[:len(real.read_bytes()) // 2])
    (folder/'text.jpeg').write_text('this is not an image\n')
    (folder/'empty.PNG').write_bytes(b'')
    return [folder/'truncated.jpeg', folder/'text.jpeg', folder/'empty.PNG']

def test_unreadable_files_are_rows_not_crashes(run, fullres, tmp_path):
    d = tmp_path/'imgs'; (d/'sub').mkdir(parents=True)
    for f in fullres[:2]: shutil.copy(f, d)
    shutil.copy(fullres[-1], d/'sub')
    shutil.copy(fullres[0], d/'.hidden.jpeg')
    bad = _bad_files(d, fullres[0])
    df = predict(run, d, out=tmp_path/'p.csv').set_index('path')
    assert len(df) == 6 and str(d/'.hidden.jpeg') not in df.index
    errs = df.loc[[str(f) for f in bad]]
    assert (errs.error != '').all() and errs.p_pneumonia.isna().all() and (errs.label == '').all()
    assert 'truncated' in errs.error.iloc[0] and 'cannot identify' in errs.error.iloc[1]
    good = df.drop(index=[str(f) for f in bad])
    assert len(good) == 3 and (good.error == '').all() and good.p_pneumonia.between(0, 1).all()
    # only bad files: every row an error, and the CSV is still written
    only_bad = predict(run, bad, out=tmp_path/'bad.csv')
    assert len(only_bad) == 3 and (only_bad.error != '').all()
    assert len(pd.read_csv(tmp_path/'bad.csv')) == 3

def test_csv_list_relative_paths(run, fullres, tmp_path):
    (tmp_path/'imgs').mkdir()
    for f in fullres[:3]: shutil.copy(f, tmp_path/'imgs')
    names = [f'imgs/{f.name}' for f in fullres[:3]]
    pd.DataFrame(dict(path=[names[2], 'imgs/missing.jpeg', names[0]], label='?')).to_csv(tmp_path/'list.csv', index=False)
    df = predict(run, tmp_path/'list.csv')
    assert list(df.path) == [str(tmp_path/n) for n in (names[2], 'imgs/missing.jpeg', names[0])]
    assert list(df.error == '') == [True, False, True] and 'No such file' in df.error[1]
    pd.DataFrame(dict(file=names)).to_csv(tmp_path/'nopath.csv', index=False)
    with pytest.raises(XrayError, match="'path' column"): predict(run, tmp_path/'nopath.csv')

def test_output_never_overwritten_silently(run, fullres, tmp_path):
    out = tmp_path/'preds.csv'
    out.write_text('precious\n')
    with pytest.raises(XrayError, match='already exists'): predict(run, fullres[:1], out=out)
    assert out.read_text() == 'precious\n'
    predict(run, fullres[:1], out=out, overwrite=True)
    assert len(pd.read_csv(out)) == 1
    with pytest.raises(XrayError, match='does not exist'): predict(run, tmp_path/'nope.jpeg')
    with pytest.raises(XrayError, match='bs'): predict(run, fullres[:1], bs=0)


def test_gradcam_overlays_have_image_size(run, fullres, tmp_path):
    # two images with the same name in different folders must not overwrite each other's overlay
    (tmp_path/'a').mkdir(); (tmp_path/'b').mkdir()
    shutil.copy(fullres[0], tmp_path/'a'/'x.jpeg'); shutil.copy(fullres[-1], tmp_path/'b'/'x.jpeg')
    files = [tmp_path/'a'/'x.jpeg', tmp_path/'b'/'x.jpeg', fullres[13]]  # L and RGB JPEGs of different sizes
    df = predict(run, files, gradcam=tmp_path/'cam', bs=2)
    assert (df.error == '').all() and len(set(df.gradcam)) == 3
    for f, png in zip(files, df.gradcam):
        fig, orig = Image.open(png), Image.open(f)
        assert png.endswith('-x.png') or png.endswith(f'-{f.stem}.png')
        assert fig.format == 'PNG' and fig.mode == 'RGB' and fig.width > orig.width and fig.height > orig.height
        cam = fig.crop((0, fig.height - orig.height, orig.width, fig.height))  # the overlay, at the image's size, bottom left
        assert np.abs(np.asarray(cam, np.int16) - np.asarray(orig.convert('RGB'), np.int16)).mean() > 5  # a visible heatmap
    np.testing.assert_allclose(df.p_pneumonia, predict(run, files).p_pneumonia, atol=1e-5)
    with pytest.raises(XrayError, match='not empty'): predict(run, files, gradcam=tmp_path/'cam')
    # overlays written inside a predicted folder are not predicted the next time
    (tmp_path/'cam'/'notes.txt').write_text('mine')
    shutil.copy(df.gradcam[0], tmp_path/'cam'/'2024-01-15-patient7.png')  # the user's, named like an overlay
    again = predict(run, tmp_path, gradcam=tmp_path/'cam', overwrite=True)
    assert sorted(again.path) == sorted(map(str, files[:2]))
    # --overwrite replaced the earlier overlays (3, now 2), the ones overlays.json listed, and left the user's files alone
    assert sorted(f.name for f in (tmp_path/'cam').iterdir()) == sorted(
        [*(Path(p).name for p in again.gradcam), 'notes.txt', '2024-01-15-patient7.png', 'overlays.json'])
    assert json.loads((tmp_path/'cam'/'overlays.json').read_text()) == [Path(p).name for p in again.gradcam]
    # a folder that holds no overlays.json is not an earlier prediction's: --overwrite removes nothing from it
    mine = tmp_path/'mine'; mine.mkdir(); (mine/'0-x.png').write_bytes(b'mine')
    with pytest.raises(XrayError, match="has no overlays.json listing an earlier prediction's overlays"):
        predict(run, files, gradcam=mine, overwrite=True)
    (mine/'1-x.png').write_bytes(b'old overlay'); (mine/'overlays.json').write_text('["1-x.png"]')
    with pytest.raises(XrayError, match='0-x.png is not an overlay of an earlier prediction'):  # the user's, named like one
        predict(run, files, gradcam=mine, overwrite=True)
    assert (mine/'0-x.png').read_bytes() == b'mine' and (mine/'1-x.png').exists()  # refused before anything was removed
    with pytest.raises(XrayError, match='is a file'): predict(run, files, gradcam=tmp_path/'cam'/'notes.txt')
    with pytest.raises(XrayError, match='does not exist'): predict(tmp_path/'no-run', files, gradcam=tmp_path/'cam2')
    assert not (tmp_path/'cam2').exists()  # nothing made for a prediction that never started

def test_gradcam_both_classes_and_layer(run, fullres, tmp_path):
    "--cam-class both draws a panel per class; --cam-layer picks the layer; wrong values are refused before any write."
    one = predict(run, fullres[:2], gradcam=tmp_path/'one')
    both = predict(run, fullres[:2], gradcam=tmp_path/'both', cam_class='both', layer='6')
    for a, b, f in zip(one.gradcam, both.gradcam, fullres[:2]):
        assert Image.open(b).width >= Image.open(a).width + Image.open(f).width  # a second panel
    np.testing.assert_allclose(one.p_pneumonia, both.p_pneumonia, atol=1e-6)
    with pytest.raises(XrayError, match='--cam-class must be'): predict(run, fullres[:1], gradcam=tmp_path/'x', cam_class='all')
    with pytest.raises(XrayError, match="--cam-layer 'nope' is not a layer"): predict(run, fullres[:1], gradcam=tmp_path/'y', layer='nope')
    assert not (tmp_path/'x').exists() and not (tmp_path/'y').exists()

def test_grad_cam_warns_when_it_cannot_localise():
    "At 28 px a resnet's last feature map is 1x1: a layer chosen there gives one flat colour, and the user is told why."
    from xray_fastai.models import build_model
    model = build_model('resnet18', pretrained=False).eval()
    with pytest.warns(UserWarning, match="layer's feature map is 1x1 at 28 px"):
        _, cams = grad_cam(model, torch.randn(2, 1, 28, 28), 1, layer='7')
    assert cams.shape == (2, 1, 1)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter('always')
        assert grad_cam(model, torch.randn(2, 1, 28, 28), 1)[1].shape == (2, 7, 7)  # the default layer: layer1
    assert not [w for w in seen if '1x1' in str(w.message)]
    with pytest.raises(XrayError, match="--cam-layer 'nope' is not a layer"): grad_cam(model, torch.randn(1, 1, 28, 28), layer='nope')


def _pneumonia_batch(shared_data, size:int, n:int=6) -> torch.Tensor:
    files = sorted((shared_data/'chest_xray_224'/'train'/'PNEUMONIA').glob('*.jpeg'))[:n]
    xb = torch.stack([torch.from_numpy(np.asarray(read_xray(f).resize((size, size)), np.float32) / 255)[None] for f in files])
    return (xb - 0.5) / 0.25

@pytest.mark.parametrize('arch', ['resnet18', 'mobilenet_v2'])
def test_grad_cam_localises_at_every_size(shared_data, arch):
    "At 28, 64 and 224 px the map drawn has at least 7x7 cells and varies over pneumonia images (the body's output: 1x1, 2x2)."
    from xray_fastai.models import build_model
    torch.manual_seed(0)
    model = build_model(arch, pretrained=False).eval()
    for size, stage in ((28, 7), (64, 8), (224, 7)):
        xb = _pneumonia_batch(shared_data, size)
        assert cam_layer(model, size)[1] == (stage, stage)
        probs, cams = grad_cam(model, xb)  # each image's predicted class
        assert cams.shape == (len(xb), stage, stage) and (cams.amax((1, 2)) > 0.999).all()  # normalised, none flat at 0
        assert (cams.flatten(1).std(1) > 0.05).all(), size  # not one flat colour
        for target in (0, 1): assert grad_cam(model, xb, target)[1].shape == (len(xb), stage, stage)  # either class
        # what the overlays drew before: the body's output, 1x1 at 28 px and 2x2 at 64 px, cannot pass these checks
        body_cells = {28: (1, 1), 64: (2, 2), 224: (7, 7)}[size]
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            assert grad_cam(model, xb, 1, layer=model[0])[1].shape[1:] == body_cells

def test_trained_run_grad_cam_localises(run, shared_data):
    "The 64 px run's overlays come from layer2 (8x8), not from the body's 2x2 output."
    model, meta = load_predictor(run)
    model.requires_grad_(False)
    assert [n for n, _ in cam_stages(model, 64)][-1] == '' and cam_layer(model, 64) == ('5', (8, 8))
    pre = XrayPreprocess(meta)
    files = sorted((shared_data/'chest_xray_224'/'train'/'PNEUMONIA').glob('*.jpeg'))[:8]
    probs, cams = grad_cam(model, pre.batch([pre.item(read_xray(f)) for f in files]))
    assert cams.shape == (8, 8, 8) and 0 <= cams.min() and cams.max() <= 1
    # (this run's body is untrained and its head tempered by hand: the maps may hold no positive evidence, so no
    # contrast check here; test_grad_cam_localises_at_every_size checks the contrast)

def test_grad_cam_is_grad_cam(run, fullres):
    "On the run's resnet34, the hook-based maps equal Grad-CAM computed by hand, and do not depend on the batch."
    model, meta = load_predictor(run)
    model.eval().requires_grad_(False)
    pre = XrayPreprocess(meta)
    xb = pre.batch([pre.item(read_xray(f)) for f in fullres[:8]])
    assert type(xb) is torch.Tensor  # not fastai's type, whose ops each go through Python
    probs, cams = grad_cam(model, xb, 1, layer=model[0])  # the body's output, as by hand below
    acts = model[0](xb).detach().requires_grad_()
    logits = model[1](acts)
    g, = torch.autograd.grad(logits[:, 1].sum(), acts)
    ref = torch.relu((g.mean((2, 3), keepdim=True) * acts).sum(1)).detach()
    ref = ref / ref.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]
    assert cams.shape == (8, 2, 2) and 0 <= cams.min() and cams.max() <= 1  # 64 px input: a 2x2 map
    torch.testing.assert_close(cams, ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(probs, logits.detach().softmax(1))
    torch.testing.assert_close(grad_cam(model, xb[3:4], 1, layer=model[0])[1], cams[3:4], atol=1e-5, rtol=1e-4)
    # the default layer, layer2 (8x8), by hand: the body's first six children, then the rest of the network
    probs8, cams8 = grad_cam(model, xb, 1)
    acts = model[0][:6](xb).detach().requires_grad_()
    g, = torch.autograd.grad(model[1](model[0][6:](acts))[:, 1].sum(), acts)
    ref = torch.relu((g.mean((2, 3), keepdim=True) * acts).sum(1)).detach()
    torch.testing.assert_close(cams8, ref / ref.flatten(1).amax(1).clamp_min(1e-12)[:, None, None], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(probs8, probs)
    # explaining the predicted class: each image's own argmax, in one batch
    pred, cams_pred = probs.argmax(1), grad_cam(model, xb)[1]
    for i in range(len(xb)): torch.testing.assert_close(cams_pred[i], grad_cam(model, xb[i:i+1], int(pred[i]))[1][0], atol=1e-5, rtol=1e-4)

def test_grad_cam_finds_the_evidence():
    "A model whose positive logit is the mean brightness: Grad-CAM lights up exactly where the image is bright."
    head = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(1, 2, bias=False))
    head[2].weight.data = torch.tensor([[-1.], [1.]])
    model = torch.nn.Sequential(torch.nn.Sequential(torch.nn.AvgPool2d(16)), head).eval()  # body: 64 px -> 4x4 map
    x = torch.zeros(2, 1, 64, 64)
    x[0, :, :16, :16] = 1; x[0, :, 16:32, 16:32] = 0.5  # image 0: bright top-left, half-bright next cell
    x[1, :, 48:, :] = -1  # image 1: only negative evidence
    probs, cams = grad_cam(model, x, 1)
    expect = torch.zeros(4, 4); expect[0, 0], expect[1, 1] = 1, 0.5
    torch.testing.assert_close(cams[0], expect)
    assert (cams[1] == 0).all() and probs[0, 1] > 0.5 > probs[1, 1]
    ov = np.asarray(cam_overlay(Image.new('L', (640, 320), 100), cams[0]), np.int16)  # upsampled to the image
    assert ov.shape == (320, 640, 3) and ov[10, 10, 0] > ov[10, 10, 2] + 50 and ov[300, 600, 2] > ov[300, 600, 0] + 50

def test_cam_figure_is_readable():
    "The figure: the overlays at the image's size side by side, a header, captions and a colour bar (hot at the top)."
    im = Image.new('L', (300, 200), 128)
    cams = [torch.tensor([[1., 0.], [1., 0.]]), torch.zeros(2, 2)]
    fig = cam_figure(im, cams, ['evidence for NORMAL', 'evidence for PNEUMONIA'], 'PNEUMONIA   P(pneumonia) = 0.930')
    a = np.asarray(fig, np.int16)
    top = fig.height - 200
    assert fig.width > 600 and top > 20
    np.testing.assert_array_equal(a[top:, :300], np.asarray(cam_overlay(im, cams[0]), np.int16))
    assert (a[:top - 1] < 100).any() and (a[:top - 1] > 250).any()  # dark text on white above the panels
    x = next(x for x in range(600, fig.width) if (np.abs(np.diff(a[top + 100, x])) > 100).any())  # the bar: saturated colours
    assert a[top + 2, x, 0] > a[top + 2, x, 2] + 100 and a[fig.height - 3, x, 2] > a[fig.height - 3, x, 0] + 100  # red top, blue bottom
    assert (a[top:, x + 30:] < 100).any()  # tick labels

def test_cam_overlay():
    im = Image.new('L', (300, 200), 128)
    cam = torch.tensor([[1., 0.], [1., 0.]])  # hot left half, cold right half
    out = np.asarray(cam_overlay(im, cam, alpha=0.5, cmap='jet'), np.int16)
    assert out.shape == (200, 300, 3)
    assert out[100, 10, 0] > out[100, 10, 2] + 50 and out[100, 290, 2] > out[100, 290, 0] + 50  # red left, blue right


def _write_dicom(fn, px:np.ndarray, photometric='MONOCHROME2', **tags):
    "A 12-bit single-frame CR DICOM file of `px` (uint16), as a scanner writes it (preamble + DICM)."
    pydicom = pytest.importorskip('pydicom')
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = '1.2.840.10008.5.1.4.1.1.1', generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta, ds.SOPClassUID, ds.SOPInstanceUID = meta, meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.Rows, ds.Columns = 'CR', *px.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    for k, v in tags.items(): setattr(ds, k, v)
    ds.PixelData = px.astype('<u2').tobytes()
    try: pydicom.dcmwrite(fn, ds, enforce_file_format=True)
    except TypeError: pydicom.dcmwrite(fn, ds, write_like_original=False)  # pydicom 2.x
    return Path(fn)

def test_dicom(run, fullres, tmp_path):
    p = np.asarray(Image.open(fullres[0]).convert('L'))
    v = p.astype(np.uint16) * 16  # 12-bit stored values
    m2 = np.asarray(open_dicom(_write_dicom(tmp_path/'m2.dcm', v)))
    m1 = np.asarray(open_dicom(_write_dicom(tmp_path/'m1.dcm', v, 'MONOCHROME1')))
    # no VOI: the image's own range becomes 0-255
    expect = np.round((p - float(p.min())) / (float(p.max()) - p.min()) * 255).astype(np.uint8)
    assert m2.shape == p.shape and (m2 == expect).all() and (m1 == 255 - m2).all()
    y, x = p.shape[0] // 2, p.shape[1] // 2
    assert m1[y, x] == 255 - m2[y, x] == 255 - expect[y, x]
    # rescale (intercept -1024) then a window covering the whole 12-bit range: back to the JPEG's grey values
    full = dict(RescaleSlope=1, RescaleIntercept=-1024, WindowCenter=1024, WindowWidth=4096)
    w2 = np.asarray(open_dicom(_write_dicom(tmp_path/'w2.dcm', v, **full)))
    assert np.abs(w2.astype(int) - p).max() <= 1
    w1 = np.asarray(open_dicom(_write_dicom(tmp_path/'w1.dcm', v, 'MONOCHROME1', **full)))
    assert (w1 == 255 - w2).all()
    # a narrow window (grey 96..160): below it black, above it white
    narrow = np.asarray(open_dicom(_write_dicom(tmp_path/'n.dcm', v, RescaleSlope=1, RescaleIntercept=-1024,
                                                WindowCenter=128 * 16 - 1024, WindowWidth=64 * 16)))
    assert (narrow[p < 90] == 0).all() and (narrow[p > 170] == 255).all() and ((p < 90).any() and (p > 170).any())
    # found in folders by extension or, extension-less, by the DICM marker; predicted like any image
    shutil.copy(tmp_path/'m2.dcm', tmp_path/'IMG0001')
    assert is_dicom(tmp_path/'IMG0001') and not is_dicom(fullres[0])
    df = predict(run, tmp_path, gradcam=tmp_path/'cam')
    assert len(df) == 6 and (df.error == '').all() and df.p_pneumonia.between(0, 1).all()
    assert all(Image.open(png).width > p.shape[1] and Image.open(png).height > p.shape[0] for png in df.gradcam)  # + captions, bar
    # this JPEG spans 0-255, so the DICOM holds exactly its image: the same probability
    assert (expect == p).all()
    row = df.set_index('path').loc[str(tmp_path/'m2.dcm')]
    assert abs(row.p_pneumonia - predict(run, fullres[:1]).p_pneumonia[0]) < 1e-5

def test_dicom_without_pydicom_is_an_error_row(run, fullres, tmp_path, monkeypatch):
    pytest.importorskip('pydicom')
    dcm = _write_dicom(tmp_path/'x.dcm', np.asarray(Image.open(fullres[0]).convert('L')).astype(np.uint16) * 16)
    monkeypatch.setitem(sys.modules, 'pydicom', None)  # `import pydicom` now raises ImportError
    df = predict(run, [dcm, fullres[0]])
    assert 'pip install pydicom' in df.error[0] and np.isnan(df.p_pneumonia[0]) and df.error[1] == ''


class Payload:
    "Unpickling this creates the folder `marker`: proof that a file was unpickled."
    def __init__(self, marker): self.marker = str(marker)
    def __reduce__(self): return (os.mkdir, (self.marker,))

def test_only_the_exported_model_file(run, fullres, tmp_path):
    "Another .safetensors beside model.json is refused, never swapped for the folder's model.safetensors."
    other = Path(shutil.copytree(run, tmp_path/'r', ignore=shutil.ignore_patterns('*.pth')))/'older.safetensors'
    other.write_bytes(b'')
    with pytest.raises(XrayError, match='older.safetensors is not the model'): predict(other, fullres[:1])
    from xray_fastai.runs import load_model_dir
    with pytest.raises(XrayError, match='older.safetensors is not the model'): load_model_dir(other)


def test_pickles_and_garbage_are_refused(run, fullres, tmp_path):
    probe = tmp_path/'probe'
    pickle.loads(pickle.dumps(Payload(probe)))
    assert probe.exists()  # the payload does fire when unpickled
    marker = tmp_path/'pwned'
    torch.save({'model': Payload(marker)}, tmp_path/'evil.pth')
    with pytest.raises(XrayError, match='refusing'): predict(tmp_path/'evil.pth', fullres[:1])
    for name, data in (('pickled', (tmp_path/'evil.pth').read_bytes()), ('garbage', os.urandom(4096)),
                       ('empty', b''), ('header', b'\x10\x00\x00\x00\x00\x00\x00\x00{"a": 1}')):
        fake = Path(shutil.copytree(run, tmp_path/name, ignore=shutil.ignore_patterns('*.pth')))
        (fake/'model.safetensors').write_bytes(data)
        for model in (fake, fake/'model.safetensors'):
            with pytest.raises(XrayError, match='could not load the model|not a model written by xray-fastai'): predict(model, fullres[:1])
    with pytest.raises(XrayError, match='no deployable model'): predict(tmp_path, fullres[:1])
    (tmp_path/'pickled'/'model.json').write_text('[1, 2]')
    with pytest.raises(XrayError, match='not an xray-fastai model'): predict(tmp_path/'pickled', fullres[:1])
    assert not marker.exists()
