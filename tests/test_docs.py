"""The user-facing documents (README.md, docs/DESIGN.md, docs/SJD2.md) against the repository.

Fast checks, no model run, that catch drift between the prose and the code:
- every repository path they name (in backticks, in shell blocks, in Markdown links) is a tracked
  file or a folder of tracked files, and every glob in one matches something;
- every ``--flag`` of a command line they give for a script under ``python/`` or ``benchmarks/`` or a
  ``python -m sjd_kernels...`` module is one that script's argument parser declares (its ``--help``,
  run once for all of them in one subprocess), and the bench CLI's subcommands, ``--op`` and
  ``--backend`` values exist;
- ``.ci/run`` runs the README's test command verbatim, and the extras the README installs exist;
- every ``sk.`` / ``sjd_kernels.`` name they use exists, the bench backend names they quote are
  registered, and the calls they show (``name(..., kw=...)`` in backticks, the README's Python blocks)
  fit the called function's signature.
Statements that need a measurement (numbers quoted from ``benchmarks/results/``) are not checked here.
"""
from __future__ import annotations

import ast
import fnmatch
import importlib
import inspect
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "docs/DESIGN.md", "docs/SJD2.md")

# Paths that are named on purpose but are not tracked files (each with the reason). Keep it small.
PATH_EXCEPTIONS = {
    ".whl/": "the wheel folder that benchmarks/fetch_wheels.sh writes (git-ignored)",
}
# Dotted names that exist only in some installs.
NAME_EXCEPTIONS = {
    "sjd_kernels._C": "the compiled CUDA extension, present only after `pip install .` with nvcc",
}
# Backtick words shaped like bench backends (cuda_*, triton_*, chain_*) that are something else;
# each maps to a file that must still mention it.
BACKEND_LIKE = {
    "cuda_sim": "tests/test_tree_kv_kernels.py",                  # a test parameter: CUDA kernels in the simulator
    "chain_speculative_sampling": "sjd_kernels/bench/cases.py",   # FlashInfer's function, timed by bench ops
}
# Flags whose next word is a file the command writes, not a path of the repository.
OUTPUT_FLAGS = {"--out", "--json", "--csv", "--tokens", "--log"}
# File kinds a bare name with an extension refers to (``noise.py``, ``gpu_run.sh``).
EXTS = {"py", "md", "sh", "cu", "cuh", "h", "cpp", "log", "csv", "png", "json", "jsonl", "txt", "toml",
        "safetensors"}
# Folders that short paths in the documents are relative to (``h200_2026-11-29/run2/ops.csv``,
# ``results/sass_sm90_2026-11-30/``), tried in this order after the repository root.
BASES = ("", "benchmarks/", "benchmarks/results/")


# ----------------------------------------------------------------------------- the documents

SHELL = ("bash", "sh", "shell", "console")
FENCE = re.compile(r"(?ms)^```([^\n]*)\n(.*?)^```")


def _text(doc: str) -> str:
    return (ROOT / doc).read_text(encoding="utf-8")


def _blocks(text: str):
    """``(language, body)`` of each fenced code block."""
    return [(m.group(1).strip().lower(), m.group(2)) for m in FENCE.finditer(text)]


def _prose(text: str) -> str:
    return FENCE.sub("", text)


def _spans_of(prose: str) -> list[str]:
    """Inline code spans, in order; a span may wrap onto the next line (not over a blank one)."""
    return [" ".join(s.split()) for s in re.findall(r"`([^`]+)`", prose) if "\n\n" not in s]


def _lines_of(body: str) -> list[str]:
    """The command lines of a shell block (comments dropped, continuations joined)."""
    out = []
    for line in body.replace("\\\n", " ").splitlines():
        line = line.split(" #", 1)[0].strip()
        if line and not line.startswith("#"):
            out.append(line)
    return out


def _spans(text: str) -> list[str]:
    return _spans_of(_prose(text))


def _shell_lines(text: str) -> list[str]:
    return [ln for lang, body in _blocks(text) if lang in SHELL for ln in _lines_of(body)]


def _sections(text: str) -> list[list[str]]:
    """Per Markdown section, its inline spans and shell-block lines in document order (a span of
    flags alone belongs to its section's last command)."""
    sections: list[list[str]] = [[]]

    def prose(chunk: str):
        parts = re.split(r"(?m)^#{1,6} .*$", chunk)
        sections[-1].extend(_spans_of(parts[0]))
        sections.extend(_spans_of(p) for p in parts[1:])

    pos = 0
    for m in FENCE.finditer(text):
        prose(text[pos:m.start()])
        if m.group(1).strip().lower() in SHELL:
            sections[-1].extend(_lines_of(m.group(2)))
        pos = m.end()
    prose(text[pos:])
    return sections


