"Reliability: messy inputs, interrupted runs, atomic files, safe loading — through the CLI where a user would meet them."
import signal, shutil, subprocess, sys, time
from pathlib import Path
import numpy as np, pandas as pd, pytest, torch
from PIL import Image
from xray_fastai.core import XrayError, load_json, save_json
from xray_fastai.data import load_source, open_xray
from conftest import copy_class_folders, wait_for

def _errline(r):
    lines = [l for l in r.stderr.splitlines() if l.startswith('error: ')]
    assert r.returncode == 2 and len(lines) == 1 and 'Traceback' not in r.stderr, r.stderr
    return lines[0]

@pytest.fixture(scope='module')
def messy(shared_data, tmp_path_factory) -> Path:
    "A folder-per-class dataset of real X-rays plus every kind of broken and unusual file a hospital export holds."
    root = copy_class_folders(shared_data, tmp_path_factory.mktemp('messy'), 20)
    real = sorted((root/'NORMAL').glob('*.jpeg'))[0]
    grey = np.asarray(Image.open(real).convert('L'))
    bad = root/'PNEUMONIA'
    (bad/'truncated.jpeg').write_bytes(real.read_bytes()[:2000])
    (bad/'empty.jpeg').write_bytes(b'')
    (bad/'notes.jpeg').write_text('exported by the PACS, not an image')
    _png_claiming(bad/'bomb.png', 20000, 20000)  # 400 MP: beyond PIL's decompression-bomb limit
    (root/'NORMAL'/'.DS_Store').write_bytes(b'\x00\x00\x00\x01Bud1')
    (root/'NORMAL'/'._IM-0001.jpeg').write_bytes(b'\x00\x05\x16\x07')  # macOS resource fork: hidden, skipped
    (root/'NORMAL'/'.thumbnails').mkdir()  # a viewer's hidden folder of small copies: not data
    shutil.copy(real, root/'NORMAL'/'.thumbnails'/'thumb.jpeg')
    # valid but unusual: RGBA PNG, 16-bit grey PNG, CMYK JPEG, upper-case extensions
    Image.fromarray(grey).convert('RGBA').save(root/'NORMAL'/'rgba.PNG')
    Image.fromarray(grey.astype(np.uint16) * 257).save(root/'NORMAL'/'grey16.png')
    Image.fromarray(grey).convert('CMYK').save(root/'NORMAL'/'cmyk.JPG')
    return root

def _png_claiming(path, w, h):
    "A tiny PNG whose header claims `w` x `h` pixels (what a decompression bomb looks like to PIL)."
    import struct, zlib
    Image.new('L', (1, 1)).save(path)
    b = bytearray(path.read_bytes())  # signature (8), IHDR length (4), b'IHDR', width, height, ..., CRC
    b[16:24] = struct.pack('>II', w, h)
    b[29:33] = struct.pack('>I', zlib.crc32(bytes(b[12:29])))
    path.write_bytes(bytes(b))

BAD = {'truncated.jpeg', 'empty.jpeg', 'notes.jpeg', 'bomb.png'}

def test_unusual_images_convert_to_grey(messy):
    ref = np.asarray(open_xray(messy/'NORMAL'/'rgba.PNG'))  # made from a grey image: R=G=B, alpha dropped
    grey16 = np.asarray(open_xray(messy/'NORMAL'/'grey16.png'))
    cmyk = np.asarray(open_xray(messy/'NORMAL'/'cmyk.JPG'))
    assert grey16.dtype == np.uint8 and np.array_equal(grey16, ref)  # 16-bit scaled, not clipped
    assert np.abs(cmyk.astype(int) - ref.astype(int)).mean() < 3    # CMYK through RGB (JPEG is lossy)
    assert ref.shape == (224, 224) and ref.std() > 10

def test_bad_files_are_skipped_and_listed(messy, run_cli):
    r = run_cli('data', 'verify', messy)
    assert r.returncode == 1
    listed = {Path(l.split(': ')[0]).name for l in r.stdout.splitlines()}
    assert listed == BAD
    with pytest.warns(UserWarning, match='skipping 4 unreadable'):
        src = load_source(messy, min_valid_per_class=1)
    names = {Path(p).name for p in src.df.item}
    assert not names & BAD and {'rgba.PNG', 'grey16.png', 'cmyk.JPG'} <= names
    assert not any(n.startswith('.') for n in names)
    assert not any('.thumbnails' in p for p in src.df.item)

def test_training_on_messy_folder_skips_bad_files(messy, run_cli, tmp_path):
    r = run_cli('train', '--data', messy, '--no-pretrained', '--frozen', '--no-aug', '--epochs', '1', '--size', '32',
                '--bs', '8', '--valid-pct', '0.25', '--out', tmp_path/'run')
    assert r.returncode == 0, r.stderr
    assert 'warning: skipping 4 unreadable image(s)' in r.stderr
    cfg = load_json(tmp_path/'run'/'config.json')
    assert cfg['skipped'] == 4 and sum(sum(c.values()) for c in cfg['counts'].values()) == 43

