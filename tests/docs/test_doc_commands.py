"""Every `dpo-ds ...` command the manual shows runs as shown, as far as it can be checked in-process on a CPU:

- the subcommand is one of dpo_ds.cli.main.COMMANDS;
- its arguments parse with the real parser of that subcommand, caught from the command's own main as
  scripts/gen_reference.py catches it (nothing runs); `dpo-ds train`'s are parsed as it parses them, by the
  launcher's parser and then the trainer's;
- `dpo-ds train`, `plan` and `prepare`: `--ds` names a shipped DeepSpeed config or a path ending in .json;
  `--config` names a shipped recipe, a file of the repository, or a file the same page made earlier with
  `dpo-ds recipes cp RECIPE FILE` (checked as that recipe); the config and every key=value load and
  validate through dpo_ds.config.load_config, and the losses named exist (build_objective, as each of the
  three commands checks before anything starts);
- `dpo-ds recipes cp|show NAME`: NAME is a shipped recipe (with --ds, a shipped DeepSpeed config).

Commands are the lines starting with `dpo-ds ` (after an optional `$ ` prompt or `VAR=value `) in the
```bash, ```sh, ```shell, ```console and ```text blocks of README.md and docs/**/*.md, with `\\`
continuation lines joined, a trailing `# comment` dropped and the line cut at a pipe, `&&`, `;` or a
redirection.

Values naming files of the reader's own are not checked for existence: load_config reads no file but the
YAML, and validate() touches the filesystem for one key only, data.chat_template (FS_KEYS); a path there
that does not exist here is checked for its key and type only. model.archive, model.name_or_path,
datasets and data.cache_dir are checked by the run, not by load_config
(test_paths_are_not_checked_by_load_config keeps that assumption honest).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

from dpo_ds.cli.main import COMMANDS
from dpo_ds.config import ConfigError, load_config
from dpo_ds.config.shipped import DEFAULT_DS, RECIPES, ds_config_path, recipe_names, recipe_path
from tests.docs.scripts import script

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
LANGS = {"bash", "sh", "shell", "console", "text"}
COMMAND = re.compile(r"^(?:\$\s+)?(?:[A-Za-z_]\w*=\S*\s+)*(dpo-ds(?:\s.*)?)$")  # `$ `, `VAR=1 ` before it
SHELL_STOP = {"|", "||", "&&", ";", "&"}  # the command ends before these
REDIRECT = re.compile(r"^\d*(>>?|<)")  # 2>&1, > log, < in
CONFIG_COMMANDS = ("train", "plan", "prepare")
FS_KEYS = ("data.chat_template",)  # the only keys validate() checks against the filesystem


gen_reference = script("gen_reference")
doc_blocks = script("doc_blocks")


# ----------------------------------------------------------------------------- finding the commands


@dataclass
class Command:
    line: int  # 1-based line of the page where the command starts
    text: str  # as written, continuation lines joined, comment dropped
    argv: list[str]  # the words after `dpo-ds`


def _words(text: str) -> list[str]:
    """The shell words of a command line, up to a comment, a pipe, `&&`, `;` or a redirection."""
    lex = shlex.shlex(text, posix=True)
    lex.whitespace_split = True
    lex.commenters = ""
    words = []
    for word in lex:
        if word.startswith("#") or word in SHELL_STOP or REDIRECT.match(word):
            break
        words.append(word)
    return words


def commands_of(markdown: str) -> list[Command]:
    """The `dpo-ds` command lines of the fenced shell and text blocks of a markdown text."""
    lines = markdown.splitlines()
    out = []
    for lang, i, end in doc_blocks.fenced(lines):
        j = i + 1
        while j < end:
            start, text = j, lines[j].strip()
            while text.endswith("\\") and j + 1 < end:
                j += 1
                text = text[:-1].rstrip() + " " + lines[j].strip()
            j += 1
            cmd = COMMAND.match(text) if lang in LANGS else None
            if cmd:
                words = _words(cmd.group(1))
                out.append(Command(start + 1, " ".join(shlex.quote(w) for w in words), words[1:]))
    return out


# ----------------------------------------------------------------------------- the real parsers


@cache
def parser_and_method(name: str) -> tuple[argparse.ArgumentParser, str]:
    """The parser `dpo-ds NAME` builds, caught at its first parse call through main.py's own dispatch (as
    gen_reference.parser_of catches it, so nothing runs), and the name of the parse method it calls."""
    return gen_reference.caught(lambda: COMMANDS[name][0]([], f"dpo-ds {name}"), f"dpo-ds {name}")


class _Exit(Exception):
    def __init__(self, code, output: str):
        super().__init__(output)
        self.code = code


def _quietly(parse, *args, **kw):
    """parse(...) with its output captured; argparse's exit (an error, or --help) raised as _Exit."""
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            return parse(*args, **kw)
    except ConfigError as e:  # the trainer's answer to a TRL flag (--deepspeed, --output_dir)
        raise _Exit(2, str(e)) from None
    except SystemExit as e:
        lines = [ln for ln in out.getvalue().splitlines() if ln.strip()]
        raise _Exit(e.code, lines[-1] if lines else f"exit {e.code}") from None


