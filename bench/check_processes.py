"""The first image check against the old one (issue 17): where its time goes, and what 2 cores allow.

    python bench/check_processes.py            # 5,000 and 20,000 links to Kermany's 224 px JPEGs; prints only
    python bench/check_processes.py --damaged  # only: old and new check on damaged copies of real files, same verdicts?
    python bench/check_processes.py --chunks 8,16,32,64  # only: the first check with that many chunks a process

Prints a cProfile of 2,000 checks, then takes turns, 6 rounds for each size (page cache warm):
- the old check: `open_xray(f, draft=32)` for every file in this process (what every start did before);
- the new check in this process (`check_image`: JPEGs decoded at their smallest scale);
- the first check as `check_images` runs it (`_check_all`: this process and a forked one for each other core);
- the machine's own ceiling: a pure-Python loop in 2 processes (one forked, as the check's are) against the same work in one.
The verdicts of the three checks are asserted equal; medians and per-round ranges are printed. `--damaged`: 40 of the
224 px files and the 23 full-resolution ones, each cut at 30/60/90/99% and overwritten with 8 random bytes in 3 places,
checked in memory by the old and the new check; the verdicts are counted, and asserted equal. `--chunks`: `_check_all`
with each number of chunks a process in turn (8 rounds at 1,000, 5,000 and 20,000 files), against the new check in one
process."""
import cProfile, io, os, pstats, random, statistics, sys, time
from pathlib import Path
from xray_fastai.core import error_line
from xray_fastai.data import check_image, open_xray, _check_all

DATA = Path(__file__).resolve().parents[2]/'shared'/'data'/'chest_xray_224'/'train'

def old_check(fn) -> str|None:
    "`check_image` as every start ran it before issue 17: JPEGs decoded to no smaller than 32 px."
    try: open_xray(fn, draft=32)
    except Exception as e: return error_line(e)

def _spin(n:int=8_000_000):
    s = 0
    for i in range(n): s += i * i
    return s

def ceiling() -> float:
    "Two units of pure-Python work (~0.5 s each) in one process against one in each of 2 processes (this one forked)."
    t0 = time.perf_counter(); _spin(); _spin(); one = time.perf_counter() - t0
    t0 = time.perf_counter(); pid = os.fork()
    if pid == 0: _spin(); os._exit(0)
    _spin(); os.waitpid(pid, 0)
    return one / (time.perf_counter() - t0)

def timed(f, *args):
    t0 = time.perf_counter(); r = f(*args); return r, time.perf_counter() - t0

def chunk_sizes(counts:list, files:list):
    "Median seconds of the first check with each of `counts` chunks a process, taking turns, and its speed-up over one process."
    for n in (1000, 5000, 20000):
        fs, res, one = files[:n], {k: [] for k in counts}, []
        for i in range(8):
            one.append(timed(lambda: [check_image(f) for f in fs])[1])
            for k in (counts if i % 2 else counts[::-1]): res[k].append(timed(_check_all, fs, None, k)[1])
        base = statistics.median(one)
        print(f"n={n}: one process {base:.3f}s; " + '; '.join(f"{k} chunks a process {statistics.median(v):.3f}s "
              f"({base / statistics.median(v):.2f}x)" for k, v in res.items()), flush=True)

def damaged_verdicts() -> dict:
    "How many damaged copies of real files each check refuses, and how many verdicts differ (asserted none)."
    real = sorted(DATA.rglob('*.jpeg'))[:40] + sorted((DATA.parents[1]/'chest_xray_fullres_sample').rglob('*.jpeg'))
    rng, counts = random.Random(0), dict(copies=0, refused=0)
    for f in real:
        data = f.read_bytes()
        copies = [data[:int(len(data) * q)] for q in (0.3, 0.6, 0.9, 0.99)]
        for _ in range(3):
            b = bytearray(data); i = rng.randrange(len(b) // 4, len(b)); b[i:i + 8] = bytes(rng.randrange(256) for _ in range(8))
            copies.append(bytes(b))
        for b in copies:
            old, new = old_check(io.BytesIO(b)), check_image(io.BytesIO(b))
            assert (old is None) == (new is None), (f, len(b), old, new)
            counts['copies'] += 1; counts['refused'] += new is not None
    return counts

if __name__ == '__main__':
    if '--damaged' in sys.argv[1:]: print(damaged_verdicts()); sys.exit()
    files = (sorted(map(str, DATA.rglob('*.jpeg'))) * 4)[:20000]
    [old_check(f) for f in files[:5232]]  # warm the page cache
    if '--chunks' in sys.argv[1:]: chunk_sizes([int(k) for k in sys.argv[sys.argv.index('--chunks') + 1].split(',')], files); sys.exit()
    prof = cProfile.Profile(); prof.enable(); [check_image(f) for f in files[:2000]]; prof.disable()
    pstats.Stats(prof).sort_stats('tottime').print_stats(8)
    for n in (5000, 20000):
        fs, res = files[:n], {'old check, 1 process': [], 'new check, 1 process': [], 'first check (check_images)': [], 'ceiling': []}
        for _ in range(6):
            old, t_old = timed(lambda: [old_check(f) for f in fs])
            new, t_new = timed(lambda: [check_image(f) for f in fs])
            first, t_first = timed(_check_all, fs)
            assert old == new == first
            for k, t in zip(res, (t_old, t_new, t_first)): res[k].append(t)
            res['ceiling'].append(ceiling())
        base = statistics.median(res['old check, 1 process'])
        print(f"n={n}: " + '; '.join(f"{k} {statistics.median(v):.2f}s ({min(v):.2f}-{max(v):.2f}), {base / statistics.median(v):.2f}x the old"
                                     for k, v in list(res.items())[:3]) +
              f"; per round, first check against the old: {min(o / f for o, f in zip(res['old check, 1 process'], res['first check (check_images)'])):.2f}-"
              f"{max(o / f for o, f in zip(res['old check, 1 process'], res['first check (check_images)'])):.2f}x"
              f"; the machine's ceiling (pure Python, 2 processes against 1): {min(res['ceiling']):.2f}-{max(res['ceiling']):.2f}x", flush=True)
