"""FASTA reading for prediction: accepted, rewritten and rejected records; unusable files."""

import gzip

import pytest

from esmfold_peft.data.fasta import FastaError, check_sequence, read_fasta


def write(tmp_path, text, name="in.fasta"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_records_ids_descriptions_and_normalisation(tmp_path):
    path = write(tmp_path, "\n>one  first protein\nMKTA\nyiak \n\n>two\nacde fghik*\n>three\tdesc\nX\n")
    contents = read_fasta(path)
    assert contents.bad == []
    assert [(r.id, r.description, r.sequence, r.line) for r in contents.records] == [
        ("one", "first protein", "MKTAYIAK", 2), ("two", "", "ACDEFGHIK", 6), ("three", "desc", "X", 8)]
    assert all(r.substitutions == {} for r in contents.records)


def test_nonstandard_letters_are_rewritten_and_recorded():
    seq, subs = check_sequence("MUUOBZJk")
    assert seq == "MCCKXXXK"
    assert subs == {"B->X": 1, "J->X": 1, "O->K": 1, "U->C": 2, "Z->X": 1}


def test_bad_records_are_reported_and_the_others_kept(tmp_path):
    path = write(tmp_path, ">ok\nMKT\n>gap\nMK-T.A\n>empty\n\n>\nMKT\n>long\nMKTAYIAKQ\n>ok\nAAAA\n>inner_stop\nMK*T\n"
                           ">digits\nMK1T\n>good2\nACD\n")
    contents = read_fasta(path, max_length=8)
    assert [r.id for r in contents.records] == ["ok", "good2"]
    reasons = {b.id: b.reason for b in contents.bad}
    assert set(reasons) == {"gap", "empty", "<record at line 7>", "long", "ok", "inner_stop", "digits"}
    assert "'-' at 3" in reasons["gap"] and "'.' at 5" in reasons["gap"]
    assert reasons["empty"] == "empty sequence"
    assert "empty id" in reasons["<record at line 7>"]
    assert reasons["long"] == "9 residues, more than the maximum of 8"
    assert reasons["ok"] == "duplicate id (first used at line 1)"
    assert "'*' at 3" in reasons["inner_stop"] and "'1' at 3" in reasons["digits"]
    assert str(contents.bad[0]) == f"gap (line 3): {reasons['gap']}"


def test_many_invalid_characters_are_summarised():
    with pytest.raises(ValueError, match=r"'-' at 5 and 3 more"):
        check_sequence("--------")


def test_gzipped_fasta(tmp_path):
    path = tmp_path / "in.fasta.gz"
    path.write_bytes(gzip.compress(b">a\nMKT\n"))
    assert [r.sequence for r in read_fasta(path).records] == ["MKT"]


@pytest.mark.parametrize("content, message", [
    (None, "file not found"),
    ("HEADER    PDB FILE\nATOM      1  N   ASN A 156\n", "not FASTA: line 1 comes before any '>' header"),
    ("\n\n", "no FASTA records"),
    (b"\x89PNG\r\n\x1a\n\xff\xfe", "not a text file"),
])
def test_unusable_files_name_the_file(tmp_path, content, message):
    path = tmp_path / "input.fasta"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(FastaError, match=message) as info:
        read_fasta(path)
    assert str(path) in str(info.value)


def test_multimers_are_chains_joined_by_colons(tmp_path):
    path = write(tmp_path, ">ab\nMKTA:\ngshm*\n>abc stops\nMK*:GS*:X\n>empty_chain\nMKT::GS\n>lead\n:MKT\n"
                           ">trail\nMKT:\n>bad_chain\nMKT:G-S\n>long\nMKTAY:IAKQ\n>many\n" + ":".join("A" * 27) + "\n")
    contents = read_fasta(path, max_length=8)
    assert [(r.id, r.sequence, r.chains, len(r)) for r in contents.records] == [
        ("ab", "MKTA:GSHM", ("MKTA", "GSHM"), 8), ("abc", "MK:GS:X", ("MK", "GS", "X"), 5)]
    reasons = {b.id: b.reason for b in contents.bad}
    assert reasons["empty_chain"] == "empty chain 2 (chains are separated by ':')"
    assert reasons["lead"] == "empty chain 1 (chains are separated by ':')"
    assert reasons["trail"] == "empty chain 2 (chains are separated by ':')"
    assert "'-' at 2 of chain 2" in reasons["bad_chain"]
    assert reasons["long"] == "9 residues in 2 chains, more than the maximum of 8"  # separators not counted
    assert "27 chains, more than the 26" in reasons["many"]


def test_a_monomer_has_one_chain():
    seq, _ = check_sequence("MKT*")
    assert seq == "MKT"
    with pytest.raises(ValueError, match="^empty sequence$"):
        check_sequence("*")
