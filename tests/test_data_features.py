"""OpenFold targets from chains, and crop / pad / collate."""

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from esmfold_peft.data.features import (FEATURE_DTYPES, chain_to_features, collate, crop,
                                        model_residue_index, pad_to)
from esmfold_peft.data.structures import parse_structure
from openfold.np import residue_constants as rc
from openfold.utils import loss as of_loss
from openfold.utils.rigid_utils import Rigid


@pytest.fixture
def chain(tmp_path, pdb_lines):
    path = tmp_path / "frag.pdb"
    path.write_text("\n".join(pdb_lines) + "\n")
    return parse_structure(path)[0]


def shorter(chain, n):
    """The first n residues of a chain (a second, shorter example for batches)."""
    return replace(chain, sequence=chain.sequence[:n], aatype=chain.aatype[:n],
                   atom37_positions=chain.atom37_positions[:n], atom37_mask=chain.atom37_mask[:n],
                   b_factors=chain.b_factors[:n], residue_index=chain.residue_index[:n],
                   insertion_codes=chain.insertion_codes[:n])


def test_keys_shapes_dtypes_finite(chain):
    f = chain_to_features(chain)
    assert set(f) == set(FEATURE_DTYPES)
    L = len(chain)
    shapes = {
        "aatype": (L,), "seq_mask": (L,), "residue_index": (L,), "all_atom_positions": (L, 37, 3),
        "all_atom_mask": (L, 37), "atom14_gt_positions": (L, 14, 3), "atom14_alt_gt_positions": (L, 14, 3),
        "atom14_gt_exists": (L, 14), "atom14_alt_gt_exists": (L, 14), "atom14_atom_exists": (L, 14),
        "atom14_atom_is_ambiguous": (L, 14), "residx_atom14_to_atom37": (L, 14),
        "residx_atom37_to_atom14": (L, 37), "atom37_atom_exists": (L, 37),
        "rigidgroups_gt_frames": (L, 8, 4, 4), "rigidgroups_alt_gt_frames": (L, 8, 4, 4),
        "rigidgroups_gt_exists": (L, 8), "rigidgroups_group_exists": (L, 8),
        "rigidgroups_group_is_ambiguous": (L, 8), "pseudo_beta": (L, 3), "pseudo_beta_mask": (L,),
        "backbone_rigid_tensor": (L, 4, 4), "backbone_rigid_mask": (L,), "chi_angles_sin_cos": (L, 4, 2),
        "chi_mask": (L, 4), "resolution": (),
    }
    for key, value in f.items():
        assert tuple(value.shape) == shapes[key], key
        assert value.dtype == FEATURE_DTYPES[key], key
        if value.is_floating_point():
            assert torch.isfinite(value).all(), key
    # the fragment is complete: every atom that should exist has a ground truth
    assert torch.equal(f["atom14_gt_exists"], f["atom14_atom_exists"])
    assert f["backbone_rigid_mask"].all() and f["seq_mask"].all()
    # chi angles per residue type: ALA none, ASP two, GLU three
    assert [f["chi_mask"][i].tolist() for i in (2, 7, 3)] == [[0, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0]]
    sin_cos = f["chi_angles_sin_cos"][f["chi_mask"] > 0]
    torch.testing.assert_close(sin_cos.norm(dim=-1), torch.ones(len(sin_cos)), atol=1e-4, rtol=0)


def dihedral(p0, p1, p2, p3):
    """Textbook (IUPAC) dihedral angle in radians."""
    b0, b1, b2 = p0 - p1, p2 - p1, p3 - p2
    b1 = b1 / np.linalg.norm(b1)
    v, w = b0 - b0.dot(b1) * b1, b2 - b2.dot(b1) * b1
    return math.atan2(np.cross(b1, v).dot(w), v.dot(w))


def test_chi_angles_are_the_dihedrals(chain):
    f = chain_to_features(chain)
    for i, resname in enumerate(rc.restype_1to3[a] for a in chain.sequence):
        for k, atoms in enumerate(rc.chi_angles_atoms[resname]):
            expected = dihedral(*(chain.atom37_positions[i, rc.atom_order[a]].astype(np.float64) for a in atoms))
            sin, cos = f["chi_angles_sin_cos"][i, k].tolist()
            assert abs(math.remainder(math.atan2(sin, cos) - expected, 2 * math.pi)) < 1e-3, (resname, k)


def test_atom14_positions_match_atom37(chain):
    f = chain_to_features(chain)
    gathered = torch.gather(f["all_atom_positions"], 1,
                            f["residx_atom14_to_atom37"][..., None].expand(-1, -1, 3))
    exists = f["atom14_gt_exists"][..., None]
    torch.testing.assert_close(gathered * exists, f["atom14_gt_positions"])


