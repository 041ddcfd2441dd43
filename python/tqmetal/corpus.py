"""The prose shipped in ``tqmetal/data``: the evaluation text of the fidelity
report and the prompts of the end-to-end benchmark."""

from __future__ import annotations

from pathlib import Path
from typing import Optional


def data_dir() -> Path:
    return Path(__file__).resolve().parent / "data"


def load_text(path: Optional[str] = None) -> str:
    """The evaluation text: ``path``, else every ``tqmetal/data/*.txt`` in name order."""
    if path is not None:
        return Path(path).read_text(encoding="utf-8")
    files = sorted(data_dir().glob("*.txt"))
    if not files:
        raise FileNotFoundError(f"no evaluation text in {data_dir()}")
    return "\n\n".join(f.read_text(encoding="utf-8").strip() for f in files)


def tokenize_text(tokenizer, text: str, n: int) -> tuple:
    """(``n`` token ids, how many times the text had to be repeated to get them)."""
    ids = list(tokenizer.encode(text, add_special_tokens=True))
    if not ids:
        raise ValueError("the evaluation text is empty")
    repeats = 1
    if len(ids) < n:
        more = list(tokenizer.encode("\n\n" + text, add_special_tokens=False))
        while len(ids) < n:
            ids += more
            repeats += 1
    return ids[:n], repeats


# ---------------------------------------------------------------------------
# Other kinds of text, none written for this project and none used to choose a
# recipe: each ships in the Python standard library or in a PyPI package (read
# from its installed files, never imported).

TEXT_KINDS = {
    "bundled": "the essays and story in tqmetal/data (written for this project; the text "
               "the recipes were chosen on)",
    "prose": "news prose: the Lee background corpus (300 ABC news articles) that gensim ships "
             "as test data (pip install --no-deps gensim==4.4.0)",
    "dialogue": "conversations: chatterbot-corpus's English dialog files, one turn per line "
                "(pip install --no-deps chatterbot-corpus==1.3.3)",
    "code": "Python source: argparse, textwrap, shutil, subprocess and typing from the "
            "running interpreter's standard library",
    "docs": "technical documentation with code: the Python language reference topics that "
            "pydoc shows (pydoc_data.topics, standard library)",
}

_CODE_MODULES = ("argparse.py", "textwrap.py", "shutil.py", "subprocess.py", "typing.py")


def _package_dir(name: str) -> Path:
    import importlib.util

    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"text kind needs the package {name!r}: {_INSTALL[name]}")
    return Path(next(iter(spec.submodule_search_locations)))


_INSTALL = {
    "gensim": "pip install --no-deps gensim==4.4.0",
    "chatterbot_corpus": "pip install --no-deps chatterbot-corpus==1.3.3",
}


def _dialogue_text() -> str:
    import yaml

    folder = _package_dir("chatterbot_corpus") / "data" / "english"
    blocks = []
    for f in sorted(folder.glob("*.yml")):
        data = yaml.safe_load(f.read_text(encoding="utf-8")) or {}
        for conv in data.get("conversations") or []:
            lines = [f"{'AB'[i % 2]}: {str(turn).strip()}" for i, turn in enumerate(conv)]
            blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def load_text_kind(kind: str) -> str:
    """The text of one of ``TEXT_KINDS`` (see there for the sources)."""
    if kind not in TEXT_KINDS:
        raise ValueError(f"text kind must be one of {', '.join(TEXT_KINDS)}, got {kind!r}")
    if kind == "bundled":
        return load_text()
    if kind == "prose":
        path = _package_dir("gensim") / "test" / "test_data" / "lee_background.cor"
        return path.read_text(encoding="utf-8").replace("\n", "\n\n").strip()
    if kind == "dialogue":
        return _dialogue_text()
    if kind == "code":
        import sysconfig

        lib = Path(sysconfig.get_paths()["stdlib"])
        return "\n\n".join((lib / m).read_text(encoding="utf-8") for m in _CODE_MODULES)
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k].strip() for k in sorted(topics))
