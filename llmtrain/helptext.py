"""``llmtrain-train --help``: Hydra's help, with each setting's comment from ``config.py`` beside
it, so the composed config it prints also says what every key means."""

from __future__ import annotations

import ast
import inspect
import io
import re
import tokenize
from collections.abc import Callable
from contextlib import redirect_stdout

from llmtrain import config

SECTIONS = {
    "ModelConfig": "model",
    "DataConfig": "data",
    "OptimConfig": "optim",
    "DistConfig": "dist",
    "LoggerConfig": "logger",
    "TrainerConfig": "trainer",
    "TrainConfig": "",
}


def setting_comments() -> dict[str, tuple[list[str], str]]:
    """``{"trainer.max_time": (comment lines above it, comment after it)}`` for every setting
    of the schemas, read from config.py's source."""
    source = inspect.getsource(config)
    lines = source.splitlines()
    after: dict[int, str] = {}  # line number: a comment that ends a code line
    alone: dict[int, str] = {}  # line number: a line that is only a comment
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            text = tok.string.lstrip("#").strip()
            row = tok.start[0]
            (alone if lines[row - 1].lstrip().startswith("#") else after)[row] = text
    found = {}
    for node in ast.parse(source).body:
        if not isinstance(node, ast.ClassDef) or node.name not in SECTIONS:
            continue
        for item in node.body:
            if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                above, row = [], item.lineno - 1
                while row in alone:
                    above.insert(0, alone[row])
                    row -= 1
                key = ".".join(filter(None, (SECTIONS[node.name], item.target.id)))
                found[key] = (above, after.get(item.lineno, ""))
    return found


def annotate(config_yaml: str, comments: dict[str, tuple[list[str], str]]) -> str:
    """``config_yaml`` (sections of ``key: value`` lines) with each key's comments."""
    out, section = [], ""
    for line in config_yaml.splitlines():
        m = re.match(r"( *)([\w-]+):", line)
        if m is None or len(m[1]) > 2:  # a list item or a nested value
            out.append(line)
            continue
        if not m[1]:
            section = m[2]
        key = f"{section}.{m[2]}" if m[1] else m[2]
        above, beside = comments.get(key, ([], ""))
        out += [f"{m[1]}# {text}" for text in above]
        out.append(f"{line:<40}  # {beside}" if beside else line)
    return "\n".join(out)


def hydra_help_with_comments(hydra_main: Callable[[], None]) -> str:
    """What Hydra prints for ``--help``, its config part annotated."""
    buf = io.StringIO()
    try:
        with redirect_stdout(buf):
            hydra_main()
    except SystemExit as e:
        if e.code:
            print(buf.getvalue(), end="")
            raise
    head, marker, rest = buf.getvalue().partition("== Config ==\n")
    if not marker:
        return head
    intro, _, rest = rest.partition("\n")  # "Override anything in the config (foo.bar=value)"
    body, blank, footer = rest.partition("\n\n")
    return f"{head}{marker}{intro}\n{annotate(body, setting_comments())}{blank}{footer}"
