"""Many adapters over one ESMFold (fold/predict/library.py, predict.py --adapter-library): records of different
adapters share batches, and each record's structure and pLDDT equal its prediction alone with its adapter (LoRTA
and LoRA, language model and trunk, monomers and a multimer); per-record choices (adapter=NAME, --adapter,
auto routing) and their outputs."""

import copy
import json

import numpy as np
import pytest
import torch

from esmfold_peft.adapters import LoRAConfig, LoRTAConfig, add_adapter, get_adapter_set, load_adapter, save_adapter
from esmfold_peft.fold.model.build import TRUNK_FAMILIES
from esmfold_peft.fold.predict import predict_fasta, predict_sequences
from esmfold_peft.fold.predict.library import (AdapterLibrary, Choice, LibraryError, LibraryOptions, scan_library,
                                               serve_library)
from esmfold_peft.fold.run.esmfold_read import load_esmfold_checkpoint
from esmfold_peft.fold.run.sketch import Sketch
from fold_fixtures import load_script, tiny_run_config, write_esmfold_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

POS_TOL, PLDDT_TOL = 1e-3, 0.01  # Å, pLDDT points
SEQS = {"q1": "MKTAYIAKQRQISFVKSHFSRQ", "q2": "GSHMLEDPVKRWACDEFG", "q3": "MKTAYIAKQR:DPWERSHLNVQA",
        "q4": "LLGDFFRKSKEKIGKEFKRIV", "q5": "MKTAYIAKQRQISFVKSHFSRQ"}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("library_base")
    cfg = tiny_run_config(tmp)
    return write_esmfold_checkpoint(cfg, tmp / "base.pt"), cfg.model.lm.path


def load_base(base):
    model, _ = load_esmfold_checkpoint(base[0], lm=base[1])
    return model.eval()


