"""Seeded fuzz cases for the scripts' entry points, and the harness that runs and judges them.

Used by test_fuzz_inputs.py. Each family is a list of (kind, count, builder); a builder gets its
own `random.Random` (seeded from SEED, the family, the kind and the index, so adding cases to one
kind reshuffles nothing else) and an empty case directory, writes the inputs there and returns a
`Case`: the script, its argv, the exit codes the contract allows and what the messages must name.
`run_case` calls the script's `main(argv)` in-process (cwd = the case directory, stdout/stderr
captured) and checks, for every case:

  (a) no traceback in stdout/stderr, no exception out of main(), no "internal error";
  (b) the exit code is one the contract documents for this input;
  (c) exit 2: one line "error: ..." naming the offending file (basename), flag or key
      (argparse's own "usage: ... / prog: error: ..." is accepted and counted separately);
      exit 1: every failed input (file basename, or FASTA "(line N)") named on stderr;
  (d) no partial output: predict writes predictions.json listing every .pdb/.json it wrote, or
      no .pdb at all; evaluate writes a parseable report.json + report.md, or nothing; no
      temporaries (names starting with '.') are left in the output directory;
  (e) nothing is written or changed in the case directory outside --out (caches named in
      `Case.ignore` excepted).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import random
import re
import shutil
import stat
import string
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
SEED = 20240611
TRACEBACK = "Traceback (most recent call last)"
PROGRESS_BAR = re.compile(r"\d+%\|.*\| *\d+/\d+ \[")
STANDARD = "ACDEFGHIKLMNPQRSTVWY"
THREE = {"A": "ALA", "C": "CYS", "D": "ASP", "E": "GLU", "F": "PHE", "G": "GLY", "H": "HIS", "I": "ILE",
         "K": "LYS", "L": "LEU", "M": "MET", "N": "ASN", "P": "PRO", "Q": "GLN", "R": "ARG", "S": "SER",
         "T": "THR", "V": "VAL", "W": "TRP", "Y": "TYR"}
FAMILIES = ("fasta", "pdb", "artefacts", "outputs", "flags")


# --- cases and results ---------------------------------------------------------------------------

@dataclass
class Case:
    script: str                      # "predict" | "evaluate" | "train"
    argv: list
    expect: frozenset                # exit codes the contract allows for this input
    out: Path                        # the --out of the call
    desc: str                        # what the input is, for the findings
    names: tuple = ()                # exit 2: one of these must be in the error line
    failed: tuple = ()               # exit 1: each of these must be on stderr (the failed inputs)
    damaged: bool = True             # exit 0 here is a silent acceptance ...
    warn_ok: bool = False            # ... unless this is set and a "warning:" line was printed
    predicted: tuple = ()            # predict, exit 0/1: these record ids must have been predicted
    chains: Optional[int] = None     # evaluate, exit 0/1: this many chains must have been scored
    ignore: tuple = ()               # paths outside --out the script may write (caches)
    check: Optional[Callable] = None  # check(case, result) -> list of extra violations
    family: str = ""
    name: str = ""


@dataclass
class Result:
    case: Case
    code: Optional[int]
    stdout: str
    stderr: str
    seconds: float
    exception: Optional[str] = None
    argparse_exit: bool = False
    progress_bars: bool = False      # progress bars on stderr although --quiet / --no-progress was given
    violations: list = field(default_factory=list)
    crash: bool = False
    silent: bool = False
    partial: bool = False

    @property
    def ok(self) -> bool:
        return not self.violations


@dataclass
class Context:
    run_dir: Path          # the shared tiny trained run (never modified)
    config_py: Path        # a tiny training config file for train_fold.py --config
    scripts: dict          # "predict" | "evaluate" | "train" -> the loaded script module
    index: int = 0         # the index of the case being built within its kind
    _ckpt: object = None

    def checkpoint(self):
        """The shared run's last.pt as torch loads it (loaded once)."""
        if self._ckpt is None:
            import torch
            self._ckpt = torch.load(self.run_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
        return self._ckpt


def load_scripts() -> dict:
    from fold_fixtures import load_script

    return {key: load_script(name) for key, name in (("predict", "predict"), ("evaluate", "evaluate"),
                                                      ("train", "train_fold"))}


# --- running and judging ---------------------------------------------------------------------------

def _under(path: Path, root: Path) -> bool:
    try:
        Path(path).relative_to(root)
        return True
    except ValueError:
        return False


def snapshot(root: Path, exclude: list) -> dict:
    """rel path -> (type, size, mtime_ns) for everything under `root` except the `exclude` subtrees."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        keep = []
        for name in dirnames + filenames:
            path = here / name
            if any(_under(path, e) for e in exclude):
                continue
            try:
                st = os.lstat(path)
            except OSError:
                continue
            kind = stat.S_IFMT(st.st_mode)
            found[str(path.relative_to(root))] = (kind, st.st_size, st.st_mtime_ns) if stat.S_ISREG(kind) else (kind,)
            if name in dirnames and stat.S_ISDIR(kind):
                keep.append(name)
        dirnames[:] = keep
    return found


def _real_dir(path: Path) -> bool:
    """A directory, not a symlink to one (False for names the system refuses, e.g. too long)."""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def _exit_code(value) -> int:
    if value is None:
        return 0
    return value if isinstance(value, int) else 1


def run_case(case: Case, ctx: Context, case_dir: Path) -> Result:
    out_existed = os.path.lexists(case.out)
    out_was_dir = _real_dir(case.out)
    exclude = [Path(p) for p in case.ignore] + ([case.out] if (not out_existed or out_was_dir) else [])
    before = snapshot(case_dir, exclude)
    before_out = set(snapshot(case.out, [])) if out_was_dir else set()
    stdout, stderr = io.StringIO(), io.StringIO()
    code, exception, argparse_exit = None, None, False
    debug = os.environ.pop("ESMFOLD_PEFT_DEBUG", None)
    cwd = os.getcwd()
    started = time.perf_counter()
    try:
        os.chdir(case_dir)
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                code = ctx.scripts[case.script].main([str(a) for a in case.argv])
            except SystemExit as exc:
                code, argparse_exit = _exit_code(exc.code), True
            except Exception as exc:  # main() must never raise: a crash
                exception = "".join(traceback.format_exception_only(type(exc), exc)).strip()
    finally:
        os.chdir(cwd)
        if debug is not None:
            os.environ["ESMFOLD_PEFT_DEBUG"] = debug
    result = Result(case, code, stdout.getvalue(), stderr.getvalue(), time.perf_counter() - started,
                    exception, argparse_exit)
    judge(result, before, snapshot(case_dir, exclude), out_existed, before_out, case_dir)
    return result


def judge(r: Result, before: dict, after: dict, out_existed: bool, before_out: set, case_dir: Path) -> None:
    case, v = r.case, r.violations
    text = r.stdout + r.stderr
    err_lines = [line for line in r.stderr.replace("\r", "\n").splitlines() if line.strip()]
    bars = [line for line in err_lines if PROGRESS_BAR.search(line)]
    if bars:  # tqdm bars are not messages; noted (with --quiet/--no-progress there should be none), not judged
        err_lines = [line for line in err_lines if line not in bars]
        r.progress_bars = any(flag in map(str, case.argv) for flag in ("--quiet", "--no-progress"))

    # (a) no traceback, no exception, no internal error
    if r.exception is not None:
        r.crash = True
        v.append(f"main() raised {r.exception[:300]}")
    if TRACEBACK in text:
        r.crash = True
        v.append("traceback printed")
    if "internal error" in r.stderr:
        r.crash = True
        v.append(next((l for l in err_lines if "internal error" in l), "internal error")[:300])
    if r.exception is None and not isinstance(r.code, int):
        v.append(f"main() returned {r.code!r}, not an int")

    # (b) the documented exit code
    if r.code is not None and r.code not in case.expect:
        if r.code == 0 and case.damaged:
            if case.warn_ok and 1 in case.expect and any(l.startswith("warning:") for l in err_lines):
                pass  # flagged, as documented
            else:
                r.silent = True
                v.append(f"silent acceptance: exit 0, expected {sorted(case.expect)}")
        else:
            v.append(f"exit {r.code}, expected {sorted(case.expect)}")
    elif r.code == 0 and case.damaged and case.warn_ok and not any(l.startswith("warning:") for l in err_lines):
        r.silent = True
        v.append("silent acceptance: exit 0 without a warning line")

    # (c) messages
    if r.code == 2:
        if r.argparse_exit:
            error_line = next((l for l in reversed(err_lines) if re.match(r"^\S+: error: ", l)), None)
            if error_line is None:
                v.append(f"argparse exit 2 without a 'prog: error:' line: {err_lines[-3:]}")
                error_line = ""
        else:
            error_line = err_lines[0] if err_lines else ""
            if len(err_lines) != 1 or not error_line.startswith("error: "):
                v.append(f"exit 2 should print one line 'error: ...'; stderr had {len(err_lines)} line(s): "
                         f"{[l[:160] for l in err_lines[:4]]}")
        if case.names and not any(n in error_line for n in case.names):
            v.append(f"error line names none of {[n[:60] for n in case.names]}: {error_line[:300]!r}")
    if r.code == 1:
        missing = [n for n in case.failed if n not in r.stderr]
        if missing:
            v.append(f"exit 1 but stderr does not name {[m[:60] for m in missing]}: {err_lines[-4:]}")

    # (d) outputs
    out = case.out
    if _real_dir(out):
        new = set(snapshot(out, [])) - before_out
        temps = sorted(p for p in new if any(part.startswith(".") for part in Path(p).parts))
        if temps:
            r.partial = True
            v.append(f"temporary files left in --out: {temps[:5]}")
        if case.script == "predict":
            _judge_predict(r, out, new)
        elif case.script == "evaluate":
            _judge_evaluate(r, out, new, out_existed)
    elif r.code in (0, 1) and case.script in ("predict", "evaluate"):
        v.append(f"exit {r.code} but --out {out.name[:60]} is not a directory")

    # (e) nothing written or changed outside --out
    added = sorted(set(after) - set(before))
    changed = sorted(p for p in set(after) & set(before) if after[p] != before[p])
    removed = sorted(set(before) - set(after))
    if added:
        v.append(f"wrote outside --out: {added[:5]}")
    if changed:
        v.append(f"changed outside --out: {changed[:5]}")
    if removed:
        v.append(f"removed outside --out: {removed[:5]}")

    if case.check is not None and not r.crash:
        v.extend(case.check(case, r))


def _judge_predict(r: Result, out: Path, new: set) -> None:
    case, v = r.case, r.violations
    pdbs = {p for p in new if p.endswith(".pdb")}
    subdirs = sorted(p for p in new if (out / p).is_dir())
    if subdirs:
        v.append(f"predict made sub-directories in --out: {subdirs[:5]}")
    summary_path = out / "predictions.json"
    if "predictions.json" in new:
        try:
            summary = json.loads(summary_path.read_text())
            listed = {p["pdb"] for p in summary["predictions"]}
            ids = [p["id"] for p in summary["predictions"]]
        except (ValueError, KeyError, TypeError) as exc:
            r.partial = True
            v.append(f"predictions.json unreadable: {exc}")
            return
        jsons = {p for p in new if p.endswith(".json") and p != "predictions.json" and not p.endswith(".pae.json")}
        unlisted = sorted((pdbs - listed) | (jsons - {Path(p).with_suffix(".json").name for p in listed}))
        if unlisted:
            r.partial = True
            v.append(f"files in --out not listed in predictions.json: {unlisted[:5]}")
        absent = sorted(p for p in listed if not (out / p).is_file())
        if absent:
            r.partial = True
            v.append(f"predictions.json lists missing files: {absent[:5]}")
        if r.code in (0, 1):
            lost = [i for i in case.predicted if i not in ids]
            if lost:
                v.append(f"valid record(s) not predicted: {[i[:40] for i in lost]}")
        if r.code == 2 and pdbs:
            r.partial = True
            v.append(f"exit 2 after writing {len(pdbs)} .pdb file(s)")
    else:
        if pdbs:
            r.partial = True
            v.append(f".pdb files without predictions.json: {sorted(pdbs)[:5]}")
        if r.code in (0, 1) and not r.crash:
            v.append(f"exit {r.code} without predictions.json")


def _judge_evaluate(r: Result, out: Path, new: set, out_existed: bool) -> None:
    case, v = r.case, r.violations
    if r.code in (0, 1) and not r.crash:
        try:
            report = json.loads((out / "report.json").read_text(),
                                parse_constant=lambda c: (_ for _ in ()).throw(ValueError(f"{c} in JSON")))
            n_chains = len(report["chains"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            r.partial = True
            v.append(f"exit {r.code} without a valid report.json: {str(exc)[:200]}")
            return
        if not (out / "report.md").is_file():
            r.partial = True
            v.append("report.json without report.md")
        if case.chains is not None and n_chains != case.chains:
            v.append(f"{n_chains} chain(s) scored, expected {case.chains}")
    elif r.code == 2 and ("report.json" in new or "report.md" in new):
        r.partial = True
        v.append("exit 2 after writing a report")


# --- small writers ----------------------------------------------------------------------------------

def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def replace_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` without touching another hard link of it."""
    if os.path.lexists(path):
        path.unlink()
    path.write_bytes(data)


def rewrite_sidecar(path: Path) -> None:
    """Record the file's current digest (as the project does), so the content check is what is tested."""
    replace_bytes(sidecar(path), (json.dumps({"sha256": sha256_bytes(path.read_bytes()), "previous": None}) + "\n")
                  .encode())


def link_copy(src: Path, dst: Path) -> Path:
    """A copy of a run directory made of hard links (cheap); damage files with `replace_bytes`."""
    shutil.copytree(src, dst, copy_function=os.link)
    return dst


def rand_seq(rng: random.Random, lo: int = 5, hi: int = 14) -> str:
    return "".join(rng.choice(STANDARD) for _ in range(rng.randint(lo, hi)))


def rand_word(rng: random.Random, lo: int = 3, hi: int = 8,
              alphabet: str = string.ascii_letters + string.digits) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(lo, hi)))


