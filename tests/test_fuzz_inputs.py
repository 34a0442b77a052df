"""Seeded fuzzing of the scripts' entry points with malformed inputs and damaged artefacts.

Every case calls scripts/predict.py, scripts/evaluate.py or scripts/train_fold.py through
`main(argv)` in-process, on one tiny trained run shared by the module, and checks the contract of
esmfold_peft.runtime.errors: no traceback, the documented exit code, a one-line "error:" naming
the file/flag/key for exit 2, the failed inputs named for exit 1, no partial output, and no write
outside --out. The families and their cases are built in fuzz_cases.py (seed `fuzz_cases.SEED`).

All cases run once, in the module fixture `fuzz_results`; each family's test then asserts that
none of its cases broke the contract, listing every case that did. The per-family table (cases,
crashes, silent acceptances, partial outputs) is printed at the end of the module and written to
/tmp/fuzz_table.md; the failing cases with what happened go to /tmp/fuzz_findings.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import random
import time
from pathlib import Path

import pytest
import torch

import fuzz_cases as fz
from fold_fixtures import write_tiny_config_file

TABLE_PATH = Path("/tmp/fuzz_table.md")
FINDINGS_PATH = Path("/tmp/fuzz_findings.md")
MIN_CASES = 300


def _fingerprint(directory: Path) -> dict:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def fuzz_context(tiny_lorta_run, tmp_path_factory):
    """The session's tiny trained run, which every case only reads, and a tiny config file."""
    config_py = write_tiny_config_file(tmp_path_factory.mktemp("fuzz_config"), steps=1)
    return fz.Context(run_dir=tiny_lorta_run, config_py=config_py, scripts=fz.load_scripts())


@pytest.fixture(scope="module")
def fuzz_results(fuzz_context, tmp_path_factory, request):
    root = tmp_path_factory.mktemp("fuzz_cases")
    run_before = _fingerprint(fuzz_context.run_dir)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models; the machine is shared
    logging.disable(logging.INFO)  # the scripts' INFO logs would fill the failure report
    started = time.perf_counter()
    try:
        results = {family: fz.run_family(family, fuzz_context, root) for family in fz.FAMILIES}
    finally:
        logging.disable(logging.NOTSET)
        torch.set_num_threads(threads)
    seconds = time.perf_counter() - started
    table = fz.table(results) + f"\n{sum(map(len, results.values()))} cases in {seconds:.0f} s (seed {fz.SEED}).\n"
    TABLE_PATH.write_text(table)
    FINDINGS_PATH.write_text(fz.findings(results))
    request.addfinalizer(lambda: _show(request.config, "\n" + table + f"failing cases: {FINDINGS_PATH}"))
    return {"families": results, "run_changed": run_before != _fingerprint(fuzz_context.run_dir)}


def _show(config, text: str) -> None:
    """Print past pytest's capture (the table is for the reader of the run, failing or not)."""
    capture = config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        print(text)


def _describe(results) -> str:
    lines = []
    for r in results:
        lines.append(f"{r.case.name} [{r.case.desc[:160]}]: exit {r.code}, expected {sorted(r.case.expect)}")
        lines.extend(f"    - {v[:500]}" for v in r.violations)
    return "\n".join(lines)


@pytest.mark.parametrize("family", fz.FAMILIES)
def test_family_keeps_the_exit_code_contract(fuzz_results, family):
    results = fuzz_results["families"][family]
    failing = [r for r in results if r.violations]
    if failing:
        pytest.fail(f"{len(failing)} of {len(results)} {family} case(s) broke the contract "
                    f"(all of them in {FINDINGS_PATH}):\n" + _describe(failing), pytrace=False)


def test_enough_cases_and_the_shared_run_untouched(fuzz_results):
    counts = {family: len(results) for family, results in fuzz_results["families"].items()}
    assert sum(counts.values()) >= MIN_CASES, counts
    assert all(n >= 20 for n in counts.values()), counts
    assert not fuzz_results["run_changed"], "a case changed the shared trained run directory"


