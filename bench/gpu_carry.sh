#!/usr/bin/env bash
# Build .gpu/ for one run of bench/gpu.py on the project's device machine (see gpu.py's docstring): the 224 px data, and
# the Python 3.12 wheels of what fastai imports that the machine's image lacks. Run from the repository root, here.
# The list was resolved against the image's package list (the device README's KINDS.md) on 2026-12-03; fastai's spacy
# chain is left out (30 MB; fastai.vision never imports it). Installing these wheels with --no-deps, the fast* imports
# ran under Python 3.12 with only packages the image has.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS="beartype==0.23.1 beautifulsoup4==4.15.0 fastai==2.8.12 fastcore==2.2.41 fastdownload==0.0.8 fastprogress==1.1.6
fasttransform==0.0.5 httpcore2==2.16.2 httpx2==2.16.2 itsdangerous==2.2.0 oauthlib==4.0.1 plum-dispatch==2.9.0
python-fasthtml==0.14.14 python-multipart==0.0.34 soupsieve==4.1.4 starlette==1.10.0 truststore==0.10.5 uvicorn==0.55.0"
rm -rf .gpu && mkdir -p .gpu/data .gpu/wheels
grep -qx '.gpu' .git/info/exclude 2>/dev/null || echo .gpu >> .git/info/exclude
cp -r ../shared/data/chest_xray_224 .gpu/data/
pip download -q --no-deps --python-version 3.12 --only-binary=:all: --platform manylinux_2_28_x86_64 \
  --platform manylinux2014_x86_64 -d .gpu/wheels $WHEELS
du -sh .gpu
cat <<'EOF'
then, with the device tool: run(carry=['.gpu'], timeout_s=600, command=
  "pip install -q --no-index --no-deps .gpu/wheels/*.whl && PYTHONPATH=$PWD PYTHONUNBUFFERED=1 python3 bench/gpu.py --data .gpu/data --out $OUT/gpu.md")
then append the gpu.md that comes back to bench/RESULTS.md, and commit it.
EOF
