"`xray-fastai` and its `data` commands: most through Typer's CliRunner, exit statuses and stderr through a real process."
import json, shutil, subprocess, sys

import pytest
from typer.testing import CliRunner

from xray_fastai.cli import app, main
from xray_fastai.core import XrayError

runner = CliRunner()


def invoke(*args, **kwargs):
    "Run the app in-process (exceptions are kept in `result.exception`)."
    return runner.invoke(app, [str(a) for a in args], **kwargs)


def table(out:str, section:str) -> dict:
    "The rows under `section` ('as found on disk' or 'as used') of `data info` text: {split: [numbers...]}."
    lines = out.splitlines()
    rows, i = {}, lines.index(section) + 1
    while i < len(lines) and lines[i].startswith('  '):
        split, *cells = lines[i].split()
        rows[split] = [int(c) for c in cells]
        i += 1
    return rows


def main_result(capsys, *args):
    "Run the console entry point `main` in-process: (exit status, stdout, stderr)."
    with pytest.raises(SystemExit) as e: main([str(a) for a in args])
    out, err = capsys.readouterr()
    return e.value.code, out, err


@pytest.fixture(scope='module')
def kermany(shared_data): return shared_data/'chest_xray_224'


@pytest.fixture(scope='module')
def bad_folder(shared_data, tmp_path_factory):
    "A folder-per-class copy of 8+8 real images (distinct patients) plus 3 unreadable '.jpeg' files: (root, bad paths)."
    from xray_fastai.data import patient_id
    root = tmp_path_factory.mktemp('bad')
    for cls in ('NORMAL', 'PNEUMONIA'):
        (root/cls).mkdir()
        files, seen = [], set()
        for f in sorted((shared_data/'chest_xray_224'/'train'/cls).iterdir()):
            if patient_id(f.name) not in seen: files.append(f); seen.add(patient_id(f.name))
            if len(files) == 8: break
        for f in files: shutil.copy(f, root/cls/f.name)
    good = sorted((root/'NORMAL').iterdir())[0].read_bytes()
    bad = [root/'NORMAL'/'truncated.jpeg', root/'PNEUMONIA'/'empty.jpeg', root/'PNEUMONIA'/'notes.jpeg']
    bad[0].write_bytes(good[:len(good)//2])
    bad[1].write_bytes(b'')
    bad[2].write_text('not an image, just text with the wrong extension\n')
    return root, {str(p) for p in bad}


@pytest.fixture(scope='module')
def one_class(shared_data, tmp_path_factory):
    "A folder with a single class folder of real images."
    root = tmp_path_factory.mktemp('oneclass')
    (root/'NORMAL').mkdir()
    for f in sorted((shared_data/'chest_xray_224'/'train'/'NORMAL').iterdir())[:3]: shutil.copy(f, root/'NORMAL')
    return root


# --- help, version, lazy imports

def test_help_lists_groups_and_commands():
    r = invoke('--help')
    assert r.exit_code == 0 and 'data' in r.output and 'Examples' in r.output and '--debug' in r.output
    r = invoke('data', '--help')
    assert r.exit_code == 0
    for cmd in ('download', 'info', 'verify'): assert cmd in r.output
    for cmd in ('download', 'info', 'verify'):
        r = invoke('data', cmd, '--help')
        assert r.exit_code == 0 and f'xray-fastai data {cmd}' in r.output  # the examples epilog


def test_no_args_shows_help():
    for args in ([], ['data'], ['data', 'info']):
        r = invoke(*args)
        assert 'Usage' in r.output and r.exit_code in (0, 2) and not isinstance(r.exception, XrayError)


def test_no_rich_tracebacks():
    assert app.pretty_exceptions_enable is False  # an XrayError never gets Typer's boxed traceback


def test_version():
    from xray_fastai import __version__
    r = invoke('--version')
    assert r.exit_code == 0 and r.output.strip() == f'xray-fastai {__version__}'


def test_help_does_not_import_torch_or_fastai():
    code = ("import sys\nimport xray_fastai.cli as cli\nheavy = lambda: sorted({'torch', 'fastai'} & set(sys.modules))\n"
            "print(heavy())\n"
            "for args in (['--help'], ['data', '--help'], ['data', 'info', '--help'], ['data', 'download', '--help']):\n"
            "    try: cli.main(args)\n"
            "    except SystemExit as e: assert e.code == 0, e.code\n"
            "print(heavy())\n")
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == '[]' and r.stdout.splitlines()[-1] == '[]'


# --- data info

# Under pytest, warnings raised in CliRunner runs are recorded by pytest (`main` prints them: tested below).

def test_info_pneumoniamnist(shared_data):
    with pytest.warns(UserWarning, match='user-supplied'):  # this copy's MD5 is not the official one
        r = invoke('data', 'info', 'pneumoniamnist', env={'XRAY_FASTAI_DATA': str(shared_data)})  # cache from the env
    assert r.exit_code == 0, r.output
    for n in ('4708', '524', '624', '1214', '3494'): assert n in r.stdout
    on_disk = {'train': [1214, 3494, 4708], 'valid': [135, 389, 524], 'test': [234, 390, 624]}
    assert table(r.stdout, 'as found on disk') == on_disk
    assert table(r.stdout, 'as used') == on_disk  # its own val split is big enough
    assert "validation: the source's own validation split" in r.stdout
    assert '28x28 px, mode L (all 5856 images)' in r.stdout and 'skipped: none' in r.stdout


def test_info_pneumoniamnist_json(shared_data, recwarn):
    r = invoke('data', 'info', 'pneumoniamnist', '--data-dir', shared_data, '--no-verify', '--json')
    assert r.exit_code == 0, r.output
    assert r.stderr == '' and not [w for w in recwarn if 'user-supplied' in str(w.message)]  # --no-verify
    d = json.loads(r.stdout)
    assert d['on_disk']['train'] == {'NORMAL': 1214, 'PNEUMONIA': 3494}
    assert d['on_disk']['test'] == {'NORMAL': 234, 'PNEUMONIA': 390}
    assert d['classes'] == ['NORMAL', 'PNEUMONIA'] and d['positive'] == 'PNEUMONIA'
    assert d['image_width'] == [28, 28] and d['modes'] == {'L': 5856} and d['skipped'] == []


def test_info_kermany_carves_patient_grouped_valid(kermany):
    from xray_fastai.data import load_source
    src = load_source(kermany, verify=False)  # the expected values (the CLI also checks every file)
    r = invoke('data', 'info', kermany)
    assert r.exit_code == 0, r.output
    assert table(r.stdout, 'as found on disk') == {'train': [1341, 3875, 5216], 'valid': [8, 8, 16]}
    used = {s: [c['NORMAL'], c['PNEUMONIA'], sum(c.values()), src.items(s).patient.nunique()]
            for s, c in src.counts().items()}
    assert set(used) == {'train', 'valid'} and used['valid'][2] > 16
    assert table(r.stdout, 'as used') == used
    assert f'validation: {src.valid_origin}' in r.stdout and 'patient-grouped' in src.valid_origin
    assert '224x224 px, mode RGB' in r.stdout and 'skipped: none' in r.stdout


def test_info_valid_pct_and_seed_are_passed(kermany):
    from xray_fastai.data import load_source
    src = load_source(kermany, verify=False, valid_pct=0.1, seed=1)
    r = invoke('data', 'info', kermany, '--valid-pct', '0.1', '--seed', '1', '--no-verify', '--json')
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d['used'] == src.counts() and d['valid_origin'] == src.valid_origin and 'seed 1' in d['valid_origin']


@pytest.mark.parametrize('pct', ['0', '0.9', 'abc'])
def test_info_rejects_bad_valid_pct(pct, run_cli):
    r = run_cli('data', 'info', 'pneumoniamnist', '--valid-pct', pct)
    assert r.returncode == 2 and '--valid-pct' in r.stderr, r.stderr
    if pct != 'abc': assert r.stderr == f"error: --valid-pct must be in (0, 0.5], got {float(pct)}\n"  # the library's line


def test_info_lists_skipped_files(bad_folder):
    root, bad = bad_folder
    with pytest.warns(UserWarning, match='skipping 3 unreadable image'): r = invoke('data', 'info', root)
    assert r.exit_code == 0, r.output
    assert table(r.stdout, 'as found on disk') == {'train': [8, 8, 16]}
    assert 'skipped: 3 unreadable file(s)' in r.stdout
    listed = {l.strip().split(': ')[0] for l in r.stdout.split('skipped: 3 unreadable file(s)\n')[1].splitlines()}
    assert listed == bad


def test_info_csv(shared_data, tmp_path):
    sample = shared_data/'chest_xray_fullres_sample'/'train'
    rows = [f'{f},{f.parent.name}' for f in sorted(sample.glob('*/*.jpeg'))]
    (tmp_path/'data.csv').write_text('path,label\n' + '\n'.join(rows) + '\n')
    r = invoke('data', 'info', tmp_path/'data.csv')
    if r.exception: raise r.exception
    assert table(r.stdout, 'as found on disk') == {'train': [12, 11, 23]}


# --- data verify

def test_verify_lists_unreadable_files(bad_folder, recwarn):
    root, bad = bad_folder
    r = invoke('data', 'verify', root)
    assert r.exit_code == 1
    lines = r.stdout.splitlines()
    assert {l.split(': ')[0] for l in lines} == bad and len(lines) == 3
    assert all(': ' in l and len(l.split(': ', 1)[1]) > 0 for l in lines)  # each with its reason
    assert any('truncated' in l for l in lines if 'truncated.jpeg' in l)
    assert r.stderr.strip() == f'{root.name}: 3 of 19 image files unreadable'  # the summary
    assert not [w for w in recwarn if 'unreadable' in str(w.message)]  # the list replaces load_source's warning


def test_verify_clean_folder(shared_data):
    r = invoke('data', 'verify', shared_data/'chest_xray_fullres_sample')
    assert r.exit_code == 0 and r.stdout == ''
    assert r.stderr.strip() == 'chest_xray_fullres_sample: all 23 images readable'


def test_verify_pneumoniamnist(shared_data):
    with pytest.warns(UserWarning, match='user-supplied'):  # replayed after load_source
        r = invoke('data', 'verify', 'pneumoniamnist', '--data-dir', shared_data)
    assert r.exit_code == 0 and r.stdout == ''
    assert r.stderr.strip() == 'pneumoniamnist: all 5856 images readable'


# --- errors: in-process

def test_user_errors_are_xray_errors(tmp_path, one_class):
    r = invoke('data', 'info', tmp_path/'missing')
    assert isinstance(r.exception, XrayError) and str(tmp_path/'missing') in str(r.exception)
    r = invoke('data', 'verify', one_class)
    assert isinstance(r.exception, XrayError) and 'only one class' in str(r.exception)
    r = invoke('data', 'download', 'cifar10')
    assert isinstance(r.exception, XrayError) and 'unknown dataset' in str(r.exception)


def test_main_prints_one_error_line(capsys, tmp_path):
    code, out, err = main_result(capsys, 'data', 'info', tmp_path/'missing')
    assert code == 2 and out == ''
    assert err.startswith('error: ') and err.count('\n') == 1 and str(tmp_path/'missing') in err


def test_main_debug_env_shows_traceback(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv('XRAY_FASTAI_DEBUG', '1')
    code, out, err = main_result(capsys, 'data', 'info', tmp_path/'missing')
    assert code == 2 and 'Traceback' in err and 'XrayError' in err


def test_main_ctrl_c_exits_130(capsys, monkeypatch):
    import xray_fastai.data
    def interrupted(*args, **kwargs): raise KeyboardInterrupt
    monkeypatch.setattr(xray_fastai.data, 'load_source', interrupted)
    code, out, err = main_result(capsys, 'data', 'info', 'pneumoniamnist')
    assert code == 130 and 'Traceback' not in err


def test_main_prints_warnings_as_one_line(capsys, shared_data):
    code, out, err = main_result(capsys, 'data', 'info', 'pneumoniamnist', '--data-dir', shared_data)
    assert code == 0 and '4708' in out
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith('warning: ') and 'user-supplied' in lines[0]
    assert 'UserWarning' not in err and '.py:' not in err


# --- errors: the real console entry point (each run imports fastai: they start together, at the start of the module)

@pytest.fixture(scope='module', autouse=True)
def real_runs(start_cli, one_class, tmp_path_factory) -> dict:
    missing = tmp_path_factory.mktemp('missing')/'no'/'such'/'folder'
    return dict(missing=(missing, start_cli('data', 'info', missing)),
                one_class=start_cli('data', 'info', one_class), debug=start_cli('--debug', 'data', 'info', one_class))


def test_cli_missing_source_one_line(real_runs):
    missing, run = real_runs['missing']
    r = run.result()
    assert r.returncode == 2 and r.stdout == ''
    assert r.stderr.count('\n') == 1 and r.stderr.startswith('error: ')
    assert str(missing) in r.stderr and 'Traceback' not in r.stderr


def test_cli_single_class_one_line(real_runs):
    r = real_runs['one_class'].result()
    assert r.returncode == 2 and r.stdout == ''
    assert r.stderr.count('\n') == 1 and r.stderr.startswith('error: ') and 'only one class (NORMAL)' in r.stderr
    assert 'Traceback' not in r.stderr


def test_cli_debug_shows_traceback(real_runs):
    r = real_runs['debug'].result()
    assert r.returncode == 2 and 'Traceback' in r.stderr and 'only one class' in r.stderr


def test_npz_suffix_in_capitals(shared_data, tmp_path):
    from xray_fastai.data import load_source
    shutil.copy(shared_data/'pneumoniamnist.npz', tmp_path/'SCANS.NPZ')  # it was taken for a folder, with a traceback
    assert load_source(tmp_path/'SCANS.NPZ', verify=False).counts() == load_source(shared_data/'pneumoniamnist.npz', verify=False).counts()


def test_unreadable_npz_files_are_one_line(shared_data, tmp_path):
    import numpy as np
    from xray_fastai.data import load_source
    (tmp_path/'page.npz').write_text('<html>not found</html>')  # what a failed manual download often is
    with pytest.raises(XrayError, match='is not a readable .npz file'): load_source(tmp_path/'page.npz')
    d = dict(np.load(shared_data/'pneumoniamnist.npz'))
    multi = {**d, **{f'{s}_labels': np.zeros((len(d[f'{s}_images']), 14), np.uint8) for s in ('train', 'val', 'test')}}
    np.savez(tmp_path/'multi.npz', **multi)  # ChestMNIST-style multi-label
    with pytest.raises(XrayError, match='one label per image'): load_source(tmp_path/'multi.npz')
    np.savez(tmp_path/'floats.npz', **{k: v.astype(np.float32) if k.endswith('labels') else v for k, v in d.items()})
    assert load_source(tmp_path/'floats.npz', verify=False).counts() == load_source(shared_data/'pneumoniamnist.npz', verify=False).counts()


def test_verify_test_only_data(shared_data, tmp_path):
    "External data with only a test split is checked like any other (it used to fail: no training images)."
    for c in ('NORMAL', 'PNEUMONIA'):
        (tmp_path/'ext'/'test'/c).mkdir(parents=True)
        for f in sorted((shared_data/'chest_xray_224'/'train'/c).glob('*.jpeg'))[:3]: shutil.copy(f, tmp_path/'ext'/'test'/c)
    r = runner.invoke(app, ['data', 'verify', str(tmp_path/'ext')])
    assert r.exit_code == 0, r.output
    assert 'all 6 images readable' in r.output
