"""kt chat: interactive chat with a model's chat template, streaming the replies."""
from __future__ import annotations

import sys

HELP = "interactive chat (chat template, streaming); /reset clears history, /exit or Ctrl-D quits"
USAGE = """kt chat [model.path=DIR] [generate.temperature=T] [generate.max_new_tokens=N] [other overrides]

Type a message and press Enter. Commands: /reset (forget the conversation), /exit.
Without model.path the embedded synthetic model answers (random weights: not meaningful text)."""


def run(overrides, flags) -> int:
    from kt_core.commands._engine import load_engine, sampling_kwargs, stats_line
    from kt_core.errors import KtError

    engine = load_engine(overrides, "chat")
    tok = engine.tokenizer
    if tok is None or not tok.chat_template:
        raise KtError(f"{engine.cfg.model.path} has no tokenizer with a chat template; use kt run instead")
    kwargs = sampling_kwargs(engine.cfg)
    history: list[dict] = []
    interactive = sys.stdin.isatty()
    print("kt chat: /reset clears the conversation, /exit quits", file=sys.stderr)
    while True:
        if interactive:
            sys.stdout.write("> ")
            sys.stdout.flush()
        line = sys.stdin.readline()
        if not line:
            break
        line = line.rstrip("\r\n")
        if not line.strip():
            continue
        if line.strip() == "/exit":
            break
        if line.strip() == "/reset":
            history.clear()
            print("(conversation cleared)", file=sys.stderr)
            continue
        history.append({"role": "user", "content": line})
        try:
            result = engine.generate(history, on_token=lambda _i, _t, text: (sys.stdout.write(text),
                                                                              sys.stdout.flush()), **kwargs)
        except KtError as exc:
            history.pop()
            print(f"kt chat: {exc}", file=sys.stderr)
            continue
        sys.stdout.write("\n")
        print(stats_line(result), file=sys.stderr)
        history.append({"role": "assistant", "content": result.text})
    return 0
