"""Parsing PDB / mmCIF into atom37 chains: the awkward parts of real files."""

import gzip
import math

import numpy as np
import pytest

from esmfold_peft.data.structures import (StructureError, chain_name, file_stem, iter_structures,
                                          parse_structure)
from openfold.np import residue_constants as rc

CA, CB, SD = rc.atom_order["CA"], rc.atom_order["CB"], rc.atom_order["SD"]


def write(path, lines):
    path.write_text("\n".join(lines) + "\nEND\n")
    return path


def residue_lines(lines, resseq):
    return [line for line in lines if int(line[22:26]) == resseq]


def with_fields(line, *, record=None, name=None, altloc=None, resname=None, resseq=None, icode=None,
                xyz=None, occupancy=None):
    """A PDB atom line with some fixed-column fields replaced."""
    line = line.ljust(80)
    if record is not None:
        line = f"{record:<6}" + line[6:]
    if name is not None:
        line = line[:12] + f" {name:<3}" + line[16:]
    if altloc is not None:
        line = line[:16] + altloc + line[17:]
    if resname is not None:
        line = line[:17] + f"{resname:>3}" + line[20:]
    if resseq is not None:
        line = line[:22] + f"{resseq:>4}" + line[26:]
    if icode is not None:
        line = line[:26] + icode + line[27:]
    if xyz is not None:
        line = line[:30] + "".join(f"{v:8.3f}" for v in xyz) + line[54:]
    if occupancy is not None:
        line = line[:54] + f"{occupancy:6.2f}" + line[60:]
    return line.rstrip()


def test_fragment_arrays(tmp_path, pdb_lines):
    (chain,) = parse_structure(write(tmp_path / "frag.pdb", pdb_lines))
    assert chain.name == "frag_A" and chain.chain_id == "A"
    assert chain.sequence == "NIAEVCMD"
    assert chain.aatype.tolist() == [rc.restype_order_with_x[a] for a in "NIAEVCMD"]
    assert chain.residue_index.tolist() == list(range(156, 164))
    assert chain.insertion_codes == [""] * 8
    assert chain.atom37_positions.shape == (8, 37, 3) and chain.atom37_positions.dtype == np.float32
    assert chain.atom37_mask.shape == (8, 37) and chain.aatype.dtype == np.int64
    assert int(chain.atom37_mask.sum()) == len(pdb_lines)
    np.testing.assert_allclose(chain.atom37_positions[0, CA], [53.712, 16.509, 19.595], atol=1e-3)
    assert np.all(chain.b_factors[chain.atom37_mask > 0] == 100.0)
    assert math.isnan(chain.resolution) and chain.release_date is None
    assert chain.source.endswith("frag.pdb")


def test_selenomethionine_becomes_methionine(tmp_path, pdb_lines):
    lines = [with_fields(l, record="HETATM", resname="MSE", name="SE" if l[12:16].strip() == "SD" else None)
             if int(l[22:26]) == 162 else l for l in pdb_lines]
    (chain,) = parse_structure(write(tmp_path / "mse.pdb", lines))
    assert chain.sequence == "NIAEVCMD"
    assert chain.atom37_mask[6, SD] == 1
    np.testing.assert_allclose(chain.atom37_positions[6, SD], [70.949, 23.769, 19.478], atol=1e-3)


def test_altloc_highest_occupancy_wins(tmp_path, pdb_lines):
    cb = next(l for l in pdb_lines if l[12:16].strip() == "CB" and int(l[22:26]) == 158)
    lines = [l for l in pdb_lines if l is not cb]
    at = lines.index(next(l for l in lines if int(l[22:26]) == 159))
    lines[at:at] = [with_fields(cb, altloc="A", occupancy=0.3, xyz=(1.0, 2.0, 3.0)),
                    with_fields(cb, altloc="B", occupancy=0.7, xyz=(4.0, 5.0, 6.0))]
    (chain,) = parse_structure(write(tmp_path / "alt.pdb", lines))
    np.testing.assert_allclose(chain.atom37_positions[2, CB], [4.0, 5.0, 6.0])


