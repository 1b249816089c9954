"`xray-fastai train` and `lr-find` through the real command line: run folders, offline errors, bad options."
import json
import pandas as pd, pytest

def _one_line_error(r, *words):
    assert r.returncode == 2, r.stderr
    errors = [l for l in r.stderr.splitlines() if l.startswith('error: ')]
    assert len(errors) == 1 and 'Traceback' not in r.stderr, r.stderr
    for w in words: assert w in errors[0], errors[0]
    return errors[0]

def test_train_frozen_cli(run_cli, mini_npz, tmp_path):
    out = tmp_path/'run'
    r = run_cli('train', '--data', mini_npz, '--arch', 'resnet34', '--frozen', '--no-pretrained', '--epochs', '2',
                '--no-verify', '--out', out)
    assert r.returncode == 0, r.stderr
    # not a terminal: one line per epoch, no progress-bar spam
    assert [l.split()[1] for l in r.stdout.splitlines() if l.startswith('epoch ')] == ['1/2', '2/2']
    assert '\r' not in r.stdout and str(out) in r.stdout.splitlines()[-1]
    cfg, hist = json.loads((out/'config.json').read_text()), pd.read_csv(out/'history.csv')
    assert (cfg['arch'], cfg['frozen'], cfg['pretrained'], cfg['epochs']) == ('resnet34', True, False, 2)
    assert len(hist) == 2 and hist.accuracy.between(0, 1).all()

def test_train_recipe_cli(run_cli, mini_npz, tmp_path):
    from xray_fastai.config import RECIPES
    out, recipe = tmp_path/'run', RECIPES['pneumoniamnist']
    # the options given override the recipe; the others are the recipe's, not the CLI's defaults
    r = run_cli('train', '--recipe', 'pneumoniamnist', '--data', mini_npz, '--epochs', '1', '--aug-param', 'max_rotate=3',
                '--no-verify', '--out', out)
    assert r.returncode == 0, r.stderr
    cfg = json.loads((out/'config.json').read_text())
    assert (cfg['recipe'], cfg['source'], cfg['epochs'], cfg['verify']) == ('pneumoniamnist', str(mini_npz), 1, False)
    for k in ('arch', 'bs', 'lr', 'pretrained'): assert cfg[k] == recipe[k], k
    assert (cfg['arch'], cfg['bs']) != ('resnet34', 64)  # not the CLI's defaults
    assert cfg['aug_kwargs'] == {**recipe.get('aug_kwargs', {}), 'max_rotate': 3.0}
    assert len(pd.read_csv(out/'history.csv')) == 1
    _one_line_error(run_cli('train', '--recipe', 'kermany', '--out', tmp_path/'k'), '--recipe kermany', '--source (a folder')
    _one_line_error(run_cli('train', '--recipe', 'cifar', '--out', tmp_path/'c'), "unknown --recipe 'cifar'", 'pneumoniamnist')
    assert not (tmp_path/'k').exists() and not (tmp_path/'c').exists()

def test_offline_pretrained_is_one_line_and_leaves_no_run(run_cli, mini_npz, tmp_path):
    env = {'TORCH_HOME': str(tmp_path/'torch'), 'HF_HUB_OFFLINE': '1'}  # an empty weights cache
    r = run_cli('train', '--data', mini_npz, '--arch', 'resnet34', '--epochs', '1', '--out', tmp_path/'run', env=env)
    _one_line_error(r, 'pretrained weights for resnet34', '--no-pretrained', '--weights PATH')
    assert not (tmp_path/'run').exists()

