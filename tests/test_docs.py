"""The README and the guides in docs/ against the code they describe (no training; 15-20 s on 2 busy cores).

Rules, kept simple on purpose:

1. Links and images. Every relative target of ``[text](target)`` / ``![alt](target)`` outside fenced blocks,
   in README.md and docs/**/*.md, exists; a ``#anchor`` must be a heading of the target file (GitHub's slug:
   lower case, punctuation dropped, spaces to hyphens) or an ``<a id="...">`` in it.
2. Flags. In a fenced block, a command line (``\\`` continuations joined) names a script (``train_sdxl_lora.py``,
   ``utils/x.py``, ``python -m utils.x``, ``./run_x.sh``, ``hf/x.py``); every ``--flag`` after the script's name
   must appear in that script's ``--help`` (for utils/sweep_report.py, in its subcommand's when one is named).
   After a lone ``--`` the flags belong to the script the command passes them to (run_experiments.sh and
   utils/train_pack.py: train_sdxl_lora.py; the inference scripts: inference_sdxl_ghibli.py). Flags before any script's name (an
   ``accelerate launch`` option) are not checked. In the text outside fences, a guide that declares its
   scripts with ``<!-- flags: SCRIPT ... -->`` has every ``--flag`` in its inline code checked against the
   ``--help`` of those scripts together.
3. Runnable commands. A fenced block right after a ``<!-- runnable -->`` line runs, command by command, with
   the project's Python first on PATH, offline, in one scratch folder shared by all such blocks (in file order:
   README.md, then docs/ by path); a command already run identically is not run again, so guides may repeat a
   set-up line such as making the tiny model. Only cheap commands are marked (``--help``, the preflight check on
   the tiny dataset, ``--output_config``); the ones needing a GPU, a download or an hour stay unmarked and the
   guide says so.
4. ``--help``. Every command (the top-level scripts, hf/*.py, the argparse commands directly in utils/, and
   the shell scripts) says what it does in the first line of its description and ends with one example: its
   last paragraph starts with ``example:`` and names the command.
5. Nothing in README.md and docs/ speaks of how the project was made (issue numbers, sessions, machine paths).
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
PYTHON_COMMANDS = ["train_sdxl_lora.py", "inference_sdxl_ghibli.py", "hf/hf_inference.py", "hf/upload_to_hf.py",
                   *sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "utils").glob("*.py")
                           if "Parser(" in p.read_text())]
SHELL_COMMANDS = ["run_experiments.sh", "run_inference_experiments.sh", "run_checkpoint_inference.sh",
                  "utils/gpu_check.sh"]
SUBCOMMANDS = {"utils/sweep_report.py": ("report", "strip")}
PASSES_TO = {"run_experiments.sh": "train_sdxl_lora.py", "run_inference_experiments.sh": "inference_sdxl_ghibli.py",
             "run_checkpoint_inference.sh": "inference_sdxl_ghibli.py", "utils/train_pack.py": "train_sdxl_lora.py"}
FLAG = re.compile(r"(?<![\w-])--[a-zA-Z][\w-]*")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def fenced_blocks(text: str) -> list[tuple[bool, str]]:
    """(runnable, block text) of every fenced block."""
    blocks, inside, lines, runnable, last = [], False, [], False, ""
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            if inside:
                blocks.append((runnable, "\n".join(lines)))
            inside, lines, runnable = not inside, [], last.strip() == "<!-- runnable -->"
        elif inside:
            lines.append(line)
        if line.strip():
            last = line
    return blocks


def prose(text: str) -> str:
    """The text outside fenced blocks."""
    return "\n".join(part for i, part in enumerate(re.split(r"^\s*```.*$", text, flags=re.M)) if i % 2 == 0)


def commands(block: str) -> list[str]:
    return [line.strip() for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def slug(heading: str) -> str:
    text = heading.strip().lower().replace("`", "")
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


@functools.cache
def anchors(path: Path) -> frozenset[str]:
    text = prose(path.read_text())
    found, seen = set(re.findall(r'<a id="([^"]+)"', text)), {}
    for heading in re.findall(r"^#{1,6} (.+)$", text, flags=re.M):
        base = slug(heading)
        found.add(base if base not in seen else f"{base}-{seen[base]}")
        seen[base] = seen.get(base, 0) + 1
    return frozenset(found)


def script_of(token: str) -> str | None:
    token = token.strip("`'\"")
    if token.startswith("utils.") and (ROOT / "utils" / f"{token[6:]}.py").exists():
        token = f"utils/{token[6:]}.py"
    token = token.removeprefix("./")
    return token if token in PYTHON_COMMANDS or token in SHELL_COMMANDS else None


def capture_help(command: str, *subcommand: str) -> str:
    """The --help text of a command: Python scripts in this process (imports shared), shell scripts run."""
    if command.endswith(".sh"):
        return subprocess.run(["bash", str(ROOT / command), "--help"], capture_output=True, text=True,
                              timeout=60, check=True).stdout
    out, argv = io.StringIO(), sys.argv
    sys.argv = [str(ROOT / command), *subcommand, "--help"]
    try:
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
            runpy.run_path(str(ROOT / command), run_name="__main__")
    finally:
        sys.argv = argv
    return out.getvalue()


@functools.cache
def helps() -> dict[str, str]:
    texts = {name: capture_help(name) for name in [*PYTHON_COMMANDS, *SHELL_COMMANDS]}
    for name, subs in SUBCOMMANDS.items():
        texts.update({f"{name} {sub}": capture_help(name, sub) for sub in subs})
    return texts


def has_flag(key: str, flag: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", helps()[key]) is not None


def unknown_flags_in_command(line: str) -> list[str]:
    wrong, key, tokens = [], None, line.split()
    for i, token in enumerate(tokens):
        script = script_of(token)
        if script:
            key = script
            if i + 1 < len(tokens) and tokens[i + 1] in SUBCOMMANDS.get(script, ()):
                key = f"{script} {tokens[i + 1]}"
        elif token == "--" and key in PASSES_TO:
            key = PASSES_TO[key]
        elif key:
            wrong += [f"{key}: {flag}" for flag in FLAG.findall(token.split("=")[0]) if not has_flag(key, flag)]
    return wrong


def test_links_and_images_resolve():
    broken = []
    for doc in DOCS:
        for target in LINK.findall(prose(doc.read_text())):
            if re.match(r"[a-z]+:", target):
                continue  # a web address
            path_part, _, anchor = target.partition("#")
            path = (doc.parent / path_part).resolve() if path_part else doc
            if not path.exists():
                broken.append(f"{doc.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and path.suffix == ".md" and anchor not in anchors(path):
                broken.append(f"{doc.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_flags_named_in_the_guides_exist():
    wrong = []
    for doc in DOCS:
        text = doc.read_text()
        for _, block in fenced_blocks(text):
            wrong += [f"{doc.relative_to(ROOT)}: {w}" for line in commands(block) for w in unknown_flags_in_command(line)]
        declared = [s for m in re.findall(r"<!-- flags: (.+?) -->", text) for s in m.split()]
        keys = [k for k in helps() if k.split()[0] in declared]
        assert all(script_of(s) for s in declared), f"{doc}: unknown script in {declared}"
        for span in re.findall(r"`([^`\n]+)`", prose(text)) if keys else []:
            wrong += [f"{doc.relative_to(ROOT)}: {flag} (not in {' '.join(declared)})" for flag in FLAG.findall(span)
                      if not any(has_flag(k, flag) for k in keys)]
    assert not wrong, "\n".join(sorted(set(wrong)))


def test_runnable_commands_run(tmp_path):
    for entry in ROOT.iterdir():  # the scratch folder sees the project, and outputs land in it
        if entry.name not in (".git", ".venv"):
            (tmp_path / entry.name).symlink_to(entry)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done, count = set(), 0
    for doc in DOCS:
        for runnable, block in fenced_blocks(doc.read_text()):
            for line in commands(block) if runnable else []:
                if line in done or line.startswith("#"):
                    continue
                result = subprocess.run(["bash", "-c", line], cwd=tmp_path, env=env, capture_output=True,
                                        text=True, timeout=120)
                assert result.returncode == 0, f"{doc.relative_to(ROOT)}: {line}\n{result.stdout[-2000:]}{result.stderr[-2000:]}"
                done.add(line)
                count += 1
    assert count >= 3  # the guides keep a few runnable commands


@pytest.mark.parametrize("command", [*PYTHON_COMMANDS, *SHELL_COMMANDS])
def test_help_says_what_the_command_does_and_ends_with_an_example(command):
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", helps()[command].strip()) if p.strip()]
    first = paragraphs[1] if paragraphs[0].startswith("usage:") else paragraphs[0]
    first_line = first.splitlines()[0]
    assert not re.match(r"(options|positional arguments):", first_line), f"{command}: no description"
    assert len(first_line.split()) >= 4, f"{command}: first line {first_line!r}"
    last = paragraphs[-1]
    assert last.lower().startswith("example:"), f"{command}: help ends with {last[-200:]!r}"
    assert Path(command).name in last or command.replace("/", ".").removesuffix(".py") in last, last


def test_the_docs_do_not_speak_of_how_the_project_was_made():
    pattern = re.compile(r"issue [0-9]+|이슈 [0-9]+|this session|/tmp/|they were|package index here", re.I)
    found = [f"{doc.relative_to(ROOT)}:{n}: {line.strip()}" for doc in DOCS
             for n, line in enumerate(doc.read_text().splitlines(), 1) if pattern.search(line)]
    assert not found, "\n".join(found)