@pytest.mark.parametrize('layout,words', [
    ('missing', ['does not exist']),
    ('empty_class', ['holds no images', 'PNEUMONIA']),
    ('one_class', ['only one class']),
    ('three_classes', ['has 3 classes (COVID, NORMAL, PNEUMONIA)', 'classifies two']),
    ('no_classes', ['no class folders']),
    ('no_train_split', ['has no training images']),
])
def test_structural_problems_are_one_line(shared_data, run_cli, tmp_path, layout, words):
    src = sorted((shared_data/'chest_xray_224'/'train'/'NORMAL').glob('*.jpeg'))[:60]
    root = tmp_path/layout
    if layout != 'missing': root.mkdir()
    if layout in ('empty_class', 'one_class'):
        (root/'NORMAL').mkdir()
        for f in src[:10]: shutil.copy(f, root/'NORMAL')
        if layout == 'empty_class': (root/'PNEUMONIA').mkdir()
    if layout == 'three_classes':  # it used to train an epoch, then crash in the binary metrics
        for i, cls in enumerate(('COVID', 'NORMAL', 'PNEUMONIA')):
            (root/cls).mkdir()
            for f in src[i*10:(i+1)*10]: shutil.copy(f, root/cls)
    if layout == 'no_train_split':  # val/ and test/ but no train/
        for split, cls, files in (('val', 'NORMAL', src[:10]), ('val', 'PNEUMONIA', src[10:20]), ('test', 'NORMAL', src[20:30])):
            (root/split/cls).mkdir(parents=True, exist_ok=True)
            for f in files: shutil.copy(f, root/split/cls)
    r = run_cli('data', 'info', root)
    line = _errline(r)
    for w in words: assert w in line, line
    assert str(root) in line

@pytest.mark.parametrize('text,words', [
    ('', ['could not read', 'EmptyDataError']),
    ('path,label\na.jpeg,NORMAL\nb.jpeg,PNEUMONIA,test,extra\n', ['could not read', 'ParserError']),
    ('file,class\na.jpeg,NORMAL\n', ['needs columns path,label[,split]', 'it has file,class']),
    ('path,label\na.jpeg,NORMAL\n,PNEUMONIA\n', ["the 'path' column has 1 empty cell(s), the first in data row 2"]),
    ('path,label\na.jpeg,NORMAL\n\nb.jpeg, \n', ["the 'label' column has 1 empty cell(s), the first in data row 2"]),
])
def test_bad_csv_sources_are_one_line(run_cli, tmp_path, text, words):
    "What is wrong with a CSV source (data, train, evaluate --source; predict's lists too) is one line naming it, exit 2."
    (tmp_path/'list.csv').write_text(text)
    for f in ('a.jpeg', 'b.jpeg'): (tmp_path/f).write_bytes(b'')
    line = _errline(run_cli('data', 'info', tmp_path/'list.csv'))
    for w in words: assert w in line, line
    assert str(tmp_path/'list.csv') in line

def test_save_that_fails_midway_keeps_the_previous_file(tmp_path, monkeypatch):
    from xray_fastai import learner
    target = tmp_path/'last.pth'
    torch.save({'epoch': 1}, target)
    before = target.read_bytes()
    def broken_save(obj, f, *a, **k):
        f.write(b'half a checkpoint'); raise OSError('disk full')
    monkeypatch.setattr(learner.torch, 'save', broken_save)
    class FakeLearn:  # just what save_checkpoint reads
        model, opt = torch.nn.Linear(2, 2), None
        recorder = type('R', (), {'smooth_loss': type('S', (), {'count': 0, 'val': 0.})()})()
        dls = type('D', (), {'train': object()})()
    with pytest.raises(OSError, match='disk full'): learner.save_checkpoint(FakeLearn(), target, 2)
    assert target.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ['last.pth']
    save_json({'a': 1}, tmp_path/'m.json')
    monkeypatch.setattr('xray_fastai.core.os.replace', lambda *a: (_ for _ in ()).throw(OSError('rename failed')))
    with pytest.raises(OSError): save_json({'a': 2}, tmp_path/'m.json')
    assert load_json(tmp_path/'m.json') == {'a': 1}