@pytest.mark.parametrize('args,words', [
    (['--epochs', '0'], ['--epochs must be positive']),
    (['--bs', '0'], ['--bs must be positive']),
    (['--lr', '-1'], ['--lr must be positive']),
    (['--lr', 'fast'], ["--lr must be a number or 'auto'"]),
    (['--size', '8'], ['--size must be at least 16']),
    (['--monitor', 'kappa'], ["unknown --monitor 'kappa'", 'valid_loss']),
    (['--arch', 'resnet35x'], ["unknown architecture 'resnet35x'", 'resnet34', 'mobilenet_v2']),
    (['--frozen', '--freeze-epochs', '1'], ['--freeze-epochs is for fine-tuning']),
    (['--aug-param', 'max_spin=3'], ["unknown augmentation setting(s) ['max_spin']"]),
    (['--aug-param', 'size=64'], ["unknown augmentation setting(s) ['size']", 'the input size is --size']),
    (['--frozen', '--no-aug', '--mixup', '0.4'], ['--mixup mixes images']),
    (['--lr-mult', '0'], ['--lr-mult must be positive, got 0']),
    (['--sync-bn'], ['--sync-bn is for distributed training']),
    # values Typer could range-check are the library's to refuse, in one line like the others
    (['--valid-pct', '0.9'], ['--valid-pct must be in (0, 0.5], got 0.9']),
    (['--mixup', '-1'], ['--mixup must be 0 (off) or a positive Beta alpha, got -1']),
    (['--distributed', '0'], ['--distributed must be at least 1, got 0']),
    (['--num-workers', '-1'], ['--num-workers must be 0 or more, got -1']),
    (['--lr', 'inf'], ['--lr must be positive']),
    (['--aug-param', 'xtra_tfms=1'], ["unknown augmentation setting(s) ['xtra_tfms']"]),
    (['--bs', '1024'], ['--bs 1024 is more than the 512 training images', 'smaller --bs']),  # it trained nothing, exit 0
    (['--lr', '1e8', '--epochs', '1'], ['training diverged in epoch 1', 'lower --lr than 100000000.0']),
])
def test_bad_train_options(start_cli, mini_npz, tmp_path, args, words):
    r = start_cli('train', '--data', mini_npz, '--no-pretrained', '--out', tmp_path/'run', *args).result()
    _one_line_error(r, *words)
    assert not (tmp_path/'run').exists()

@pytest.mark.parametrize('cmd', [['train', '--epochs', '0'], ['lr-find', '--bs', '0'], ['train', '--recipe', 'pneumoniamnist', '--lr', 'fast']])
def test_a_wrong_value_is_answered_before_torch_loads(cmd):
    "A mistyped value costs a user a fraction of a second, not the seconds torch and fastai take to import."
    import subprocess, sys
    code = (f"import sys\nfrom xray_fastai.cli import main\ntry: main({cmd!r})\n"
            "except SystemExit as e: print(e.code, sorted({'torch', 'fastai'} & set(sys.modules)))")
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=60)
    assert r.stdout.split() == ['2', '[]'] and len(r.stderr.splitlines()) == 1 and r.stderr.startswith('error: --'), r

def test_resume_takes_no_other_settings(run_cli, mini_npz, tmp_path):
    r = run_cli('train', '--resume', tmp_path/'run', '--epochs', '9', '--bs', '8', '--data-dir', tmp_path)
    _one_line_error(r, '--resume continues a run with its own settings: drop --epochs, --bs')

def test_out_is_a_file(run_cli, mini_npz, tmp_path):
    (tmp_path/'notes.txt').write_text('keep me')
    _one_line_error(run_cli('train', '--data', mini_npz, '--no-pretrained', '--out', tmp_path/'notes.txt'), 'is a file')
    assert (tmp_path/'notes.txt').read_text() == 'keep me'

def test_existing_run_folder_is_not_overwritten(run_cli, mini_npz, tmp_path):
    out = tmp_path/'mine'; out.mkdir(); (out/'notes.txt').write_text('keep me')
    r = run_cli('train', '--data', mini_npz, '--no-pretrained', '--out', out)
    _one_line_error(r, 'already exists', '--resume')
    assert (out/'notes.txt').read_text() == 'keep me' and len(list(out.iterdir())) == 1

def test_lr_find_cli(run_cli, mini_npz, tmp_path):
    plot = tmp_path/'lr.png'
    r = run_cli('lr-find', '--data', mini_npz, '--frozen', '--no-pretrained', '--no-verify', '--plot', plot)
    assert r.returncode == 0, r.stderr
    sugg = dict(l.split() for l in r.stdout.splitlines())
    assert set(sugg) == {'valley', 'slide', 'minimum', 'steep'} and all(float(v) > 0 for v in sugg.values())
    assert plot.read_bytes()[:4] == b'\x89PNG'