def test_point_mutation_altloc_keeps_the_occupied_residue(tmp_path, pdb_lines):
    # SER first: Biopython alone would select the residue added last (ALA)
    ala = residue_lines(pdb_lines, 158)
    ser = [with_fields(l, resname="SER", altloc="A", occupancy=0.6) for l in ala]
    ser.append(with_fields(ala[-1], name="OG", resname="SER", altloc="A", occupancy=0.6, xyz=(60.0, 16.0, 19.0)))
    ala = [with_fields(l, altloc="B", occupancy=0.4) for l in ala]
    at = pdb_lines.index(residue_lines(pdb_lines, 158)[0])
    lines = pdb_lines[:at] + ser + ala + pdb_lines[at + 5:]
    (chain,) = parse_structure(write(tmp_path / "mut.pdb", lines))
    assert chain.sequence == "NISEVCMD"
    assert chain.atom37_mask[2, rc.atom_order["OG"]] == 1


def test_insertion_codes_keep_the_residue(tmp_path, pdb_lines):
    lines = [with_fields(l, resseq=156, icode="A") if int(l[22:26]) == 157 else l for l in pdb_lines]
    (chain,) = parse_structure(write(tmp_path / "ins.pdb", lines))
    assert chain.sequence == "NIAEVCMD"
    assert chain.residue_index.tolist()[:3] == [156, 156, 158]
    assert chain.insertion_codes[:3] == ["", "A", ""]


def test_water_and_ligands_dropped(tmp_path, pdb_lines):
    het = [
        "HETATM  300  O   HOH A 301      10.000  10.000  10.000  1.00 20.00           O",
        "HETATM  301  S   SO4 A 302      12.000  10.000  10.000  1.00 20.00           S",
        "HETATM  302  O1  SO4 A 302      13.000  10.000  10.000  1.00 20.00           O",
        "HETATM  303 CA    CA A 303      14.000  10.000  10.000  1.00 20.00          CA",
    ]
    (chain,) = parse_structure(write(tmp_path / "het.pdb", pdb_lines + het))
    assert chain.sequence == "NIAEVCMD" and chain.residue_index[-1] == 163


def test_modified_and_unknown_residues(tmp_path, pdb_lines):
    renames = {160: "UNK", 161: "CSO", 162: "XYZ"}  # unknown name, known modification, unknown hetero
    lines = [with_fields(l, resname=renames[int(l[22:26])],
                         record="ATOM" if int(l[22:26]) == 160 else "HETATM")
             if int(l[22:26]) in renames else l for l in pdb_lines]
    (chain,) = parse_structure(write(tmp_path / "mod.pdb", lines))
    assert chain.sequence == "NIAEXCXD"
    assert chain.aatype[4] == 20 and chain.aatype[6] == 20
    assert chain.atom37_mask[4, CA] == 1  # backbone of the unknown residue is kept


def test_missing_atoms_are_masked(tmp_path, pdb_lines):
    lines = [l for l in pdb_lines if not (int(l[22:26]) == 163 and l[12:16].strip() in ("CG", "OD1"))]
    (chain,) = parse_structure(write(tmp_path / "miss.pdb", lines))
    assert chain.atom37_mask[7, rc.atom_order["CG"]] == 0
    assert chain.atom37_mask[7, rc.atom_order["OD1"]] == 0
    assert np.all(chain.atom37_positions[7, rc.atom_order["CG"]] == 0)
    assert chain.atom37_mask[7, CB] == 1


def test_first_model_only(tmp_path, pdb_lines):
    moved = [with_fields(l, xyz=(0.0, 0.0, 0.0)) for l in pdb_lines]
    lines = ["MODEL        1", *pdb_lines, "ENDMDL", "MODEL        2", *moved, "ENDMDL"]
    (chain,) = parse_structure(write(tmp_path / "nmr.pdb", lines))
    np.testing.assert_allclose(chain.atom37_positions[0, CA], [53.712, 16.509, 19.595], atol=1e-3)


def test_pdb_header_resolution_and_date(tmp_path, pdb_lines):
    header = ["HEADER    HYDROLASE                               12-JAN-99   1ABC              ",
              "REVDAT   1   20-FEB-99 1ABC    0                                                ",
              "REMARK   2 RESOLUTION.    1.80 ANGSTROMS.                                       "]
    (chain,) = parse_structure(write(tmp_path / "1abc.pdb", header + pdb_lines))
    assert chain.resolution == pytest.approx(1.8)
    assert chain.release_date == "1999-02-20"