# ----------------------------------------------------------------------------- repository files

def _tracked() -> tuple[set, set]:
    """Tracked files and the folders that hold them (the filesystem when git cannot say)."""
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, timeout=30).stdout
        files = {f for f in out.decode().split("\0") if f}
    except (OSError, subprocess.SubprocessError):
        files = set()
    if not files:
        files = {str(p.relative_to(ROOT)) for p in ROOT.rglob("*") if p.is_file() and ".git" not in p.parts}
    dirs = {"/".join(f.split("/")[:i]) for f in files for i in range(1, f.count("/") + 1)}
    return files, dirs


FILES, DIRS = _tracked()
TOP = {p.split("/")[0] for p in FILES}


def _brace_expand(tok: str) -> list[str]:
    m = re.search(r"\{([^{}]*,[^{}]*)\}", tok)
    if not m:
        return [tok]
    return [x for alt in m.group(1).split(",") for x in _brace_expand(tok[:m.start()] + alt + tok[m.end():])]


def _path_exists(path: str) -> bool:
    want_dir = path.endswith("/")
    for base in BASES:
        p = (base + path).rstrip("/")
        if any(c in p for c in "*?["):
            if any(fnmatch.fnmatchcase(f, p) for f in FILES | DIRS):
                return True
        elif p in DIRS or (p in FILES and not want_dir):
            return True
    return False


def _path_candidates(tokens: list[str]):
    """The tokens of one span or command line that name repository paths."""
    skip_next = False
    for raw in tokens:
        if skip_next:
            skip_next = False
            continue
        if raw in OUTPUT_FLAGS:
            skip_next = True
            continue
        tok = raw.strip("\"'`,;()").rstrip(".:")
        tok = re.sub(r":\d+(-\d+)?$", "", tok)                        # file:line
        if not tok or tok.startswith(("~", "/", "$", "-")) or "://" in tok or "<" in tok or ">" in tok:
            continue                                                    # outside the repository, flags, placeholders
        ext = re.search(r"\.([A-Za-z0-9]+)$", tok)
        has_ext = bool(ext) and ext.group(1) in EXTS
        if "/" in tok:
            if tok.split("/")[0] in TOP or tok.endswith("/") or has_ext:
                yield tok
        elif has_ext and re.fullmatch(r"[\w.\-*]+", tok):
            yield tok                                                   # a bare file name


def _doc_paths(doc: str):
    text = _text(doc)
    for unit in _spans(text) + _shell_lines(text):
        try:
            tokens = shlex.split(unit)
        except ValueError:
            tokens = unit.split()
        for tok in _path_candidates(tokens):
            yield tok
    for target in re.findall(r"\]\(([^)\s]+)\)", text):               # Markdown links and images
        if not re.match(r"[a-z]+:|#", target):
            yield target.split("#")[0]


@pytest.mark.parametrize("doc", DOCS)
def test_named_paths_exist(doc):
    missing = []
    for tok in _doc_paths(doc):
        if tok in PATH_EXCEPTIONS:
            continue
        for path in _brace_expand(tok):
            if "/" in path:
                ok = _path_exists(path)
            else:                                                       # bare name: some tracked file of that name
                ok = any(fnmatch.fnmatchcase(f.rsplit("/", 1)[-1], path) for f in FILES)
            if not ok:
                missing.append(path)
    assert not missing, f"{doc} names paths that are not tracked files or folders: {sorted(set(missing))}"


def test_path_exceptions_are_still_needed():
    """An allow-listed path that no document names any more should leave the list."""
    named = {tok for doc in DOCS for tok in _doc_paths(doc)}
    assert set(PATH_EXCEPTIONS) <= named, set(PATH_EXCEPTIONS) - named


# ----------------------------------------------------------------------------- command lines

BENCH = "sjd_kernels.bench"
BENCH_SUBS = ("list", "ops", "e2e", "compare")


