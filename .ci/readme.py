"Render nbs/index.ipynb to README.md (GitHub markdown). nbdev-readme does this through Quarto, which cannot be installed offline."
import sys
from pathlib import Path
from fastcore.nbio import read_nb

def render(nb_path) -> str:
    "Markdown cells as they are; visible code cells as fenced Python with their text output."
    parts = []
    for cell in read_nb(nb_path).cells:
        src = cell.source.strip()
        # pictures in nbs/images/: the notebook (and the site) link them as images/..., the README from the root
        if cell.cell_type == 'markdown': parts.append(src.replace('](images/', '](nbs/images/'))
        elif cell.cell_type == 'code' and src and '#| hide' not in src:
            code = '\n'.join(l for l in src.splitlines() if not l.startswith('#|'))
            parts.append(f"```python\n{code}\n```")
            out = ''.join(o.get('text', '') for o in cell.get('outputs', []) if o.get('output_type') == 'stream')
            if out.strip(): parts.append(f"```\n{out.rstrip()}\n```")
    return '<!-- generated from nbs/index.ipynb by .ci/readme.py: edit the notebook -->\n\n' + '\n\n'.join(parts) + '\n'

if __name__ == '__main__':
    root = Path(__file__).resolve().parents[1]
    (root/'README.md').write_text(render(root/'nbs'/'index.ipynb'))
