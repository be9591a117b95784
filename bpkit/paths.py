"""Every path a user gives, resolved once: at config load, against the current directory.

A config names paths relative to where ``bpkit`` is run (``runs/<name>``, ``data/train.npz``,
``model.init_from: runs/mnist1d_mlp``). ``resolve_paths`` makes each of them absolute (``~``
expanded) as soon as the config is loaded, so everything after -- orbax, which refuses relative
paths, the run directory's stored ``config.yaml``, ``bpkit eval`` run from elsewhere -- sees one
unambiguous path.
"""
from __future__ import annotations

import os

# (section, key) of every field that holds a path; ``run.out_dir`` defaults to runs/<run.name>.
PATH_KEYS = (("run", "out_dir"), ("model", "init_from"), ("data", "path"),
             ("data", "test_path"), ("data", "labels_path"), ("data", "test_labels_path"),
             ("data", "cache_dir"))


def absolute(path: str) -> str:
    """``path`` with ``~`` expanded, made absolute against the current directory."""
    return os.path.abspath(os.path.expanduser(path))


def resolve_paths(cfg):
    """``cfg`` with every path field absolute and ``run.out_dir`` filled in (idempotent; the
    config is changed in place and returned)."""
    if cfg.run.out_dir is None:
        cfg.run.out_dir = cfg.out_dir  # runs/<name>
    for section, key in PATH_KEYS:
        value = getattr(getattr(cfg, section), key)
        if isinstance(value, str) and value:
            setattr(getattr(cfg, section), key, absolute(value))
    return cfg