def _command(unit: str):
    """``(target, sub, flags, values)`` per command of a shell line or span: ``target`` is a script
    path, ``-m MODULE`` (``bench ops ...`` and ``ops --check`` are the bench CLI's) or ``""`` for a
    span of flags alone; ``sub`` the bench subcommand(s); ``values`` the ``(flag, value)`` pairs of
    ``--op`` and ``--backend``. Units that are no command yield nothing."""
    unit = unit.replace("[", " ").replace("]", " ")
    for piece in re.split(r"\s(?:&&|\|\||;|\|)\s", unit):
        try:
            toks = shlex.split(piece)
        except ValueError:
            toks = piece.split()
        target, sub, rest = None, None, None
        for i, t in enumerate(toks):
            if re.fullmatch(r"(python|benchmarks)/[\w/]+\.py", t):
                target, rest = t, toks[i + 1:]
                break
            if t == "-m" and i + 1 < len(toks):
                target, rest = "-m " + toks[i + 1], toks[i + 2:]
                break
        if target is None and toks:
            if toks[0] == "bench" and len(toks) > 1:
                target, rest = "-m " + BENCH, toks[1:]
            elif toks[0] in BENCH_SUBS and len(toks) > 1 and toks[1].startswith("--"):
                target, rest = "-m " + BENCH, toks
            elif toks[0].startswith("--"):
                target, rest = "", toks                                 # flags only: the section's last command
        if target is None:
            continue
        if target == f"-m {BENCH}" and rest and not rest[0].startswith("-"):
            sub, rest = rest[0], rest[1:]
        flags = [t.split("=")[0] for t in rest if re.fullmatch(r"--[A-Za-z0-9][\w-]*(=.*)?", t)]
        values = [(a, b) for a, b in zip(rest, rest[1:]) if a in ("--op", "--backend")]
        yield target, sub, flags, values


def _doc_commands():
    """``(doc, target, sub, flags, values)`` for every command of ours in the documents."""
    out = []
    for doc in DOCS:
        for section in _sections(_text(doc)):
            last = None
            for unit in section:
                for target, sub, flags, values in _command(unit):
                    if target == "":
                        if last is None:
                            continue                                    # flags of no command we check
                        target, sub = last
                    elif target.startswith("-m ") and not target.startswith("-m sjd_kernels"):
                        last = None                                     # pytest, pip: not ours
                        continue
                    else:
                        last = (target, sub)
                    out.append((doc, target, sub, flags, values))
    return out


_HELP_RUNNER = r"""
import contextlib, io, json, os, runpy, sys, warnings
warnings.simplefilter("ignore")
out = {}
for key in json.loads(sys.argv[1]):
    target, sub = key.split("\t")
    buf, err = io.StringIO(), io.StringIO()
    argv = ([sub] if sub else []) + ["--help"]
    old_argv, old_path = sys.argv[:], sys.path[:]
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(err):
            if target.startswith("-m "):
                sys.argv = [target[3:]] + argv
                runpy.run_module(target[3:], run_name="__main__", alter_sys=True)
            else:
                sys.argv = [target] + argv
                sys.path.insert(0, os.path.dirname(os.path.abspath(target)))
                runpy.run_path(target, run_name="__main__")
    except SystemExit:
        pass
    except BaseException as e:
        err.write(f"\n{type(e).__name__}: {e}")
    finally:
        sys.argv, sys.path[:] = old_argv, old_path
    out[key] = buf.getvalue() if "usage:" in buf.getvalue() else buf.getvalue() + err.getvalue()
print("\n@@HELP@@" + json.dumps(out))
"""