def _train_proc(cli_env, mini_npz, out, epochs=3, size=28):
    args = [sys.executable, '-m', 'xray_fastai.cli', 'train', '--data', str(mini_npz), '--no-pretrained', '--no-verify',
            '--arch', 'resnet34', '--epochs', str(epochs), '--bs', '64', '--seed', '1', '--size', str(size), '--out', str(out)]
    return subprocess.Popen(args, env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

def test_sigkill_then_resume(cli_env, mini_npz, run_cli, tmp_path):
    out = tmp_path/'run'
    p = _train_proc(cli_env, mini_npz, out)
    wait_for(out/'last.pth', p)
    p.kill(); p.communicate()
    done = len(pd.read_csv(out/'history.csv'))
    assert 1 <= done < 3 and not (out/'metrics.json').exists()
    before = torch.load(out/'last.pth', weights_only=True)['wall']  # the killed session's time, up to its last epoch
    assert before >= pd.read_csv(out/'history.csv').seconds[:done].sum()
    r = run_cli('train', '--resume', out)
    assert r.returncode == 0, r.stderr
    hist = pd.read_csv(out/'history.csv')
    assert list(hist.epoch) == [0, 1, 2]  # each epoch once
    m = load_json(out/'metrics.json')
    assert m['epochs'] == 3 and 0 <= m['best_epoch'] < 3 and 0 <= m['best']['accuracy'] <= 1
    assert m['wall_seconds'] >= before + hist.seconds[done:].sum()  # the killed session's time counts too

def test_ctrl_c_leaves_a_resumable_run(cli_env, mini_npz, tmp_path):
    out = tmp_path/'run'
    p = _train_proc(cli_env, mini_npz, out, epochs=20)
    wait_for(out/'last.pth', p)
    p.send_signal(signal.SIGINT)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 130, stderr
    assert f'xray-fastai train --resume {out}' in stderr and 'Traceback' not in stderr
    assert torch.load(out/'last.pth', weights_only=True)['epoch'] >= 0

def test_ctrl_c_before_the_first_epoch_leaves_nothing(cli_env, mini_npz, tmp_path):
    "Nothing to resume: the half-made run folder goes (it would block --out), and no --resume is suggested."
    out = tmp_path/'run'
    p = _train_proc(cli_env, mini_npz, out, epochs=20, size=112)  # a long first epoch: the signal lands inside it
    wait_for(out/'config.json', p)
    p.send_signal(signal.SIGINT)
    _, stderr = p.communicate(timeout=120)
    assert p.returncode == 130 and 'no epoch was completed, so nothing was kept' in stderr, stderr
    assert '--resume' not in stderr and not out.exists()
    mine = tmp_path/'mine'; mine.mkdir()  # the user's empty --out stays, empty
    p = _train_proc(cli_env, mini_npz, mine, epochs=20, size=112)
    wait_for(mine/'config.json', p)
    p.send_signal(signal.SIGINT); p.communicate(timeout=120)
    assert mine.is_dir() and not any(mine.iterdir())

class _Payload:
    "Unpickling this creates a marker file: what a malicious 'checkpoint' would do."
    def __init__(self, marker): self.marker = str(marker)
    def __reduce__(self): return (Path.touch, (Path(self.marker),))

def _crafted(path, marker):
    torch.save({'model': _Payload(marker)}, path)
    return path

@pytest.fixture(scope='module')
def tiny_run(mini_npz, tmp_path_factory):
    from xray_fastai.learner import train
    return train(out=tmp_path_factory.mktemp('runs')/'tiny', source=str(mini_npz), verify=False, pretrained=False,
                 arch='resnet34', frozen=True, aug=False, epochs=1, lr=1e-2, bs=64, seed=0)

@pytest.mark.parametrize('entry', ['weights', 'resume', 'predict', 'evaluate'])
def test_crafted_pickles_are_refused(entry, tiny_run, mini_npz, run_cli, tmp_path, shared_data):
    marker = tmp_path/'pwned'
    if entry == 'weights':
        r = run_cli('train', '--data', mini_npz, '--no-pretrained', '--out', tmp_path/'run',
                    '--weights', _crafted(tmp_path/'evil.pth', marker))
    else:
        run = tmp_path/'copy'
        shutil.copytree(tiny_run, run)
        if entry == 'resume':
            _crafted(run/'last.pth', marker)
            r = run_cli('train', '--resume', run)
        else:  # a model file that is really a pickle, under the safetensors name
            _crafted(run/'model.safetensors', marker)
            r = (run_cli('predict', run, shared_data/'chest_xray_fullres_sample', '--out', tmp_path/'p.csv')
                 if entry == 'predict' else run_cli('evaluate', run))
    line = _errline(r)
    assert 'unpickle' in line or 'not a model written by xray-fastai' in line or 'could not read' in line, line
    assert not marker.exists()


@pytest.mark.parametrize('content', [b'not weights at all\n', b'\x89PNG\r\n\x1a\n' + bytes(64), b'{"a": 1}'])
def test_weights_that_are_not_weights(content, tmp_path):
    from xray_fastai.models import build_model, load_weights
    (tmp_path/'w.pth').write_bytes(content)
    with pytest.raises(XrayError, match=r'could not read weights from .*w.pth \(corrupt, or not a weights file'):
        load_weights(build_model('resnet18', pretrained=False), tmp_path/'w.pth', 'resnet18')

def test_only_downloads_are_called_download_errors():
    from xray_fastai.models import catch_download_errors
    with pytest.raises(RuntimeError, match='shape mismatch'), catch_download_errors('resnet18', downloading=False):
        raise RuntimeError('shape mismatch')
    with pytest.raises(XrayError, match='could not download pretrained weights'), catch_download_errors('resnet18'):
        raise RuntimeError('HTTP Error 403')
