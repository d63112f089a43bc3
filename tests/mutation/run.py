"""Mutation check of the test suite: applies each deliberate bug of tests/mutation/mutants.py to a
scratch copy of the working tree, rebuilds what the mutant's tests need, runs them, and reports
which mutants the suite catches. Run on demand; not part of `make test`.

Usage (from the repository root; takes tens of minutes for the whole list):
    nice .venv/bin/python tests/mutation/run.py [MUTANT_ID ...] [--list] [--scratch DIR]
        [--jobs N] [--skip-baseline] [--timeout SECONDS]

Without ids every mutant runs. The scratch copy (default: $TMPDIR/custom_bn-mutation) persists
between runs so that rebuilds stay incremental: it is synced with the working tree (tracked and
untracked, not ignored files) at the start, each mutant is applied, built, tested and reverted
in it, and nothing in the working tree itself is ever modified. Before the mutants, the
unmutated copy is built and every test command is run once: a command that already fails
would "catch" everything. Exit status: 0 when every mutant is caught, 1 when one survives, does
not build or its command errs, 2 when a snippet is missing or not unique (the list has rotted).
Logs of every build and test are kept in <scratch>/mutation-logs.
"""

import argparse
import filecmp
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
sys.dont_write_bytecode = True  # no __pycache__ in the working tree
from mutants import MUTANTS, Mutant  # noqa: E402

VENV_PYTHON = REPO / ".venv" / "bin" / "python"
PYTHON = str(VENV_PYTHON) if VENV_PYTHON.exists() else sys.executable
EMULATOR_BUILD = "build/mutation-emulator"  # inside the scratch copy
EMULATOR_BINARY = EMULATOR_BUILD + "/tests/cpp/emulator/custom_bn_emulator_tests"
MANIFEST = ".mutation-manifest"


class ListError(Exception):
    """The mutant list does not match the sources."""


# ------------------------------------------------------------------------------ the list


def check_snippets(mutants: List[Mutant], root: Path) -> List[str]:
    """Problems of the list against the sources under root: each snippet exactly once."""
    problems = []
    ids = [m.id for m in mutants]
    for dup in sorted({i for i in ids if ids.count(i) > 1}):
        problems.append(f"{dup}: id used twice")
    for m in mutants:
        path = root / m.file
        if not path.is_file():
            problems.append(f"{m.id}: {m.file} does not exist")
            continue
        found = path.read_text().count(m.original)
        if found != 1:
            problems.append(f"{m.id}: snippet found {found} times in {m.file} (must be once): "
                            f"{m.original!r}")
        if m.original == m.replacement:
            problems.append(f"{m.id}: replacement equals the original")
        if not m.tests:
            problems.append(f"{m.id}: no test command")
        for cmd in m.tests:
            if shlex.split(cmd)[0] not in ("pytest", "emulator"):
                problems.append(f"{m.id}: unknown command kind in {cmd!r}")
    return problems


# ------------------------------------------------------------------------------ scratch copy


def source_files() -> List[str]:
    """Tracked and untracked, not ignored files of the working tree, relative to it."""
    out = subprocess.run(["git", "-C", str(REPO), "ls-files", "-co", "--exclude-standard", "-z"],
                         check=True, capture_output=True).stdout.decode()
    return sorted({f for f in out.split("\0") if f and (REPO / f).is_file()})


def sync_scratch(scratch: Path) -> None:
    """Makes the sources of scratch equal those of the working tree. Only files whose content
    differs are copied (with a fresh mtime), so the build outputs kept in scratch stay valid
    and rebuilds are incremental; files that left the working tree are deleted."""
    scratch.mkdir(parents=True, exist_ok=True)
    files = source_files()
    manifest = scratch / MANIFEST
    previous = set(manifest.read_text().split("\n")) if manifest.exists() else set()
    for rel in sorted(previous - set(files)):
        if rel and (scratch / rel).is_file():
            (scratch / rel).unlink()
    copied = 0
    for rel in files:
        src, dst = REPO / rel, scratch / rel
        if dst.is_file() and filecmp.cmp(src, dst, shallow=False):
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
        shutil.copymode(src, dst)
        copied += 1
    manifest.write_text("\n".join(files))
    print(f"scratch copy {scratch}: {len(files)} files, {copied} updated", flush=True)