def parse(name: str, argv: list[str]) -> argparse.Namespace:
    """The namespace `dpo-ds NAME argv` parses to, as the command parses it (train: the launcher's
    arguments, then the trainer's, each by its own parser)."""
    parser, method = parser_and_method(name)
    args = _quietly(getattr(argparse.ArgumentParser, method), parser, argv)
    if name == "train":  # the launcher passes what it does not know to the trainer on each rank
        from dpo_ds.cli.train import parse_args

        _, trainer_argv = args
        args = _quietly(parse_args, trainer_argv)
    return args[0] if isinstance(args, tuple) else args


# ----------------------------------------------------------------------------- checking a page


def _ds_problem(spec: str) -> str | None:
    if spec.endswith(".json"):
        return None
    try:
        ds_config_path(spec)
    except ConfigError as e:
        return str(e)
    return None


def _config_file(spec: str, made: dict[str, str]) -> str:
    """The YAML `--config spec` loads: a copy the page made (as the recipe it copied), a shipped recipe, or a
    file of the repository. Not recipe_path's lookup, which finds any file of that name in the current
    directory: a stray my_dpo.yaml there must not hide a page that uses one it never made."""
    if spec in made:
        return made[spec]
    name = spec.removesuffix(".yaml")
    if "/" not in name and name in recipe_names():
        return str(RECIPES / f"{name}.yaml")
    if (ROOT / spec).is_file():
        return str(ROOT / spec)
    raise ConfigError(
        f"--config {spec}: not a shipped recipe ({', '.join(recipe_names())}), a file of the repository, "
        "or a file a `dpo-ds recipes cp RECIPE FILE` above it on the page made"
    )


def _without_reader_paths(overrides: list[str]) -> list[str]:
    """key=value with a FS_KEYS value replaced by a file that exists: its key and type are still checked
    (the value is a path string), the file it names is the reader's."""
    out = []
    for arg in overrides:
        key, eq, value = arg.partition("=")
        if eq and key.strip() in FS_KEYS and value.lower() not in ("null", "none", "~", ""):
            arg = f"{key}={__file__}"
        out.append(arg)
    return out


def check_config(args: argparse.Namespace, made: dict[str, str]) -> str | None:
    """What `dpo-ds train|plan|prepare` checks before anything starts: --ds, --config, key=value, losses."""
    from dpo_ds.training.objectives import build_objective

    problem = _ds_problem(args.ds or DEFAULT_DS)
    if problem:
        return problem
    try:
        config = _config_file(args.config, made) if args.config else None
        cfg = load_config(config, _without_reader_paths(args.overrides))
        build_objective(cfg)
    except ConfigError as e:
        return str(e)
    return None


def check_recipes(args: argparse.Namespace, made: dict[str, str]) -> str | None:
    """`dpo-ds recipes cp|show NAME` names a shipped recipe (--ds: DeepSpeed config); a cp's DEST is made."""
    if args.action == "ls":
        return None
    if not args.name:
        return f"{args.action} needs a recipe's name"
    try:
        src = (ds_config_path if args.ds else recipe_path)(args.name)
    except ConfigError as e:
        return str(e)
    if args.action == "cp" and not args.ds:
        dest = args.dest or src.name
        made[dest + src.name if dest.endswith("/") else dest] = str(src)
    return None


def problems(page: str, markdown: str) -> tuple[list[str], int]:
    """Each bad command of a page as `page:line: `command`: what is wrong`, and how many commands it has."""
    bad, made = [], {}  # made: each YAML file a `dpo-ds recipes cp` of the page wrote -> its source
    cmds = commands_of(markdown)
    for cmd in cmds:
        where = f"{page}:{cmd.line}: `{cmd.text}`"
        if not cmd.argv or cmd.argv[0] in ("-h", "--help", "help"):  # dpo-ds's own usage
            continue
        if cmd.argv[0] not in COMMANDS:
            bad.append(f"{where}: no such subcommand (dpo-ds has {', '.join(COMMANDS)})")
            continue
        name = cmd.argv[0]
        try:
            args = parse(name, cmd.argv[1:])
        except _Exit as e:
            if e.code not in (0, None):  # 0: --help / --help-keys printed and exited, as it should
                bad.append(f"{where}: {e}")
            continue
        if name in CONFIG_COMMANDS:
            problem = check_config(args, made)
        elif name == "recipes":
            problem = check_recipes(args, made)
        else:
            problem = None
        if problem:
            bad.append(f"{where}: {problem}")
    return bad, len(cmds)