def test_mmcif_header_chains_and_gzip(tmp_path, pdb_lines, to_mmcif):
    mse = [with_fields(l, record="HETATM", resname="MSE", name="SE" if l[12:16].strip() == "SD" else None)
           if int(l[22:26]) == 162 else l for l in pdb_lines]
    dna = ["ATOM    400  P    DA B   1      30.000  10.000  10.000  1.00 20.00           P",
           "ATOM    401  C1'  DA B   1      31.000  10.000  10.000  1.00 20.00           C"]
    water = ["HETATM  500  O   HOH C   1      40.000  10.000  10.000  1.00 20.00           O"]
    header = ("_refine.ls_d_res_high 2.10\n"
              "loop_\n_pdbx_audit_revision_history.ordinal\n_pdbx_audit_revision_history.revision_date\n"
              "1 2001-02-03\n2 2011-12-13\n")
    path = tmp_path / "2xyz.cif.gz"
    with gzip.open(path, "wt") as fh:
        fh.write(to_mmcif(mse + dna + water, header))
    (chain,) = parse_structure(path)
    assert chain.name == "2xyz_A" and chain.sequence == "NIAEVCMD"
    assert chain.atom37_mask[6, SD] == 1
    assert chain.resolution == pytest.approx(2.1) and chain.release_date == "2001-02-03"


def test_mmcif_fallback_header_keys(tmp_path, pdb_lines, to_mmcif):
    header = ("_refine.ls_d_res_high ?\n_em_3d_reconstruction.resolution 3.4\n"
              "_pdbx_database_status.recvd_initial_deposition_date 2020-05-06\n")
    path = tmp_path / "em.cif"
    path.write_text(to_mmcif(pdb_lines, header))
    (chain,) = parse_structure(path)
    assert chain.resolution == pytest.approx(3.4) and chain.release_date == "2020-05-06"


def test_chain_selection(tmp_path, pdb_lines):
    chain_b = [l[:21] + "B" + l[22:] for l in pdb_lines]
    path = write(tmp_path / "ab.pdb", pdb_lines + ["TER"] + chain_b)
    assert [c.name for c in parse_structure(path)] == ["ab_A", "ab_B"]
    assert [c.chain_id for c in parse_structure(path, chains=["B"])] == ["B"]
    with pytest.raises(StructureError, match=r"ab\.pdb: no protein chain 'Z'"):
        parse_structure(path, chains=["Z"])


@pytest.mark.parametrize("name, text, reason", [
    ("empty.pdb", "", "empty file"),
    ("blank.cif", "\n\n", "empty file"),
    ("words.pdb", "this is not a structure\n", "no atoms found"),
    ("broken.cif", "data_x\nloop_\n_atom_site.id\n1\n", "not parseable as MMCIF"),
    ("ligand.pdb", "HETATM    1  O   HOH A   1      10.000  10.000  10.000  1.00 20.00           O\n",
     "no protein chain"),
    ("notes.txt", "ATOM\n", "unknown structure format"),
])
def test_bad_files_raise_naming_the_file(tmp_path, name, text, reason):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(StructureError, match=reason) as info:
        parse_structure(path)
    assert info.value.path == str(path) and str(path) in str(info.value)


def test_bad_gzip_and_missing_file(tmp_path):
    bad = tmp_path / "bad.pdb.gz"
    bad.write_bytes(b"not gzip at all")
    with pytest.raises(StructureError, match="cannot read file"):
        parse_structure(bad)
    with pytest.raises(StructureError, match="file not found"):
        parse_structure(tmp_path / "absent.pdb")


def test_iter_structures_reports_and_skips(tmp_path, pdb_lines):
    good = write(tmp_path / "good.pdb", pdb_lines)
    bad = tmp_path / "bad.pdb"
    bad.write_text("")
    also_good = write(tmp_path / "also.pdb", pdb_lines)
    errors = []
    names = [c.name for c in iter_structures([good, bad, also_good], errors)]
    assert names == ["good_A", "also_A"]
    assert errors == [(str(bad), "empty file")]


def test_names():
    assert file_stem("/x/1abc.cif.gz") == "1abc" and file_stem("model.pdb") == "model"
    assert chain_name("/x/1abc.cif", "B") == "1abc_B" and chain_name("pred.pdb", " ") == "pred"