def _root_ignores_permissions(tmp_path: Path) -> bool:
    probe = tmp_path / "probe"
    probe.mkdir(mode=0o555)
    try:
        (probe / "x").write_text("")
        return True
    except PermissionError:
        return False
    finally:
        probe.chmod(0o755)


@pytest.mark.parametrize("script", [s for s, _ in fz.READ_ONLY])
def test_read_only_output_parent(request, tmp_path, script):
    """--out inside a read-only directory: exit 2 naming it (skipped where permissions are not enforced)."""
    if _root_ignores_permissions(tmp_path):
        pytest.skip(f"running as uid {os.geteuid()}, which writes into a 0o555 directory anyway, so a read-only "
                    "--out parent cannot be tested here")
    fuzz_context = request.getfixturevalue("fuzz_context")
    build = dict(fz.READ_ONLY)[script]
    d = tmp_path / "case"
    d.mkdir()
    case = build(random.Random(f"{fz.SEED}/read-only/{script}"), d, fuzz_context, "read-only")
    case.family, case.name = "outputs", f"outputs/{script}-read-only"
    try:
        result = fz.run_case(case, fuzz_context, d)
    finally:
        (d / "locked").chmod(0o755)
    if not result.ok:
        pytest.fail(_describe([result]), pytrace=False)


def _fake_case(tmp_path: Path, name: str, behave, expect=frozenset({2}), **kw):
    """A case whose 'predict' script is `behave(out)`; the harness must judge it."""
    d = tmp_path / name
    d.mkdir()
    (d / "input.fasta").write_text(">a\nMKT\n")
    out = d / "out"

    def main(argv):
        return behave(d, out)

    ctx = fz.Context(run_dir=d, config_py=d, scripts={"predict": type("Fake", (), {"main": staticmethod(main)})})
    case = fz.Case("predict", ["--out", out], frozenset(expect), out, name,
                   names=kw.pop("names", ("input.fasta",)), **kw)
    case.family, case.name = "harness", name
    return fz.run_case(case, ctx, d)


def test_the_harness_catches_each_kind_of_violation(tmp_path):
    import sys

    def error(text, code=2):
        print(text, file=sys.stderr)
        return code

    def pdb_without_summary(d, out):
        out.mkdir()
        (out / "a.pdb").write_text("ATOM\n")
        return 1

    def temporary_left(d, out):
        out.mkdir()
        (out / ".predictions.json.x1y2").write_text("{")
        return error("error: input.fasta: bad")

    def outside(d, out):
        (d / "stray.txt").write_text("x")
        return error("error: input.fasta: bad")

    def changed_input(d, out):
        (d / "input.fasta").write_text(">b\nAAAA\n")
        return error("error: input.fasta: bad")

    def traceback_printed(d, out):
        return error("Traceback (most recent call last):\n  File x\nValueError\nerror: input.fasta: bad")

    def raises(d, out):
        raise ValueError("boom")

    cases = {
        "ok": (lambda d, out: error("error: /x/input.fasta: not FASTA"), {}),
        "raises": (raises, {"crash": True}),
        "traceback": (traceback_printed, {"crash": True}),
        "internal": (lambda d, out: error("error: internal error: KeyError: 'x'", 1), {"crash": True}),
        "silent": (lambda d, out: 0, {"silent": True}),
        "wrong-code": (lambda d, out: error("error: input.fasta: bad", 1), {}),
        "two-lines": (lambda d, out: error("warning: x\nerror: input.fasta: bad"), {}),
        "unnamed": (lambda d, out: error("error: something is wrong"), {}),
        "no-error-prefix": (lambda d, out: error("input.fasta: bad"), {}),
        "pdb-without-summary": (pdb_without_summary, {"partial": True}),
        "temporary-left": (temporary_left, {"partial": True}),
        "write-outside": (outside, {}),
        "change-input": (changed_input, {}),
    }
    for name, (behave, flags) in cases.items():
        result = _fake_case(tmp_path, name, behave, expect=({1, 2} if name == "pdb-without-summary" else {2}))
        if name == "ok":
            assert result.ok, result.violations
            continue
        assert result.violations, name
        for flag, value in flags.items():
            assert getattr(result, flag) is value, (name, flag, result.violations)
