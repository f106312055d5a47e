"""The repo stands alone: no file points outside it, and the README's two commands are the ones CI runs."""
import os
import re
import subprocess

HERE = os.path.dirname(os.path.abspath(__file__))
# pointers to documents a reader of the repo does not have: a sibling `shared/` folder, its `spec/`
# files, section numbers of those specs, or our own tracker's issue numbers (upstream's, named with
# their project as in "Bagel #157", are public), or bug ids of another project's review
OUTSIDE = re.compile(r"\.\./shared|\bshared/spec|\bspec/|spec §|§\s?\d|\.\./DESIGN\.md|lmms_engine\.md|bagel\.md|nsa\.md|anchors\.md"
                     r"|\b[Ii]ssues? #?\d"
                     r"|\bbugs? [A-Z]\d|LMMS Engine bug")  # another project's bug ids: the reason belongs in the comment


def tracked_files() -> list[str]:
    out = subprocess.run(["git", "ls-files"], cwd=HERE, capture_output=True, text=True)
    if out.returncode:  # not a git checkout (an sdist, a copy): every file under the repo
        return [os.path.relpath(os.path.join(d, f), HERE) for d, _, fs in os.walk(HERE) if ".git" not in d
                and ".venv" not in d for f in fs]
    return out.stdout.split()


def test_no_file_refers_outside_the_repo():
    bad = []
    for name in tracked_files():
        if name.startswith("testdata/") or name == "test_repo.py":
            continue
        try:
            text = open(os.path.join(HERE, name), encoding="utf-8").read()
        except (UnicodeDecodeError, FileNotFoundError):
            continue
        bad += [f"{name}:{i}: {line.strip()[:100]}" for i, line in enumerate(text.splitlines(), 1) if OUTSIDE.search(line)]
    assert not bad, "references to documents outside the repo:\n" + "\n".join(bad)


def test_design_anchors_cited_in_the_code_exist():
    """An anchor of DESIGN.md cited in a comment must name one of its headings (GitHub's anchor rule)."""
    headings = {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
                for h in re.findall(r"^#+ (.+)$", open(os.path.join(HERE, "DESIGN.md")).read(), re.M)}
    cited = set()
    for name in tracked_files():
        if name.endswith((".py", ".md")):
            cited |= {(name, a) for a in re.findall(r"DESIGN\.md#([\w\-]+)", open(os.path.join(HERE, name)).read())}
    missing = sorted(f"{n}: #{a}" for n, a in cited if a not in headings)
    assert not missing, f"anchors not in DESIGN.md: {missing}"


def test_ci_runs_the_readme_commands():
    readme = open(os.path.join(HERE, "README.md")).read()
    first = re.search(r"```bash\n(.*?)```", readme, re.S).group(1).strip().splitlines()
    assert len(first) == 2, first  # exactly two commands: install + demo, tests
    install_and_demo, tests = first
    assert install_and_demo.endswith(" && python train.py")
    ci = open(os.path.join(HERE, ".ci", "run")).read().splitlines()
    assert install_and_demo.removesuffix(" && python train.py") in ci and tests in ci


def test_no_product_file_imports_a_test_file():
    """The product (the CLIs, their modules, bench.py, dev/) runs without the tests: shared fixtures
    live in a module of their own (golden.py), never in a test file."""
    import ast
    py = [n for n in tracked_files() if n.endswith(".py")]
    tests = {os.path.basename(n)[:-3] for n in py if os.path.basename(n).startswith("test_") or n.endswith("conftest.py")}
    bad = []
    for name in py:
        if os.path.basename(name)[:-3] in tests:
            continue
        for node in ast.walk(ast.parse(open(os.path.join(HERE, name)).read(), name)):
            mods = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                    [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            bad += [f"{name}:{node.lineno}: imports {m}" for m in mods if m.split(".")[0] in tests]
    assert not bad, "\n".join(bad)


CLIS = ("train.py", "data.py", "sample.py", "convert_weights.py", "bench.py")


def shown_commands(doc: str) -> list[tuple[str, list[str]]]:
    """(script, its arguments) of every `python X.py ...` / `torchrun ... X.py ...` line of one of the
    CLIS in the bash blocks of `doc`, with continuation lines joined and comments dropped."""
    import shlex
    text = open(os.path.join(HERE, doc)).read()
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            for i, w in enumerate(words):
                if w in CLIS:
                    args = words[i + 1:]
                    ends = [j for j, a in enumerate(args) if a in ("&&", "|", ";", ">", "2>&1")]  # shell, not ours
                    out.append((w, args[:ends[0]] if ends else args))
                    break
    return out


def test_readme_links_resolve():
    readme = open(os.path.join(HERE, "README.md")).read()
    links = [l.split("#")[0] for l in re.findall(r"\]\(([^)\s]+)\)", readme) if "://" not in l]
    assert links, "the README links its docs"
    missing = [l for l in links if not os.path.exists(os.path.join(HERE, l))]
    assert not missing, f"README links to files that do not exist: {missing}"
    for name in os.listdir(os.path.join(HERE, "docs")):  # and the docs' own relative links
        if name.endswith(".md"):
            text = open(os.path.join(HERE, "docs", name)).read()
            bad = [l for l in re.findall(r"\]\(([^)\s#]+)(?:#[^)]*)?\)", text) if "://" not in l
                   and not os.path.exists(os.path.join(HERE, "docs", l))]
            assert not bad, f"docs/{name} links to files that do not exist: {bad}"


def test_readme_commands_parse():
    """Every command the README and docs/ show parses with its script's CLI (no renamed or misspelt flag)."""
    import importlib
    import tyro
    readme = shown_commands("README.md")
    assert {s for s, _ in readme} >= {"train.py", "data.py", "sample.py", "convert_weights.py"}, readme
    docs = [c for n in sorted(os.listdir(os.path.join(HERE, "docs"))) if n.endswith(".md")
            for c in shown_commands(os.path.join("docs", n))]
    for script, argv in readme + docs:
        mod = importlib.import_module(script.removesuffix(".py"))
        try:
            if hasattr(mod, "parse_args"):
                mod.parse_args(argv)
            else:
                tyro.cli(mod.Args, args=argv)
        except SystemExit as e:
            raise AssertionError(f"`{script} {' '.join(argv)}` (README or docs/) does not parse (exit {e.code})") from None
