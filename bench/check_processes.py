"""The first image check (`check_images`) in one process against forked processes, and where its time goes (issue 17).

    python bench/check_processes.py            # 5,000 and 20,000 checks (links to Kermany's 224 px JPEGs, page cache warm)

Prints a cProfile of 2,000 checks (decoding is the `decode` row; the rest is Python) and, for each size twice, the
wall seconds of checking in this process and in 2 forked processes, with the same verdicts asserted."""
import cProfile, multiprocessing as mp, pstats, time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from xray_fastai.data import check_image

DATA = Path(__file__).resolve().parents[2]/'shared'/'data'/'chest_xray_224'/'train'

def _chunk(fs): return [check_image(f) for f in fs]

def in_processes(fs, n=2, k=8):
    size = -(-len(fs) // (n * k))
    with ProcessPoolExecutor(n, mp_context=mp.get_context('fork')) as p:
        return sum(p.map(_chunk, [fs[i:i + size] for i in range(0, len(fs), size)]), [])

if __name__ == '__main__':
    files = (sorted(map(str, DATA.rglob('*.jpeg'))) * 4)[:20000]
    _chunk(files[:5232])  # warm the page cache
    prof = cProfile.Profile(); prof.enable(); _chunk(files[:2000]); prof.disable()
    pstats.Stats(prof).sort_stats('tottime').print_stats(8)
    for n in (5000, 20000):
        for _ in range(2):
            t0 = time.perf_counter(); one = _chunk(files[:n]); seq = time.perf_counter() - t0
            t0 = time.perf_counter(); two = in_processes(files[:n]); par = time.perf_counter() - t0
            assert one == two
            print(f"n={n} one process {seq:.2f}s, 2 processes {par:.2f}s ({seq / par:.2f}x)", flush=True)
