"""mutmut over the Python package (python/custom_bn): every mutant mutmut generates is run against
the tests that execute the mutated function, from a fast selection of the suite. On demand
(`make mutation-python`), not part of `make test`.

mutmut expects the package under src/ (or ./): the run stages python/custom_bn, with the built
extension, as src/custom_bn in a scratch folder beside a copy of tests/ and pytest.ini, writes
mutmut's setup.cfg there, and runs mutmut in it, so nothing in the working tree changes. The
summary (mutants, killed, survived, timeouts, ...) is printed and written to
<scratch>/summary.json; `mutmut results` / `mutmut show NAME` in the scratch folder list and show
the survivors.

Usage (from the repository root, after `make build-python`):
    .venv/bin/python tests/mutation/run_python.py [--scratch DIR] [--jobs N] [FILE ...]
FILE: module files of python/custom_bn to mutate (default: all of them).
"""

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MUTMUT = Path(sys.executable).parent / "mutmut"
# Tests that compare with torch.nn and run in seconds; together they reach every module.
TESTS = ["test_argument_cases.py", "test_convert.py", "test_errors.py", "test_fake.py",
         "test_fused.py", "test_fused_tools.py", "test_inplace.py", "test_modules.py",
         "test_transforms.py", "test_sync.py", "test_accepted_inputs.py", "test_interop.py"]
# torch.compile, torch.export and TorchScript cannot trace or script mutmut's trampolines (every
# mutated function goes through one), so the tests that compile, export or script are left out.
KEYWORDS = ("not compile and not export and not onnx and not evaluation_operator "
            "and not torchscript and not script")
# Modules whose mutants no test can judge (version strings and build facts).
SKIP = ["_build_info.py"]
# torchrun starts processes that import the package from the working tree, not mutmut's copy.
DESELECT = ["tests/python/test_sync.py::test_torchrun_launch"]


def stage(scratch: Path, files) -> None:
    if scratch.exists():
        shutil.rmtree(scratch)
    (scratch / "src").mkdir(parents=True)
    shutil.copytree(REPO / "python" / "custom_bn", scratch / "src" / "custom_bn",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "tests", scratch / "tests", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(REPO / "pytest.ini", scratch / "pytest.ini")
    extension = [p.name for p in (scratch / "src" / "custom_bn").glob("_C*.so")]
    if not extension:
        sys.exit("run `make build-python` first: python/custom_bn has no built _C extension")
    package = sorted(p.name for p in (scratch / "src" / "custom_bn").glob("*.py"))
    mutate = [f for f in (files or package) if f not in SKIP]
    also_copy = [f"src/custom_bn/{f}" for f in package if f not in mutate]
    also_copy += [f"src/custom_bn/{name}" for name in extension + ["py.typed"]]
    lines = ["[mutmut]",
             "paths_to_mutate=" + "\n    ".join(f"src/custom_bn/{f}" for f in mutate),
             "tests_dir=" + "\n    ".join(f"tests/python/{t}" for t in TESTS),
             "also_copy=" + "\n    ".join(also_copy + ["tests", "pytest.ini"]),
             "pytest_add_cli_args=" + "\n    ".join(
                 ["-p", "no:logging", "-k", KEYWORDS,
                  *(a for t in DESELECT for a in ("--deselect", t))]), ""]
    (scratch / "setup.cfg").write_text("\n".join(lines))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="*")
    parser.add_argument("--scratch", type=Path, default=Path(tempfile.gettempdir()) / "custom_bn-mutmut")
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    stage(args.scratch, args.files)
    subprocess.run([str(MUTMUT), "run", "--max-children", str(args.jobs)], cwd=args.scratch)
    results = subprocess.run([str(MUTMUT), "results", "--all", "true"], cwd=args.scratch,
                             capture_output=True, text=True).stdout
    status = Counter(line.rsplit(":", 1)[1].strip() for line in results.splitlines() if ":" in line)
    summary = {"mutants": sum(status.values()), **status}
    (args.scratch / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))
    survivors = [line.split(":")[0].strip() for line in results.splitlines() if line.endswith("survived")]
    print("\n".join(["survivors:", *survivors]) if survivors else "no survivor")
    return 0 if summary.get("killed", 0) == summary["mutants"] else 1


if __name__ == "__main__":
    sys.exit(main())