# ----------------------------------------------------------------------------- the tests


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_every_command_shown_parses_and_its_config_loads(page):
    bad, _ = problems(str(page.relative_to(ROOT)), page.read_text(encoding="utf-8"))
    assert not bad, "commands of the manual that would not run as shown:\n" + "\n".join(bad)


def test_the_manual_shows_commands():
    cmds = {p: commands_of(p.read_text(encoding="utf-8")) for p in PAGES}
    assert cmds[ROOT / "README.md"] and cmds[ROOT / "docs" / "getting-started.md"]
    shown = {c.argv[0] for page in cmds.values() for c in page if c.argv}
    assert {"train", "plan", "prepare", "export", "recipes"} <= shown


PAGE = """\
# A page

```bash
$ dpo-ds plan --config demo_dpo --gpus 2 \\
    --gpu-mem 24 loss.beta=0.2   # a comment
CUDA_VISIBLE_DEVICES=0,1 dpo-ds train --config demo_dpo 2>&1 | tee log
pip install dpo_ds  # not ours
echo dpo-ds train --config nope
```

```python
dpo-ds train --config nope  # not a shell block
```

```text
dpo-ds export runs/x/LATEST out
loss 0.69 dpo-ds
```
"""


def test_commands_are_found_joined_and_cut():
    cmds = commands_of(PAGE)
    assert [(c.line, c.argv) for c in cmds] == [
        (4, ["plan", "--config", "demo_dpo", "--gpus", "2", "--gpu-mem", "24", "loss.beta=0.2"]),
        (6, ["train", "--config", "demo_dpo"]),
        (16, ["export", "runs/x/LATEST", "out"]),
    ]
    assert problems("page.md", PAGE) == ([], 3)


@pytest.mark.parametrize(
    "command, says",
    [
        ("dpo-ds trian --config demo_dpo", "no such subcommand"),
        ("dpo-ds train --gpu 8 --config demo_dpo", "unrecognized arguments: --gpu"),
        ("dpo-ds plan --config demo_dpo --gpus eight", "invalid int value"),
        ("dpo-ds train --config demo_dpo --deepspeed ds.json", "--ds"),
        ("dpo-ds train --config no_such_recipe", "--config no_such_recipe: not a shipped recipe"),
        ("dpo-ds train --ds zero4 --config demo_dpo", "not the name of a shipped DeepSpeed config"),
        ("dpo-ds train --config demo_dpo loss.bta=0.1", "unknown config key 'loss.bta'"),
        ("dpo-ds prepare --config demo_dpo batch_size=lots", "expected an integer"),
        ("dpo-ds plan --config demo_dpo loss.beta=-1", "must be > 0"),
        ("dpo-ds train --config demo_dpo loss=dpoo", "config key 'loss.name'"),
        ("dpo-ds train --config my_dpo.yaml", "--config my_dpo.yaml: not a shipped recipe"),
        ("dpo-ds export runs/x/LATEST out --dtype fp8", "invalid choice"),
        ("dpo-ds recipes cp no_such_recipe mine.yaml", "not the name of a shipped recipe"),
    ],
)
def test_a_bad_command_is_named(command, says):
    bad, n = problems("page.md", f"intro\n\n```bash\n{command}\n```\n")
    assert n == 1 and len(bad) == 1, bad
    assert bad[0].startswith("page.md:4: `dpo-ds ") and says in bad[0], bad[0]


def test_a_copy_made_on_the_page_loads_as_its_recipe():
    made_first = (
        "```bash\ndpo-ds recipes cp demo_dpo my_dpo.yaml\ndpo-ds train --config my_dpo.yaml lr=1e-6\n```\n"
    )
    assert problems("page.md", made_first) == ([], 2)
    used_first = "```bash\ndpo-ds train --config my_dpo.yaml\ndpo-ds recipes cp demo_dpo my_dpo.yaml\n```\n"
    assert len(problems("page.md", used_first)[0]) == 1


def test_paths_are_not_checked_by_load_config():
    """The keys naming the reader's files load without the files; only FS_KEYS need a file that exists."""
    load_config(
        None,
        [
            "model.name_or_path=/models/none",
            "model.archive=runs/none/LATEST/policy.pt",
            "datasets=[/data/none]",
            "data.cache_dir=/shared/none",
        ],
    )
    for key in FS_KEYS:
        with pytest.raises(ConfigError, match=re.escape(key)):
            load_config(None, [f"{key}=/templates/none.jinja"])
        load_config(None, _without_reader_paths([f"{key}=/templates/none.jinja"]))
    with pytest.raises(ConfigError, match="unknown config key 'data.chat_templat'"):
        load_config(None, _without_reader_paths(["data.chat_templat=/templates/none.jinja"]))
