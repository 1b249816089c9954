#!/usr/bin/env python
"""Re-render the docs: run notebooks in place and keep their outputs (figures, tables), then `nbdev-clean`.

    python .ci/render_docs.py                 # every notebook in nbs/
    python .ci/render_docs.py 03d_learner 05_report.ipynb nbs/06_predict.ipynb

Each notebook runs in its own process with execnb's `CaptureShell`, from `nbs/` (as `nbdev-test` runs it),
with `MPLBACKEND=Agg` and this checkout's `xray_fastai` first on the path. The cells `nbdev-test` skips are
skipped (`#| eval: false`, and the `tst_flags` of pyproject.toml), so they keep no output. A notebook with an
error is left as it was and named at the end (exit status 1). CI does not run this: `nbdev-test` still runs
every notebook; commit the rendered notebooks after checking them.
"""
import os, subprocess, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NBS = ROOT/'nbs'


def notebooks(names) -> list:
    "The notebooks named in `names` (stem, file name or path), or every notebook in `nbs/`."
    if not names: return sorted(p for p in NBS.glob('*.ipynb') if not p.name.startswith(('_', '.')))
    res = []
    for n in names:
        p = Path(n)
        cands = [p, NBS/p.name, NBS/f'{p.name}.ipynb']
        hit = next((c for c in cands if c.suffix == '.ipynb' and c.is_file()), None)
        if hit is None: sys.exit(f"error: no notebook {n!r} in {NBS}")
        res.append(hit.resolve())
    return res


def render_one(fn:Path) -> bool:
    "Execute notebook `fn` in place, keeping outputs; skip the cells `nbdev-test` skips; False on an error."
    from fastcore.nbio import read_nb, write_nb
    from execnb.shell import CaptureShell
    from nbdev.config import get_config
    from nbdev.process import NBProcessor
    from nbdev.test import _skip_cell
    flags = get_config().tst_flags
    flags = flags.split() if isinstance(flags, str) else flags
    proc = NBProcessor(fn, rm_directives=False, process=True).nb  # parses the `#|` directives
    skip = _skip_cell(proc, flags)
    skipped = [bool(skip(c)) or c.cell_type != 'code' for c in proc.cells]
    nb = read_nb(fn)  # the raw notebook: what is written back
    assert len(nb.cells) == len(skipped), f"{fn}: directive parsing changed the number of cells"
    for c, s in zip(nb.cells, skipped):
        if s and c.cell_type == 'code': c['outputs'], c['execution_count'] = [], None  # no stale outputs
    shell = CaptureShell(fn)
    os.chdir(fn.parent)
    try: shell.run_all(nb, exc_stop=True, preproc=lambda c: skipped[c.idx_])
    except Exception:
        sys.stderr.write(shell.prettytb(fname=fn) + '\n')
        return False
    write_nb(nb, fn)
    return True


def main(args):
    if args[:1] == ['--one']: return 0 if render_one(Path(args[1])) else 1
    env = dict(os.environ, MPLBACKEND='Agg', PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')]).rstrip(os.pathsep))
    failed = []
    for fn in notebooks(args):
        t = time.time()
        rc = subprocess.run([sys.executable, __file__, '--one', str(fn)], cwd=NBS, env=env).returncode
        print(f"{fn.name}: {'ok' if rc == 0 else 'FAILED (left as it was)'} in {time.time() - t:.0f}s", flush=True)
        if rc: failed.append(fn.name)
    subprocess.run(['nbdev-clean'], cwd=ROOT, env=env, check=True)  # the metadata nbdev keeps out of git
    if failed: print(f"error: {len(failed)} notebook(s) failed: {' '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == '__main__': sys.exit(main(sys.argv[1:]))