def wrap(seq: str, width: int) -> list:
    return [seq[i:i + width] for i in range(0, len(seq), width)] or [""]


def fasta_text(records: list, rng: random.Random, newline: str = "\n") -> tuple:
    """(text, header line numbers) for records given as (header, sequence lines)."""
    lines, numbers = [], []
    for header, seq_lines in records:
        if rng.random() < 0.2:
            lines.append("")
        numbers.append(len(lines) + 1)
        lines.append(">" + header)
        lines.extend(seq_lines)
    return newline.join(lines) + newline, numbers


def predict_argv(ctx: Context, fasta: Path, out: Path, rng: random.Random, run: Optional[Path] = None,
                 extra: tuple = ()) -> list:
    argv = ["--fasta", fasta, "--run", run or ctx.run_dir, "--out", out, "--quiet"]
    if rng.random() < 0.5:
        argv.append("--no-merge")
    return argv + list(extra)


def write_valid_fasta(d: Path, rng: random.Random) -> tuple:
    path = d / "in.fasta"
    rid = "p" + rand_word(rng)
    path.write_text(f">{rid}\n{rand_seq(rng, 6, 10)}\n")
    return path, rid


# --- structures --------------------------------------------------------------------------------------

MMCIF_COLUMNS = ["group_PDB", "id", "type_symbol", "label_atom_id", "label_alt_id", "label_comp_id", "label_asym_id",
                 "label_seq_id", "pdbx_PDB_ins_code", "Cartn_x", "Cartn_y", "Cartn_z", "occupancy",
                 "B_iso_or_equiv", "auth_seq_id", "auth_asym_id", "pdbx_PDB_model_num"]
MMCIF_REQUIRED = ("group_PDB", "id", "label_atom_id", "label_comp_id", "Cartn_x", "Cartn_y", "Cartn_z",
                  "auth_asym_id")


def random_chain(rng: random.Random, lo: int = 20, hi: int = 36):
    import numpy as np
    n = rng.randint(lo, hi)
    seq = "".join(rng.choice(STANDARD) for _ in range(n))
    gen = np.random.default_rng(rng.randrange(1 << 30))
    steps = gen.normal(size=(n, 3))
    ca = np.cumsum(3.8 * steps / np.linalg.norm(steps, axis=1, keepdims=True), axis=0)
    return seq, ca


def noisy(rng: random.Random, ca, scale: float = 0.8):
    import numpy as np
    return ca + np.random.default_rng(rng.randrange(1 << 30)).normal(scale=scale, size=ca.shape)


def pdb_lines(seq: str, ca, chain: str = "A", start: int = 1, b: float = 70.0) -> list:
    lines = []
    for i, (aa, (x, y, z)) in enumerate(zip(seq, ca)):
        lines.append(f"ATOM  {i + 1:5d}  CA  {THREE[aa]} {chain}{start + i:4d}    {x:8.3f}{y:8.3f}{z:8.3f}"
                     f"  1.00{b:6.2f}           C")
    return lines


def pdb_text(seq, ca, chain="A", start=1) -> str:
    return "\n".join(pdb_lines(seq, ca, chain, start) + ["END"]) + "\n"


def _cif_token(value: str) -> str:
    if value == "" or any(c.isspace() for c in value) or value[0] in "_#$'\";[]":
        return "'" + value.replace("'", "") + "'" if "'" not in value else '"' + value + '"'
    return value


def mmcif_rows(seq, ca, chain="A", start=1) -> list:
    rows = []
    for i, (aa, (x, y, z)) in enumerate(zip(seq, ca)):
        rows.append(["ATOM", str(i + 1), "C", "CA", ".", THREE[aa], chain, str(start + i), "?", f"{x:.3f}",
                     f"{y:.3f}", f"{z:.3f}", "1.00", "70.00", str(start + i), chain, "1"])
    return rows


def mmcif_text(rows: list, columns: list = MMCIF_COLUMNS) -> str:
    body = "\n".join(" ".join(_cif_token(v) for v in row) for row in rows)
    return ("data_FUZZ\n#\nloop_\n" + "".join(f"_atom_site.{c}\n" for c in columns) + body + "\n#\n")


def write_structure(path: Path, seq, ca, chain="A", start=1) -> Path:
    """PDB or mmCIF by the suffix (.gz compressed)."""
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    text = mmcif_text(mmcif_rows(seq, ca, chain, start)) if name.endswith((".cif", ".mmcif")) else \
        pdb_text(seq, ca, chain, start)
    data = text.encode()
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


def structure_suffix(rng: random.Random) -> str:
    return rng.choice([".pdb", ".pdb", ".cif", ".ent", ".mmcif", ".pdb.gz", ".cif.gz"])


# --- the summary table and the findings ---------------------------------------------------------------

