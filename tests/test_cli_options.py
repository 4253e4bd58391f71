"""Issue 14, "no traceback anywhere": every option of every script that takes a value is fed an invalid value,
and the script answers with ONE line on stderr naming the option (or the offending path), a non-zero exit
code and no traceback.

The options come from each script's ``build_parser()`` (argparse actions: type, choices, metavar, help);
a script without one is read from its ``--help`` text instead. Invalid values follow the action: a plain
``int`` gets "-5" (negative counts were silently accepted), a plain ``float`` "nan", a checked type the first
of "-5", "nan", "bogus" that it refuses ("nan" first when it takes fractions), ``choices`` "bogus", an output folder an existing FILE and an output
file an existing FOLDER. Free text and input paths are left out (no value is invalid for argparse there).

Cost: one subprocess per script and kind of option (a fresh interpreter, the real entry point, ~1-2 s each);
the other options of the same kind are parsed in process by the same parser (same type, same error path).
Every run gets harmless companion arguments (missing inputs, outputs in tmp) so that an option the script
fails to refuse can neither start real work nor write into the project.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["01_download_data.py", "02_export_model.py", "03_vanilla_benchmark.py", "04_onnx_benchmark.py",
           "05_optimized_python_benchmark.py", "06_inferenceAndPassport.py", "07_compare_vanilla_vs_optimized.py",
           "08_visualize_passport.py", "09_visualize_spine.py", "registration/register.py", "registration/evaluate.py"]
OUTPUT_FLAGS = {"--out", "--out-dir", "--result", "--config-out"}
TIMEOUT_S = 120

# Harmless companions per script: inputs that do not exist, outputs in the test's tmp folder (never the
# project's benchmarks/ or ct_data/). The option under test replaces its own companion.
COMPANIONS: dict[str, dict[str, str]] = {
    "01_download_data.py": {"--from": "missing_scans", "--out": "ct_data"},
    "02_export_model.py": {"--model-dir": "missing_model", "--out": "model.onnx"},
    "07_compare_vanilla_vs_optimized.py": {"--results": "missing_result.json", "--out-dir": "comparison"},
    "08_visualize_passport.py": {"--passport": "missing_passport.json", "--out": "passport.png"},
    "09_visualize_spine.py": {"--passport": "missing_passport.json", "--out": "spine.png"},
    "registration/register.py": {"--fixed-passport": "missing_a.json", "--moving-passport": "missing_b.json",
                                 "--out": "registration"},
    "registration/evaluate.py": {"--ct": "missing_ct.nii.gz", "--labels": "missing_seg.nii.gz",
                                 "--out": "evaluation.json"},
}
for _stage in ("03_vanilla_benchmark.py", "04_onnx_benchmark.py", "05_optimized_python_benchmark.py",
               "06_inferenceAndPassport.py"):
    COMPANIONS[_stage] = {"--input": "missing_input", "--out": "masks", "--result": "result.json"}
COMPANIONS["05_optimized_python_benchmark.py"] |= {"--reference": "missing_reference.json",
                                                   "--config-out": "config.json"}


@dataclass(frozen=True)
class Case:
    """One option of one script and the invalid value it gets ("FILE"/"FOLDER": made at run time)."""

    script: str
    flag: str
    value: str
    kind: str  # dedupe key: the type's name, "choices", or the output flag itself
    in_process: bool  # parse with build_parser() in this process (a subprocess for the first of its kind)

    @property
    def id(self) -> str:
        return f"{Path(self.script).stem}{self.flag}={self.value}"


def module_name(script: str) -> str:
    return script.removesuffix(".py").replace("/", ".")


def long_flag(option_strings: list[str]) -> str:
    return max(option_strings, key=len)


def output_value(flag: str, metavar: str | None, help_text: str) -> str | None:
    """"FILE" (put an existing file there) for an output folder, "FOLDER" for an output file, None otherwise."""
    if flag not in OUTPUT_FLAGS:
        return None
    folder = "DIR" in (metavar or "") or re.search(r"\b(folder|directory)\b", help_text or "") is not None
    return "FILE" if folder else "FOLDER"


def refused(type_fn, text: str) -> bool:
    try:
        type_fn(text)
    except (argparse.ArgumentTypeError, ValueError, TypeError):
        return True
    return False


def invalid_value(action: argparse.Action) -> tuple[str, str] | None:
    """(invalid value, kind) for an argparse action, or None when argparse cannot refuse anything there."""
    flag = long_flag(action.option_strings)
    out = output_value(flag, action.metavar, action.help)
    if out:
        return out, flag
    if action.choices is not None:
        return "bogus", "choices"
    if action.type is int:
        return "-5", "int"
    if action.type is float:
        return "nan", "float"
    if callable(action.type):
        fractional = not refused(action.type, "0.5")  # a float type: NaN is its classic hole
        for text in ("nan", "-5", "bogus") if fractional else ("-5", "nan", "bogus"):
            if refused(action.type, text):
                return text, getattr(action.type, "__qualname__", repr(action.type))
    return None


def cases_from_parser(script: str, parser: argparse.ArgumentParser) -> list[Case]:
    cases, seen = [], set()
    for action in parser._actions:  # argparse has no public listing of its actions
        if not action.option_strings or action.nargs == 0:  # positionals, store_true, help
            continue
        found = invalid_value(action)
        if found:
            value, kind = found
            cases.append(Case(script, long_flag(action.option_strings), value, kind, in_process=kind in seen))
            seen.add(kind)
    return cases


HELP_OPTION = re.compile(r"^  (?:-\w, )?(--[\w-]+)(?: (\S+))?(?:\s{2,}(.*))?$")


def cases_from_help(script: str) -> list[Case]:
    """The fallback for a script without build_parser(): its --help text, every case run as a subprocess."""
    done = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, encoding="utf-8",
                          errors="replace", timeout=TIMEOUT_S, env=environment())
    options: list[list[str]] = []
    for line in done.stdout.splitlines():
        match = HELP_OPTION.match(line)
        if match:
            options.append([match.group(1), match.group(2) or "", match.group(3) or ""])
        elif options and line.startswith("    "):
            options[-1][2] += " " + line.strip()
    cases = []
    for flag, metavar, help_text in options:
        if not metavar or flag == "--help":
            continue
        out = output_value(flag, metavar, help_text)
        if out:
            cases.append(Case(script, flag, out, flag, in_process=False))
        elif metavar.startswith("{"):
            cases.append(Case(script, flag, "bogus", "choices", in_process=False))
        elif metavar in ("N", "S") or re.search(r"\(default:? -?\d", help_text):
            cases.append(Case(script, flag, "-5", "number", in_process=False))
    return cases


def collect() -> list[Case]:
    cases = []
    for script in SCRIPTS:
        try:
            build = getattr(importlib.import_module(module_name(script)), "build_parser", None)
        except Exception:  # noqa: BLE001 - a script that does not import is still tested through --help
            build = None
        cases += cases_from_parser(script, build()) if build else cases_from_help(script)
    return cases


def environment() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "LANG"}


CASES = collect()


def argv_for(case: Case, tmp_path: Path) -> tuple[list[str], str]:
    """Command-line arguments (companions + the option under test) and the text the error line must name."""
    argv = []
    for flag, name in COMPANIONS.get(case.script, {}).items():
        if flag != case.flag:
            argv += [flag, str(tmp_path / name)]
    value, needle = case.value, case.flag
    if case.value == "FILE":
        value = needle = str(tmp_path / "a_file")
        Path(value).write_text("a file, not a folder\n", encoding="utf-8")
    elif case.value == "FOLDER":
        value = needle = str(tmp_path / "a_folder")
        Path(value).mkdir()
    return [*argv, case.flag, value], needle


def check_one_line(code: int | None, output: str, errors: str, needle: str) -> None:
    lines = [ln for ln in errors.splitlines() if ln.strip()]
    assert "Traceback" not in output + errors, errors
    assert code not in (0, None), f"exit code {code}; stderr: {errors!r}"
    assert len(lines) == 1, f"{len(lines)} lines on stderr: {errors!r}"
    assert needle in lines[0], f"the error line does not name {needle}: {lines[0]!r}"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_invalid_option_value_gives_one_line(case: Case, tmp_path):
    argv, needle = argv_for(case, tmp_path)
    if case.in_process:
        parser = importlib.import_module(module_name(case.script)).build_parser()
        errors = io.StringIO()
        with contextlib.redirect_stderr(errors), pytest.raises(SystemExit) as stop:
            parser.parse_args(argv)
        check_one_line(stop.value.code, "", errors.getvalue(), needle)
        return
    done = subprocess.run([sys.executable, case.script, *argv], cwd=ROOT, capture_output=True, encoding="utf-8",
                          errors="replace", timeout=TIMEOUT_S, env=environment())
    check_one_line(done.returncode, done.stdout, done.stderr, needle)


def test_every_script_is_covered():
    """Each script contributes cases (a parser that lost its options would silently test nothing)."""
    assert {c.script for c in CASES} == set(SCRIPTS)
