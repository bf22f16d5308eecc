"""The documents stay true to the code: every link to a file points at one that exists,
every link to lines at the lines it names, every command in the README and docs/training.md
parses, and the verification recipe runs."""

import ast
import importlib.util
import re
import shlex
import sys
from pathlib import Path

import pytest

from manual_grad.training.cli import main

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[([^\]]*)\]\(([^)\s]+)\)")


def local_links():
    for doc in DOCS:
        for text, target in LINK.findall(doc.read_text()):
            if not re.match(r"[a-z]+:", target) and not target.startswith("#"):
                yield doc, text, target


def span(path: Path, qualname: str) -> tuple[int, int] | None:
    nodes = ast.parse(path.read_text()).body
    node = None
    for part in qualname.split("."):
        node = next((n for n in nodes if isinstance(n, ast.ClassDef | ast.FunctionDef)
                     and n.name == part), None)
        if node is None:
            return None
        nodes = node.body
    return node.lineno, node.end_lineno


def test_every_link_points_at_a_file_and_the_lines_it_names():
    problems, ranged = [], 0
    for doc, text, target in local_links():
        file, _, anchor = target.partition("#")
        path = (doc.parent / file).resolve()
        where = f"{doc.relative_to(ROOT)}: [{text}]({target})"
        if not path.exists():
            problems.append(f"{where}: no such file")
            continue
        lines = re.fullmatch(r"L(\d+)-L(\d+)", anchor)
        if not lines:
            continue
        ranged += 1
        first, last = int(lines.group(1)), int(lines.group(2))
        if not 1 <= first <= last <= len(path.read_text().splitlines()):
            problems.append(f"{where}: lines out of range")
        name = text.strip("`")
        if path.suffix == ".py" and re.fullmatch(r"[\w.]+", name):
            actual = span(path, name)
            if actual != (first, last):
                problems.append(f"{where}: {name} is at L{actual[0]}-L{actual[1]}"
                                if actual else f"{where}: no {name} in {file}")
    assert not problems, "\n".join(problems) + "\n(python tests/test_docs.py fixes them)"
    assert ranged >= 50  # derivations.md links each formula to its lines


def commands(doc: Path, prefix: str) -> list[list[str]]:
    """The commands starting with ``prefix`` in a document's bash blocks (continuation
    lines joined, comments dropped)."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", doc.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words[: len(prefix.split())] == prefix.split():
                found.append(words)
    return found


TRAIN_COMMANDS = sorted({" ".join(c) for doc in (ROOT / "README.md", ROOT / "docs" /
                                                 "training.md", ROOT / "train.py")
                         for c in commands(doc, "python train.py")} |
                        {line.strip() for line in (ROOT / "train.py").read_text().splitlines()
                         if line.strip().startswith("python train.py")})


def test_the_documents_show_the_main_commands():
    assert "python train.py fit --config configs/mnist_regression.yaml" in TRAIN_COMMANDS
    assert any("--ckpt_path best" in c for c in TRAIN_COMMANDS)
    assert len(TRAIN_COMMANDS) >= 12


@pytest.mark.parametrize("command", TRAIN_COMMANDS)
def test_every_train_command_in_the_documents_parses(command, monkeypatch, capsys):
    words = shlex.split(command, comments=True)[2:]
    if "--print_config" not in words:
        words.append("--print_config")  # parse everything, run nothing
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", ["train.py"])
    with pytest.raises(SystemExit) as exit_info:
        main(words)
    assert exit_info.value.code in (0, None), capsys.readouterr().err[-2000:]
    assert "model:" in capsys.readouterr().out


def test_every_bench_command_in_the_documents_is_a_module():
    modules = {m for doc in DOCS for m in re.findall(r"python -m (bench\.\w+)",
                                                     doc.read_text())}
    assert {"bench.seed_table", "bench.layers", "bench.models"} <= modules
    for module in modules:
        assert importlib.util.find_spec(module) is not None, module


def test_the_verification_recipe_runs():
    text = (ROOT / "docs" / "verification.md").read_text()
    block = re.search(r"## Check your own layer.*?```python\n(.*?)```", text, re.S).group(1)
    namespace: dict = {}
    exec(compile(block, "verification.md", "exec"), namespace)
    namespace["test_my_layer"]()


def test_the_readme_is_a_door_not_a_history():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    for history in ("Until 2026", "the day before", "before, they", "now 2x"):
        assert history.lower() not in readme.lower(), history


def fix_links() -> None:
    """Point every `Class.method` link at the method's lines as they are now."""
    for doc in DOCS:
        text = doc.read_text()

        def now(m: re.Match, folder: Path = doc.parent) -> str:
            name, file = m.group(1), m.group(2)
            found = span((folder / file).resolve(), name)
            return m.group(0) if found is None else \
                f"[`{name}`]({file}#L{found[0]}-L{found[1]})"

        fixed = re.sub(r"\[`([\w.]+)`\]\(([^)#\s]+\.py)#L\d+-L\d+\)", now, text)
        if fixed != text:
            doc.write_text(fixed)
            print(f"fixed {doc.relative_to(ROOT)}")


if __name__ == "__main__":
    fix_links()