@pytest.fixture(scope="module")
def helps():
    """``--help`` text of every script / module (and bench subcommand) the documents give flags for,
    from one subprocess (one torch import)."""
    keys = {f"{t}\t{s or ''}" for _, t, s, flags, _ in _doc_commands() if flags}
    keys |= {f"-m {BENCH}\t"}                                          # the subcommands
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    r = subprocess.run([sys.executable, "-c", _HELP_RUNNER, json.dumps(sorted(keys))], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert "@@HELP@@" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
    return json.loads(r.stdout.split("@@HELP@@", 1)[1])


def _usage_flags(help_text: str) -> set:
    """The options an argparse ``--help`` declares: those of its usage block (up to the first blank line)."""
    usage = help_text[help_text.index("usage:"):].split("\n\n", 1)[0]
    return set(re.findall(r"(--[A-Za-z0-9][\w-]*)", usage))


def test_documented_flags_are_accepted(helps):
    bad = []
    for doc, target, sub, flags, _ in _doc_commands():
        if not flags:
            continue
        text = helps[f"{target}\t{sub or ''}"]
        assert "usage:" in text, f"{target} {sub or ''} --help gave no usage:\n{text[-1500:]}"
        declared = _usage_flags(text) | {"--help"}
        bad += [f"{doc}: {target} {sub or ''} {f}" for f in flags if f not in declared]
    assert not bad, "flags the documents use that the parsers do not declare:\n" + "\n".join(bad)


def test_documented_bench_subcommands_ops_and_backends_exist(helps):
    from sjd_kernels.bench import cases
    choices = re.search(r"\{([\w,]+)\}", helps[f"-m {BENCH}\t"])
    assert choices, helps[f"-m {BENCH}\t"][:500]
    subs = set(choices.group(1).split(","))
    backends = {b for bench in cases.OPS.values() for b in bench.backends}
    bad, seen = [], 0
    for doc, target, sub, _, values in _doc_commands():
        if target != f"-m {BENCH}":
            continue
        seen += 1
        bad += [f"{doc}: bench subcommand {s!r}" for s in (sub or "").split("|") if s and s not in subs]
        for flag, value in values:
            known = cases.OPS if flag == "--op" else backends
            if value not in known:
                bad.append(f"{doc}: bench {flag} {value!r}")
    assert seen, "no bench command found in the documents (the extraction broke)"
    assert not bad, bad


def test_ci_runs_the_readme_test_command():
    """The README's second command (install and test) is what ``.ci/run`` runs, verbatim."""
    bash = [body for lang, body in _blocks(_text("README.md")) if lang == "bash"]
    assert bash, "the README lost its first bash block"
    commands = [ln.strip() for ln in bash[0].splitlines() if ln.strip() and not ln.strip().startswith("#")]
    assert len(commands) >= 2, commands
    test_cmd = commands[1]
    assert "pytest" in test_cmd, test_cmd
    ci = [ln.strip() for ln in (ROOT / ".ci/run").read_text().splitlines()]
    ran = [ln.rstrip("\\").rstrip() for ln in ci if not ln.startswith("#")]
    assert test_cmd in ran, f".ci/run does not run the README's test command:\n  {test_cmd}"


def test_readme_install_extras_exist():
    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    named = set()
    for unit in _shell_lines(_text("README.md")) + _spans(_text("README.md")):
        named |= {x for group in re.findall(r"\.\[([\w,-]+)\]", unit) for x in group.split(",")}
    assert named and named <= extras, (named, extras)


# ----------------------------------------------------------------------------- Python names

def _resolve(dotted: str):
    """The object a dotted name names: the longest importable module prefix, then attributes."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for j, name in enumerate(parts[i:], start=i):
            if not hasattr(obj, name) and inspect.ismodule(obj):
                try:
                    obj = importlib.import_module(".".join(parts[:j + 1]))
                    continue
                except ImportError:
                    pass
            obj = getattr(obj, name)
        return obj
    raise ImportError(dotted)


def _doc_dotted_names(doc: str) -> set:
    text = _text(doc)
    return {m.group(0) for m in re.finditer(r"\b(?:sk|sjd_kernels)(?:\.[A-Za-z_]\w*)+", text)}


@pytest.mark.parametrize("doc", DOCS)
def test_sk_and_sjd_kernels_names_exist(doc):
    bad = []
    for name in sorted(_doc_dotted_names(doc)):
        full = "sjd_kernels" + name[2:] if name.startswith("sk.") else name
        if full in NAME_EXCEPTIONS:
            continue
        try:
            _resolve(full)
        except (ImportError, AttributeError) as e:
            bad.append(f"{name} ({type(e).__name__}: {e})")
    assert not bad, f"{doc} names what does not exist: {bad}"


def test_quoted_backend_names_are_registered():
    from sjd_kernels.bench import cases
    backends = {b for bench in cases.OPS.values() for b in bench.backends}
    bad = []
    for doc in DOCS:
        for span in _spans(_text(doc)):
            if not re.fullmatch(r"(cuda|triton|chain)[_*][\w*]*", span):
                continue
            if span in BACKEND_LIKE:
                if span not in (ROOT / BACKEND_LIKE[span]).read_text():
                    bad.append(f"{doc}: {span} (not in {BACKEND_LIKE[span]} any more)")
            elif not any(fnmatch.fnmatchcase(b, span) for b in backends):
                bad.append(f"{doc}: {span}")
    assert not bad, f"backend names no bench op registers: {bad}"


# Where a bare name in a backtick call (``generate(...)``, ``load(race=True)``) is looked up, in order.
BARE_NAME_MODULES = ("sjd_kernels", "sjd_kernels.decoding", "sjd_kernels.sjd2", "sjd_kernels.models.hf",
                     "sjd_kernels.cuda.jacobi_step", "sjd_kernels.cuda.sim")
SHORT_ROOTS = {"sk": "sjd_kernels", "sjd_kernels": "sjd_kernels", "sim": "sjd_kernels.cuda.sim",
               "cuda": "sjd_kernels.cuda"}


def _dotted(node) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return None if base is None else f"{base}.{node.attr}"
    return None


def _callee(dotted: str, namespace: dict):
    """``(object, needs_self)`` for a call target of the package, or None for anything else
    (torch, builtins, C macros, formulas)."""
    root, *attrs = dotted.split(".")
    if root in namespace:
        obj = namespace[root]
    elif root in SHORT_ROOTS:
        obj = importlib.import_module(SHORT_ROOTS[root])
    else:
        mods = [importlib.import_module(m) for m in BARE_NAME_MODULES]
        owner = next((m for m in mods if hasattr(m, root)), None)
        if owner is None:
            return None
        obj = getattr(owner, root)
    parent = None
    for a in attrs:
        parent = obj
        if inspect.ismodule(obj) and not hasattr(obj, a):
            try:
                importlib.import_module(f"{obj.__name__}.{a}")
            except ImportError:
                pass
        obj = getattr(obj, a)                                           # AttributeError: a renamed name
    home = obj.__name__ if inspect.ismodule(obj) else (getattr(obj, "__module__", None) or "")
    if not home.startswith("sjd_kernels"):
        return None
    needs_self = (inspect.isclass(parent) and inspect.isfunction(inspect.getattr_static(parent, attrs[-1], None)))
    return obj, needs_self


def _check_call(call: ast.Call, namespace: dict, where: str, bad: list):
    dotted = _dotted(call.func)
    if dotted is None:
        return
    try:
        found = _callee(dotted, namespace)
    except (ImportError, AttributeError) as e:
        bad.append(f"{where}: {dotted} does not exist ({e})")
        return
    if found is None:
        return
    obj, needs_self = found
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return
    kws = {k.arg: None for k in call.keywords if k.arg}
    open_ended = any(isinstance(a, ast.Starred) or (isinstance(a, ast.Constant) and a.value is Ellipsis)
                     for a in call.args)
    pos = [] if open_ended else [None] * (len(call.args) + needs_self)
    try:
        if open_ended:
            params = sig.parameters
            if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
                unknown = [k for k in kws if k not in params or params[k].kind is params[k].POSITIONAL_ONLY]
                if unknown:
                    raise TypeError(f"unexpected keyword(s) {unknown}")
        else:
            sig.bind_partial(*pos, **kws)
    except TypeError as e:
        bad.append(f"{where}: {ast.unparse(call)} does not fit {dotted}{sig} ({e})")


@pytest.mark.parametrize("doc", DOCS)
def test_calls_in_backticks_fit_signatures(doc):
    """``name(args, kw=...)`` spans: the keywords exist and the positional count fits (``...`` among
    the positional arguments stands for any number of them)."""
    bad, checked = [], 0
    for span in _spans(_text(doc)):
        if not re.fullmatch(r"[A-Za-z_][\w.]*\(.*\)", span):
            continue
        try:
            node = ast.parse(span, mode="eval").body
        except SyntaxError:
            continue                                                    # notation, not Python
        if isinstance(node, ast.Call):
            checked += 1
            _check_call(node, {}, doc, bad)
    assert checked or doc != "README.md", "no call found in the README's spans (the extraction broke)"
    assert not bad, bad


def test_readme_python_blocks_fit_signatures():
    """The README's Python blocks: their imports run and every call of a package function fits its
    signature (the blocks themselves need a GPU and a model, so they are not run)."""
    bad, blocks = [], [body for lang, body in _blocks(_text("README.md")) if lang == "python"]
    assert blocks
    namespace: dict = {"sk": importlib.import_module("sjd_kernels")}
    for i, body in enumerate(blocks):
        tree = ast.parse(body)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                exec(compile(ast.Module([node], []), f"README python block {i}", "exec"), namespace)
        namespace = {k: v for k, v in namespace.items() if k != "__builtins__"}
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                _check_call(node, namespace, f"README python block {i}", bad)
    assert not bad, bad
