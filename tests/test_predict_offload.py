"""--cpu-offload (fold/model/offload.py): the language model's layers stay in host memory, each gets device copies
for its own forward only, outputs unchanged; refused without a GPU. Its GPU memory and time are a GPU-suite cell
(bench/gpu_suite.py, predict section, "ours, LM offloaded")."""

import pytest
import torch

from esmfold_peft.fold.model.offload import offload_language_model, offload_layers
from esmfold_peft.fold.predict import PredictionError, predict_fasta
from esmfold_peft.fold.run.checkpoint import load_trained_model
from fold_fixtures import load_script

pytestmark = pytest.mark.usefixtures("one_thread")


def test_offloaded_layers_give_the_same_outputs_and_load_once_per_forward(tiny_lorta_run):
    """On CPU the device copy is the host tensor itself: this checks the hooks and outputs; the GPU suite the rest."""
    model, _ = load_trained_model(tiny_lorta_run)
    model.eval()
    tokens = torch.tensor([[0, 5, 6, 7, 8, 9, 2]])
    with torch.no_grad():
        before = model.esm(tokens, repr_layers=[model.esm.num_layers])["representations"][model.esm.num_layers]
    offload = offload_language_model(model, torch.device("cpu"))
    layers = list(model.esm.layers)
    host = layers[0].fc1.weight.data_ptr()
    with torch.no_grad():
        after = model.esm(tokens, repr_layers=[model.esm.num_layers])["representations"][model.esm.num_layers]
    assert torch.equal(before, after)  # the adapter (unmerged) applied as before
    assert offload.loads == len(layers) and offload.host_bytes > 0
    assert layers[0].fc1.weight.data_ptr() == host  # after its forward, the layer holds its host copy again
    offload.remove()
    assert not offload.handles


def test_trainable_layers_are_not_offloaded(tiny_lorta_run):
    model, _ = load_trained_model(tiny_lorta_run)
    model.esm.layers[0].fc1.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="trainable"):
        offload_layers([model.esm.layers[0]], torch.device("cpu"))


def test_cpu_offload_without_a_gpu_is_refused_in_one_line(tiny_lorta_run, tmp_path, capsys):
    fasta = tmp_path / "in.fasta"
    fasta.write_text(">a\nMKTAYIAKQR\n")
    assert load_script("predict").main(["-i", str(fasta), "--run", str(tiny_lorta_run), "-o", str(tmp_path / "o"),
                                        "--cpu-only", "--cpu-offload"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--cpu-offload" in err and "Traceback" not in err
    with pytest.raises(PredictionError, match="cpu-offload"):
        predict_fasta(fasta, tiny_lorta_run, tmp_path / "p", device="cpu", cpu_offload=True, progress=False)
    assert not (tmp_path / "o").exists() and not (tmp_path / "p" / "a.pdb").exists()
