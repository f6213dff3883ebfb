"""Static checks of docker/ against the code (helpers for tests/test_docker*.py).

They scan the code as it is, so they follow what backend/, workers/ and samlight/ really read and run.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
CODE_DIRS = ("backend", "serving", "workers", "samlight")
READER_METHODS = {"text", "integer", "number", "flag", "names"}  # serving.config.Environment
ENV_NAME = re.compile(r"^[A-Z][A-Z0-9_]*[A-Z0-9]$")
COMPOSE_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])([^}]*))?\}")


@dataclass(frozen=True)
class EnvRead:
    name: str
    path: Path
    line: int

    def where(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"


def _source(node: ast.AST) -> str:
    return ast.unparse(node)


def _is_env_mapping(node: ast.AST) -> bool:
    """`os.environ`, `environ`, a variable called env/environ/environment, `os.environ.copy()`..."""
    text = _source(node).lower()
    return "environ" in text or re.fullmatch(r"(self\.)?_?env(ironment)?", text) is not None


def env_reads(tree: ast.AST, path: Path) -> list[EnvRead]:
    """Every environment variable a module reads by a literal name.

    Covers os.environ.get/[...]/pop/setdefault, os.getenv, `"X" in os.environ`, an `env` mapping
    parameter (env.get("X")), ``serving.config.Environment`` readers (read.integer("X", 0)), and helpers whose name mentions env (_env_int("X", 0)). Writes
    (os.environ["X"] = ...) are not reads.
    """
    found: list[EnvRead] = []

    def add(node: ast.AST, value: ast.AST) -> None:
        if isinstance(value, ast.Constant) and isinstance(value.value, str) and ENV_NAME.match(value.value):
            found.append(EnvRead(value.value, path, node.lineno))

    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and node.args:
            func = node.func
            if isinstance(func, ast.Attribute) and func.attr in {"get", "pop", "setdefault"} \
                    and _is_env_mapping(func.value):
                add(node, node.args[0])
            elif isinstance(func, ast.Attribute) and func.attr == "getenv":
                add(node, node.args[0])
            elif isinstance(func, ast.Attribute) and func.attr in READER_METHODS and (
                    _source(func.value) == "read" or _source(func.value).startswith("Environment(")):
                add(node, node.args[0])
            elif isinstance(func, ast.Name) and "env" in func.id.lower():
                add(node, node.args[0])
        elif isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load) and _is_env_mapping(node.value):
            add(node, node.slice)
        elif isinstance(node, ast.Compare) and len(node.ops) == 1 and isinstance(node.ops[0], (ast.In, ast.NotIn)) \
                and _is_env_mapping(node.comparators[0]):
            add(node, node.left)
    return found


def code_env_reads(dirs: tuple[str, ...] = CODE_DIRS) -> list[EnvRead]:
    reads: list[EnvRead] = []
    for name in dirs:
        for path in sorted((REPO / name).rglob("*.py")):
            reads += env_reads(ast.parse(path.read_text(), str(path)), path)
    return reads


def env_example_names(path: Path = REPO / ".env.example") -> dict[str, str]:
    """NAME -> value of every `NAME=value` line, and of every commented-out `# NAME=value` line."""
    names = {}
    for line in path.read_text().splitlines():
        match = re.match(r"^#?\s*([A-Z][A-Z0-9_]*)=(.*)$", line.strip())
        if match:
            names.setdefault(match.group(1), match.group(2))
    return names


def compose_variables(text: str) -> dict[str, tuple[str, str]]:
    """${NAME}, ${NAME:-default}, ${NAME:?error} in a compose file -> {NAME: (operator, argument)}."""
    out = {}
    for match in COMPOSE_VAR.finditer(text.replace("$$", "")):
        out.setdefault(match.group(1), (match.group(2) or "", match.group(3) or ""))
    return out
