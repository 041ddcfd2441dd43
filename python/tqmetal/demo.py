"""What `tqmetal generate` does with no prompt: answer a question about a long document.

The document is prose shipped with the package (``tqmetal/data``, written for the
project, CC0), several thousand tokens: long enough that the answer sits deep in
the int4-quantized part of the cache, far behind the full-precision window, and
within the default model's 8K context. The question is one the default model
(SmolLM2-135M-Instruct, greedy) answers right from it with the default int4
cache; ``tests/test_demo.py`` checks that it still does.
"""

from __future__ import annotations

from .corpus import data_dir

# Two essays (about 4.2K tokens); the answer is in the second, some 1.4K tokens
# before the question: the model reads it from int4-quantized keys and values.
DOCUMENT_FILES = ("02_on_bridges.txt", "01_the_river_town.txt")
QUESTION = "How old is Margaret Oyelaran?"
ANSWERS = ("81", "eighty-one")  # a right answer contains one of these
# The document's sentence that holds the answer, printed after the run.
EVIDENCE = ("a retired engineer named Margaret Oyelaran inspects every Tuesday morning "
            "whether or not anyone has asked her to. She is eighty-one.")


def document() -> str:
    return "\n\n".join((data_dir() / f).read_text(encoding="utf-8").strip()
                       for f in DOCUMENT_FILES)


def prompt() -> str:
    """The user message: the document, then the question."""
    return f"{document()}\n\n{QUESTION}"
