"""The fine-tuning demonstration end to end on the tiniest shapes (--smoke): its stages, files, table and reruns.

Its numbers are not checked (two steps per run say nothing); what is checked is that every stage ran
with the model it should have (the base file exported from the base run, only adapters trained in
the fine-tuning, the merged adapter used for prediction), and that a rerun skips what is done.
"""

import json

import pytest

import background
from conftest import bench_module
from esmfold_peft.runtime.errors import EXIT_OK, EXIT_USAGE
from fold_fixtures import load_script

demo = load_script("demo_finetune")  # the example: scripts/demo_finetune.py
DemoSettings, base_overrides, finetune_overrides, make_families = (
    demo.DemoSettings, demo.base_overrides, demo.finetune_overrides, demo.make_families)


@background.job("demo_finetune_smoke_program")
def demo_finetune_smoke_program(folder):
    out = folder / "demo"
    return background.run("scripts/demo_finetune.py", "--smoke", "--out", str(out), "--no-progress"), out


def test_smoke_demonstration_runs_every_stage_and_reruns_nothing(demo_data, capsys):
    """The demonstration as a program (in the background while the in-process tests run), then rerun in-process."""
    script = load_script("demo_finetune")
    proc, out = background.result("demo_finetune_smoke_program")
    assert proc.returncode == EXIT_OK, proc.stderr[-3000:]
    printed = proc.stdout
    assert "| fine-tuned, heads frozen | new family" in printed and "next: python scripts/predict.py" in printed
    assert "pLDDT calibration error (ECE" in printed and "above the better sequence-only baseline" in printed

    for family in ("base", "new"):
        manifest = json.loads((out / "families" / family / "manifest.json").read_text())
        assert {v["split"] for v in manifest["variants"]} == {"train", "val"}
    base_parents = {p["name"] for p in json.loads((out / "families/base/manifest.json").read_text())["parents"]}
    new_parents = {p["name"] for p in json.loads((out / "families/new/manifest.json").read_text())["parents"]}
    assert len(base_parents) == 2 and len(new_parents) == 1 and new_parents <= base_parents  # distant: a base fold
    rates = {f: json.loads((out / "families" / f / "manifest.json").read_text())["rate"] for f in ("base", "new")}
    assert rates == {"base": 0.3, "new": 0.6}

    results = json.loads((out / "results.json").read_text())
    base, ft = results["stages"]["base"], results["stages"]["finetune"]
    assert base["steps"] == 2 and ft["steps"] == 2
    assert base["trainable_parameters"]["trunk_and_heads"] > 0 and base["trainable_parameters"]["adapter"] == 0
    assert ft["trainable_parameters"]["adapter"] == ft["trainable_parameters"]["total"] > 0  # only the adapters
    heads = results["stages"]["finetune_heads"]["trainable_parameters"]  # the adapters and the confidence heads
    assert heads["adapter"] == ft["trainable_parameters"]["adapter"] and heads["trunk_and_heads"] > 0
    heads_cfg = json.loads((out / "finetune_heads" / "config.json").read_text())
    assert heads_cfg["model"]["trainable"] == "confidence" and heads_cfg["optim"]["confidence_lr"] == 1e-2
    assert json.loads((out / "finetune" / "config.json").read_text())["model"]["init_from"].endswith("base_esmfold.pt")
    assert (out / "base_esmfold.pt").is_file() and results["stages"]["export"]["esm_type"] == "esm2_8M_270K"
    assert {(s["model"], s["family"]) for s in results["scores"]} == {
        (m, f) for m in ("base", "finetuned", "finetuned_heads", "routed") for f in ("base", "new")}
    routed = {f: results["routing"][f] for f in ("base", "new")}  # the library's one entry, --adapter auto
    assert routed["base"]["n"] == 2 and routed["new"]["n"] == 1
    assert all(r["to_adapter"] + r["to_base"] == r["n"] and 0 <= r["accuracy"] <= 1 for r in routed.values())
    assert (out / "library" / "new_family" / "adapter" / "sketch.json").is_file()
    assert "| routing accuracy |" in (out / "results.md").read_text()
    routing_demo = bench_module("routing_demo")  # its BENCHMARKS.md section, from these results
    targets, reading = routing_demo.read_routing_demo({"results": results})
    assert [t[3] for t in targets] == ["met" if float(t[2]) >= -0.01 else "missed" for t in targets]
    assert "Routing accuracy" in reading and routing_demo.tables(results)[0]["rows"][0][1] == 1
    for s in results["scores"]:
        assert (out / "eval" / f"{s['model']}-on-{s['family']}" / "report" / "report.json").is_file()
        assert s["n_chains"] == (2 if s["family"] == "base" else 1) and 0 <= s["lddt_ca"] <= 1
        assert s["adapter_merged"] == (s["model"] not in ("base", "routed"))
        assert s["pearson_r"] is None and "fewer than" in s["correlation_caveat"]  # 1-2 chains: no r, and why
        assert s["lddt_ca_margin"]["better_baseline"] in ("helix", "compact")
    for name in ("families", "base", "export", "finetune", "finetune_heads", "evaluate"):
        assert results["stages"][name]["wall_s"] >= 0 and results["stages"][name]["cpu_s"] >= 0
    table = (out / "results.md").read_text()
    assert table.count("| fine-tuned, heads frozen |") == 2 and table.count("| base (exported file) |") == 2
    assert table.count("| fine-tuned, heads trained |") == 2 and "| none: n too small |" in table
    assert all(f"| {name} |" in table for name in ("families", "base", "export", "finetune", "finetune_heads",
                                                   "evaluate"))
    assert "scripts/train_fold.py --config demo" in table and "scripts/export_esmfold.py" in table

    state = (out / "demo.json").read_text()
    report = (out / "eval" / "finetuned-on-new" / "predictions" / "predictions.json").stat().st_mtime_ns
    assert script.main(["--smoke", "--out", str(out), "--no-progress"]) == EXIT_OK  # everything done: skipped
    assert (out / "demo.json").read_text() == state
    assert (out / "eval" / "finetuned-on-new" / "predictions" / "predictions.json").stat().st_mtime_ns == report
    assert json.loads((out / "results.json").read_text())["scores"] == results["scores"]

    capsys.readouterr()
    assert script.main(["--smoke", "--out", str(out), "--rank", "3", "--no-progress"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "rank=2 (asked: 3)" in err and err.count("\n") == 1


def test_the_runs_are_the_recipe(tmp_path):
    settings = DemoSettings()
    base = base_overrides(settings, tmp_path)
    ft = finetune_overrides(settings, tmp_path)
    assert "adapter.method=none" in base and "data.source=dir" in base
    for item in ("adapter.method=lorta", "adapter.scope=both", "model.trainable=",
                 f"model.init_from={tmp_path / 'base_esmfold.pt'}", f"optim.lr={settings.finetune_lr}"):
        assert item in ft
    heads = finetune_overrides(settings, tmp_path, heads=True)
    assert "model.trainable=confidence" in heads and "model.trainable=" not in heads
    assert [o for o in heads if not o.startswith(("model.trainable", "optim.confidence_lr"))] == \
        [o for o in ft if o != "model.trainable="]  # the same run otherwise
    trunk = [o for o in ft if o.startswith("model.trunk")]
    assert trunk == [o for o in base if o.startswith("model.trunk")]  # the same architecture, or init_from refuses


def test_an_unseen_new_family_is_on_a_parent_the_base_never_saw(demo_data, tmp_path):
    settings = DemoSettings.smoke(new_family="unseen", new_rate=0.3)
    sets = make_families(settings, demo_data.root, tmp_path)
    base = [p["name"] for p in sets["base"]["parents"]]
    new = [p["name"] for p in sets["new"]["parents"]]
    assert len(base) == settings.n_families and len(new) == 1 and new[0] not in base
    assert sets["new"]["rate"] == 0.3
    distant = make_families(DemoSettings.smoke(), demo_data.root, tmp_path / "distant")
    assert [p["name"] for p in distant["new"]["parents"]] == base[:1]  # the first base parent's fold
    with pytest.raises(ValueError, match="new_family must be one of distant, unseen"):
        DemoSettings(new_family="novel")


def test_a_clade_shares_its_ancestors_residues(demo_data, tmp_path):
    """The clade kind: variants of one ancestor (the first base parent at new_rate): its members share the
    ancestor's substitutions, so they are closer to each other than to the base family on the same fold."""
    from esmfold_peft.fold.run.sketch import Sketch

    settings = DemoSettings.smoke(new_family="clade")
    sets = make_families(settings, demo_data.root, tmp_path)
    assert sets["new"]["rate"] == settings.rate and sets["new"]["parents"][0]["name"].endswith("_clade")
    read = lambda f, split: (tmp_path / "families" / f / f"{split}.fasta").read_text().split(">")[1:]  # noqa: E731
    seqs = lambda f, split: ["".join(r.splitlines()[1:]) for r in read(f, split)]  # noqa: E731
    new_train, base_train = Sketch.of(seqs("new", "train")), Sketch.of(seqs("base", "train"))
    for q in seqs("new", "val"):
        assert new_train.score(q) > base_train.score(q)