def table(results: dict, skipped: dict = None) -> str:
    skipped = skipped or {}
    rows = ["| family | cases | passed | crashes | silent acceptances | partial outputs | other violations "
            "| argparse exits | progress bars despite --quiet/--no-progress | seconds |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    total = [0] * 9
    for family, rs in results.items():
        other = sum(1 for r in rs if r.violations and not (r.crash or r.silent or r.partial))
        row = [len(rs), sum(r.ok for r in rs), sum(r.crash for r in rs), sum(r.silent for r in rs),
               sum(r.partial for r in rs), other, sum(r.argparse_exit for r in rs), sum(r.progress_bars for r in rs),
               sum(r.seconds for r in rs)]
        total = [a + b for a, b in zip(total, row)]
        rows.append(f"| {family} | " + " | ".join(str(x) if i < 8 else f"{x:.1f}" for i, x in enumerate(row)) + " |")
    rows.append("| **all** | " + " | ".join(str(x) if i < 8 else f"{x:.1f}" for i, x in enumerate(total)) + " |")
    notes = ["", "crashes: traceback, exception out of main() or 'internal error'; silent acceptances: exit 0 on a "
             "damaged input; partial outputs: files left that predictions.json / report.json do not account for, "
             "or temporaries; other: wrong exit code, error line missing or not naming the file/flag/key, writes "
             "outside --out. argparse exits: SystemExit(2) from argparse's own parser (accepted, counted). "
             "progress bars: tqdm bars on stderr although --quiet/--no-progress was given (counted, not judged)."]
    for family, reason in skipped.items():
        notes.append(f"skipped in {family}: {reason}")
    return "\n".join(rows + notes) + "\n"


def findings(results: dict) -> str:
    parts = ["# Fuzz findings (tests/test_fuzz_inputs.py, seed %d)\n" % SEED]
    for family, rs in results.items():
        bad = [r for r in rs if r.violations]
        parts.append(f"\n## {family}: {len(bad)} failing of {len(rs)}\n")
        bars = [r for r in rs if r.progress_bars]
        if bars:
            lines = bars[0].stderr.replace("\r", "\n").splitlines()
            example = next(line for line in lines if PROGRESS_BAR.search(line))
            parts.append(f"- note: {len(bars)} case(s) printed progress bars although --quiet/--no-progress was "
                         f"given, e.g. {bars[0].case.name}: `{example[:120]}`\n")
        for r in bad:
            err = " / ".join(l.strip()[:200] for l in r.stderr.splitlines() if l.strip())[-600:]
            parts.append(f"- **{r.case.name}** ({r.case.script}) {r.case.desc}\n"
                         f"  - exit {r.code} (expected {sorted(r.case.expect)}); "
                         + "; ".join(x[:400] for x in r.violations) + "\n"
                         + (f"  - stderr: `{err}`\n" if err else ""))
    return "".join(parts)


# ======================================================================================================
# family: FASTA files for predict.py
# ======================================================================================================

FASTA_NAMES = ["in.fasta", "seqs.fa", "with space.fasta", "ünï.fasta", "x.faa", "-dash.fasta"]


def _fasta_file(d: Path, rng: random.Random, data: bytes, name: Optional[str] = None) -> Path:
    path = d / (name or rng.choice(FASTA_NAMES))
    path.write_bytes(data)
    return path


def _usage_case(ctx, d, rng, path: Path, desc: str) -> Case:
    out = d / "out"
    return Case("predict", predict_argv(ctx, path, out, rng), frozenset({2}), out, desc, names=(path.name,))


def fasta_empty(rng, d, ctx):
    data = rng.choice(["", "\n", "\n\n\n", "   \n\t\n", "\r\n", " ", "\r\n\r\n"])
    return _usage_case(ctx, d, rng, _fasta_file(d, rng, data.encode()), f"empty FASTA {data!r}")


def fasta_no_header(rng, d, ctx):
    kind = rng.choice(["seq", "comment", "seq-then-header", "pdb", "json", "csv"])
    seq = rand_seq(rng)
    text = {"seq": "\n".join(wrap(seq, rng.randint(3, 10))) + "\n",
            "comment": f";old-style comment\n>{rand_word(rng)}\n{seq}\n",
            "seq-then-header": f"{seq}\n>{rand_word(rng)}\n{rand_seq(rng)}\n",
            "pdb": "HEADER    PROTEIN\n" + "\n".join(pdb_lines("MKT", [(0, 0, 0), (3.8, 0, 0), (7.6, 0, 0)])) + "\n",
            "json": json.dumps({"id": rand_word(rng), "sequence": seq}) + "\n",
            "csv": f"id,sequence\n{rand_word(rng)},{seq}\n"}[kind]
    return _usage_case(ctx, d, rng, _fasta_file(d, rng, text.encode()), f"text before any '>' ({kind})")


def fasta_binary(rng, d, ctx):
    n = rng.choice([1, 7, 64, 500, 4096])
    data = bytearray(rng.randrange(256) for _ in range(n))
    data[rng.randrange(n)] = rng.choice([0, 0xFF])
    if rng.random() < 0.4:
        data = b">" + rand_word(rng).encode() + b"\n" + data
    return _usage_case(ctx, d, rng, _fasta_file(d, rng, bytes(data)), f"{len(data)} bytes of binary garbage")


def fasta_bad_utf8(rng, d, ctx):
    bad = rng.choice([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xc0\xaf", b"\xe2\x82", b"\x80", b"\xfe\xff"])
    rid, seq = rand_word(rng), rand_seq(rng)
    where = rng.choice(["header", "sequence", "end", "utf16"])
    if where == "utf16":
        data = f">{rid}\n{seq}\n".encode("utf-16")
    elif where == "header":
        data = b">" + rid.encode() + bad + b"\n" + seq.encode() + b"\n"
    elif where == "sequence":
        k = rng.randrange(1, len(seq))
        data = b">" + rid.encode() + b"\n" + seq[:k].encode() + bad + seq[k:].encode() + b"\n"
    else:
        data = b">" + rid.encode() + b"\n" + seq.encode() + b"\n" + bad
    return _usage_case(ctx, d, rng, _fasta_file(d, rng, data), f"invalid UTF-8 {bad!r} in the {where}")


def fasta_gzip(rng, d, ctx):
    plain = f">{rand_word(rng)}\n{rand_seq(rng)}\n>{rand_word(rng)}\n{rand_seq(rng)}\n".encode()
    packed = gzip.compress(plain)
    kind = rng.choice(["truncated", "truncated", "truncated", "not-gzip", "empty", "gzip-of-garbage", "header-only"])
    if kind == "truncated":
        data = packed[:rng.randrange(1, len(packed) - 1)]
    elif kind == "not-gzip":
        data = plain
    elif kind == "empty":
        data = b""
    elif kind == "gzip-of-garbage":
        data = gzip.compress(bytes(rng.randrange(256) for _ in range(200)) + b"\x00")
    else:
        data = packed[:10]
    path = _fasta_file(d, rng, data, rng.choice(["in.fasta.gz", "seqs.fa.GZ", "x.gz"]))
    return _usage_case(ctx, d, rng, path, f"gzip {kind} ({len(data)} of {len(packed)} bytes)")


def fasta_not_a_file(rng, d, ctx):
    kind = rng.choice(["missing", "directory", "dangling-symlink", "fifo"])
    path = d / f"{kind}.fasta"
    if kind == "directory":
        path.mkdir()
    elif kind == "dangling-symlink":
        path.symlink_to(d / "nowhere.fasta")
    elif kind == "fifo":
        os.mkfifo(path)
    return _usage_case(ctx, d, rng, path, f"--fasta is a {kind}")


ODD_IDS = ["a/b", "../../x", "..", ".", ".hidden", "sp|P69905|HBA_HUMAN", "predictions", "PREDICTIONS", "ü-ñ",
           "a\\b", "-", "~", "CON", "a:b", "a*b", "%s%n", "${HOME}", "a\u200bb", "日本", "nul\x7f"]


def fasta_valid_odd(rng, d, ctx):
    """Valid records written oddly: must be predicted (exit 0), every file safely named inside --out."""
    n = rng.randint(2, 3)
    ids, records, feats = [], [], set()
    for k in range(n):
        rid = ODD_IDS[(3 * ctx.index + k) % len(ODD_IDS)] if k < 2 or rng.random() < 0.5 else rand_word(rng)
        if rng.random() < 0.2:
            rid = rand_word(rng, 150, 400)
            feats.add("long id")
        while rid in ids or not rid:
            rid += "x"
        ids.append(rid)
        seq = rand_seq(rng, 4, 12)
        if rng.random() < 0.3:
            seq = seq[:2] + rng.choice("UOBZJ") + seq[2:]
            feats.add("UOBZJ")
        if rng.random() < 0.5:
            seq = "".join(c.lower() if rng.random() < 0.5 else c for c in seq)
            feats.add("lowercase")
        if rng.random() < 0.3:
            seq += "*"
            feats.add("'*' end")
        lines = wrap(seq, rng.randint(1, 8))
        if rng.random() < 0.3:
            lines = [" ".join(line) + " \t" for line in lines]
            feats.add("spaces")
        header = rid + (("\t" + rand_word(rng, 1, 60, string.printable[:94] + " ")) if rng.random() < 0.5 else "")
        records.append((header, lines))
    newline = rng.choice(["\n", "\r\n", "\r\n"])
    if newline == "\r\n":
        feats.add("CRLF")
    text, _ = fasta_text(records, rng, newline)
    if rng.random() < 0.3:
        text = text.rstrip("\r\n")
        feats.add("no final newline")
    path = _fasta_file(d, rng, text.encode())
    out = d / "out"
    return Case("predict", predict_argv(ctx, path, out, rng), frozenset({0}), out,
                f"valid records, ids {[i[:30] for i in ids]}, {sorted(feats)}", damaged=False, predicted=tuple(ids))


BAD_KINDS = ["unknown-letter", "digits", "punct", "inner-stop", "double-stop", "empty-seq", "blank-seq", "dup-id",
             "empty-id", "too-long", "control", "gap"]
UNKNOWN_LETTERS = "ΩÄＭéµЖ"
CASEFOLD_LETTERS = "ßıſﬀ"


def _bad_record(rng, kind, valid_ids, letters=UNKNOWN_LETTERS):
    rid = "bad" + rand_word(rng)
    seq = rand_seq(rng, 6, 12)
    k = rng.randrange(1, len(seq) - 1)
    if kind == "unknown-letter":
        seq = seq[:k] + rng.choice(letters) + seq[k:]
    elif kind == "digits":
        seq = seq[:k] + str(rng.randrange(10)) + seq[k:]
    elif kind == "punct":
        seq = seq[:k] + rng.choice("-._!?@#$%^&()[]{};,</\\|+=~`'\"") + seq[k:]  # ':' separates chains
    elif kind == "inner-stop":
        seq = seq[:k] + "*" + seq[k:]
    elif kind == "double-stop":
        seq += "**"
    elif kind == "empty-seq":
        return rid, []
    elif kind == "blank-seq":
        return rid, ["", "   ", "\t"]
    elif kind == "dup-id":
        rid = rng.choice(valid_ids)
    elif kind == "empty-id":
        return rng.choice(["", "   ", "\t"]), [seq]
    elif kind == "too-long":
        return rid, ["".join(rng.choice(STANDARD) for _ in range(rng.randint(1001, 60000)))]
    elif kind == "control":
        seq = seq[:k] + rng.choice("\x07\x1b\x7f\x01") + seq[k:]
    elif kind == "gap":
        seq = seq[:k] + "-" * rng.randint(1, 4) + seq[k:]
    return rid, wrap(seq, rng.randint(4, 20))


def _mixed(rng, d, ctx, n_valid, n_bad, letters=UNKNOWN_LETTERS, kinds=BAD_KINDS):
    valid = [("ok" + rand_word(rng), rand_seq(rng, 5, 12)) for _ in range(n_valid)]
    valid_ids = [v[0] for v in valid] or ["ok" + rand_word(rng)]
    bad = [kinds[ctx.index % len(kinds)]] + [rng.choice(kinds) for _ in range(n_bad - 1)]  # every kind comes up
    order = [("valid", v) for v in valid] + [("bad", k) for k in bad]
    rng.shuffle(order)
    if "dup-id" in bad and n_valid:  # a duplicate id needs the first use before it
        order.sort(key=lambda o: o != ("valid", valid[0]))
    records, bad_index, kinds_used = [], [], []
    seen = set()
    for tag, item in order:
        if tag == "valid":
            records.append((item[0], wrap(item[1], rng.randint(3, 12))))
            seen.add(item[0])
        else:
            kind = item if (item != "dup-id" or seen) else "digits"
            rid, lines = _bad_record(rng, kind, sorted(seen) or valid_ids, letters)
            bad_index.append(len(records))
            kinds_used.append(kind)
            records.append((rid, lines))
    text, numbers = fasta_text(records, rng, rng.choice(["\n", "\r\n"]))
    path = _fasta_file(d, rng, text.encode())
    out = d / "out"
    failed = tuple(f"(line {numbers[i]})" for i in bad_index)
    return path, out, valid, kinds_used, failed


def fasta_mixed(rng, d, ctx):
    path, out, valid, kinds, failed = _mixed(rng, d, ctx, rng.randint(1, 3), rng.randint(1, 4))
    return Case("predict", predict_argv(ctx, path, out, rng), frozenset({1}), out,
                f"{len(valid)} valid + bad records {kinds}", failed=failed, predicted=tuple(v[0] for v in valid))


def fasta_casefold(rng, d, ctx):
    path, out, valid, kinds, failed = _mixed(rng, d, ctx, rng.randint(1, 2), 1, CASEFOLD_LETTERS, ["unknown-letter"])
    letter = next(c for c in path.read_text() if c in CASEFOLD_LETTERS)
    return Case("predict", predict_argv(ctx, path, out, rng), frozenset({1}), out,
                f"{len(valid)} valid + 1 record holding {letter!r} (str.upper() maps it to ASCII letters)",
                failed=failed, predicted=tuple(v[0] for v in valid))


def fasta_all_invalid(rng, d, ctx):
    kinds = [k for k in BAD_KINDS if k != "dup-id"]
    path, out, valid, used, failed = _mixed(rng, d, ctx, 0, rng.randint(1, 4), kinds=kinds)
    # the epilog: bad records are reported and skipped, predictions.json is always written, exit 1
    return Case("predict", predict_argv(ctx, path, out, rng), frozenset({1}), out,
                f"only bad records {used}", failed=failed)


EDGE_SEQUENCES = [["M"], ["XXXXX"], ["X", "GG"], ["MX", "m"], ["ACDEFGHIKLMNPQRSTVWYX"]]


def fasta_edge_sequences(rng, d, ctx):
    """Valid but unusual sequences (one residue, only X): predicted, exit 0."""
    seqs = EDGE_SEQUENCES[ctx.index % len(EDGE_SEQUENCES)]
    ids = [f"e{k}{rand_word(rng)}" for k in range(len(seqs))]
    text, _ = fasta_text([(i, [s]) for i, s in zip(ids, seqs)], rng)
    path = _fasta_file(d, rng, text.encode())
    out = d / "out"
    return Case("predict", predict_argv(ctx, path, out, rng), frozenset({0}), out, f"edge sequences {seqs}",
                damaged=False, predicted=tuple(ids))


def fasta_max_length_edge(rng, d, ctx):
    """--max-length N: a record of N residues is predicted, one of N + 1 reported (exit 1)."""
    n = rng.randint(6, 12)
    ok, long = "ok" + rand_word(rng), "long" + rand_word(rng)
    text, numbers = fasta_text([(ok, [rand_seq(rng, n, n)]), (long, [rand_seq(rng, n + 1, n + 1)])], rng)
    path = _fasta_file(d, rng, text.encode())
    out = d / "out"
    return Case("predict", predict_argv(ctx, path, out, rng, extra=("--max-length", str(n))), frozenset({1}), out,
                f"--max-length {n}: records of {n} and {n + 1} residues", failed=(f"(line {numbers[1]})",),
                predicted=(ok,))


MULTIMER_BAD = [("empty-chain-end", lambda r: rand_seq(r) + ":"), ("empty-chain-start", lambda r: ":" + rand_seq(r)),
                ("empty-chain-inner", lambda r: rand_seq(r) + "::" + rand_seq(r)), ("only-separator", lambda r: ":"),
                ("27-chains", lambda r: ":".join(rand_seq(r, 1, 2) for _ in range(27))),
                ("bad-letter-in-chain", lambda r: rand_seq(r) + ":" + rand_seq(r)[:3] + "1" + rand_seq(r))]


def fasta_multimer(rng, d, ctx):
    """Chains joined by ':' (fasta.py): valid multimers predicted, empty chains / too many chains reported."""
    good = [(f"m{k}{rand_word(rng)}", ":".join(rand_seq(rng, 3, 7) + ("*" if rng.random() < 0.3 else "")
                                               for _ in range(rng.randint(2, 3)))) for k in range(rng.randint(1, 2))]
    kind, make = MULTIMER_BAD[ctx.index % len(MULTIMER_BAD)]
    bad_id = "bad" + rand_word(rng)
    records = [(i, wrap(q, rng.randint(4, 12))) for i, q in good] + [(bad_id, [make(rng)])]
    rng.shuffle(records)
    text, numbers = fasta_text(records, rng)
    path = _fasta_file(d, rng, text.encode())
    out = d / "out"
    line = numbers[[r[0] for r in records].index(bad_id)]
    return Case("predict", predict_argv(ctx, path, out, rng), frozenset({1}), out,
                f"multimers {[q for _, q in good]} + bad multimer ({kind})", failed=(f"(line {line})",),
                predicted=tuple(i for i, _ in good))


FASTA = [("empty", 6, fasta_empty), ("no-header", 8, fasta_no_header), ("binary", 10, fasta_binary),
         ("bad-utf8", 8, fasta_bad_utf8), ("gzip", 10, fasta_gzip), ("not-a-file", 4, fasta_not_a_file),
         ("valid-odd", 10, fasta_valid_odd), ("mixed", len(BAD_KINDS) + 4, fasta_mixed),
         ("casefold", 3, fasta_casefold),
         ("all-invalid", 6, fasta_all_invalid), ("edge-sequences", len(EDGE_SEQUENCES), fasta_edge_sequences),
         ("max-length-edge", 2, fasta_max_length_edge), ("multimer", len(MULTIMER_BAD), fasta_multimer)]


# ======================================================================================================
# family: structure files for evaluate.py --pred/--ref
# ======================================================================================================

NONFINITE = ["nan", "NaN", "inf", "-inf", "Infinity", "1e999", "-1e999"]


def _is_mmcif(path: Path) -> bool:
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    return name.endswith((".cif", ".mmcif"))


def damaged_structure(rng: random.Random, kind: str, path: Path, seq: str, ca) -> str:
    """Write `path` (format by suffix, gzipped for .gz) holding the chain with damage `kind`; describe it."""
    gz, cif = path.name.endswith(".gz"), _is_mmcif(path)

    def put(text: str) -> None:
        data = text.encode()
        path.write_bytes(gzip.compress(data) if gz else data)

    rows, lines = mmcif_rows(seq, ca), pdb_lines(seq, ca)
    if kind == "empty":
        path.write_bytes(b"")
        return "empty file"
    if kind == "garbage-bytes":
        data = bytearray(rng.randrange(256) for _ in range(rng.randint(1, 3000)))
        data[0] = 0xFF
        path.write_bytes(bytes(data))
        return f"{len(data)} random bytes"
    if kind == "garbage-text":
        words = [" ".join(rand_word(rng, 1, 12, string.ascii_letters + string.punctuation) for _ in range(8))
                 for _ in range(rng.randint(1, 40))]
        put("\n".join(words) + "\n")
        return "random text"
    if kind == "no-atoms":
        variant = rng.choice(["header-only", "water", "dna", "ter-end"])
        if cif:
            if variant == "header-only" or variant == "ter-end":
                put("data_X\n#\n_entry.id X\n#\n")
            else:
                comp, atom = ("HOH", "O") if variant == "water" else ("DA", "P")
                group = "HETATM" if variant == "water" else "ATOM"
                put(mmcif_text([[group, str(i + 1), atom[0], atom, ".", comp, "A", str(i + 1), "?", f"{x:.3f}",
                                 f"{y:.3f}", f"{z:.3f}", "1.00", "10.00", str(i + 1), "A", "1"]
                                for i, (x, y, z) in enumerate(ca)]))
        else:
            if variant == "header-only":
                put("HEADER    NOTHING HERE\nREMARK   1 no atoms\nEND\n")
            elif variant == "ter-end":
                put("TER\nEND\n")
            else:
                comp, atom = ("HOH", " O  ") if variant == "water" else (" DA", " P  ")
                group = "HETATM" if variant == "water" else "ATOM  "
                put("\n".join(f"{group}{i + 1:5d} {atom} {comp} A{i + 1:4d}    {x:8.3f}{y:8.3f}{z:8.3f}  1.00 10.00"
                              for i, (x, y, z) in enumerate(ca)) + "\nEND\n")
        return f"no protein atoms ({variant})"
    if kind in ("nonfinite", "nonfinite-bfactor"):
        token = rng.choice(NONFINITE)
        k = rng.randrange(len(seq))
        if cif:
            col = MMCIF_COLUMNS.index(rng.choice(["Cartn_x", "Cartn_y", "Cartn_z"]) if kind == "nonfinite"
                                      else "B_iso_or_equiv")
            rows[k][col] = token
            put(mmcif_text(rows))
        else:
            a, b = rng.choice([(30, 38), (38, 46), (46, 54)]) if kind == "nonfinite" else (60, 66)
            lines[k] = lines[k][:a] + token.rjust(b - a)[-(b - a):] + lines[k][b:]
            put("\n".join(lines + ["END"]) + "\n")
        return f"{token} {'coordinate' if kind == 'nonfinite' else 'B-factor'} at residue {k + 1}"
    if kind.startswith("mmcif-"):
        assert cif, kind
        columns = list(MMCIF_COLUMNS)
        if kind == "mmcif-ragged":
            k = rng.randrange(len(rows))
            del rows[k][rng.randrange(len(columns))]
            put(mmcif_text(rows, columns))
            return f"mmCIF row {k + 1} one value short"
        if kind == "mmcif-missing-required":
            drop = [rng.choice(MMCIF_REQUIRED)]
        elif kind == "mmcif-no-seq-ids":
            drop = ["label_seq_id", "auth_seq_id"]
        else:
            drop = [rng.choice([c for c in MMCIF_COLUMNS if c not in MMCIF_REQUIRED])]
        keep = [i for i, c in enumerate(columns) if c not in drop]
        put(mmcif_text([[row[i] for i in keep] for row in rows], [columns[i] for i in keep]))
        return f"mmCIF without column(s) {drop}"
    if kind == "truncated":
        text = mmcif_text(rows) if cif else pdb_text(seq, ca)
        cut = rng.randrange(len(text) // 5, len(text) * 3 // 5)
        while text[cut - 1] == "\n":
            cut += 1
        put(text[:cut])
        return f"cut mid-line at {cut} of {len(text)} characters"
    raise ValueError(kind)


def _eval_case(rng, d, pred, ref, expect, desc, plots=None, **kw) -> Case:
    out = d / "out"
    argv = ["--pred", pred, "--ref", ref, "--out", out, "--quiet"]
    if not (plots if plots is not None else rng.random() < 0.1):
        argv.append("--no-plots")
    return Case("evaluate", argv, frozenset(expect), out, desc, **kw)


def _suffix_for(rng, kind):
    if kind.startswith("mmcif-"):
        return rng.choice([".cif", ".mmcif", ".cif.gz"])
    return structure_suffix(rng)


HARD_DAMAGE = ["empty", "garbage-text", "garbage-bytes", "no-atoms", "nonfinite", "mmcif-missing-required",
               "mmcif-no-seq-ids"]


def _single_damage(kind, warn_ok=False):
    def build(rng, d, ctx):
        seq, ca = random_chain(rng)
        side = rng.choice(["pred", "ref"])
        stem = rand_word(rng)
        good = write_structure(d / f"good_{stem}{structure_suffix(rng)}", seq, ca if side == "pred" else noisy(rng, ca))
        bad = d / f"bad_{stem}{_suffix_for(rng, kind)}"
        desc = damaged_structure(rng, kind, bad, seq, noisy(rng, ca) if side == "pred" else ca)
        pred, ref = (bad, good) if side == "pred" else (good, bad)
        return _eval_case(rng, d, pred, ref, {1}, f"--{side} {bad.name}: {desc}", failed=(bad.name,),
                          chains=None if warn_ok else 0, warn_ok=warn_ok)
    return build


def pdb_truncated(rng, d, ctx):
    return _single_damage("truncated", warn_ok=True)(rng, d, ctx)


def pdb_optional_column(rng, d, ctx):
    seq, ca = random_chain(rng)
    ref = write_structure(d / f"r{structure_suffix(rng)}", seq, ca)
    pred = d / f"p{rng.choice(['.cif', '.mmcif'])}"
    desc = damaged_structure(rng, "mmcif-missing-optional", pred, seq, noisy(rng, ca))
    return _eval_case(rng, d, pred, ref, {0, 1}, f"--pred {desc}", damaged=False, failed=(pred.name,))


def pdb_nonfinite_bfactor(rng, d, ctx):
    seq, ca = random_chain(rng)
    ref = write_structure(d / f"r{structure_suffix(rng)}", seq, ca)
    pred = d / f"p{structure_suffix(rng)}"
    desc = damaged_structure(rng, "nonfinite-bfactor", pred, seq, noisy(rng, ca))
    # scoring without pLDDT (exit 0) or failing the pair (exit 1) are both fine; a crash is not
    return _eval_case(rng, d, pred, ref, {0, 1}, f"--pred {desc}", damaged=False, failed=(pred.name,),
                      plots=rng.random() < 0.5)


def pdb_mismatch(rng, d, ctx):
    seq, ca = random_chain(rng, 24, 36)
    ref = write_structure(d / f"r{structure_suffix(rng)}", seq, ca)
    pred = d / f"p{structure_suffix(rng)}"
    kind = rng.choice(["other-protein", "half", "two-chains", "fragment-ref"])
    if kind == "other-protein":
        other, other_ca = random_chain(rng, len(seq), len(seq))
        write_structure(pred, other, other_ca)
    elif kind == "half":
        write_structure(pred, seq[:len(seq) // 2], noisy(rng, ca[:len(seq) // 2]))
    elif kind == "fragment-ref":
        write_structure(ref, seq[:8], ca[:8])
        write_structure(pred, rand_seq(rng, 30, 40), noisy(rng, random_chain(rng, 40, 40)[1]))
    else:
        h = len(seq) // 2
        text = "\n".join(pdb_lines(seq[:h], ca[:h], "B") + ["TER"] + pdb_lines(seq[h:], ca[h:], "C", h + 1)
                         + ["END"]) + "\n"
        pred = pred.with_name("p.pdb")
        pred.write_text(text)
    # flagged with a warning (exit 0), or failed (exit 1): the documented outcomes
    return _eval_case(rng, d, pred, ref, {1}, f"mismatched pair: {kind}", warn_ok=True,
                      failed=(ref.name,) if kind == "two-chains" else ())


ODD_CHAINS = [("/", ".pdb"), ("\\", ".pdb"), (".", ".pdb"), ("#", ".pdb"), ("~", ".pdb"), ("../../x", ".cif"),
              ("/", ".cif"), ("a" * 300, ".cif"), ("é", ".mmcif"), ("a b", ".cif"), ("x/../../y", ".mmcif"),
              ("..", ".cif"), ("-", ".cif.gz")]


def pdb_chain_odd(rng, d, ctx):
    seq, ca = random_chain(rng)
    chain, suffix = ODD_CHAINS[ctx.index % len(ODD_CHAINS)]
    write_structure(d / f"r{suffix}", seq, ca, chain=chain)
    write_structure(d / f"p{suffix}", seq, noisy(rng, ca), chain=chain)
    return _eval_case(rng, d, d / f"p{suffix}", d / f"r{suffix}", {0}, f"chain id {chain[:40]!r} ({suffix})",
                      damaged=False, chains=1, plots=rng.random() < 0.3)


def pdb_wrong_suffix(rng, d, ctx):
    seq, ca = random_chain(rng)
    good = write_structure(d / "r.pdb", seq, ca)
    bad = d / rng.choice(["p.txt", "p.json", "p", "p.pdb.bak"])
    bad.write_text(pdb_text(seq, noisy(rng, ca)))
    pred, ref = (bad, good) if rng.random() < 0.5 else (good, bad)
    return _eval_case(rng, d, pred, ref, {2}, f"{bad.name} has no structure suffix", names=(bad.name,))


def pdb_special_file(rng, d, ctx):
    """A FIFO or a dangling symlink named like a structure file: refused, never opened (a FIFO would block)."""
    seq, ca = random_chain(rng)
    good = write_structure(d / "r.pdb", seq, ca)
    special = d / "p.pdb"
    kind = ["fifo", "dangling-symlink"][ctx.index % 2]
    if kind == "fifo":
        os.mkfifo(special)
    else:
        special.symlink_to(d / "nowhere.pdb")
    return _eval_case(rng, d, special, good, {2}, f"--pred is a {kind}", names=("p.pdb",))


def pdb_file_vs_dir(rng, d, ctx):
    seq, ca = random_chain(rng)
    (d / "dir").mkdir()
    write_structure(d / "dir" / "m.pdb", seq, ca)
    f = write_structure(d / "m.pdb", seq, noisy(rng, ca))
    pred, ref = (d / "dir", f) if rng.random() < 0.5 else (f, d / "dir")
    return _eval_case(rng, d, pred, ref, {2}, "a file against a directory", names=("--pred", "dir", "m.pdb"))


def pdb_dir_without_structures(rng, d, ctx):
    seq, ca = random_chain(rng)
    (d / "pred").mkdir()
    (d / "ref").mkdir()
    (d / "pred" / "m.txt").write_text(pdb_text(seq, ca))
    write_structure(d / "ref" / "m.pdb", seq, ca)
    return _eval_case(rng, d, d / "pred", d / "ref", {2}, "a prediction directory without structure files",
                      names=("pred",))


def pdb_dir_one_bad(rng, d, ctx):
    (d / "pred").mkdir()
    (d / "ref").mkdir()
    k = rng.randint(2, 4)
    for i in range(k):
        seq, ca = random_chain(rng)
        write_structure(d / "ref" / f"g{i}{structure_suffix(rng)}", seq, ca)
        write_structure(d / "pred" / f"g{i}{structure_suffix(rng)}", seq, noisy(rng, ca))
    kind = rng.choice(HARD_DAMAGE)
    seq, ca = random_chain(rng)
    side = rng.choice(["pred", "ref"])
    bad = d / side / f"bad{_suffix_for(rng, kind)}"
    desc = damaged_structure(rng, kind, bad, seq, ca)
    other = "ref" if side == "pred" else "pred"
    write_structure(d / other / f"bad{structure_suffix(rng)}", seq, noisy(rng, ca))
    return _eval_case(rng, d, d / "pred", d / "ref", {1}, f"{k} good pairs + {side}/{bad.name}: {desc}",
                      failed=(bad.name,), chains=k, plots=rng.random() < 0.15)


def pdb_dir_unmatched(rng, d, ctx):
    (d / "pred").mkdir()
    (d / "ref").mkdir()
    k = rng.randint(1, 3)
    for i in range(k):
        seq, ca = random_chain(rng)
        write_structure(d / "ref" / f"g{i}.pdb", seq, ca)
        write_structure(d / "pred" / f"g{i}.pdb", seq, noisy(rng, ca))
    seq, ca = random_chain(rng)
    kind = rng.choice(["lonely-ref", "lonely-pred", "duplicate-stem"])
    if kind == "lonely-ref":
        named = write_structure(d / "ref" / "lonely.cif", seq, ca).name
    elif kind == "lonely-pred":
        named = write_structure(d / "pred" / "lonely.pdb", seq, ca).name
    else:
        write_structure(d / "ref" / "dup.pdb", seq, ca)
        write_structure(d / "pred" / "dup.pdb", seq, noisy(rng, ca))
        write_structure(d / "pred" / "dup.cif.gz", seq, noisy(rng, ca))
        named = "dup"
    return _eval_case(rng, d, d / "pred", d / "ref", {1}, f"{k} good pairs + {kind}", failed=(named,), chains=k)


PDB = [("empty", 5, _single_damage("empty")), ("truncated", 8, pdb_truncated),
       ("garbage-text", 5, _single_damage("garbage-text")), ("garbage-bytes", 5, _single_damage("garbage-bytes")),
       ("no-atoms", 6, _single_damage("no-atoms")), ("nonfinite", 10, _single_damage("nonfinite")),
       ("nonfinite-bfactor", 3, pdb_nonfinite_bfactor),
       ("mmcif-missing-required", 7, _single_damage("mmcif-missing-required")),
       ("mmcif-no-seq-ids", 2, _single_damage("mmcif-no-seq-ids")), ("mmcif-missing-optional", 3, pdb_optional_column),
       ("mmcif-ragged", 4, _single_damage("mmcif-ragged", warn_ok=True)), ("mismatch", 8, pdb_mismatch),
       ("chain-odd", len(ODD_CHAINS), pdb_chain_odd), ("wrong-suffix", 2, pdb_wrong_suffix),
       ("special-file", 2, pdb_special_file), ("file-vs-dir", 2, pdb_file_vs_dir),
       ("dir-no-structures", 1, pdb_dir_without_structures), ("dir-one-bad", 14, pdb_dir_one_bad),
       ("dir-unmatched", 4, pdb_dir_unmatched)]


# ======================================================================================================
# family: damaged artefacts in a copy of the trained run (predict.py --run / --checkpoint, train --resume)
# ======================================================================================================

FOLD = Path("model") / "fold_model.safetensors"
ADAPTER = Path("adapter") / "adapter_model.safetensors"
ADAPTER_CONFIG = Path("adapter") / "adapter_config.json"
LAST = Path("checkpoints") / "last.pt"


def _predict_on_copy(rng, d, ctx, desc, names) -> tuple:
    """(a hard-linked copy of the run, a function making the predict case on it once it is damaged)."""
    run = link_copy(ctx.run_dir, d / "run")
    fasta, _ = write_valid_fasta(d, rng)
    out = d / "out"
    return run, lambda: Case("predict", predict_argv(ctx, fasta, out, rng, run=run), frozenset({2}), out, desc,
                             names=names)


def _rewrite_safetensors(path: Path, mutate) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    with safe_open(str(path), "pt") as fh:
        metadata = fh.metadata()
    tensors = {k: v.clone() for k, v in load_file(str(path)).items()}
    mutate(tensors)
    path.unlink()
    save_file(tensors, str(path), metadata=metadata)
    if os.path.lexists(sidecar(path)):
        rewrite_sidecar(path)


def _weights_damage(rel: Path):
    kinds = ["truncated", "empty", "garbage", "flipped", "header-flip-no-sidecar", "nan", "inf", "int64",
             "wrong-shape", "missing-tensor", "extra-tensor", "sidecar-garbage", "sidecar-wrong-shape", "directory"]

    def build(rng, d, ctx, kind):
        import torch
        run, make = _predict_on_copy(rng, d, ctx, "", ())
        path = run / rel
        data = path.read_bytes()
        if kind == "truncated":
            replace_bytes(path, data[:rng.randrange(1, len(data) - 1)])
        elif kind == "empty":
            replace_bytes(path, b"")
        elif kind == "garbage":
            replace_bytes(path, bytes(rng.randrange(256) for _ in range(min(len(data), 4096))))
        elif kind == "flipped":
            flipped = bytearray(data)
            for _ in range(rng.randint(1, 4)):
                flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
            replace_bytes(path, bytes(flipped))
        elif kind == "header-flip-no-sidecar":
            header = int.from_bytes(data[:8], "little")
            flipped = bytearray(data)
            flipped[8 + rng.randrange(header)] = 1  # a control character: never valid JSON
            replace_bytes(path, bytes(flipped))
            if os.path.lexists(sidecar(path)):
                sidecar(path).unlink()
        elif kind in ("nan", "inf", "int64", "wrong-shape", "missing-tensor", "extra-tensor"):
            def mutate(tensors):
                name = rng.choice(sorted(k for k, v in tensors.items() if v.is_floating_point() and v.numel()))
                t = tensors[name]
                if kind in ("nan", "inf"):
                    bad = float("nan") if kind == "nan" else rng.choice([1, -1]) * float("inf")
                    t.view(-1)[rng.randrange(t.numel())] = bad
                elif kind == "int64":
                    tensors[name] = t.round().to(torch.int64)
                elif kind == "wrong-shape":
                    tensors[name] = torch.zeros(t.numel() + 1)
                elif kind == "missing-tensor":
                    del tensors[name]
                else:
                    tensors["fuzz.unexpected_weight"] = torch.zeros(3)
                mutate.name = name
            _rewrite_safetensors(path, mutate)
            kind = f"{kind} ({getattr(mutate, 'name', '')})"
        elif kind == "sidecar-garbage":
            replace_bytes(sidecar(path), bytes(rng.randrange(256) for _ in range(40)))
        elif kind == "sidecar-wrong-shape":
            replace_bytes(sidecar(path), rng.choice([b"[]\n", b"{\"sha256\": 5}\n", b"\"abc\"\n", b"{}\n"]))
        elif kind == "directory":
            path.unlink()
            path.mkdir()
        case = make()
        case.desc = f"{rel}: {kind}"
        case.names = (rel.name,)
        return case

    return build, kinds


def _cycle(build, kinds):
    """A builder going through `kinds` in turn (so a family with count >= len(kinds) covers them all)."""
    def builder(rng, d, ctx):
        return build(rng, d, ctx, kinds[ctx.index % len(kinds)])
    return builder


ADAPTER_CONFIG_DAMAGE = [
    ("list", lambda m, r: [m]), ("string", lambda m, r: "lorta"), ("number", lambda m, r: 3),
    ("null", lambda m, r: None), ("empty-object", lambda m, r: {}),
    ("no-method", lambda m, r: {k: v for k, v in m.items() if k != "method"}),
    ("no-config", lambda m, r: {k: v for k, v in m.items() if k != "config"}),
    ("no-layout", lambda m, r: {k: v for k, v in m.items() if k != "layout"}),
    ("method-int", lambda m, r: {**m, "method": 7}), ("method-unknown", lambda m, r: {**m, "method": "foo"}),
    ("method-lora", lambda m, r: {**m, "method": "lora"}), ("config-list", lambda m, r: {**m, "config": [1, 2]}),
    ("rank-string", lambda m, r: {**m, "config": {**m["config"], "rank": "abc"}}),
    ("rank-zero", lambda m, r: {**m, "config": {**m["config"], "rank": 0}}),
    ("rank-negative", lambda m, r: {**m, "config": {**m["config"], "rank": -2}}),
    ("rank-other", lambda m, r: {**m, "config": {**m["config"], "rank": 5}}),
    ("rank-bool", lambda m, r: {**m, "config": {**m["config"], "rank": True}}),
    ("alpha-string", lambda m, r: {**m, "config": {**m["config"], "alpha": "x"}}),
    ("modes-unknown", lambda m, r: {**m, "config": {**m["config"], "modes": "foo"}}),
    ("targets-string", lambda m, r: {**m, "config": {**m["config"], "targets": "q"}}),
    ("layout-string", lambda m, r: {**m, "layout": "x"}), ("layout-empty", lambda m, r: {**m, "layout": {}}),
    ("format-99", lambda m, r: {**m, "format_version": 99}),
    ("format-string", lambda m, r: {**m, "format_version": "1"}),
]
ADAPTER_CONFIG_RAW = [("empty-file", b""), ("invalid-json", b"{\"method\": "), ("binary", b"\xff\xfe\x00garbage"),
                      ("nan-literal", None), ("utf16", None)]


def artefact_adapter_config(rng, d, ctx, kind):
    run, make = _predict_on_copy(rng, d, ctx, "", ())
    path = run / ADAPTER_CONFIG
    meta = json.loads(path.read_text())
    raw = dict(ADAPTER_CONFIG_RAW)
    if kind in raw:
        data = raw[kind]
        if kind == "nan-literal":
            data = json.dumps({**meta, "config": {**meta["config"], "alpha": float("nan")}}).encode()
        elif kind == "utf16":
            data = json.dumps(meta).encode("utf-16")
    else:
        data = json.dumps(dict(ADAPTER_CONFIG_DAMAGE)[kind](meta, rng)).encode()
    replace_bytes(path, data)
    case = make()
    case.desc = f"{ADAPTER_CONFIG}: {kind}"
    case.names = (ADAPTER_CONFIG.name, "adapter")
    return case


def _drop(cfg, dotted):
    node = cfg
    *parents, last = dotted.split(".")
    for p in parents:
        node = node[p]
    del node[last]
    return cfg


def _set(cfg, dotted, value):
    node = cfg
    *parents, last = dotted.split(".")
    for p in parents:
        node = node[p]
    node[last] = value
    return cfg


RUN_CONFIG_DAMAGE = [
    ("empty-file", None), ("garbage", None), ("invalid-json", None), ("list", None), ("string", None),
    ("null", None), ("empty-object", None), ("directory", None),
    ("no-model", ("drop", "model")), ("no-adapter", ("drop", "adapter")), ("no-train", ("drop", "train")),
    ("no-data", ("drop", "data")), ("no-val", ("drop", "val")), ("no-num-blocks", ("drop", "model.trunk.num_blocks")),
    ("model-list", ("set", "model", [])), ("adapter-method-int", ("set", "adapter.method", 7)),
    ("adapter-method-unknown", ("set", "adapter.method", "foo")),
    ("adapter-rank-string", ("set", "adapter.rank", "abc")),
    ("trunk-string", ("set", "model.trunk", "x")), ("num-blocks-negative", ("set", "model.trunk.num_blocks", -1)),
    ("c-s-string", ("set", "model.trunk.c_s", "x")), ("lm-path-missing", ("set", "model.lm.path", "{run}/no_such_lm")),
    ("num-recycles-negative", ("set", "val.num_recycles", -1)),
    ("num-recycles-string", ("set", "val.num_recycles", "x")),
]


def artefact_run_config(rng, d, ctx, kind):
    run, make = _predict_on_copy(rng, d, ctx, "", ())
    path = run / "config.json"
    cfg = json.loads(path.read_text())
    action = dict(RUN_CONFIG_DAMAGE)[kind]
    names = ("config.json",)
    if action is None:
        data = {"empty-file": b"", "garbage": bytes(rng.randrange(256) for _ in range(300)),
                "invalid-json": path.read_bytes()[:rng.randrange(1, 200)], "list": b"[1, 2]\n",
                "string": b"\"demo\"\n", "null": b"null\n", "empty-object": b"{}\n", "directory": None}[kind]
        if data is None:
            path.unlink()
            path.mkdir()
        else:
            replace_bytes(path, data)
    else:
        op, key, *value = action
        cfg = _drop(cfg, key) if op == "drop" else _set(cfg, key, value[0])
        replace_bytes(path, json.dumps(cfg, indent=1).encode())
        names = ("config.json", key)
        if kind == "lm-path-missing":
            names = ("no_such_lm",)
    case = make()
    case.desc = f"config.json: {kind}"
    case.names = names
    return case


CHECKPOINT_DAMAGE = ["truncated", "empty", "garbage", "flipped", "list", "int", "string", "tensor", "no-model",
                     "model-list", "model-nan", "model-int64", "model-wrong-shape", "format-99", "step-string",
                     "unsafe-pickle", "ema-nan", "directory", "missing", "safetensors-file"]


def artefact_checkpoint(rng, d, ctx, kind):
    import fractions
    import torch
    run = link_copy(ctx.run_dir, d / "run")
    path = run / LAST
    target = path
    data = path.read_bytes()
    ckpt = ctx.checkpoint()

    def save(obj):
        path.unlink()
        torch.save(obj, path)
        rewrite_sidecar(path)

    def model_with(fn):
        model = dict(ckpt["model"])
        name = rng.choice(sorted(k for k, v in model.items() if v.is_floating_point() and v.numel()))
        model[name] = fn(model[name].clone())
        return {**ckpt, "model": model}

    if kind == "truncated":
        replace_bytes(path, data[:rng.randrange(1, len(data) - 1)])
    elif kind == "empty":
        replace_bytes(path, b"")
    elif kind == "garbage":
        replace_bytes(path, bytes(rng.randrange(256) for _ in range(4096)))
    elif kind == "flipped":
        flipped = bytearray(data)
        for _ in range(rng.randint(1, 3)):
            flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
        replace_bytes(path, bytes(flipped))
    elif kind in ("list", "int", "string", "tensor"):
        save({"list": [1, 2, 3], "int": 5, "string": "model", "tensor": torch.zeros(3)}[kind])
    elif kind == "no-model":
        save({k: v for k, v in ckpt.items() if k != "model"})
    elif kind == "model-list":
        save({**ckpt, "model": [1, 2]})
    elif kind == "model-nan":
        save(model_with(lambda t: t.view(-1).index_fill_(0, torch.tensor([0]), float("nan")).view(t.shape)))
    elif kind == "model-int64":
        save(model_with(lambda t: t.round().to(torch.int64)))
    elif kind == "model-wrong-shape":
        save(model_with(lambda t: torch.zeros(t.numel() + 2)))
    elif kind == "format-99":
        save({**ckpt, "format": 99})
    elif kind == "step-string":
        save({**ckpt, "step": "x"})
    elif kind == "unsafe-pickle":
        save({**ckpt, "extra": {"fraction": fractions.Fraction(1, 3)}})
    elif kind == "ema-nan":
        ema = ckpt.get("ema")
        if isinstance(ema, dict) and isinstance(ema.get("shadow"), dict) and ema["shadow"]:
            shadow = dict(ema["shadow"])
            name = rng.choice(sorted(shadow))
            shadow[name] = torch.full_like(shadow[name], float("inf"))
            save({**ckpt, "ema": {**ema, "shadow": shadow}})
        else:
            save(model_with(lambda t: torch.full_like(t, float("-inf"))))
    elif kind == "directory":
        target = d / "ckpt_dir.pt"
        target.mkdir()
    elif kind == "missing":
        target = d / "no_such.pt"
    elif kind == "safetensors-file":
        target = run / FOLD
    fasta, _ = write_valid_fasta(d, rng)
    out = d / "out"
    return Case("predict", predict_argv(ctx, fasta, out, rng, run=run, extra=("--checkpoint", target)),
                frozenset({2}), out, f"--checkpoint {target.name}: {kind}", names=(target.name,))


MISSING = [("adapter-dir", ("adapter",), 2), ("adapter-config", ("adapter_config.json",), 2),
           ("adapter-weights", ("adapter_model.safetensors",), 2), ("model-and-checkpoints", ("run",), 2),
           ("fold-sidecar", (), 0), ("adapter-sidecar", (), 0)]


def artefact_missing(rng, d, ctx, kind):
    """Files removed from the run copy; a missing .sha256 sidecar only means no checksum was recorded (exit 0)."""
    run, make = _predict_on_copy(rng, d, ctx, "", ())
    names, code = next((n, c) for k, n, c in MISSING if k == kind)
    target = {"adapter-dir": run / "adapter", "adapter-config": run / ADAPTER_CONFIG, "adapter-weights": run / ADAPTER,
              "fold-sidecar": sidecar(run / FOLD), "adapter-sidecar": sidecar(run / ADAPTER)}.get(kind)
    if kind == "model-and-checkpoints":
        shutil.rmtree(run / "model")
        shutil.rmtree(run / "checkpoints")
    elif target.is_dir():
        shutil.rmtree(target)
    else:
        target.unlink()
    case = make()
    case.desc, case.names, case.expect, case.damaged = f"run copy without {kind}", names, frozenset({code}), code != 0
    if code == 0:
        case.predicted = (re.search(r">(\S+)", next(a for a in case.argv if str(a).endswith(".fasta")).read_text())
                          .group(1),)
    return case


EVALUATE_RUN_DAMAGE = ["config-garbage", "fold-weights-truncated", "adapter-config-list", "checkpoint-garbage"]


def artefact_evaluate_run(rng, d, ctx, kind):
    """evaluate.py --run on a damaged run copy: exit 2 naming the file, before any work."""
    run = link_copy(ctx.run_dir, d / "run")
    extra = []
    if kind == "config-garbage":
        path = run / "config.json"
        replace_bytes(path, b"\x00garbage{")
    elif kind == "fold-weights-truncated":
        path = run / FOLD
        replace_bytes(path, path.read_bytes()[:100])
    elif kind == "adapter-config-list":
        path = run / ADAPTER_CONFIG
        replace_bytes(path, b"[]\n")
    else:
        path = run / LAST
        replace_bytes(path, bytes(rng.randrange(256) for _ in range(512)))
        extra = ["--checkpoint", path]
    out = d / "out"
    return Case("evaluate", ["--run", run, "--out", out, "--quiet", "--no-plots"] + extra, frozenset({2}), out,
                f"evaluate --run with {kind}", names=(path.name,))


def _metrics_ok(case, result):
    problems = []
    run = case.out
    lines = (run / "metrics.jsonl").read_text().splitlines() if (run / "metrics.jsonl").is_file() else []
    for n, line in enumerate(lines, 1):
        try:
            if not isinstance(json.loads(line), dict):
                raise ValueError("not an object")
        except ValueError as exc:
            problems.append(f"metrics.jsonl line {n} still damaged after resume: {line[:80]!r} ({exc})")
    try:
        summary = json.loads((run / "summary.json").read_text())
        if result.code == 0 and (summary.get("status") != "completed" or summary.get("steps") != 3):
            problems.append(f"summary.json after resume: status {summary.get('status')}, steps {summary.get('steps')}")
    except (OSError, ValueError) as exc:
        problems.append(f"summary.json unreadable after resume: {exc}")
    return problems


def artefact_resume(rng, d, ctx, kind):
    run = d / "run"
    shutil.copytree(ctx.run_dir, run)  # a real copy: training appends to its files
    path = run / "metrics.jsonl"
    text = path.read_text()
    body, last = text.rstrip("\n").rsplit("\n", 1)
    if kind == "torn-last-line":
        torn = body + "\n" + last[:rng.randrange(1, len(last) - 1)]
    else:
        torn = text + "{\"step\": 2, \"loss\": 0." + "\x00" * rng.randint(0, 3)
    replace_bytes(path, torn.encode())
    cache = d / "cache"
    argv = ["--out", run, "--resume", "--steps", "3", "--no-progress", "--set", f"data.cache_dir={cache}"]
    return Case("train", argv,
                frozenset({0}), run, f"metrics.jsonl {kind}, then --resume --steps 3", damaged=False,
                ignore=(cache,), check=_metrics_ok)


ARTEFACTS = [
    ("fold-weights", 14, _cycle(*_weights_damage(FOLD))),
    ("adapter-weights", 14, _cycle(*_weights_damage(ADAPTER))),
    ("adapter-config", 0, None),  # filled below: every damage of its list once
    ("run-config", 0, None),
    ("checkpoint", 0, None),
    ("resume", 2, _cycle(artefact_resume, ["torn-last-line", "garbage-tail"])),
    ("missing", len(MISSING), _cycle(artefact_missing, [k for k, _, _ in MISSING])),
    ("evaluate-run", len(EVALUATE_RUN_DAMAGE), _cycle(artefact_evaluate_run, EVALUATE_RUN_DAMAGE)),
]


_ADAPTER_CONFIG_KINDS = [k for k, _ in ADAPTER_CONFIG_DAMAGE] + [k for k, _ in ADAPTER_CONFIG_RAW]
ARTEFACTS[2] = ("adapter-config", len(_ADAPTER_CONFIG_KINDS), _cycle(artefact_adapter_config, _ADAPTER_CONFIG_KINDS))
ARTEFACTS[3] = ("run-config", len(RUN_CONFIG_DAMAGE), _cycle(artefact_run_config, [k for k, _ in RUN_CONFIG_DAMAGE]))
ARTEFACTS[4] = ("checkpoint", len(CHECKPOINT_DAMAGE), _cycle(artefact_checkpoint, CHECKPOINT_DAMAGE))


# ======================================================================================================
# family: unusable output paths, for all three scripts
# ======================================================================================================

OUT_KINDS = ["existing-file", "long-name", "long-component", "parent-is-file", "grandparent-is-file",
             "symlink-to-file", "dangling-symlink", "input-as-out"]


def unusable_out(rng: random.Random, d: Path, kind: str, input_file: Optional[Path] = None) -> tuple:
    """(an --out that cannot be used, the names the error must mention); creates what it needs in `d`."""
    word = rand_word(rng, 4, 8, string.ascii_lowercase)
    if kind == "existing-file":
        out = d / f"taken_{word}"
        out.write_text("keep me\n")
        return out, (out.name,)
    if kind == "long-name":
        out = d / ("n" * rng.randint(256, 400))
        return out, (out.name,)
    if kind == "long-component":
        (d / "a").mkdir()
        long = "c" * rng.randint(256, 400)
        return d / "a" / long / "out", (long,)
    if kind in ("parent-is-file", "grandparent-is-file"):
        f = d / f"file_{word}"
        f.write_text("")
        return (f / "sub" if kind == "parent-is-file" else f / "sub" / "deeper"), (f.name,)
    if kind == "symlink-to-file":
        f = d / f"target_{word}"
        f.write_text("keep me\n")
        (d / "link").symlink_to(f)
        return d / "link", ("link",)
    if kind == "dangling-symlink":
        (d / "link").symlink_to(d / f"nowhere_{word}")
        return d / "link", ("link",)
    if kind == "input-as-out":
        return input_file, (input_file.name,)
    if kind == "read-only":
        locked = d / "locked"
        locked.mkdir()
        locked.chmod(0o555)
        return locked / "out", ("locked",)
    raise ValueError(kind)


def out_predict(rng, d, ctx, kind):
    fasta, _ = write_valid_fasta(d, rng)
    out, names = unusable_out(rng, d, kind, fasta)
    return Case("predict", predict_argv(ctx, fasta, out, rng), frozenset({2}), out, f"predict --out {kind}",
                names=names)


def out_evaluate(rng, d, ctx, kind):
    seq, ca = random_chain(rng)
    ref = write_structure(d / f"r{structure_suffix(rng)}", seq, ca)
    pred = write_structure(d / f"p{structure_suffix(rng)}", seq, noisy(rng, ca))
    out, names = unusable_out(rng, d, kind, pred)
    return Case("evaluate", ["--pred", pred, "--ref", ref, "--out", out, "--quiet", "--no-plots"], frozenset({2}), out,
                f"evaluate --out {kind}", names=names)


def out_train(rng, d, ctx, kind):
    out, names = unusable_out(rng, d, kind)
    cache = d / "cache"
    return Case("train", ["--config", ctx.config_py, "--out", out, "--no-progress", "--set", f"data.cache_dir={cache}"],
                frozenset({2}), out, f"train_fold --out {kind}", names=names, ignore=(cache,))


OUTPUTS = [("predict", len(OUT_KINDS), _cycle(out_predict, OUT_KINDS)),
           ("evaluate", len(OUT_KINDS), _cycle(out_evaluate, OUT_KINDS)),
           ("train", len(OUT_KINDS) - 1, _cycle(out_train, OUT_KINDS[:-1]))]
READ_ONLY = [("predict", out_predict), ("evaluate", out_evaluate), ("train", out_train)]


# ======================================================================================================
# family: bad flags and config values
# ======================================================================================================

def _train_flags(extra_fn, print_config=False):
    def build(rng, d, ctx):
        extra, names, desc = extra_fn(rng, d, ctx)
        cache = d / "cache"
        argv = ["--config", ctx.config_py, "--out", d / "run", "--no-progress", "--set", f"data.cache_dir={cache}"]
        if extra and extra[0] == "--resume":  # a resume brings its own --out
            argv = ["--no-progress"]
        out = Path(extra[extra.index("--out") + 1]) if "--out" in extra else d / "run"
        return Case("train", argv + list(extra) + (["--print-config"] if print_config else []), frozenset({2}),
                    out, f"train_fold {desc}", names=names, ignore=(cache, d / "__pycache__"))
    return build


def _predict_flags(extra_fn):
    def build(rng, d, ctx):
        fasta, _ = write_valid_fasta(d, rng)
        extra, names, desc = extra_fn(rng, d, ctx)
        out = d / "out"
        argv = ["--fasta", fasta, "--run", ctx.run_dir, "--out", out, "--quiet"]
        if "--run" in extra or extra_fn is _predict_modes:
            argv = ["--fasta", fasta, "--out", out, "--quiet"]
        return Case("predict", argv + list(extra), frozenset({2}), out, f"predict {desc}", names=names)
    return build


def _evaluate_flags(extra_fn, with_files=True):
    def build(rng, d, ctx):
        extra, names, desc = extra_fn(rng, d, ctx)
        out = d / "out"
        argv = ["--out", out, "--quiet", "--no-plots"]
        if with_files:
            seq, ca = random_chain(rng)
            ref = write_structure(d / "r.pdb", seq, ca)
            pred = write_structure(d / "p.pdb", seq, noisy(rng, ca))
            argv = ["--pred", pred, "--ref", ref] + argv
        return Case("evaluate", argv + list(extra), frozenset({2}), out, f"evaluate {desc}", names=names)
    return build


def _bad_set_value(rng, d, ctx):
    key, pool = rng.choice([("train.steps", ["abc", "1.5", "[1]", "{}", "None", "nan", "true", ""]),
                            ("train.batch_size", ["x", "2.5", "[2]"]), ("optim.lr", ["abc", "[1]", "none", "{}"]),
                            ("adapter.rank", ["x", "2.5", "true"]), ("model.trunk.num_blocks", ["x", "1.5"]),
                            ("train.seed", ["abc", "1.5"]), ("adapter.modes", ["7", "[1]"]),
                            ("train.bf16", ["maybe", "2"])])
    value = rng.choice(pool)
    return ["--set", f"{key}={value}"], (key, "modes") if key == "adapter.modes" else (key,), f"--set {key}={value}"


def _unknown_key(rng, d, ctx):
    key = ["train.stepz", "foo.bar", "model.trunk.nonexistent", "adapter.rnak", "Train.steps", "train..steps",
           ".train", "train.steps.x", "steps"][ctx.index % 9]
    return ["--set", f"{key}=1"], (key,), f"--set {key}=1 (unknown key)"


def _malformed_set(rng, d, ctx):
    item = ["noequals", "=5", "train.steps", " = ", "model=3", "train={}", "model.trunk=1"][ctx.index % 7]
    key = item.split("=")[0].strip()
    names = (key,) if "=" in item and key else (item, "''")
    return ["--set", item], names, f"--set {item!r}"


def _bad_modes(rng, d, ctx):
    value = ["foo", "", "heads,heads", "matrices,layers", "heads;matrices", "HEADS", "all,heads", ",,"][ctx.index % 8]
    return ["--modes", value, "--adapter", "lorta"], ("modes",), f"--modes {value!r}"


def _modes_without_lorta(rng, d, ctx):
    adapter = ["lora", "none", "full"][ctx.index % 3]
    return ["--modes", "heads", "--adapter", adapter], ("--modes",), f"--modes heads --adapter {adapter}"


def _rank_without_adapter(rng, d, ctx):
    adapter, flag = [("none", ("--rank", "4")), ("full", ("--alpha", "2"))][ctx.index % 2]
    return [*flag, "--adapter", adapter], (flag[0],), f"{' '.join(flag)} --adapter {adapter}"


def _argparse_train(rng, d, ctx):
    flag, value = [("--rank", "-3"), ("--rank", "0"), ("--rank", "abc"), ("--steps", "-1"), ("--steps", "0"),
                   ("--crop-size", "-16"), ("--alpha", "-1"), ("--alpha", "0"), ("--alpha", "nan"), ("--alpha", "inf"),
                   ("--alpha", "-inf"), ("--seed", "abc"), ("--adapter", "foo"), ("--steps", "1e3")][ctx.index % 14]
    return [flag, value], (flag,), f"{flag} {value}"


# each is refused by the contract; one that is not refused trains for the tiny config's one step
NEGATIVE_VALUES = [("optim.lr", "-1"), ("optim.lr", "0"), ("train.batch_size", "0"), ("train.crop_size", "-16"),
                   ("train.max_recycles", "-1"), ("adapter.rank", "0"), ("adapter.alpha", "-2"),
                   ("model.trunk.num_blocks", "-1"), ("model.trunk.num_blocks", "-3"), ("data.num_workers", "-1"),
                   ("adapter.dropout", "1.5"), ("train.effective_batch_size", "-2"), ("train.steps", "-5"),
                   ("train.log_every", "-1"), ("val.num_recycles", "-1"), ("optim.warmup_steps", "-3"),
                   ("optim.lr", "nan"), ("adapter.alpha", "inf"), ("optim.ema_decay", "1.5"),
                   ("optim.clip_grad_norm", "-1")]


def _negative_value(rng, d, ctx):
    key, value = NEGATIVE_VALUES[ctx.index % len(NEGATIVE_VALUES)]
    return ["--set", f"{key}={value}"], (key, key.rsplit(".", 1)[-1]), f"--set {key}={value}"


def _bad_config_file(rng, d, ctx):
    kind = rng.choice(["missing-name", "syntax-error", "returns-list", "raises", "missing-path"])
    if kind == "missing-name":
        return ["--config", "nonexistent_cfg"], ("nonexistent_cfg",), "--config nonexistent_cfg"
    if kind == "missing-path":
        return ["--config", d / "nope.py"], ("nope.py",), "--config nope.py (missing)"
    path = d / f"{kind.replace('-', '_')}.py"
    path.write_text({"syntax-error": "def get_config(:\n", "returns-list": "def get_config():\n    return [1]\n",
                     "raises": "def get_config():\n    raise RuntimeError('boom')\n"}[kind])
    return ["--config", path], (path.name,), f"--config {path.name} ({kind})"


def _bad_resume(rng, d, ctx):
    kind = ctx.index % 5
    if kind == 0:
        return ["--resume"], ("--out",), "--resume without --out"
    if kind == 1:
        shutil.copytree(ctx.run_dir, d / "run")  # a real copy: a resume that goes ahead appends to its files
        return (["--resume", "--out", d / "run", "--adapter", "lora"], ("adapter.method", "--adapter"),
                "--resume --adapter lora on a lorta run (locked)")
    if kind == 2:
        (d / "empty").mkdir()
        return ["--resume", "--out", d / "empty"], ("empty",), "--resume --out an empty directory"
    if kind == 3:
        return ["--resume", "--out", d / "nonexistent"], ("nonexistent",), "--resume --out a missing directory"
    run = d / "copy"
    shutil.copytree(ctx.run_dir, run)
    key, value = rng.choice([("adapter.rank", "5"), ("model.trunk.num_blocks", "3"), ("optim.lr", "0.5")])
    return ["--resume", "--out", run, "--set", f"{key}={value}"], (key,), f"--resume --set {key}={value} (locked)"


def _train_device(rng, d, ctx):
    device = rng.choice(["tpu", "cuda:99", "cpu:x", "meta", "foo"])
    return ["--device", device], (device,), f"--device {device}"


def _argparse_predict(rng, d, ctx):
    flag, value = [("--num-recycles", "-1"), ("--num-recycles", "abc"), ("--format", "xyz"), ("--max-length", "-5"),
                   ("--max-length", "abc"), ("--max-tokens-per-batch", "0"), ("--max-tokens-per-batch", "-5"),
                   ("--merge-tolerance", "-1"), ("--merge-tolerance", "0"), ("--merge-tolerance", "nan"),
                   ("--merge-tolerance", "inf"), ("--merge-tolerance", "abc")][ctx.index % 12]
    return [flag, value], (flag,), f"{flag} {value}"


PREDICT_MODES = ["esmfold-missing", "esmfold-garbage", "esmfold-safetensors", "run-and-esmfold", "neither",
                 "lm-with-run", "checkpoint-with-esmfold", "set-with-esmfold", "chunk-size-0", "chunk-size-negative",
                 "chunk-size-abc"]


def _predict_modes(rng, d, ctx):
    """--run / --esmfold / --lm / --checkpoint / --chunk-size combinations that cannot be used."""
    kind = PREDICT_MODES[ctx.index % len(PREDICT_MODES)]
    garbage = d / "garbage.pt"
    garbage.write_bytes(bytes(rng.randrange(256) for _ in range(256)))
    lm = d / "lm.pt"
    lm.write_bytes(bytes(rng.randrange(256) for _ in range(64)))
    run = ["--run", ctx.run_dir]
    return {
        "esmfold-missing": (["--esmfold", d / "missing_esmfold.pt", "--lm", lm], ("missing_esmfold.pt",)),
        "esmfold-garbage": (["--esmfold", garbage, "--lm", lm], ("garbage.pt", "lm.pt")),
        "esmfold-safetensors": (["--esmfold", ctx.run_dir / FOLD, "--lm", lm], (FOLD.name, "lm.pt")),
        "run-and-esmfold": (run + ["--esmfold", garbage], ("--run", "--esmfold")),
        "neither": ([], ("--run", "--esmfold")),
        "lm-with-run": (run + ["--lm", lm], ("--lm",)),
        "checkpoint-with-esmfold": (["--esmfold", garbage, "--lm", lm, "--checkpoint", ctx.run_dir / LAST],
                                    ("--checkpoint",)),
        "set-with-esmfold": (["--esmfold", garbage, "--lm", lm, "--set", "model.trunk.chunk_size=4"], ("--set",)),
        "chunk-size-0": (run + ["--chunk-size", "0"], ("--chunk-size",)),
        "chunk-size-negative": (run + ["--chunk-size", "-3"], ("--chunk-size",)),
        "chunk-size-abc": (run + ["--chunk-size", "abc"], ("--chunk-size",)),
    }[kind] + (f"{kind}",)


def _predict_device(rng, d, ctx):
    device = ["tpu", "cuda:99", "cpu:x", "meta", "foo"][ctx.index % 5]
    return ["--device", device], (device,), f"--device {device}"


def _predict_set(rng, d, ctx):
    item, names = [("model.trunk.chunk_size=abc", ("model.trunk.chunk_size",)), ("no.such.key=1", ("no.such.key",)),
                   (f"model.lm.path={d / 'nope_lm'}", ("nope_lm",)), ("val.num_recycles=-1", ("num_recycles",)),
                   ("model.trunk.chunk_size=-4", ("chunk_size",)), ("adapter.rank=5", ("adapter", "rank")),
                   ("noequals", ("noequals",)), ("model.trunk.num_blocks=0", ("num_blocks", "fold_model")),
                   ("adapter.method=foo", ("adapter.method",)), ("model.trunk=3", ("model.trunk",))][ctx.index % 10]
    return ["--set", item], names, f"--set {item}"


def _predict_run(rng, d, ctx):
    kind = ["missing", "file", "empty-dir", "run-subdir"][ctx.index % 4]
    target = {"missing": d / "no_run", "file": d / "run_file", "empty-dir": d / "empty_run",
              "run-subdir": ctx.run_dir / "model"}[kind]
    if kind == "file":
        target.write_text("{}\n")
    elif kind == "empty-dir":
        target.mkdir()
    return ["--run", target], (target.name,), f"--run {kind}"


def _lddt_cutoff(rng, d, ctx):
    value = ["-1", "0", "nan", "inf", "-inf", "abc"][ctx.index % 6]
    return ["--lddt-cutoff", value], ("--lddt-cutoff", "lddt"), f"--lddt-cutoff {value}"


def _evaluate_modes(rng, d, ctx):
    seq, ca = random_chain(rng)
    f = write_structure(d / "x.pdb", seq, ca)
    kind = ctx.index % 9
    return [(["--run", ctx.run_dir, "--pred", f], ("--run", "--pred"), "--run with --pred"),
            (["--pred", f], ("--ref",), "--pred without --ref"),
            (["--ref", f], ("--pred",), "--ref without --pred"),
            (["--run", d / "no_run"], ("no_run",), "--run missing"),
            (["--run", f], ("x.pdb",), "--run a file"),
            (["--run", ctx.run_dir, "--split", "foo"], ("--split",), "--split foo"),
            (["--run", ctx.run_dir, "--max-chains", "-1"], ("--max-chains",), "--max-chains -1"),
            (["--run", ctx.run_dir, "--lddt-cutoff", "10"], ("--lddt-cutoff",), "--run --lddt-cutoff 10"),
            (["--run", ctx.run_dir, "--checkpoint", d / "missing.pt"], ("missing.pt",), "--run --checkpoint missing"),
            ][kind]


def _evaluate_run_flags(rng, d, ctx):
    return [(["--run", ctx.run_dir, "--num-recycles", "-3"], ("--num-recycles",), "--run --num-recycles -3"),
            (["--run", ctx.run_dir, "--device", "tpu"], ("tpu",), "--run --device tpu")][ctx.index % 2]


FLAGS = [("train-set-value", 6, _train_flags(_bad_set_value)), ("train-unknown-key", 9, _train_flags(_unknown_key)),
         ("train-malformed-set", 7, _train_flags(_malformed_set)), ("train-modes", 8, _train_flags(_bad_modes)),
         ("train-modes-adapter", 3, _train_flags(_modes_without_lorta)),
         ("train-rank-adapter", 2, _train_flags(_rank_without_adapter)),
         ("train-argparse", 14, _train_flags(_argparse_train)),
         ("train-negative", len(NEGATIVE_VALUES), _train_flags(_negative_value)),
         ("train-config-file", 4, _train_flags(_bad_config_file)),
         ("train-resume", 5, _train_flags(_bad_resume, print_config=False)),
         ("train-device", 2, _train_flags(_train_device, print_config=False)),
         ("predict-argparse", 12, _predict_flags(_argparse_predict)),
         ("predict-device", 5, _predict_flags(_predict_device)),
         ("predict-modes", len(PREDICT_MODES), _predict_flags(_predict_modes)),
         ("predict-set", 10, _predict_flags(_predict_set)), ("predict-run", 4, _predict_flags(_predict_run)),
         ("evaluate-lddt-cutoff", 6, _evaluate_flags(_lddt_cutoff)),
         ("evaluate-modes", 9, _evaluate_flags(_evaluate_modes, with_files=False)),
         ("evaluate-run-flags", 2, _evaluate_flags(_evaluate_run_flags, with_files=False))]

REGISTRY = {"fasta": FASTA, "pdb": PDB, "artefacts": ARTEFACTS, "outputs": OUTPUTS, "flags": FLAGS}


def build_cases(family: str, ctx: Context, root: Path):
    """Yield (case, case_dir) for every case of `family`, each built in its own directory under `root`."""
    for kind, count, builder in REGISTRY[family]:
        for i in range(count):
            rng = random.Random(f"{SEED}/{family}/{kind}/{i}")
            d = root / family / f"{kind}-{i}"
            d.mkdir(parents=True)
            ctx.index = i
            case = builder(rng, d, ctx)
            case.family, case.name = family, f"{family}/{kind}-{i}"
            yield case, d


def run_family(family: str, ctx: Context, root: Path) -> list:
    return [run_case(case, ctx, d) for case, d in build_cases(family, ctx, root)]
