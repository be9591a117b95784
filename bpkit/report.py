"""``<run>/report.html``: one self-contained page per run (``bpkit report RUN_DIR``; written at
the end of every ``bpkit train``). Everything is inside the file -- plots as base64 PNGs,
CSS inline, no script, no link to fetch -- so it opens offline, attaches to a message and
survives the run directory being moved.

Sections (each an element with that id): ``summary``, ``samples`` (the language model's text
sample, the GAN's generated vs real points, the regression fit), ``plots``, ``signals``
(backward signals per layer at the last logged step), ``parity`` (the first-batch gradient
check), ``config`` (the resolved config.yaml) and ``environment`` (versions and devices).
"""
from __future__ import annotations

import base64
import datetime
import html
import json
import os
import platform
import sys
from typing import Any

from bpkit.train.history import read_config, read_summary, run_name

PARITY_FILE = "parity.json"           # written by the run: the first-batch check
ENVIRONMENT_FILE = "environment.json"  # written by the run: versions and devices
SAMPLE_FILE = "sample.txt"             # written by a language-model run: generated text
_SAMPLE_PLOTS = ("samples.png", "fit.png")

_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:2em auto;max-width:1100px;
color:#222;padding:0 1em;line-height:1.4}
h1{margin-bottom:.1em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
.sub{color:#666;margin-top:0}
table{border-collapse:collapse;font-size:.92em;margin:.5em 0}
td,th{border:1px solid #ddd;padding:.25em .6em;text-align:left}
th{background:#f4f4f4}td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.warn td{background:#fff1f0}
pre{background:#f7f7f7;border:1px solid #e5e5e5;padding:.7em;overflow-x:auto;font-size:.85em}
figure{display:inline-block;margin:.4em;vertical-align:top}
figure img{max-width:520px;border:1px solid #eee}figcaption{color:#555;font-size:.85em}
.ok{color:#137333;font-weight:600}.bad{color:#b3261e;font-weight:600}.muted{color:#777}
"""


def _esc(x: Any) -> str:
    return html.escape(str(x))


def _num(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return "-" if v is None else str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _img(path: str, caption: str) -> str:
    with open(path, "rb") as f:
        data = base64.b64encode(f.read()).decode("ascii")
    return (f'<figure><img alt="{_esc(caption)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{_esc(caption)}</figcaption></figure>")


def _read_json(run_dir: str, name: str) -> dict | None:
    path = os.path.join(run_dir, name)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def environment(xla_options: str = "auto") -> dict[str, Any]:
    """Versions of Python, bpkit, JAX, jaxlib, optax, numpy; the platform, JAX's devices,
    whether freed host memory is kept (``bpkit.host_memory``) and the XLA options bpkit's steps
    compile with (``run.xla_options``: ``auto`` is ``compat.step_compiler_options``)."""
    from importlib import metadata

    from bpkit.host_memory import status
    env: dict[str, Any] = {"python": sys.version.split()[0],
                           "platform": platform.platform(), "host_memory": status()}
    for pkg in ("bpkit", "jax", "jaxlib", "optax", "numpy"):
        try:
            env[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            env[pkg] = None
    try:
        import jax
        env["devices"] = [str(d) for d in jax.devices()]
        env["backend"] = jax.default_backend()
        from bpkit.engine.compat import step_compiler_options
        env["compiler_options"] = (step_compiler_options(jax.default_backend())
                                   if xla_options == "auto" else {})
    except Exception as e:  # a report never fails on this
        env["devices"] = f"unavailable ({type(e).__name__})"
    return env


def _summary_section(run_dir: str) -> str:
    s = read_summary(run_dir)
    if s is None:
        from bpkit.compare import run_row
        row = run_row(run_dir)
        rows = "".join(f"<tr><th>{_esc(k)}</th><td class=num>{_esc(_num(v))}</td></tr>"
                       for k, v in row.items() if v is not None)
        return (f"<p class=muted>No summary.json: the run has not finished "
                f"({_esc(row.get('status'))}). Last logged values:</p><table>{rows}</table>")
    rows = "".join(f"<tr><th>{_esc(k)}</th><td class=num>{_esc(_num(v) if not isinstance(v, dict) else json.dumps(v))}</td></tr>"  # noqa: E501
                   for k, v in s.items())
    return f"<table>{rows}</table>"


def _signals_section(run_dir: str) -> str:
    from bpkit.train.plots import read_metrics
    try:
        train, _ = read_metrics(run_dir)
    except FileNotFoundError:
        train = []
    logged = [r for r in train if r.get("backward_signals")]
    if not logged:
        return ("<p class=muted>No backward signals were logged (set diagnostics.every to a "
                "number of steps to log them).</p>")
    rec = logged[-1]
    sig = rec["backward_signals"]
    cfg = read_config(run_dir).get("diagnostics", {})
    vanish, explode = cfg.get("vanish_ratio", 1e-3), cfg.get("explode_ratio", 1e3)
    top = [v.get("activation_grad_norm") for k, v in sig.items() if "/" not in k]
    top = [v for v in top if v]
    ref = top[-1] if top else None
    rows = []
    for layer, v in sig.items():
        act, par = v.get("activation_grad_norm"), v.get("param_grad_norm")
        ratio = act / ref if act is not None and ref else None
        warn = ratio is not None and "/" not in layer and not (vanish <= ratio <= explode)
        rows.append(f"<tr{' class=warn' if warn else ''}><td>{_esc(layer)}</td>"
                    f"<td class=num>{_esc(_num(act))}</td><td class=num>{_esc(_num(par))}</td>"
                    f"<td class=num>{_esc(_num(ratio))}</td></tr>")
    return (f"<p>At step {rec['step']:,} (of {len(logged)} logged steps), layers from the input "
            f"to the output; highlighted: a top-level layer whose signal is outside "
            f"[{vanish:g}, {explode:g}] x the last layer's.</p><table><tr><th>layer</th>"
            "<th>||dL/d output||</th><th>||dL/d params||</th><th>/ last layer</th></tr>"
            + "".join(rows) + "</table>")


def _parity_section(run_dir: str) -> str:
    p = _read_json(run_dir, PARITY_FILE)
    if p is None:
        check = read_config(run_dir).get("run", {}).get("check_parity")
        why = ("run.check_parity was false" if check is False
               else "this run did not record it")
        return f"<p class=muted>No first-batch parity result ({why}).</p>"
    status = "<span class=ok>OK</span>" if p.get("ok") else "<span class=bad>MISMATCH</span>"
    detail = "".join(f"<tr><th>{_esc(k)}</th><td class=num>{_esc(_num(v))}</td></tr>"
                     for k, v in p.items() if k != "table")
    table = f"<pre>{_esc(p['table'])}</pre>" if p.get("table") else ""
    return (f"<p>bpkit's gradient vs jax.grad on the first batch: {status}</p>"
            f"<table>{detail}</table>{table}")


def _samples_section(run_dir: str) -> str:
    parts = []
    text = os.path.join(run_dir, SAMPLE_FILE)
    if os.path.isfile(text):
        with open(text, encoding="utf-8", errors="replace") as f:
            parts.append(f"<p>Text sampled at the end of the run:</p><pre>{_esc(f.read())}</pre>")
    for name in _SAMPLE_PLOTS:
        path = os.path.join(run_dir, "plots", name)
        if os.path.isfile(path):
            parts.append(_img(path, name))
    return "".join(parts) or "<p class=muted>No samples for this kind of run.</p>"


def _environment_section(run_dir: str) -> str:
    env, when = _read_json(run_dir, ENVIRONMENT_FILE), "recorded by the run"
    if env is None:
        env, when = environment(), "of this report (the run recorded none)"
    rows = "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(', '.join(v) if isinstance(v, list) else v)}"
                   "</td></tr>" for k, v in env.items())
    return f"<p class=muted>Environment {when}.</p><table>{rows}</table>"


def render(run_dir: str) -> str:
    """The report's HTML text."""
    name = run_name(run_dir)
    plots_dir = os.path.join(run_dir, "plots")
    pngs = sorted(p for p in os.listdir(plots_dir) if p.endswith(".png")
                  and p not in _SAMPLE_PLOTS) if os.path.isdir(plots_dir) else []
    order = ["loss.png", "accuracy.png", "learning_rate.png", "grad_norm.png", "chamfer.png"]
    pngs.sort(key=lambda p: (order.index(p) if p in order else len(order), p))
    plots = "".join(_img(os.path.join(plots_dir, p), p) for p in pngs) or (
        "<p class=muted>No plots (bpkit plot RUN_DIR writes them).</p>")
    cfg_path = os.path.join(run_dir, "config.yaml")
    cfg_text = open(cfg_path, encoding="utf-8").read() if os.path.isfile(cfg_path) else "(none)"
    now = datetime.datetime.now().isoformat(timespec="seconds")
    sections = [("summary", "Summary", _summary_section(run_dir)),
                ("samples", "Samples", _samples_section(run_dir)),
                ("plots", "Plots", plots),
                ("signals", "Backward signals", _signals_section(run_dir)),
                ("parity", "Gradient parity", _parity_section(run_dir)),
                ("config", "Config", f"<pre>{_esc(cfg_text)}</pre>"),
                ("environment", "Environment", _environment_section(run_dir))]
    body = "".join(f'<section id="{sid}"><h2>{_esc(title)}</h2>{content}</section>'
                   for sid, title, content in sections)
    return ("<!DOCTYPE html><html lang=en><head><meta charset=utf-8>"
            f"<title>{_esc(name)} - bpkit run report</title><style>{_CSS}</style></head>"
            f"<body><h1 id=title>{_esc(name)}</h1><p class=sub>{_esc(os.path.abspath(run_dir))}"
            f" &middot; report written {now}</p>{body}</body></html>\n")


def write_report(run_dir: str) -> str:
    """Write ``<run_dir>/report.html`` (atomically); returns its path."""
    path = os.path.join(run_dir, "report.html")
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(render(run_dir))
    os.replace(tmp, path)
    return path


def record_environment(run_dir: str, xla_options: str = "auto") -> None:
    """``environment.json``: the versions, devices and settings the run trained with."""
    with open(os.path.join(run_dir, ENVIRONMENT_FILE), "w") as f:
        json.dump(environment(xla_options), f, indent=2)


def record_parity(run_dir: str, report, rows: int) -> None:
    """``parity.json`` from the first-batch ``ParityReport`` (on ``rows`` examples)."""
    with open(os.path.join(run_dir, PARITY_FILE), "w") as f:
        json.dump({"ok": bool(report.ok), "max_abs_vs_jax_grad": float(report.max_jax_abs),
                   "parameter_arrays": len(report.leaves), "examples": rows,
                   "table": str(report)}, f, indent=2)


def record_sample(run_dir: str, text: str) -> None:
    """``sample.txt``: a language model's text sample."""
    with open(os.path.join(run_dir, SAMPLE_FILE), "w", encoding="utf-8") as f:
        f.write(text)