def perturb(adapter, seed, scale=0.5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def write_entry(base, folder, parts: dict, seed: int, sketch_of=()):
    """A library entry: adapters (random nonzero factors) on the base's LM ("esm") and/or trunk, saved as a run
    saves them (adapter/, trunk_adapter/), with a routing sketch of `sketch_of`."""
    model = load_base(base)
    for part, config in parts.items():
        module = getattr(model, part)
        layout = TRUNK_FAMILIES if part == "trunk" else None
        perturb(add_adapter(module, copy.deepcopy(config), layout=layout), seed + len(part))
        directory = folder / ("adapter" if part == "esm" else "trunk_adapter")
        save_adapter(module, directory)
        if sketch_of:
            Sketch.of(sketch_of).save(directory)
    return folder


def solo(base, entry, sequences):
    """Each sequence predicted alone with the entry's adapters (None: the base model)."""
    model = load_base(base)
    if entry is not None:
        for part, d in (("esm", "adapter"), ("trunk", "trunk_adapter")):
            if (entry / d).is_dir():
                load_adapter(getattr(model, part), entry / d)
    return [predict_sequences(model, [s], torch.device("cpu"), 0)[0] for s in sequences]


def assert_same(a, b):
    assert a.atom_positions.shape == b.atom_positions.shape
    assert np.abs(a.atom_positions - b.atom_positions).max() <= POS_TOL
    assert np.abs(a.plddt - b.plddt).max() <= PLDDT_TOL


@pytest.fixture(scope="module")
def lorta_library(base, tmp_path_factory):
    lib = tmp_path_factory.mktemp("lib_lorta")
    write_entry(base, lib / "lm", {"esm": LoRTAConfig(rank=4, alpha=8)}, 1, sketch_of=[SEQS["q1"], SEQS["q5"]])
    write_entry(base, lib / "trunk", {"trunk": LoRTAConfig(rank=2, alpha=4)}, 2, sketch_of=[SEQS["q2"]])
    write_entry(base, lib / "both", {"esm": LoRTAConfig(rank=2, alpha=2, targets=("q", "v")),
                                     "trunk": LoRTAConfig(rank=3, alpha=3)}, 3, sketch_of=[SEQS["q3"]])
    return lib


@pytest.mark.parametrize("kind", ["lorta", "lora"])
def test_a_mixed_batch_equals_each_record_alone_with_its_adapter(base, lorta_library, tmp_path, kind):
    if kind == "lorta":
        lib = lorta_library
    else:
        lib = tmp_path / "lib"
        write_entry(base, lib / "lm", {"esm": LoRAConfig(rank=2, alpha=4)}, 4)
        write_entry(base, lib / "trunk", {"trunk": LoRAConfig(rank=1, alpha=2)}, 5)
        write_entry(base, lib / "both", {"esm": LoRAConfig(rank=1, alpha=1), "trunk": LoRAConfig(rank=2)}, 6)
    names = ["lm", None, "both", "trunk", "lm"]  # three adapters and the base, a multimer (q3) among them
    library = AdapterLibrary(lib)
    model = load_base(base)
    serve_library(library, model, base[0], announce=False)
    with library.routed([Choice(n, "fasta") for n in names]):
        mixed = predict_sequences(model, list(SEQS.values()), torch.device("cpu"), 0)
    plain = solo(base, None, SEQS.values())
    for pred, name, seq, bare in zip(mixed, names, SEQS.values(), plain):
        alone = solo(base, None if name is None else lib / name, [seq])[0]
        assert_same(pred, alone)
        if name is not None:  # each adapter visibly moves its records, or the check above proves nothing
            assert np.abs(alone.atom_positions - bare.atom_positions).max() > 10 * POS_TOL, name


def test_predict_writes_each_records_adapter_and_auto_routes_by_training_sequences(base, lorta_library, tmp_path,
                                                                                    capsys):
    fasta = tmp_path / "in.fasta"
    fasta.write_text(">q1 adapter=lm\nMKTAYIAKQRQISFVKSHFSRQ\n>q2\nGSHMLEDPVKRWACDEFG\n"
                     ">q3 adapter=base\nMKTAYIAKQR:DPWERSHLNVQA\n>q4 adapter=nope\nLLGDFFRKSKEKIGKEFKRIV\n"
                     ">q5\nLLGDFFRKSKEKIGKEFKRIV\n")
    assert load_script("predict").main(["-i", str(fasta), "--esmfold", str(base[0]), "--lm", str(base[1]),
                                        "-o", str(tmp_path / "o"), "--adapter-library", str(lorta_library),
                                        "--adapter", "auto", "--cpu-only", "--no-progress", "--num-recycles",
                                        "0"]) == 1  # q4 names an adapter the library lacks: that record fails
    out = tmp_path / "o"
    summary = json.loads((out / "predictions.json").read_text())
    by_id = {p["id"]: p for p in summary["predictions"]}
    assert by_id["q1"]["adapter"] == "lm" and by_id["q1"]["routing"]["how"] == "fasta"
    assert by_id["q2"]["adapter"] == "trunk" and by_id["q2"]["routing"]["how"] == "auto"
    assert by_id["q2"]["routing"]["score"] == 1.0  # its own training sequence
    assert by_id["q3"]["adapter"] == "base"
    assert by_id["q5"]["adapter"] == "base" and by_id["q5"]["routing"]["score"] < 0.1  # unrelated: the base
    assert "REMARK" in (out / "q1.pdb").read_text() and "q1 adapter lm" in (out / "q1.pdb").read_text()
    rows = [line.split("\t") for line in (out / "summary.tsv").read_text().splitlines()]
    assert rows[0][3] == "adapter" and [r[3] for r in rows[1:4]] == ["lm", "trunk", "base"]
    assert summary["adapter_library"] == str(lorta_library) and summary["adapter_default"] == "auto"
    failed = {f["id"]: f["reason"] for f in summary["failures"]}
    assert "'nope' is not in the library" in failed["q4"]
    assert "adapter_merged" in summary and summary["adapter_merged"] is False
    assert summary["library"]["resident_bytes"] > 0 and summary["library"]["bytes_per_resident_adapter"] > 0


def test_library_entries_and_refusals_are_one_line(base, lorta_library, tmp_path):
    assert sorted(scan_library(lorta_library)) == ["both", "lm", "trunk"]
    assert set(scan_library(lorta_library)["both"].parts) == {"esm", "trunk"}
    (tmp_path / "empty").mkdir()
    with pytest.raises(LibraryError, match="holds no adapter"):
        scan_library(tmp_path / "empty")
    (tmp_path / "odd" / "x").mkdir(parents=True)
    with pytest.raises(LibraryError, match="not a library entry"):
        scan_library(tmp_path / "odd")
    other = tmp_path / "other.pt"
    from fold_fixtures import tiny_run_config as cfg_of
    write_esmfold_checkpoint(cfg_of(tmp_path / "o"), other, seed=9)
    library = AdapterLibrary(lorta_library, capacity=1)
    model, _ = load_esmfold_checkpoint(other, lm=base[1])
    serve_library(library, model, other, announce=False)
    with pytest.raises(LibraryError, match="trunk_adapter.*allow_other_base"):
        with library.routed([Choice("trunk", "fasta")]):
            pass


def test_the_cache_keeps_at_most_its_capacity_and_reloads_evicted_entries(base, lorta_library):
    library = AdapterLibrary(lorta_library, capacity=2)
    model = load_base(base)
    serve_library(library, model, base[0], announce=False)
    for names in (["lm"], ["trunk"], ["both"], ["lm", "both"], ["lm"]):
        library.ensure(names)
        assert len(library.resident) <= 2 and all(n in library.resident for n in names)
    assert library.loads == 4  # lm, trunk, both, then lm again after its eviction
    assert library.resident_bytes() > 0
    stack = next(iter(get_adapter_set(model.esm).mixed.stacks.values()))
    assert next(iter(stack.tensors.values())).shape[0] == 3  # the base and the 2 the cache holds: no slot wasted
    with pytest.raises(LibraryError, match="more than --adapter-cache 2"):
        library.ensure(["lm", "trunk", "both"])


@pytest.fixture(scope="module")
def finetuned_entry(tmp_path_factory):
    """(base run, its export as an ESMFold file, a slim fine-tuning run from that file): the base trained here (no
    adapter), the fine-tuning run LoRTA on the LM and the trunk with nothing else trained, its adapters then moved
    far enough to change structures visibly and re-saved where the run keeps them."""
    from esmfold_peft.fold.run.checkpoint import load_trained_model
    from esmfold_peft.fold.run.esmfold_write import export_esmfold_checkpoint
    from esmfold_peft.fold.train import train
    from esmfold_peft.runtime.errors import EXIT_OK

    tmp = tmp_path_factory.mktemp("finetuned_entry")
    cfg = tiny_run_config(tmp, adapter="none", steps=2)
    cfg.model.trainable = "trunk"
    assert train(cfg, tmp / "base", progress=False) == EXIT_OK
    export_esmfold_checkpoint(*load_trained_model(tmp / "base"), tmp / "base.pt", esm_type="esm2_8M")
    cfg = tiny_run_config(tmp, adapter="lorta", steps=2)
    cfg.model.init_from, cfg.model.trainable, cfg.adapter.scope = str(tmp / "base.pt"), "", "both"
    assert train(cfg, tmp / "run", progress=False) == EXIT_OK
    model, _ = load_trained_model(tmp / "run")
    for part, directory in (("esm", "adapter"), ("trunk", "trunk_adapter")):
        perturb(get_adapter_set(getattr(model, part)).get(), seed=len(part))
        save_adapter(getattr(model, part), tmp / "run" / directory)
    assert (tmp / "run" / "adapter" / "sketch.json").is_file()  # written by the run's export
    return tmp / "base", tmp / "base.pt", tmp / "run", cfg.model.lm.path


def pdb_atoms(path):
    return np.array([[float(line[30:38]), float(line[38:46]), float(line[46:54])]
                     for line in path.read_text().splitlines() if line.startswith("ATOM")])


@pytest.mark.parametrize("served_over", ["esmfold", "run"])
def test_a_whole_run_entry_predicts_as_the_run_itself(finetuned_entry, tmp_path, served_over):
    """A fine-tuning run as a library entry, served over its base file (--esmfold) or over the base run the file was
    exported from (--run), predicts what `predict.py --run` of that run predicts (PDB coordinates to their 3
    decimals, pLDDT to its 2)."""
    import shutil

    base_run, base_file, run, lm = finetuned_entry
    lib = tmp_path / "lib"
    shutil.copytree(run, lib / "ft")
    fasta = tmp_path / "in.fasta"
    fasta.write_text("".join(f">{k}\n{v}\n" for k, v in SEQS.items() if k in ("q1", "q3")))
    solo_run = predict_fasta(fasta, run, tmp_path / "solo", merge=False, progress=False, num_recycles=0)
    over = dict(run_dir=None, esmfold=base_file, lm=lm) if served_over == "esmfold" else dict(run_dir=base_run)
    mixed = predict_fasta(fasta, out_dir=tmp_path / "lib_out", progress=False, num_recycles=0,
                          library=LibraryOptions(lib, "ft"), **over)
    assert [p["adapter"] for p in mixed.predicted] == ["ft", "ft"]
    for p, q in zip(solo_run.predicted, mixed.predicted):
        assert np.abs(pdb_atoms(tmp_path / "solo" / p["structure"]) -
                      pdb_atoms(tmp_path / "lib_out" / q["structure"])).max() <= 2e-3
        assert p["plddt_per_residue"] == q["plddt_per_residue"] or \
            np.abs(np.array(p["plddt_per_residue"]) - np.array(q["plddt_per_residue"])).max() <= 0.02
    bare = predict_fasta(fasta, out_dir=tmp_path / "bare", progress=False, num_recycles=0, **over)
    moved = max(np.abs(pdb_atoms(tmp_path / "bare" / p["structure"]) - pdb_atoms(tmp_path / "solo" / p["structure"]))
                .max() for p in bare.predicted)
    assert moved > 10 * POS_TOL


def test_a_chunked_trunk_splits_batches_by_adapter_with_the_same_structures(base, lorta_library, tmp_path):
    """--chunk-size flattens triangle attention's batch: trunk adapters of different records cannot be gathered
    in one forward, so the job splits each batch by adapter; the structures are those of the gathered job."""
    fasta = tmp_path / "in.fasta"
    fasta.write_text(">q1 adapter=trunk\nMKTAYIAKQRQISFVKSHFSRQ\n>q2 adapter=both\nGSHMLEDPVKRWACDEFGHI\n"
                     ">q3\nLLGDFFRKSKEKIGKEFKRIV\n")
    library = LibraryOptions(lorta_library, "lm")
    runs = {chunk: predict_fasta(fasta, None, tmp_path / str(chunk), esmfold=base[0], lm=base[1], progress=False,
                                 num_recycles=0, library=library, chunk_size=chunk) for chunk in (None, 4)}
    assert [p["batch_size"] for p in runs[None].predicted] == [3, 3, 3]  # one gathered batch
    assert [p["batch_size"] for p in runs[4].predicted] == [1, 1, 1]  # split by adapter
    for a, b in zip(runs[None].predicted, runs[4].predicted):
        assert a["adapter"] == b["adapter"]
        assert np.abs(pdb_atoms(tmp_path / "None" / a["structure"]) - pdb_atoms(tmp_path / "4" / b["structure"])
                      ).max() <= 2e-3


def test_library_misuse_is_one_line(base, lorta_library, finetuned_entry, tmp_path, capsys):
    import shutil

    fasta = tmp_path / "in.fasta"
    fasta.write_text(">q1\nMKTAYIAKQR\n")
    predict = load_script("predict")
    common = ["-i", str(fasta), "--esmfold", str(base[0]), "--lm", str(base[1]), "--cpu-only", "--no-progress"]
    cases = {"no_library": ["--adapter", "lm"],
             "missing": ["--adapter-library", str(tmp_path / "nowhere")]}
    trunk = tmp_path / "trunk_lib"  # a run that trained its trunk beside its adapters: not the shared base
    shutil.copytree(finetuned_entry[2], trunk / "run")
    from safetensors.torch import save_file
    save_file({"trunk.blocks.0.weight": torch.zeros(2)}, str(trunk / "run" / "model" / "fold_model.safetensors"))
    cases["trained_trunk"] = ["--adapter-library", str(trunk)]
    damaged = tmp_path / "damaged_lib"
    shutil.copytree(lorta_library, damaged)
    (damaged / "lm" / "adapter" / "sketch.json").write_text("{not json")
    cases["damaged_sketch"] = ["--adapter-library", str(damaged), "--adapter", "auto"]
    expected = {"no_library": "give the library too", "missing": "no such adapter library",
                "trained_trunk": "trained trunk.blocks.0.weight beside its adapters", "damaged_sketch": "sketch.json"}
    for name, extra in cases.items():
        capsys.readouterr()
        assert predict.main(common + extra + ["-o", str(tmp_path / name)]) == 2, name
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and expected[name] in err and "Traceback" not in err, (name, err)
        assert not (tmp_path / name / "q1.pdb").exists()


def test_a_run_entry_names_the_esmfold_file_it_was_fine_tuned_from(base, finetuned_entry, tmp_path):
    """A run entry records its model.init_from file's SHA-256: served over another file, it is refused by name."""
    import shutil

    shutil.copytree(finetuned_entry[2], tmp_path / "lib" / "ft")
    library = AdapterLibrary(tmp_path / "lib")
    assert library.entries["ft"].pretrained is not None
    library.attach(load_esmfold_checkpoint(finetuned_entry[1], lm=finetuned_entry[3])[0],
                   finetuned_entry[1])  # its own file: served
    with pytest.raises(LibraryError, match=r"ft: fine-tuned from another ESMFold .* than .*base\.pt"):
        AdapterLibrary(tmp_path / "lib").attach(load_base(base), base[0])


@pytest.fixture(scope="module")
def heads_entry(finetuned_entry, tmp_path_factory):
    """A fine-tuning run from the same base file that trained its confidence heads too (model.trainable=confidence),
    its adapters and pLDDT head then moved so that both visibly change what is written."""
    from esmfold_peft.fold.run.checkpoint import load_trained_model
    from esmfold_peft.fold.train import train
    from esmfold_peft.runtime.artifacts import load_safetensors, save_safetensors
    from esmfold_peft.runtime.errors import EXIT_OK

    tmp = tmp_path_factory.mktemp("heads_entry")
    cfg = tiny_run_config(tmp, adapter="lorta", steps=2)
    cfg.model.init_from, cfg.model.trainable, cfg.adapter.scope = str(finetuned_entry[1]), "confidence", "both"
    assert train(cfg, tmp / "run", progress=False) == EXIT_OK
    model, _ = load_trained_model(tmp / "run")
    for part, directory in (("esm", "adapter"), ("trunk", "trunk_adapter")):
        perturb(get_adapter_set(getattr(model, part)).get(), seed=3 + len(part))
        save_adapter(getattr(model, part), tmp / "run" / directory)
    weights = tmp / "run" / "model" / "fold_model.safetensors"
    heads = load_safetensors(weights)
    assert heads and all(k.startswith(("lddt_head.", "ptm_head.")) for k in heads)
    g = torch.Generator().manual_seed(11)
    save_safetensors({k: v + torch.randn(v.shape, generator=g) * 0.5 for k, v in heads.items()}, weights)
    return tmp / "run"


def test_an_entry_that_trained_its_confidence_heads_brings_them(finetuned_entry, heads_entry, tmp_path):
    """Records of an entry that trained its pLDDT head get that head and its convention (Cα pLDDT on every atom),
    as predict.py --run of the entry writes them; the other records of the same batch keep the base's heads."""
    import shutil

    _, base_file, plain_run, lm = finetuned_entry
    lib = tmp_path / "lib"
    shutil.copytree(heads_entry, lib / "heads")
    shutil.copytree(plain_run, lib / "plain")
    fasta = tmp_path / "in.fasta"
    fasta.write_text(f">h1 adapter=heads\n{SEQS['q1']}\n>p1 adapter=plain\n{SEQS['q2']}\n"
                     f">h2 adapter=heads\n{SEQS['q3']}\n")
    mixed = predict_fasta(fasta, None, tmp_path / "mixed", esmfold=base_file, lm=lm, progress=False, num_recycles=0,
                          library=LibraryOptions(lib))
    by_id = {p["id"]: p for p in mixed.predicted}
    assert {p["batch_size"] for p in mixed.predicted} == {3}  # one batch, two kinds of heads
    solo = predict_fasta(fasta, heads_entry, tmp_path / "solo", progress=False, num_recycles=0, merge=False)
    for p in solo.predicted:
        if p["id"].startswith("h"):
            q = by_id[p["id"]]
            assert q["confidence"]["plddt_head"] == "ca" and q["confidence"]["plddt_head"] == \
                json.loads((tmp_path / "solo" / "predictions.json").read_text())["confidence"]["plddt_head"]
            assert np.abs(np.array(p["plddt_per_residue"]) - np.array(q["plddt_per_residue"])).max() <= 0.02
            assert np.abs(pdb_atoms(tmp_path / "solo" / p["structure"]) -
                          pdb_atoms(tmp_path / "mixed" / q["structure"])).max() <= 2e-3
    plain = predict_fasta(fasta, plain_run, tmp_path / "plain", progress=False, num_recycles=0, merge=False)
    p1 = next(p for p in plain.predicted if p["id"] == "p1")
    assert by_id["p1"]["confidence"]["plddt_head"] == mixed.confidence.plddt  # the base's heads, for this record
    # the base file's pLDDT head was never trained: no number for p1, as its run writes none; the entry's for h1, h2
    assert p1["mean_plddt"] is None and by_id["p1"]["mean_plddt"] is None and mixed.confidence.plddt is None
    assert by_id["h1"]["mean_plddt"] is not None and by_id["h2"]["mean_plddt"] is not None


def test_skip_existing_predicts_again_a_record_whose_adapter_changed(base, lorta_library, tmp_path):
    fasta = tmp_path / "in.fasta"
    fasta.write_text(">q1 adapter=lm\nMKTAYIAKQRQISFVKSHFSRQ\n>q2 adapter=trunk\nGSHMLEDPVKRWACDEFG\n")
    kwargs = dict(esmfold=base[0], lm=base[1], progress=False, num_recycles=0, library=LibraryOptions(lorta_library))
    predict_fasta(fasta, None, tmp_path / "o", **kwargs)
    fasta.write_text(">q1 adapter=both\nMKTAYIAKQRQISFVKSHFSRQ\n>q2 adapter=trunk\nGSHMLEDPVKRWACDEFG\n")
    again = predict_fasta(fasta, None, tmp_path / "o", skip_existing=True, **kwargs)
    assert again.n_reused == 1  # q2: the same sequence, model and adapter
    assert {p["id"]: p["adapter"] for p in again.predicted} == {"q1": "both", "q2": "trunk"}
    assert "q1 adapter both" in (tmp_path / "o" / "q1.pdb").read_text()
