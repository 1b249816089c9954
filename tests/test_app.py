"`xray-fastai serve`: the real server on 127.0.0.1, driven in Debian's chromium through Playwright's Python API."
import os, shutil, signal, socket, subprocess, sys, time, urllib.request
from pathlib import Path

import numpy as np, pytest
from PIL import Image
from playwright.sync_api import sync_playwright
from xray_fastai.app import chosen_threshold, model_card, card_markdown
from xray_fastai.evaluate import evaluate
from xray_fastai.predict import predict
from test_predict import small, run, _write_dicom  # noqa: F401 (the tiny 64 px run, its head tempered so probabilities spread)
from conftest import REPO

DOCS_SCREENSHOT = REPO/'nbs'/'images'/'app.png'  # refreshed when UPDATE_DOCS_IMAGES=1
# Debian's chromium (.ci/run installs it); GitHub's Ubuntu runners have Google Chrome instead
BROWSER = next(filter(None, map(shutil.which, ('chromium', 'chromium-browser', 'google-chrome'))), None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); return s.getsockname()[1]


@pytest.fixture(scope='module')
def served(run, cli_env, tmp_path_factory):
    "The real CLI serving the run (and a copy: a model picker) on a free port; its log, temp folders and run listing."
    evaluate(run, split='valid')  # chooses a threshold on validation: the page shows decisions at it
    other = Path(shutil.copytree(run, tmp_path_factory.mktemp('other')/'second-run'))
    cwd, tmp = tmp_path_factory.mktemp('cwd'), tmp_path_factory.mktemp('tmp')
    port, log = _free_port(), open(cwd.parent/'serve.log', 'w')
    before = sorted(p.relative_to(run) for p in run.rglob('*'))
    proc = subprocess.Popen([sys.executable, '-m', 'xray_fastai.cli', 'serve', str(run), str(other), '--port', str(port),
                             '--max-file-mb', '2'], cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                            env={**cli_env, 'PYTHONPATH': str(REPO), 'TMPDIR': str(tmp)})
    url, t0 = f"http://127.0.0.1:{port}/", time.time()
    while True:
        assert proc.poll() is None, Path(log.name).read_text()
        try:
            if urllib.request.urlopen(url, timeout=5).status == 200: break
        except OSError: pass
        assert time.time() - t0 < 300, 'the server did not start in 300 s'
        time.sleep(1)
    yield dict(url=url, proc=proc, cwd=cwd, tmp=tmp, run=run, before=before, log=Path(log.name))
    if proc.poll() is None: proc.kill(); proc.wait()


def _upload(page, url, files:list):
    page.goto(url)
    page.wait_for_selector('#upload input[type=file]', state='attached', timeout=60_000)
    page.set_input_files('#upload input[type=file]', [str(f) for f in files])
    page.wait_for_function(f"document.querySelectorAll('#results tr').length == {len(files) + 1}", timeout=180_000)
    return page.locator('#results tr').all()[1:]


