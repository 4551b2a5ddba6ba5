"""`odlora chat`: a scripted conversation against a tiny export, answers checked against
`Runtime.generate` on the same messages.

    python -m pytest -q tests/test_chat.py
"""

from __future__ import annotations

import io

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from ondevice_lora.config import SamplingConfig  # noqa: E402
from ondevice_lora.runtime.chat import run_chat  # noqa: E402
from test_runtime import MAX_SEQ, PROMPT  # noqa: E402
from test_serve import rt, tiny_export  # noqa: E402,F401  (fixtures)

GREEDY = SamplingConfig(max_new_tokens=8)
FIRST, SECOND, THIRD = "A small dog runs to the river.", PROMPT, "Paris is"


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def chat(rt, script: list[str], adapter="a", sampling=GREEDY):
    out = io.StringIO()
    session = run_chat(rt, io.StringIO("".join(line + "\n" for line in script)), out, sampling, adapter)
    return session, out.getvalue()


def test_scripted_conversation_switches_adapters_and_resets(rt):
    blend = [("a", 0.5), ("b", 0.5)]
    one = rt.generate([user(FIRST)], adapter="a", sampling=GREEDY).text
    two = rt.generate([user(FIRST), assistant(one), user(SECOND)], adapter="b", sampling=GREEDY).text
    three = rt.generate([user(THIRD)], adapter=blend, sampling=GREEDY).text
    after_quit = rt.generate([user(THIRD), assistant(three), user(FIRST)], adapter=blend, sampling=GREEDY).text
    assert len({one, two, three, after_quit}) == 4
    session, out = chat(rt, [FIRST, "/adapter b", SECOND, "/adapters", "/reset", "/adapter a:0.5+b:0.5", THIRD,
                             "/adapter zzz", "/quit", FIRST])
    assert out.startswith("chatting with a (64-token context)")
    assert f"> {one}\n" in out and f"> {two}\n" in out and f"> {three}\n" in out and after_quit not in out
    assert "(answering with b)" in out and "adapters: base, a, b (answering with b)" in out
    assert "(conversation cleared)" in out and "(answering with a:0.5+b:0.5)" in out
    assert "error: unknown adapter 'zzz'" in out and "outgrew" not in out
    assert session.messages == [user(THIRD), assistant(three)] and session.label == "a:0.5+b:0.5"


def test_old_turns_are_dropped_once_the_context_is_full(rt):
    script = [FIRST, SECOND, THIRD, FIRST, SECOND, PROMPT * 20, THIRD]
    session, out = chat(rt, script, adapter="base")
    assert out.count("dropping the oldest turns") == 1 and out.count("error: ") == 1
    assert f"--max-seq-len {MAX_SEQ}" in out  # the over-long message is refused; the chat goes on
    prompt = session.messages[:-1]  # what the last answer was given
    assert prompt[-1] == user(THIRD) and len(prompt) < 2 * 6 - 1
    assert len(rt.encode(prompt)) <= MAX_SEQ - GREEDY.max_new_tokens
    answer = rt.generate(prompt, sampling=GREEDY).text
    assert session.messages[-1] == assistant(answer) and out.endswith(f"> {answer}\n> \n")


def test_help_and_end_of_input(rt):
    session, out = chat(rt, ["/help"])
    assert "/adapter ID" in out and "/reset" in out and "/quit" in out and out.endswith("> \n")
    assert session.messages == []


# -- the command line ----------------------------------------------------------------------------------

def test_cli_chat_reads_stdin(tiny_export, rt):
    from click.testing import CliRunner

    from ondevice_lora.cli import cli

    export_dir, blobs = tiny_export
    one = rt.generate([user(FIRST)], adapter="a", sampling=GREEDY).text
    two = rt.generate([user(FIRST), assistant(one), user(SECOND)], adapter="b", sampling=GREEDY).text
    result = CliRunner().invoke(cli, ["chat", "--export", str(export_dir), "--adapter", str(blobs["a"]),
                                      "--adapter", f"mine={blobs['b']}", "--max-new-tokens", "8"],
                                input=f"{FIRST}\n/adapter mine\n{SECOND}\n/quit\n")
    assert result.exit_code == 0, result.output
    assert result.output.startswith("chatting with a ") and f"> {one}\n" in result.output
    assert "(answering with mine)" in result.output and f"> {two}\n" in result.output


def test_cli_chat_refuses_a_reserved_id(tiny_export):
    from click.testing import CliRunner

    from ondevice_lora.cli import cli
    from ondevice_lora.errors import OdloraError

    export_dir, blobs = tiny_export
    result = CliRunner().invoke(cli, ["chat", "--export", str(export_dir), "--adapter", f"base={blobs['a']}"], input="")
    assert isinstance(result.exception, OdloraError)
    assert "`base` names the model without adapters" in str(result.exception)


def test_chat_help_explains_itself():
    from click.testing import CliRunner

    from ondevice_lora.cli import cli

    result = CliRunner().invoke(cli, ["chat", "--help"])
    assert result.exit_code == 0
    for words in ("/adapter ID", "/adapters", "/reset", "/quit", "a:0.7+b:0.3", "[ID=]FILE", "--max-new-tokens",
                  "oldest turns"):
        assert words in result.output, words


class CtrlC(io.StringIO):
    """A terminal where the user presses Ctrl-C: at the prompt once, then during the first answer's
    second piece (Python raises KeyboardInterrupt wherever the main thread is)."""

    def __init__(self, lines: list[str]):
        super().__init__()
        self.lines, self.pieces, self.prompted = list(lines), 0, False

    def readline(self):
        if not self.prompted:
            self.prompted = True
            raise KeyboardInterrupt
        return self.lines.pop(0) + "\n" if self.lines else ""

    def write(self, text):
        if text not in ("> ", "\n") and not text.startswith("chatting"):
            self.pieces += 1
            if self.pieces == 2:
                raise KeyboardInterrupt
        return super().write(text)


def test_ctrl_c_stops_the_answer_and_the_chat_goes_on(rt):
    full = rt.generate([user(FIRST)], adapter="a", sampling=GREEDY).text
    terminal = CtrlC([FIRST, SECOND])
    session = run_chat(rt, terminal, terminal, GREEDY, "a")
    stopped = session.messages[1]["content"]
    assert stopped and full.startswith(stopped) and stopped != full and " (stopped)" in terminal.getvalue()
    second = rt.generate([user(FIRST), assistant(stopped), user(SECOND)], adapter="a", sampling=GREEDY).text
    assert session.messages[2:] == [user(SECOND), assistant(second)]  # the chat went on after it
