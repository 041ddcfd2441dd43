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