class Applied:
    """Context manager: the mutant applied to its file in scratch, reverted on exit (also on
    errors and Ctrl-C). Reverting rewrites the file, so its mtime moves on and the next build
    recompiles it: nothing built from the mutant survives."""

    def __init__(self, scratch: Path, mutant: Mutant):
        self.path = scratch / mutant.file
        self.mutant = mutant
        self.text = None

    def __enter__(self):
        self.text = self.path.read_text()
        if self.text.count(self.mutant.original) != 1:
            raise ListError(f"{self.mutant.id}: snippet not found exactly once in "
                            f"{self.mutant.file} of the scratch copy")
        self.path.write_text(self.text.replace(self.mutant.original, self.mutant.replacement))
        return self

    def __exit__(self, *exc):
        self.path.write_text(self.text)
        return False


# ------------------------------------------------------------------------------ builds and tests


class Runner:
    def __init__(self, scratch: Path, jobs: int, timeout: float):
        self.scratch = scratch
        self.jobs = jobs
        self.timeout = timeout
        self.logs = scratch / "mutation-logs"
        self.logs.mkdir(exist_ok=True)
        self.env = dict(os.environ, MAX_JOBS=str(jobs), CUSTOM_BN_WITH_CUDA="0",
                        PYTHONPATH=str(scratch / "python"), PYTHONDONTWRITEBYTECODE="1")

    def _run(self, cmd: List[str], log: str, timeout: Optional[float] = None) -> Tuple[int, str]:
        """Runs cmd in scratch at low priority; (exit status, output). -9 on timeout."""
        with open(self.logs / log, "w") as f:
            f.write("$ " + shlex.join(cmd) + "\n")
            f.flush()
            proc = subprocess.Popen(["nice", "-n", "10"] + cmd, cwd=self.scratch, env=self.env,
                                    stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # the process group this call started
                proc.wait()
                rc = -9
            except BaseException:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise
        return rc, (self.logs / log).read_text()

    def build_python(self, tag: str) -> bool:
        rc, _ = self._run([PYTHON, "setup.py", "-q", "build_ext", "--inplace"],
                          f"{tag}.build-python.log")
        return rc == 0

    def build_emulator(self, tag: str) -> bool:
        build = self.scratch / EMULATOR_BUILD
        if not (build / "build.ninja").exists():
            prefix = subprocess.run(
                [PYTHON, "-c", "import torch.utils; print(torch.utils.cmake_prefix_path)"],
                check=True, capture_output=True, text=True).stdout.strip()
            rc, _ = self._run(["cmake", "-S", ".", "-B", EMULATOR_BUILD, "-G", "Ninja",
                               "-DCMAKE_BUILD_TYPE=Release", "-DWITH_CUDA=OFF",
                               f"-DCMAKE_PREFIX_PATH={prefix}"], f"{tag}.configure.log")
            if rc != 0:
                return False
        rc, _ = self._run(["cmake", "--build", EMULATOR_BUILD, "--target",
                           "custom_bn_emulator_tests", "-j", str(self.jobs)],
                          f"{tag}.build-emulator.log")
        return rc == 0

    def build(self, kind: str, tag: str) -> bool:
        return self.build_python(tag) if kind == "pytest" else self.build_emulator(tag)

    def test(self, command: str, log: str) -> Tuple[bool, str]:
        """Runs one test command: (failed, what failed or why)."""
        kind, *args = shlex.split(command)
        if kind == "pytest":
            cmd = [PYTHON, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider"] + args
        else:
            cmd = [str(self.scratch / EMULATOR_BINARY)] + args
        rc, out = self._run(cmd, log, self.timeout)
        if rc == 0:
            return False, ""
        if rc == -9:
            return True, f"timeout after {self.timeout:.0f} s"
        if rc < 0:
            return True, f"crash ({signal.Signals(-rc).name})"
        if kind == "pytest":
            if rc == 5:
                return False, "no tests collected"
            failed = re.findall(r"^(?:FAILED|ERROR) (.+?)(?: - .*)?$", out, re.M)
            return True, failed[0] if failed else f"pytest exit {rc}"
        names = re.findall(r"^\[  FAILED  \] ([^\s,]+\.[^\s,]+)", out, re.M)
        failed = list(dict.fromkeys(names))  # each failure is listed twice
        if not failed:
            return True, f"emulator exit {rc}"
        # DeliberateBugs tests first check that the unmutated kernels pass, so any mutant
        # fails them too: name a test that compares results, when there is one.
        direct = [t for t in failed if not t.startswith("DeliberateBugs.")] or failed
        more = f" (+{len(failed) - 1} more)" if len(failed) > 1 else ""
        return True, f"emulator {direct[0]}{more}"


def command_kinds(commands) -> List[str]:
    return sorted({shlex.split(c)[0] for c in commands})


def baseline(runner: Runner, mutants: List[Mutant]) -> bool:
    """Builds the unmutated copy and runs every command of the selected mutants once."""
    commands = sorted({c for m in mutants for c in m.tests})
    for kind in command_kinds(commands):
        start = time.time()
        if not runner.build(kind, "baseline"):
            print(f"baseline: the unmutated {kind} build failed, see {runner.logs}")
            return False
        print(f"baseline: {kind} build {time.time() - start:.0f} s", flush=True)
    ok = True
    for i, command in enumerate(commands):
        start = time.time()
        failed, why = runner.test(command, f"baseline.test{i}.log")
        note = why if why else "ok"
        print(f"baseline: {command}: {'FAILS: ' + why if failed else note} "
              f"({time.time() - start:.0f} s)", flush=True)
        ok = ok and not failed and not why
    return ok


def run_mutant(runner: Runner, m: Mutant) -> Dict[str, str]:
    start = time.time()
    result = {"status": "NOT caught", "by": ""}
    built = set()
    with Applied(runner.scratch, m):
        for i, command in enumerate(m.tests):
            kind = shlex.split(command)[0]
            if kind not in built:
                if not runner.build(kind, m.id):
                    result = {"status": "build failed", "by": f"{kind} build"}
                    break
                built.add(kind)
            failed, why = runner.test(command, f"{m.id}.test{i}.log")
            if failed:
                result = {"status": "caught", "by": why}
                break
            if why:  # the command ran nothing: a defect of the list
                result = {"status": "error", "by": f"{command}: {why}"}
                break
    result["time"] = f"{time.time() - start:.0f} s"
    return result


def markdown_table(rows: List[Tuple[Mutant, Dict[str, str]]]) -> str:
    lines = ["| mutant | file | description | result | caught by | time |",
             "|---|---|---|---|---|---|"]
    for m, r in rows:
        cells = [f"`{m.id}`", f"`{m.file}`", m.description, r["status"],
                 f"`{r['by']}`" if r["by"] else "—", r["time"]]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ids", nargs="*", help="mutants to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--scratch", type=Path,
                        default=Path(tempfile.gettempdir()) / "custom_bn-mutation",
                        help="persistent scratch copy of the working tree")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="parallel compile jobs (MAX_JOBS)")
    parser.add_argument("--timeout", type=float, default=1800,
                        help="seconds per test command; a mutant that hangs a test is caught")
    parser.add_argument("--skip-baseline", action="store_true",
                        help="trust that the unmutated tests pass (saves a full run)")
    opts = parser.parse_args()

    problems = check_snippets(MUTANTS, REPO)
    if problems:
        print("mutant list does not match the sources:\n  " + "\n  ".join(problems))
        return 2
    if opts.list:
        for m in MUTANTS:
            print(f"{m.id:32} {m.file:36} {m.description}")
        return 0
    unknown = [i for i in opts.ids if i not in {m.id for m in MUTANTS}]
    if unknown:
        print("unknown mutant ids: " + ", ".join(unknown))
        return 2
    selected = [m for m in MUTANTS if not opts.ids or m.id in opts.ids]
    # Emulator-only mutants first: the emulator build also compiles the CPU library, which the
    # CPU mutants touch; this order rebuilds the library there only once.
    selected.sort(key=lambda m: command_kinds(m.tests) != ["emulator"])

    start = time.time()
    sync_scratch(opts.scratch)
    runner = Runner(opts.scratch.resolve(), opts.jobs, opts.timeout)
    if not opts.skip_baseline and not baseline(runner, selected):
        print("baseline failed: fix the suite (or the build) before judging mutants")
        return 1
    rows = []
    try:
        for n, m in enumerate(selected, 1):
            print(f"[{n}/{len(selected)}] {m.id}: {m.description}", flush=True)
            r = run_mutant(runner, m)
            print(f"    -> {r['status']}{': ' + r['by'] if r['by'] else ''} ({r['time']})",
                  flush=True)
            rows.append((m, r))
    except ListError as e:
        print(e)
        return 2
    finally:
        if rows:
            print("\n" + markdown_table(rows))
    survivors = [m.id for m, r in rows if r["status"] != "caught"]
    total = time.time() - start
    print(f"\n{len(rows) - len(survivors)}/{len(rows)} caught in {total / 60:.1f} min; logs in "
          f"{runner.logs}")
    if survivors:
        print("not caught: " + ", ".join(survivors))
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
