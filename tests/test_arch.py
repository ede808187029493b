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


def _two_stage(**fields) -> dict:
    """A JSON-ready two-stage description with ``fields`` overriding the top level or (``s1_*``) stage 1."""
    stage1 = {"c_in": 16, "c_out": 24, "stride": 2, "ops": ["k3_e6"]}
    stage1.update({k[3:]: v for k, v in fields.items() if k.startswith("s1_")})
    d = {"stem_channels": 32, "stages": [{"c_in": 32, "c_out": 16, "stride": 1, "ops": ["k3_e1"]}, stage1]}
    d.update({k: v for k, v in fields.items() if not k.startswith("s1_")})
    return d


INVALID_FIELDS = [
    ({"s1_c_out": 0}, r"stage 1 \(16->0\): c_out must be >= 1, got 0"),
    ({"s1_c_out": -8}, r"stage 1 \(16->-8\): c_out must be >= 1, got -8"),
    ({"s1_c_out": 24.5}, r"stage 1 c_out must be a whole number, got 24\.5"),
    ({"s1_stride": 3}, r"stage 1 \(16->24\): stride must be 1 or 2, got 3"),
    ({"stem_stride": 0}, r"stem_stride must be 1 or 2, got 0"),
    ({"stem_channels": 0, "stages": [{"c_in": 0, "c_out": 16, "stride": 1, "ops": ["k3_e1"]}]},
     r"stem_channels must be >= 1, got 0"),
    ({"in_channels": 1}, r"in_channels 1: only 3 \(RGB\) is supported"),
    ({"final_channels": -5}, r"final_channels \(0: no final 1x1 conv\) must be >= 0, got -5"),
    ({"final_channels": 1280.5}, r"final_channels must be a whole number, got 1280\.5"),
    ({"bn_eps": 0}, r"bn_eps must be a number > 0, got 0"),
    ({"bn_eps": "small"}, r"bn_eps must be a number > 0, got 'small'"),
]


@pytest.mark.parametrize("fields,message", INVALID_FIELDS)
def test_invalid_numbers_in_a_json_arch_are_one_arch_error_naming_the_field(fields, message):
    with pytest.raises(ArchError, match=message):
        Arch.from_dict(_two_stage(**fields))


def test_integral_floats_and_integer_strings_in_json_are_read_as_ints():
    arch = Arch.from_dict(_two_stage(s1_c_out=24.0, final_channels="640"))
    assert arch.stages[1].c_out == 24 and isinstance(arch.stages[1].c_out, int) and arch.final_channels == 640


@pytest.mark.parametrize("kwargs,message", [
    (dict(final_channels=-5), "final_channels .* must be >= 0, got -5"),
    (dict(stem_stride=0), "stem_stride must be 1 or 2"),
    (dict(in_channels=1), "only 3 \\(RGB\\)"),
    (dict(bn_eps=-1e-5), "bn_eps must be a number > 0"),
])
def test_python_api_rejects_invalid_top_level_fields(kwargs, message):
    with pytest.raises(ArchError, match=message):
        Arch(stages=(Stage(32, 16, 1, ("k3_e1",)),), **kwargs)


@pytest.mark.parametrize("stage,message", [
    (Stage(32, 0, 1, ("k3_e1",)), "c_out must be >= 1"),
    (Stage(32, 24.5, 1, ("k3_e1",)), "c_out must be a whole number, got 24.5"),
    (Stage(32, 16, 2.0, ("k3_e1",)), "stride must be a whole number, got 2.0"),
    (Stage(32, 16, 1, ("k3_e1",), dilation=0), "dilation must be >= 1, got 0"),
])
def test_python_api_rejects_invalid_stage_numbers(stage, message):
    with pytest.raises(ArchError, match=message):
        Arch(stages=(stage,))


@pytest.mark.parametrize("text,message", [
    ("[[32, 16], ['k3_e1'], 1]|[[16, 24.5], ['k3_e6'], 2]",
     "net_config entry 1 c_out must be a whole number, got 24.5"),
    ("[[32, 16], ['k3_e1'], 1]|[[16, 0], ['k3_e6'], 2]", r"stage 1 \(16->0\): c_out must be >= 1"),
    ("[[32, 16], ['k3_e1'], 0]", r"stride must be 1 or 2, got 0"),
    ("[[320, 1280], ['conv_2d_1x1'], 1]", "net_config has no stages"),
])
def test_invalid_numbers_in_net_config_are_one_arch_error(text, message):
    with pytest.raises(ArchError, match=message):
        Arch.from_net_config(text)
