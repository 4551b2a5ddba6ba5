"""A chat over one Runtime: the conversation kept as chat messages, answers streamed, adapters
switched between turns (`odlora chat`; the commands are in `HELP`).

    from ondevice_lora.runtime.chat import run_chat
    run_chat(rt, sys.stdin, sys.stdout, SamplingConfig(), adapter="dates")

The export's KV cache bounds the conversation: once the messages leave no room for an answer,
the oldest turns are dropped (said once). `run_chat` reads and writes the streams it is given,
so tests drive it with a script instead of a terminal; `odlora chat` gives it stdin's bytes,
which it decodes itself so that input that is not UTF-8 is a warning, not a traceback, or, on a
terminal, a `TerminalInput` (GNU readline: line editing, history with the arrow keys, Ctrl-R).
Ctrl-C stops the answer being written (what came so far stays in the conversation) and, at the
prompt, clears the line; Ctrl-D or /quit leaves.
"""

from __future__ import annotations

from typing import BinaryIO, TextIO, Union

from ..errors import OdloraError
from ..config import SamplingConfig
from .adapters import label, normalise, parse_label
from .engine import Runtime

HELP = """commands:
  /adapter ID   answer with ID from now on (`base`: no adapter; a blend: a:0.7+b:0.3)
  /adapters     list the adapters
  /reset        forget the conversation
  /quit         leave (so does end of input)"""


class Chat:
    """One conversation: its messages, the adapter that answers next, and where it writes."""

    def __init__(self, rt: Runtime, sampling: SamplingConfig, out: TextIO, adapter: str = "base"):
        self.rt, self.sampling, self.out = rt, sampling, out
        self.messages: list[dict] = []
        self.trimmed = False  # whether dropping old turns has been announced
        self.use(adapter)

    def say(self, text: str) -> None:
        self.write(text + "\n")

    def write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()  # answers stream: each piece shows as it comes

    def use(self, spec: str) -> None:
        """Switch adapters; an unknown id fails now rather than at the next answer."""
        adapter = normalise(parse_label(spec), 1.0, self.rt.adapters)
        # An adapter trained on raw prompts (`personalize --format raw`) never saw a conversation:
        # it reads each message alone, as it was trained.
        self.alone = self.rt.prompt_format(adapter) == "raw"
        self.adapter, self.label = adapter, label(adapter) or "base"

    def answering(self) -> str:
        return f"answering with {self.label}" + (self.ALONE if self.alone else "")

    ALONE = "; trained on raw prompts, it reads each message alone"

    def handle(self, line: str) -> bool:
        """One line of input: a /command or a message. False when the chat ends; errors are said, not raised."""
        try:
            if line.startswith("/"):
                return self.command(line)
            if line:
                self.ask(line)
        except OdloraError as e:
            self.say(f"error: {e.for_cli()}")  # a terminal program: settings as their flags
        return True

    def command(self, line: str) -> bool:
        name, _, arg = line.partition(" ")
        if name == "/quit":
            return False
        if name == "/reset":
            self.messages.clear()
            self.say("(conversation cleared)")
        elif name == "/adapters":
            self.say(f"adapters: {', '.join(['base', *sorted(self.rt.adapters)])} ({self.answering()})")
        elif name == "/adapter":
            if arg.strip():
                self.use(arg)
            self.say(f"({self.answering()})")
        else:
            self.say(HELP)
        return True

    def ask(self, text: str) -> str:
        """Answer `text` after the conversation so far, streamed to `out`; returns the answer.
        A refused message (too long, say) leaves the conversation as it was."""
        history = [] if self.alone else self.messages
        messages = self.fit([*history, {"role": "user", "content": text}])
        shown: list[str] = []

        def show(piece: str) -> None:
            shown.append(piece)
            self.write(piece)

        try:
            answer = self.rt.generate(messages, adapter=self.adapter, sampling=self.sampling, on_text=show).text
        except KeyboardInterrupt:  # Ctrl-C: this answer stops here, the chat goes on
            answer = "".join(shown)
            self.write(" (stopped)")
        self.say("")
        self.messages = [*messages, {"role": "assistant", "content": answer}]
        return answer

    def fit(self, messages: list[dict]) -> list[dict]:
        """Without the oldest turns (a message and its answer) that leave the prompt no room for an
        answer: max-new-tokens, or half the context when that is smaller."""
        limit = self.rt.max_seq_len - min(self.sampling.max_new_tokens, self.rt.max_seq_len // 2)
        while len(messages) > 1 and len(self.rt.encode(messages)) > limit:
            messages = messages[2:]
            if not self.trimmed:
                self.trimmed = True
                self.say(f"(the conversation outgrew the export's {self.rt.max_seq_len} tokens: "
                         f"dropping the oldest turns from now on)")
        return messages


def run_chat(rt: Runtime, inp: Union[TextIO, BinaryIO, "TerminalInput"], out: TextIO, sampling: SamplingConfig,
             adapter: str = "base") -> Chat:
    """Read lines from `inp` (text, bytes decoded as UTF-8, or a terminal) until /quit or end of
    input; returns the conversation."""
    chat = Chat(rt, sampling, out, adapter)
    chat.say(f"chatting with {chat.label} ({rt.max_seq_len}-token context{chat.ALONE if chat.alone else ''}); "
             f"/help lists the commands")
    while True:
        try:
            line = read_line(inp, chat)
        except KeyboardInterrupt:  # Ctrl-C at the prompt: a fresh line, as a shell does
            chat.say("")
            continue
        if not line:
            chat.say("")
            return chat
        if not chat.handle(line.strip()):
            return chat


class TerminalInput:
    """Lines typed at a terminal, through GNU readline (where Python has it): editing, history."""

    def __init__(self):
        try:
            import readline  # noqa: F401  (loaded, it gives input() line editing and history)
        except ImportError:  # Windows' Python has no readline: plain input()
            pass

    def readline(self, prompt: str) -> str:
        try:
            return input(prompt) + "\n"
        except EOFError:
            return ""


def read_line(inp, chat: Chat) -> str:
    """The next line after the prompt ("" at the end of input), as text."""
    if isinstance(inp, TerminalInput):
        return inp.readline("> ")
    chat.write("> ")
    line = inp.readline()
    return decode_line(line, chat) if isinstance(line, bytes) else line


def decode_line(raw: bytes, chat: Chat) -> str:
    """A line of input as UTF-8. Bytes that are not (a Latin-1 file piped in, a terminal in another
    encoding) become U+FFFD and the chat says so, instead of ending with a UnicodeDecodeError."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        chat.say(f"(warning: this line is not valid UTF-8 at byte {e.start}; undecodable bytes read as \ufffd)")
        return raw.decode("utf-8", errors="replace")
