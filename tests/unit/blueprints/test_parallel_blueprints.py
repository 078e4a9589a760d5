"""Parallel-slot sites and blueprints: signatures and keys, the new families (width, LoRA,
conv branch, parallel MLP, attention heads), the attention op, `fits`, Tezzeret's
compile and validation for parallel sites — and that existing blueprints and their
kernels are exactly what they were."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from esper.blueprints import (
    PARALLEL_SLOT_TAG,
    build_module,
    builtin_blueprints,
    fits,
    make_blueprint,
    node,
    parse_site_key,
    plan_ir,
    site_key,
    site_output_shape,
    site_shape,
    site_signature,
    slot_kinds,
    supports,
    validate_ir,
)
from esper.blueprints.artifact import SigningKey, TrustedKeys, materialize, verify_artifact
from esper.blueprints.ops import NC, NLD
from esper.errors import BlueprintError, ConfigError, FailedPreconditionError
from esper.tezzeret.compiler import compile_catalog, compile_kernel, validate_kernel
from generated.esper.common.v1 import seed_pb2

BPS = {bp.name: bp for bp in builtin_blueprints()}
PARALLEL = [bp for bp in BPS.values() if seed_pb2.SLOT_KIND_PARALLEL in slot_kinds(bp)]
KEY = SigningKey.from_bytes(bytes(range(32)).hex().encode())

PARALLEL_SITES = {
    "nc40to16": site_signature("NC", 16, input=("NC", 40)),
    "nc16to16": site_signature("NC", 16, input=("NC", 16)),
    "nc16to4": site_signature("NC", 4, input=("NC", 16)),
    "ncl4to8": site_signature("NCL", 8, (20,), input=("NCL", 4, (20,))),
    "ncl_var": site_signature("NCL", 8, input=("NCL", 4)),
    "nchw4to8": site_signature("NCHW", 8, (6, 6), input=("NCHW", 4, (6, 6))),
    "nld8to16": site_signature("NLD", 16, (5,), input=("NLD", 8, (5,))),
    "nld16": site_signature("NLD", 16, (5,), input=("NLD", 16, (5,))),
}
OUTPUT_SITES = {
    "nc16": site_signature("NC", 16),
    "ncl8x20": site_signature("NCL", 8, (20,)),
    "nchw8x6x6": site_signature("NCHW", 8, (6, 6)),
    "nld16x5": site_signature("NLD", 16, (5,)),
}
PAIRS = [(bp, n) for bp in PARALLEL for n, s in PARALLEL_SITES.items() if supports(bp, s)]

# Ids measured on main before parallel slots existed (same key, benchmark_iters=0): the
# catalog's output-slot blueprints and their kernels must never change id.
PINNED_BLUEPRINTS = {
    "bottleneck_mlp": "bp-ce8cfb3c237ad9d6", "lowrank_adapter": "bp-861cf89ec9334242",
    "conv3x3_residual": "bp-b35994c3a53da9d0", "conv3_residual_1d": "bp-d4c252d2aff82be6",
    "dwsep_conv2d": "bp-32ed68ecd491d3c1", "dwsep_conv1d": "bp-60e21f9fe84df017",
    "squeeze_excite": "bp-0771dbc4492f578d", "norm_scale": "bp-da2ff67a0ab22bcd",
}
PINNED_KERNELS = {
    "bottleneck_mlp@nc16": "ee693fbb3d8bbcf4c986d12ab876996b3cf81697667b367b6d1a752bd68e6814",
    "bottleneck_mlp@ncl8x20": "c04345d99e5cbc357d050827bba641482be6dfe9a06cab2501d90fcbdaa4ad0d",
    "bottleneck_mlp@nchw8x6x6":
        "89c267b73c7900d23d0476430b142fbe9f4a204afb09dac116b68f9b35e1d7c5",
    "bottleneck_mlp@nld16x5": "c7bb7b987a36aa4f08876ed6fff231101010a72e5db17ca9062af137b9c7bcc0",
    "lowrank_adapter@nc16": "2a109f9693035d76e05df7cc0e9a69c3d218730597dd45aa2efa4af59c461111",
    "lowrank_adapter@ncl8x20":
        "f82334450a90e3640bc9bddf097c0e52c402cdaba84408ca1b28b1f113bbe279",
    "lowrank_adapter@nchw8x6x6":
        "15e507854a969e46454c58736339c78906906fe3001b3afca64d9bc1026f5140",
    "lowrank_adapter@nld16x5":
        "ede522284bb95cde4bf2e0f85186915d8f3ea904aecc5f1dd8454f6fa95d4ff6",
    "conv3x3_residual@nchw8x6x6":
        "312491f51c9b2462b208ba341a0c3fbb89137569033f61f7b7e9cb0cbf479651",
    "conv3_residual_1d@ncl8x20":
        "4d785c1a02e4a0f5bf5d3eecc034b0181f56d7d071ec8646523732f14a04028f",
    "dwsep_conv2d@nchw8x6x6": "b427439ddf23a0c1b346490d1e1c1ca8c251744e6ec886adb2881cf3ceeafcc9",
    "dwsep_conv1d@ncl8x20": "a6f1f8f2068db99bf4687eaf3baf70bca8d60754c25d22199d6d65028ed4a809",
    "squeeze_excite@ncl8x20": "afccccb833368790c097125afbaf7a89aebc7ad5f6d606a7c4206be925555f3e",
    "squeeze_excite@nchw8x6x6":
        "e631f3486591173d84331786f58a44a8ac7d603ecd66fe5edefec92cee23f8b6",
    "squeeze_excite@nld16x5": "944a48b088ddf4142d66b8c7c9743d3b33431085cce24b3548d97fd499642c0f",
    "norm_scale@nc16": "6a987362b53c695f2ca67e2655aa4054f7ed573621e4b400b77f09c183ea8237",
    "norm_scale@ncl8x20": "4748c5e38ca1877b03c081ede379b88ee5e86daadaf5df34abec73adb25df727",
    "norm_scale@nchw8x6x6": "b4589e1be6011328683296f0d9a664f1634cd46e164de189515866b943ef1767",
    "norm_scale@nld16x5": "851cfa5499658fb0f735f9f37650e2842037c1e059b54b6d8fd24b5a7ebd9a29",
}


def test_existing_blueprints_and_their_kernel_ids_are_unchanged() -> None:
    assert {n: BPS[n].blueprint_id for n in PINNED_BLUEPRINTS} == PINNED_BLUEPRINTS
    assert list(BPS)[: len(PINNED_BLUEPRINTS)] == list(PINNED_BLUEPRINTS)  # catalog order
    got = {}
    for name in PINNED_BLUEPRINTS:
        for site_name, site in OUTPUT_SITES.items():
            if site.layout in BPS[name].layouts:
                ck = compile_kernel(BPS[name], site, KEY, benchmark_iters=0)
                got[f"{name}@{site_name}"] = ck.kernel_id.removeprefix("sha256:")
    assert got == PINNED_KERNELS


def test_new_families_are_parallel_slot_blueprints() -> None:
    families = {bp.family for bp in PARALLEL}
    assert {"width", "lora", "conv_branch", "parallel_mlp", "attention_heads"} <= families
    assert all(PARALLEL_SLOT_TAG in bp.tags for bp in PARALLEL)
    assert {n for n in PINNED_BLUEPRINTS} & {bp.name for bp in PARALLEL} == set()
    # Output slots keep exactly the old catalog, plus the attention heads (tagged for both).
    for site in OUTPUT_SITES.values():
        new = [bp.name for bp in BPS.values()
               if bp.name not in PINNED_BLUEPRINTS and supports(bp, site)]
        assert set(new) <= {"attn_heads2", "attn_heads2_causal"}
    for site in PARALLEL_SITES.values():
        assert not any(supports(BPS[n], site) for n in PINNED_BLUEPRINTS)
    assert {bp.name for bp, _ in PAIRS} == {bp.name for bp in PARALLEL}


def test_parallel_site_signature_key_and_shapes() -> None:
    site = PARALLEL_SITES["ncl4to8"]
    assert site.kind == seed_pb2.SLOT_KIND_PARALLEL and site.input.channels == 4
    assert site_shape(site) == (4, 20) and site_output_shape(site) == (8, 20)
    assert site_key(site) == "NCL:4:20:FLOAT32->NCL:8:20:FLOAT32"
    for s in [*PARALLEL_SITES.values(), *OUTPUT_SITES.values()]:
        assert parse_site_key(site_key(s)) == s
    out = OUTPUT_SITES["nc16"]
    assert site_key(out) == "NC:16:-:FLOAT32" and not out.HasField("input")
    assert out.SerializeToString() == seed_pb2.SiteSignature(
        layout=NC, channels=16, dtype=seed_pb2.D_TYPE_FLOAT32).SerializeToString()


@pytest.mark.parametrize(("key", "match"), [
    ("NC:16", "LAYOUT:CHANNELS:SPATIAL:DTYPE"),
    ("NC:4:-:FLOAT32->NC:4:-:FLOAT32->NC:4:-:FLOAT32", "more than one"),
    ("NC:4:-:FLOAT16->NC:4:-:FLOAT32", "dtype D_TYPE_FLOAT16 differs"),
])
def test_bad_site_keys(key: str, match: str) -> None:
    with pytest.raises(BlueprintError, match=match):
        parse_site_key(key)


def test_check_site_rules_for_kinds() -> None:
    bad_out = site_signature("NC", 4)
    bad_out.input.channels = 4
    with pytest.raises(BlueprintError, match="input is set on an output slot"):
        plan_ir(BPS["bottleneck_mlp"].ir, bad_out)
    bad_par = seed_pb2.SiteSignature(layout=NC, channels=4, kind=seed_pb2.SLOT_KIND_PARALLEL)
    with pytest.raises(BlueprintError, match="needs site.input"):
        plan_ir(BPS["lora_r4"].ir, bad_par)
    with pytest.raises(BlueprintError, match="site.input channels=0"):
        site_signature("NC", 4, input=("NC", 0))
    changes_layout = site_signature("NC", 16, input=("NCL", 4, (8,)))
    with pytest.raises(BlueprintError, match="changes layout NCL → NC"):
        plan_ir(BPS["lora_r4"].ir, changes_layout)
    assert not supports(BPS["lora_r4"], changes_layout)


@pytest.mark.parametrize(("bp", "site_name"), PAIRS, ids=[f"{b.name}-{s}" for b, s in PAIRS])
def test_parallel_blueprint_maps_input_to_output_zero_at_init_and_learns(bp, site_name) -> None:
    site = PARALLEL_SITES[site_name]
    module = build_module(bp, site, seed=3)
    torch.manual_seed(1)
    x = torch.randn(3, *[d or 11 for d in site_shape(site)])
    out_shape = tuple(d or 11 for d in site_output_shape(site))
    s = module(x)
    assert tuple(s.shape) == (3, *out_shape)
    assert torch.equal(s, torch.zeros_like(s))  # exactly zero: y = m(x) + s(x) = m(x)
    h = torch.randn_like(s)
    ((h + s) - 1).pow(2).mean().backward()
    grads = [p.grad for p in module.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    assert {k: tuple(v.shape) for k, v in module.state_dict().items()} == \
        module.plan.tensor_specs()
    assert module.plan.output_shape == site_output_shape(site)


def test_width_seed_is_exactly_k_more_neurons_in_the_wrapped_pair() -> None:
    torch.manual_seed(0)
    fc1, fc2 = nn.Linear(40, 16), nn.Linear(16, 10)
    seed = build_module(BPS["width4_relu"], site_signature("NC", 10, input=("NC", 40)), seed=2)
    with torch.no_grad():  # as if trained: the output side is no longer zero
        seed.nodes["out"].weight.normal_()
        seed.nodes["out"].bias.normal_()
    wide1, wide2 = nn.Linear(40, 20), nn.Linear(20, 10)
    with torch.no_grad():
        wide1.weight.copy_(torch.cat([fc1.weight, seed.nodes["hidden"].weight]))
        wide1.bias.copy_(torch.cat([fc1.bias, seed.nodes["hidden"].bias]))
        wide2.weight.copy_(torch.cat([fc2.weight, seed.nodes["out"].weight], dim=1))
        wide2.bias.copy_(fc2.bias + seed.nodes["out"].bias)
    x = torch.randn(32, 40)
    grown = fc2(F.relu(fc1(x))) + seed(x)
    torch.testing.assert_close(grown, wide2(F.relu(wide1(x))), atol=1e-5, rtol=1e-5)


def test_lora_seed_merges_into_the_linear_weight() -> None:
    torch.manual_seed(0)
    fc = nn.Linear(16, 4)
    seed = build_module(BPS["lora_r4"], site_signature("NC", 4, input=("NC", 16)), seed=2)
    with torch.no_grad():
        seed.nodes["adapter"].up.normal_()
    assert set(seed.state_dict()) == {"nodes.adapter.down", "nodes.adapter.up"}  # no bias
    merged = nn.Linear(16, 4)
    with torch.no_grad():
        merged.weight.copy_(fc.weight + seed.nodes["adapter"].up @ seed.nodes["adapter"].down)
        merged.bias.copy_(fc.bias)
    x = torch.randn(8, 16)
    torch.testing.assert_close(fc(x) + seed(x), merged(x), atol=1e-5, rtol=1e-5)


# ---- the attention op -------------------------------------------------------------------


def _attn_bp(**attrs) -> object:
    return make_blueprint("t", "test", "", [NLD], [node("a", "attention", ["input"], **attrs)],
                          "a", tags=[PARALLEL_SLOT_TAG])


def test_attention_matches_torch_sdpa_and_is_causal_when_asked() -> None:
    site = PARALLEL_SITES["nld8to16"]
    for causal in (False, True):
        m = build_module(_attn_bp(heads=2, head_dim=4, causal=causal), site)
        a = m.nodes["a"]
        with torch.no_grad():  # as if trained: the zero-initialised side has moved
            a.out_weight.normal_()
            a.out_bias.normal_()
            a.qkv_bias.normal_()
        x = torch.randn(3, 5, 8)
        q, k, v = F.linear(x, a.qkv_weight, a.qkv_bias).view(3, 5, 3, 2, 4).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        ref = F.linear(o.transpose(1, 2).reshape(3, 5, 8), a.out_weight, a.out_bias)
        torch.testing.assert_close(m(x), ref, atol=1e-6, rtol=1e-5)
        later = x.clone()
        later[:, 3:] = torch.randn(3, 2, 8)  # change only tokens 3 and 4
        same_prefix = torch.allclose(m(later)[:, :3], m(x)[:, :3], atol=1e-6)
        assert same_prefix is causal


def test_attention_shape_rules_zero_check_and_bounds() -> None:
    site = PARALLEL_SITES["nld16"]
    plan = plan_ir(_attn_bp(heads=4).ir, site)  # head_dim 0 → 16 / 4 = 4 per head
    assert plan.nodes[0].params == {"qkv_weight": (48, 16), "qkv_bias": (48,),
                                    "out_weight": (16, 16), "out_bias": (16,)}
    with pytest.raises(BlueprintError, match="not zero at initialisation"):
        validate_ir(_attn_bp(zero_init=False).ir, site)
    with pytest.raises(BlueprintError, match="exceeds the bound 4096"):
        validate_ir(_attn_bp(heads=64, head_dim=128).ir, site)
    with pytest.raises(BlueprintError, match="out of range"):
        validate_ir(_attn_bp(heads=65).ir, site)
    nc_bp = make_blueprint("t", "test", "", [NC], [node("a", "attention", ["input"])], "a",
                           tags=[PARALLEL_SLOT_TAG])
    with pytest.raises(BlueprintError, match="does not apply to layout NC"):
        validate_ir(nc_bp.ir, PARALLEL_SITES["nc16to16"])


# ---- fits: no silent no-growth ----------------------------------------------------------


def test_fits_lists_the_blueprints_per_slot() -> None:
    sites = {"act1": OUTPUT_SITES["nc16"], "fc1:fc2": PARALLEL_SITES["nc40to16"]}
    out = fits(BPS.values(), sites)
    assert [b.name for b in out["fc1:fc2"]] == ["width4_relu", "width8_relu", "width8_gelu",
                                                "lora_r4", "lora_r8"]
    assert "bottleneck_mlp" in [b.name for b in out["act1"]]
    assert not {"width4_relu", "lora_r4"} & {b.name for b in out["act1"]}


def test_fits_raises_naming_slots_and_blueprints_when_nothing_fits() -> None:
    sites = {"act1": OUTPUT_SITES["nc16"], "fc1:fc2": PARALLEL_SITES["nc40to16"]}
    convs = [BPS["conv3x3_residual"], BPS["conv_branch_1d"]]
    with pytest.raises(ConfigError) as info:
        fits(convs, sites)
    msg = str(info.value)
    assert "no offered blueprint fits any seed slot" in msg
    assert "act1 (output NC:16:-:FLOAT32)" in msg
    assert "fc1:fc2 (parallel NC:40:-:FLOAT32->NC:16:-:FLOAT32)" in msg
    assert "conv3x3_residual (NCHW; output slots)" in msg
    assert "conv_branch_1d (NCL; parallel slots)" in msg
    assert fits(convs, sites, require=False) == {"act1": [], "fc1:fc2": []}
    with pytest.raises(ConfigError, match="Blueprints: \\(none\\)"):
        fits([], sites)
    with pytest.raises(ConfigError, match="no seed slots"):
        fits(convs, {})
    # One slot that fits is enough: the run can grow there.
    assert fits([BPS["lora_r4"]], sites)["fc1:fc2"][0].name == "lora_r4"


# ---- Tezzeret -------------------------------------------------------------------------


def test_tezzeret_compiles_a_parallel_kernel_that_verifies_and_materializes() -> None:
    site = PARALLEL_SITES["nc40to16"]
    ck = compile_kernel(BPS["width8_relu"], site, KEY, benchmark_iters=2)
    assert ck.manifest.site == site and ck.manifest.validation.shape_ok
    assert ck.manifest.validation.init_max_abs_delta == 0.0
    assert ck.manifest.profile.parameters == 40 * 8 + 8 + 8 * 16 + 16
    assert ck.manifest.profile.forward_flops_per_sample == 2 * (40 * 8 + 8 * 16)
    vk = verify_artifact(ck.artifact_bytes, TrustedKeys([KEY]), expected_kernel_id=ck.kernel_id)
    module = materialize(vk)
    assert tuple(module(torch.randn(2, 40)).shape) == (2, 16)
    # The same IR compiled for an output site of the output's shape is another kernel.
    other = compile_kernel(BPS["attn_heads2"], PARALLEL_SITES["nld16"], KEY, benchmark_iters=0)
    same_shape_output = compile_kernel(BPS["attn_heads2"], OUTPUT_SITES["nld16x5"], KEY,
                                       benchmark_iters=0)
    assert other.kernel_id != same_shape_output.kernel_id


def test_tezzeret_refuses_a_blueprint_for_the_other_slot_kind() -> None:
    with pytest.raises(FailedPreconditionError, match="serves slot kinds.*SLOT_KIND_PARALLEL"):
        compile_kernel(BPS["lora_r4"], OUTPUT_SITES["nc16"], KEY, benchmark_iters=0)
    with pytest.raises(FailedPreconditionError, match="serves slot kinds.*UNSPECIFIED"):
        compile_kernel(BPS["bottleneck_mlp"], PARALLEL_SITES["nc40to16"], KEY,
                       benchmark_iters=0)


def test_tezzeret_validation_catches_a_wrong_output_shape_at_a_parallel_site() -> None:
    report = validate_kernel(nn.Linear(40, 40), PARALLEL_SITES["nc40to16"])
    assert not report.shape_ok
    assert "seed output [4, 40] != site output [4, 16]" in list(report.notes)
    nonzero = validate_kernel(nn.Linear(40, 16), PARALLEL_SITES["nc40to16"])
    assert nonzero.shape_ok and nonzero.init_max_abs_delta > 1e-3


def test_compile_catalog_for_parallel_sites_skips_what_cannot_map_input_to_output() -> None:
    strided = site_signature("NCL", 8, (10,), input=("NCL", 4, (20,)))  # a stride-2 conv
    sites = [PARALLEL_SITES["nc40to16"], strided, PARALLEL_SITES["ncl4to8"]]
    out = compile_catalog(sites, KEY, benchmark_iters=0)
    names = [(ck.blueprint.name, site_key(ck.manifest.site)) for ck in out]
    expected = [(bp.name, site_key(s)) for s in sites for bp in BPS.values() if supports(bp, s)]
    assert names == expected
    assert ("conv_branch_1d", "NCL:4:20:FLOAT32->NCL:8:20:FLOAT32") in names
    assert not any(key == site_key(strided) for _, key in names)