def test_fape_of_ground_truth_is_zero(chain):
    batch = collate([chain_to_features(chain), chain_to_features(shorter(chain, 5))])
    traj = Rigid.from_tensor_4x4(batch["backbone_rigid_tensor"]).to_tensor_7()[None]  # one SM block
    bb = of_loss.backbone_loss(batch["backbone_rigid_tensor"], batch["backbone_rigid_mask"], traj)
    sc = of_loss.sidechain_loss(
        sidechain_frames=batch["rigidgroups_gt_frames"][None],
        sidechain_atom_pos=batch["atom14_gt_positions"][None],
        rigidgroups_gt_frames=batch["rigidgroups_gt_frames"],
        rigidgroups_alt_gt_frames=batch["rigidgroups_alt_gt_frames"],
        rigidgroups_gt_exists=batch["rigidgroups_gt_exists"],
        renamed_atom14_gt_positions=batch["atom14_gt_positions"],
        renamed_atom14_gt_exists=batch["atom14_gt_exists"],
        alt_naming_is_better=torch.zeros(2, 8),
    )
    assert float(bb) < 1e-3 and float(sc.max()) < 1e-3
    # and a perturbed prediction is not
    moved = traj.clone()
    moved[..., 4:] += torch.randn(moved[..., 4:].shape, generator=torch.Generator().manual_seed(0))
    assert float(of_loss.backbone_loss(batch["backbone_rigid_tensor"], batch["backbone_rigid_mask"], moved)) > 0.02


def test_unknown_residue_and_missing_atoms(chain):
    chain.aatype[4] = 20
    chain.sequence = chain.sequence[:4] + "X" + chain.sequence[5:]
    chain.atom37_mask[7, rc.atom_order["CG"]] = 0
    f = chain_to_features(chain)
    assert f["atom37_atom_exists"][4].sum() == 0 and f["atom14_atom_exists"][4].sum() == 0
    assert f["chi_mask"][7, 0] == 0  # chi1 of ASP needs CG
    assert all(torch.isfinite(v).all() for v in f.values() if v.is_floating_point())


def test_resolution(chain):
    assert float(chain_to_features(chain)["resolution"]) == 0.0  # nan -> OpenFold's 0 for PDB inputs
    assert float(chain_to_features(chain, unknown_resolution=2.5)["resolution"]) == 2.5
    chain.resolution = 1.9
    assert float(chain_to_features(chain)["resolution"]) == pytest.approx(1.9)


@pytest.mark.parametrize("author, expected", [
    ([5, 6, 7], [0, 1, 2]),
    ([10, 11, 15, 16], [0, 1, 5, 6]),  # gap kept
    ([10, 11, 11, 11, 12, 20], [0, 1, 2, 3, 4, 10]),  # insertion codes shift what follows
    ([100, 1, 2], [0, 1, 2]),  # numbering restarts
    ([-3, -2, 0], [0, 1, 3]),
])
def test_model_residue_index(author, expected):
    assert model_residue_index(np.array(author)).tolist() == expected


def test_crop_deterministic_and_consistent(chain):
    f = chain_to_features(chain)
    a = crop(f, 5, torch.Generator().manual_seed(7))
    b = crop(f, 5, torch.Generator().manual_seed(7))
    assert all(torch.equal(a[k], b[k]) for k in f)
    start = int(a["residue_index"][0] - f["residue_index"][0])
    for key, value in f.items():
        expected = value if value.dim() == 0 else value[start:start + 5]
        assert torch.equal(a[key], expected), key
    starts = {int(crop(f, 5, torch.Generator().manual_seed(s))["residue_index"][0]) for s in range(20)}
    assert len(starts) > 1 and starts <= {0, 1, 2, 3}
    assert crop(f, 8, torch.Generator()) is f and crop(f, 100, torch.Generator()) is f


def test_pad_to(chain):
    f = chain_to_features(chain)
    p = pad_to(f, 11)
    assert all(v.shape[0] == 11 for k, v in p.items() if k != "resolution")
    assert p["seq_mask"][8:].sum() == 0 and p["all_atom_positions"][8:].abs().sum() == 0
    assert torch.equal(p["aatype"][:8], f["aatype"])
    assert pad_to(f, 8) is f
    with pytest.raises(ValueError, match="shorter"):
        pad_to(f, 3)


def test_collate(chain):
    batch = collate([chain_to_features(shorter(chain, 3)), chain_to_features(chain)])
    assert batch["aatype"].shape == (2, 8) and batch["rigidgroups_gt_frames"].shape == (2, 8, 8, 4, 4)
    assert batch["mask"].tolist() == [[1.0] * 3 + [0.0] * 5, [1.0] * 8]
    assert batch["mask"].dtype == torch.float32 and batch["resolution"].shape == (2,)
    with pytest.raises(ValueError):
        collate([])


def test_collated_batch_feeds_openfold_losses(chain):
    batch = collate([chain_to_features(chain)])
    logits = torch.zeros(1, 8, 8, 64)
    loss = of_loss.distogram_loss(logits, **batch)
    assert math.isclose(float(loss), math.log(64), rel_tol=1e-4)