def test_app_in_a_real_browser(served, shared_data, tmp_path):
    assert BROWSER, 'no chromium: apt-get install chromium (.ci/run does)'
    run = served['run']
    xray = sorted((shared_data/'chest_xray_224_site_A'/'PNEUMONIA').glob('*.jpeg'))[0]
    fullres = sorted((shared_data/'chest_xray_fullres_sample').rglob('*.jpeg'))[0]
    text = tmp_path/'notes.png'; text.write_text('this is not an image\n')
    bad = tmp_path/'bad'; bad.mkdir()
    (bad/'truncated.jpeg').write_bytes(fullres.read_bytes()[:len(fullres.read_bytes()) // 3])
    Image.open(xray).convert('RGBA').save(bad/'rgba.png')
    Image.fromarray((np.asarray(Image.open(xray).convert('L'), np.uint16) * 257)).save(bad/'grey16.png')
    Image.new('1', (20_000, 20_000)).save(bad/'huge.png')  # 400 megapixels in a few kB: a decompression bomb
    _write_dicom(bad/'scan.dcm', np.asarray(Image.open(xray).convert('L'), np.uint16) * 16)  # 12-bit, as a scanner writes
    big = tmp_path/'big.png'; Image.fromarray(np.random.default_rng(0).integers(0, 255, (1600, 1600), np.uint8)).save(big)
    assert big.stat().st_size > 2.1e6 and (bad/'huge.png').stat().st_size < 1e6
    expect = predict(run, [xray, bad/'rgba.png', bad/'grey16.png', bad/'scan.dcm']).p_pneumonia.values
    thr, where = chosen_threshold(run)
    assert where == 'eval-valid' and 0 < thr < 1
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=BROWSER, args=['--no-sandbox'])
        page = browser.new_page(viewport={'width': 1400, 'height': 1150})
        try:
            # a real X-ray and a text file named .png, in one upload
            rows = _upload(page, served['url'], [xray, text])
            p_page = float(rows[0].locator('td.p').inner_text())
            assert abs(p_page - expect[0]) < 1e-4, (p_page, expect[0])
            assert rows[0].locator('td.d05').inner_text() == ('PNEUMONIA' if expect[0] >= 0.5 else 'NORMAL')
            assert rows[0].locator('td.dthr').inner_text() == ('PNEUMONIA' if expect[0] >= thr else 'NORMAL')
            assert rows[1].locator('td.error').inner_text().startswith('error: UnidentifiedImageError')
            assert 'notes.png' in page.inner_text('#message') and str(tmp_path) not in page.inner_text('#results')
            card = page.inner_text('#card')
            assert 'resnet34' in card and '64 px' in card and 'eval-valid' in card and f"{thr:.4g}" in card
            assert page.locator('#overlays img').count() >= 1  # the Grad-CAM figure of the X-ray
            page.wait_for_timeout(1000)
            page.screenshot(path=tmp_path/'app.png', full_page=True)
            shot = Image.open(tmp_path/'app.png')
            assert shot.format == 'PNG' and shot.width >= 1400 and np.asarray(shot.convert('L')).std() > 20
            if os.environ.get('UPDATE_DOCS_IMAGES') == '1': shutil.copy(tmp_path/'app.png', DOCS_SCREENSHOT)
            # damaged and unusual files: a message on the page, the server keeps serving
            rows = _upload(page, served['url'], [bad/'truncated.jpeg', bad/'rgba.png', bad/'grey16.png', bad/'huge.png',
                                                 bad/'scan.dcm'])
            cells = [r.locator('td').nth(1).inner_text() for r in rows]
            notes = [r.locator('td').last.inner_text() for r in rows]
            assert notes[0].startswith('error: OSError') and notes[3].startswith('error: DecompressionBomb'), notes
            np.testing.assert_allclose([float(cells[i]) for i in (1, 2, 4)], expect[1:], atol=1e-4)  # grey, and the DICOM
            assert page.inner_text('#message').startswith('error: 3 of 5 files predicted')
            # an upload over --max-file-mb is refused by the server, which keeps serving
            page.goto(served['url'])
            page.wait_for_selector('#upload input[type=file]', state='attached', timeout=60_000)
            page.set_input_files('#upload input[type=file]', [str(big)])
            page.wait_for_timeout(3000)
            assert 'exceed the maximum allowed size of 2.0 Mb: "big.png"' in page.inner_text('body')  # Gradio's message
            assert page.locator('#results td.p').count() == 0
            rows = _upload(page, served['url'], [xray])
            assert abs(float(rows[0].locator('td.p').inner_text()) - expect[0]) < 1e-4
            # several runs: a model picker whose choice changes the model card
            page.locator('#model input').click()
            page.get_by_role('option', name='second-run').click()
            page.wait_for_function("document.querySelector('#card').innerText.includes('second-run')", timeout=60_000)
        finally: browser.close()
    # nothing written outside a temporary folder, and that folder goes when the server stops
    assert sorted(p.relative_to(run) for p in run.rglob('*')) == served['before']
    assert list(served['cwd'].iterdir()) == []
    assert [p.name for p in served['tmp'].iterdir()][0].startswith('xray-fastai-serve-')
    served['proc'].send_signal(signal.SIGTERM)
    served['proc'].wait(60)
    assert list(served['tmp'].iterdir()) == [], served['log'].read_text()


def test_model_card_without_evaluation(run, tmp_path):
    bare = Path(shutil.copytree(run, tmp_path/'bare', ignore=shutil.ignore_patterns('eval-*')))
    card = model_card(bare)
    assert card['threshold'] is None and card['arch'] == 'resnet34' and card['size'] == 64 and card['valid']
    md = card_markdown(card)
    assert 'not evaluated yet' in md and 'the page uses 0.5' in md


def test_serve_errors(run_cli, tmp_path):
    res = run_cli('serve', tmp_path/'nope')
    assert res.returncode == 2 and res.stderr.strip() == f"error: {tmp_path/'nope'} is not a run folder"
    t0 = time.time()
    res = run_cli('serve', '--help')
    assert res.returncode == 0 and '--max-file-mb' in res.stdout and '--host' in res.stdout and '127.0.0.1' in res.stdout
    assert time.time() - t0 < 10  # (the < 1 s figure is measured on a quiet machine: gradio is imported only when serving)
    assert 'gradio' not in subprocess.run([sys.executable, '-c', 'import sys, xray_fastai.cli; print(sorted(sys.modules))'],
                                          capture_output=True, text=True, cwd=REPO).stdout


def test_without_gradio_one_line_naming_the_extra(run, tmp_path, monkeypatch):
    from xray_fastai.app import make_app
    from xray_fastai.core import XrayError
    monkeypatch.setitem(sys.modules, 'gradio', None)  # as if not installed
    with pytest.raises(XrayError, match=r"the web app needs gradio: pip install 'xray-fastai\[app\]'"): make_app([run], tmp_path)
