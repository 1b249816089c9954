"The real download code against a local HTTP server on 127.0.0.1 serving ../shared/data (never the internet)."
import functools, http.server, socket, threading, urllib.request
from contextlib import contextmanager

import pytest

from xray_fastai.core import XrayError, md5sum
from xray_fastai.data import PNEUMONIAMNIST_MD5, download

FNAME = 'pneumoniamnist.npz'


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args): pass


@contextmanager
def serve(folder):
    "Serve `folder` over HTTP on 127.0.0.1 at a free port while in the block; yields the base URL."
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), functools.partial(_QuietHandler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, kwargs=dict(poll_interval=0.05), daemon=True)
    thread.start()
    try: yield f'http://127.0.0.1:{server.server_address[1]}'
    finally:
        server.shutdown(); server.server_close(); thread.join()


def closed_port() -> int:
    "A port on 127.0.0.1 that nothing listens on."
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.fixture(scope='module')
def mirror(shared_data):
    with serve(shared_data) as url: yield url


@pytest.fixture
def served_md5(shared_data):
    "MD5 of the served copy: not the official one (same images in another order)."
    md5 = md5sum(shared_data/FNAME)
    assert md5 != PNEUMONIAMNIST_MD5[28]
    return md5


@pytest.mark.parametrize('via', ['base_url', 'env'])
def test_corrupt_download_saves_nothing(mirror, served_md5, tmp_path, monkeypatch, via):
    if via == 'env': monkeypatch.setenv('XRAY_FASTAI_MIRROR', mirror)
    with pytest.raises(XrayError, match='corrupt') as e:
        download('pneumoniamnist', data_dir=tmp_path, base_url=mirror if via == 'base_url' else None)
    msg = str(e.value)
    assert served_md5 in msg and PNEUMONIAMNIST_MD5[28] in msg and f'{mirror}/{FNAME}' in msg
    assert list(tmp_path.iterdir()) == []  # neither the file nor a temporary file


def test_unverified_download(mirror, served_md5, tmp_path):
    path = download('pneumoniamnist', data_dir=tmp_path, verify=False, base_url=mirror)
    assert path == tmp_path/FNAME and md5sum(path) == served_md5
    assert list(tmp_path.iterdir()) == [path]


def test_cached_file_is_used_without_network(shared_data, served_md5, tmp_path, monkeypatch):
    with serve(shared_data) as url: first = download('pneumoniamnist', data_dir=tmp_path, verify=False, base_url=url)
    def no_network(*args, **kwargs): raise AssertionError('the network was used')
    monkeypatch.setattr(urllib.request, 'urlopen', no_network)
    assert download('pneumoniamnist', data_dir=tmp_path, verify=False, base_url=url) == first
    with pytest.warns(UserWarning, match='user-supplied') as w:  # kept, never deleted, but flagged
        assert download('pneumoniamnist', data_dir=tmp_path, base_url=url) == first
    assert served_md5 in str(w[0].message) and PNEUMONIAMNIST_MD5[28] in str(w[0].message)
    assert md5sum(first) == served_md5


@contextmanager
def _stopped_server(folder):
    with serve(folder) as url: pass
    yield url

@contextmanager
def _closed_port(folder): yield f'http://127.0.0.1:{closed_port()}'

@pytest.mark.parametrize('down', [_stopped_server, _closed_port])
def test_unreachable_server(shared_data, tmp_path, down):
    with down(shared_data) as url, pytest.raises(XrayError) as e:
        download('pneumoniamnist', data_dir=tmp_path, base_url=url)
    msg = str(e.value)
    assert '\n' not in msg and f'{url}/{FNAME}' in msg and f'put it at {tmp_path/FNAME}' in msg
    assert list(tmp_path.iterdir()) == []


def test_missing_file_404(mirror, tmp_path):
    with pytest.raises(XrayError) as e:  # the served folder has no 64 px file
        download('pneumoniamnist:64', data_dir=tmp_path, base_url=mirror)
    msg = str(e.value)
    assert '\n' not in msg and f'{mirror}/pneumoniamnist_64.npz' in msg and str(tmp_path/'pneumoniamnist_64.npz') in msg
    assert 'not found' in msg.lower()
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope='module', autouse=True)
def cli_download(mirror, start_cli, tmp_path_factory):
    "The real-process download (it imports fastai), started with the module so that it overlaps the other tests."
    cache = tmp_path_factory.mktemp('cache')
    return cache, start_cli('data', 'download', 'pneumoniamnist', '--data-dir', cache, '--no-verify',
                            env={'XRAY_FASTAI_MIRROR': mirror})


def test_cli_download_end_to_end(cli_download, served_md5):
    cache, run = cli_download
    r = run.result()
    assert r.returncode == 0, r.stderr
    assert r.stdout == f'{cache/FNAME}\n' and md5sum(cache/FNAME) == served_md5
    assert 'downloading' in r.stderr and 'Traceback' not in r.stderr


def test_cli_download_corrupt_is_one_error_line(mirror, tmp_path, capsys):
    from xray_fastai.cli import main
    with pytest.raises(SystemExit) as e: main(['data', 'download', '--data-dir', str(tmp_path), '--mirror', mirror])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.splitlines()[-1].startswith('error: download of ') and 'corrupt' in err
    assert err.count('error:') == 1 and 'Traceback' not in err and list(tmp_path.iterdir()) == []


class _TruncatingHandler(_QuietHandler):
    "Announces the whole file's Content-Length, then sends half of it and closes the connection."
    def copyfile(self, source, outputfile):
        data = source.read()
        outputfile.write(data[:len(data) // 2])


def test_unverified_download_cut_short_saves_nothing(shared_data, tmp_path):
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), functools.partial(_TruncatingHandler, directory=str(shared_data)))
    thread = threading.Thread(target=server.serve_forever, kwargs=dict(poll_interval=0.05), daemon=True)
    thread.start()
    try:
        with pytest.raises(XrayError, match='stopped early|could not download') as e:  # no MD5 to catch it (--no-verify)
            download('pneumoniamnist', data_dir=tmp_path, verify=False, base_url=f'http://127.0.0.1:{server.server_address[1]}')
    finally:
        server.shutdown(); server.server_close(); thread.join()
    assert '\n' not in str(e.value)
    assert list(tmp_path.iterdir()) == []  # neither a truncated file in the cache nor a temporary file


def test_mirror_without_scheme_is_one_line(tmp_path):
    with pytest.raises(XrayError, match='could not download mirror.example/medmnist/pneumoniamnist.npz') as e:
        download('pneumoniamnist', data_dir=tmp_path, base_url='mirror.example/medmnist')
    assert 'unknown url type' in str(e.value) and list(tmp_path.iterdir()) == []
