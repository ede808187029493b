import json

import pytest

from fna.arch import BUILTIN_ARCHS, SKIP, Arch, ArchError, Op, Stage, get_arch, load_arch, parse_op, save_arch


@pytest.mark.parametrize("name,kernel,expansion", [("k3_e6", 3, 6), ("k7_e3", 7, 3), ("k1_e1", 1, 1), ("k9_e12", 9, 12)])
def test_op_names_decode_to_kernel_and_expansion(name, kernel, expansion):
    assert parse_op(name) == Op(kernel, expansion)
    assert parse_op(name).name == name


def test_skip_decodes_to_none():
    assert parse_op(SKIP) is None


@pytest.mark.parametrize("bad", ["k4_e6", "k3_e0", "conv3x3", "k3e6", ""])
def test_unknown_or_invalid_op_is_rejected(bad):
    with pytest.raises(ArchError):
        parse_op(bad)


def test_mobilenet_v2_has_the_seed_layout():
    arch = BUILTIN_ARCHS["mobilenet_v2"]
    assert [(s.c_in, s.c_out, s.stride, len(s.ops)) for s in arch.stages] == [
        (32, 16, 1, 1), (16, 24, 2, 2), (24, 32, 2, 3), (32, 64, 2, 4), (64, 96, 1, 3), (96, 160, 2, 3), (160, 320, 1, 1)]
    assert arch.stage_strides() == [2, 4, 8, 16, 16, 32, 32]


def test_published_fna_archs_keep_the_seed_channels():
    for name in ("fna_deeplabv3", "fna_retinanet", "fna_ssdlite"):
        arch = BUILTIN_ARCHS[name]
        assert [s.c_out for s in arch.stages] == [16, 24, 32, 64, 96, 160, 320]
    assert BUILTIN_ARCHS["fna_deeplabv3"].stages[3].ops == ("k7_e6", "k7_e6", "k5_e6", "k7_e6", "k7_e6", "k5_e6")


def test_skip_where_shape_changes_is_rejected():
    with pytest.raises(ArchError, match="stage 1.*layer 0.*skip"):
        Arch(stages=(Stage(32, 16, 1, ("k3_e1",)), Stage(16, 24, 2, ("skip", "k3_e6"))))


def test_channels_that_do_not_chain_are_rejected():
    with pytest.raises(ArchError, match="stage 1.*do not chain"):
        Arch(stages=(Stage(32, 16, 1, ("k3_e1",)), Stage(24, 32, 2, ("k3_e6",))))


def test_canonical_moves_skips_to_the_stage_end():
    arch = Arch(stages=(Stage(32, 16, 1, ("k3_e1",)), Stage(16, 16, 1, ("k3_e6", "skip", "k5_e3", "skip", "k7_e6"))))
    assert arch.canonical().stages[1].ops == ("k3_e6", "k5_e3", "k7_e6", "skip", "skip")
    assert arch.stages[1].depth == 3


@pytest.mark.parametrize("name", list(BUILTIN_ARCHS))
def test_json_round_trip(name, tmp_path):
    arch = BUILTIN_ARCHS[name]
    save_arch(arch, tmp_path / "a.json")
    assert load_arch(tmp_path / "a.json") == arch


@pytest.mark.parametrize("name", list(BUILTIN_ARCHS))
def test_net_config_round_trip(name, tmp_path):
    arch = BUILTIN_ARCHS[name]
    save_arch(arch, tmp_path / "a.txt")
    assert load_arch(tmp_path / "a.txt") == arch


def test_reads_the_reference_net_config_text():
    text = """[[32, 16], ['k3_e1'], 1]|
[[16, 24], ['k3_e6', 'k3_e6', 'skip', 'skip'], 2]|
[[24, 32], ['k7_e6', 'k5_e6', 'skip', 'skip'], 2]|
[[32, 64], ['k3_e6', 'k5_e6', 'k7_e6', 'k3_e6'], 2]|
[[64, 96], ['k5_e6', 'k7_e6', 'skip', 'skip'], 1]|
[[96, 160], ['k7_e6', 'k7_e6', 'k7_e3', 'k7_e6'], 2]|
[[160, 320], ['k7_e6'], 1]"""
    assert Arch.from_net_config(text) == BUILTIN_ARCHS["fna_retinanet"]


def test_net_config_final_conv_entry_sets_final_channels():
    arch = Arch.from_net_config("[[32, 16], ['k3_e1'], 1]|[[16, 24], ['k3_e6'], 2]|[[24, 2048], ['conv_2d_1x1'], 1]")
    assert arch.final_channels == 2048 and len(arch.stages) == 2


def test_malformed_files_name_the_file(tmp_path):
    (tmp_path / "bad.json").write_text('{"stages": [')
    with pytest.raises(ArchError, match=r"bad\.json: malformed JSON"):
        load_arch(tmp_path / "bad.json")
    (tmp_path / "bad.txt").write_text("[[32, 16], ['k3_e1'], 1]|[[16, 24], ['k3_e6'")
    with pytest.raises(ArchError, match=r"bad\.txt: net_config entry 1"):
        load_arch(tmp_path / "bad.txt")
    (tmp_path / "op.json").write_text(json.dumps({"stages": [{"c_in": 32, "c_out": 16, "stride": 1, "ops": ["k3_e9x"]}]}))
    with pytest.raises(ArchError, match=r"op\.json: stage 0.*unknown op 'k3_e9x'"):
        load_arch(tmp_path / "op.json")


def test_unknown_name_lists_the_builtins():
    with pytest.raises(ArchError, match="not a built-in.*mobilenet_v2"):
        get_arch("resnet_9000")
