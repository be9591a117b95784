"""``bpkit config show CONFIG``: the resolved config as YAML, every key with its comment.

The comments are the ones written next to each field in ``bpkit/config.py`` (read from its
source with ``tokenize``, so the dataclasses stay the single place a field is described) and,
for ``model.args``, the factory's schema in ``bpkit.validate.MODEL_ARGS``; the factory's
arguments the config leaves at their defaults are listed as comments. The output is a valid
config: ``bpkit config show A.yaml > B.yaml`` gives a file that trains exactly as ``A.yaml``.
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import io
import tokenize

import yaml

from bpkit import config as config_mod
from bpkit.validate import ALIASES, MODEL_ARGS

COMMENT_COLUMN = 30  # the column of the comments' "#" (as in configs/*.yaml)


@functools.lru_cache(maxsize=None)
def field_comments(cls) -> dict[str, str]:
    """``{field: comment}`` of a config dataclass: the comment at the end of the field's line,
    or else the comment lines just above it."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):  # no source (a frozen install): no comments
        return {}
    lines = source.splitlines()
    comments = {}  # line number (1-based) -> comment text
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    out = {}
    for node in ast.parse(source).body[0].body:
        if not isinstance(node, ast.AnnAssign) or not isinstance(node.target, ast.Name):
            continue
        text = comments.get(node.end_lineno)
        if text is None:  # comment lines directly above the field
            above, line = [], node.lineno - 1
            while line >= 1 and lines[line - 1].strip().startswith("#"):
                above.insert(0, comments.get(line, ""))
                line -= 1
            text = " ".join(above) or None
        if text:
            out[node.target.id] = text
    return out


def _scalar(value) -> str:
    """``value`` as a one-line YAML value."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return text[:-len("...")].strip() if text.endswith("...") else text


def _line(indent: int, key: str, value: str | None, comment: str | None) -> str:
    body = " " * indent + (f"{key}: {value}" if value is not None else f"{key}:")
    if comment:
        body = body.ljust(COMMENT_COLUMN - 2) + f" # {comment}"
    return body


def _model_args_lines(name: str, args: dict) -> list[str]:
    """``model.args``: the given arguments, then the factory's others as commented-out lines
    with their defaults."""
    schema = MODEL_ARGS.get(ALIASES.get(name, name), {})
    lines = [_line(4, k, _scalar(v), schema[k].doc if k in schema else None)
             for k, v in args.items()]
    for key, arg in schema.items():
        if key not in args:
            default = None if arg.default is None else _scalar(
                list(arg.default) if isinstance(arg.default, tuple) else arg.default)
            lines.append(_line(4, f"# {key}", default, arg.doc))
    return lines


def render(cfg, source: str = "") -> str:
    """The YAML text of ``cfg``, commented."""
    out = [f"# {source}: the resolved config (every default filled in)" if source else
           "# the resolved config (every default filled in)"]
    data = cfg.to_dict()
    data["run"]["out_dir"] = cfg.out_dir
    for section, cls in config_mod._SECTION_CLASSES.items():
        doc = (cls.__doc__ or "").strip()
        if doc and not doc.startswith(cls.__name__ + "("):  # dataclass's generated signature
            out.append(f"# {doc.splitlines()[0]}")
        out.append(f"{section}:")
        comments = field_comments(cls)
        for f in dataclasses.fields(cls):
            value = data[section][f.name]
            if section == "model" and f.name == "args":
                out.append(_line(2, "args", "{}" if not value else None,
                                 comments.get("args")))
                out += _model_args_lines(cfg.model.name, value)
            else:
                out.append(_line(2, f.name, _scalar(value), comments.get(f.name)))
    return "\n".join(out) + "\n"


__all__ = ["field_comments", "render"]
