"""cluster.yaml says only what is true: nodes install every dependency of pyproject.toml, and
every node starts Ray with token authentication and gets the token."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!\[ ;]", requirement, maxsplit=1)[0].lower()


def test_cluster_nodes_install_every_dependency():
    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    installed = {_name(word.strip('"')) for cmd in config["setup_commands"] if "pip install" in cmd
                 for word in cmd.split("pip install", 1)[1].split() if not word.startswith("-")}
    needed = {_name(r) for r in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]}
    assert needed - installed == set()


def test_every_node_starts_ray_with_token_authentication():
    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    starts = [c for key in ("head_start_ray_commands", "worker_start_ray_commands") for c in config[key]
              if "ray start" in c]
    assert len(starts) == 2 and all(c.startswith("RAY_AUTH_MODE=token ray start") for c in starts)
    assert config["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}
