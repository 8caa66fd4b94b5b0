"""The zoo ViT against timm's and Hugging Face's: parameter counts, weight import parity,
position-table resampling, configuration errors, training basics.

Reference models are randomly initialized from configs (nothing is downloaded), and
every parameter is perturbed so that a mis-mapped tensor (say norm1 <-> norm2, or a
zero bias) shows in the outputs.
"""

import copy
import re

import pytest
import timm
import torch
import transformers
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer as TimmViT

import kernels
import zoo.vision  # noqa: F401  (registers the presets)
import zoo.weights
from zoo.config import TransformerConfig
from zoo.registry import create_model
from zoo.vision import ViTConfig, resample_pos_embed

TOL = 1e-4  # the parity bound, fp32 on CPU


def perturbed(model: torch.nn.Module) -> torch.nn.Module:
    """model in eval mode with every parameter moved off its (often constant) init."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def small_timm(**kw) -> TimmViT:
    args = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=7)
    args.update(kw)
    return perturbed(TimmViT(**args))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def run(model, x, backend):
    """model(x) and model.forward_features(x) under backend; "triton" on its PyTorch path (fast)."""
    model.set_attn_backend(backend)
    with torch.no_grad(), kernels.reference_only():
        return model(x), model.forward_features(x)


# --- parameter counts --------------------------------------------------------------------


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "vit_small_patch16_224", "vit_base_patch16_224"])
def test_preset_parameter_count_equals_timm(name):
    with torch.device("meta"):  # counts only: no memory, no init time
        ours = sum(p.numel() for p in create_model(name).parameters())
        theirs = sum(p.numel() for p in timm.create_model(name, pretrained=False).parameters())
    assert ours == theirs


def test_small_presets_run():
    digits, cifar = create_model("vit_digits"), create_model("vit_cifar")
    assert digits.cfg.backbone.attn_backend == cifar.cfg.backbone.attn_backend == "triton"
    with torch.no_grad(), kernels.reference_only():
        assert digits(torch.randn(3, 1, 8, 8)).shape == (3, 10)
        assert cifar.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 10)


# --- timm parity -------------------------------------------------------------------------

TIMM_CASES = {
    "cls_token": dict(),
    "avg_pool_fc_norm": dict(global_pool="avg", class_token=False),
    "avg_pool_with_cls": dict(global_pool="avg"),
    "registers_layer_scale": dict(reg_tokens=3, no_embed_class=True, init_values=0.1),
    "registers_in_table": dict(reg_tokens=2),
    "non_square_pre_norm": dict(img_size=(32, 48), patch_size=(8, 4), pre_norm=True, qkv_bias=False,
                                mlp_ratio=2.5),
}


@pytest.mark.parametrize("case", list(TIMM_CASES))
def test_timm_parity(case):
    ref = small_timm(**TIMM_CASES[case])
    model = zoo.weights.from_timm(ref)
    assert not model.training
    H, W = ref.patch_embed.img_size
    x = torch.randn(2, 3, H, W)
    with torch.no_grad():
        want_logits, want_feats = ref(x), ref.forward_features(x)
    for backend in ("eager", "sdpa", "triton"):
        logits, feats = run(model, x, backend)
        assert max_diff(logits, want_logits) <= TOL, backend
        assert max_diff(feats, want_feats) <= TOL, backend


def test_timm_parity_triton_interpreter():
    # The one case that runs the Triton kernels themselves (interpreted on CPU).
    ref = perturbed(TimmViT(img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=3))
    model = zoo.weights.from_timm(ref, attn_backend="triton")
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert max_diff(model(x), ref(x)) <= TOL


@pytest.mark.parametrize("case", ["cls_token", "avg_pool_fc_norm", "registers_layer_scale", "non_square_pre_norm"])
def test_timm_state_dict_parity(case):
    kw = TIMM_CASES[case]
    ref = small_timm(**kw)
    hints = {"img_size": kw["img_size"]} if "img_size" in kw else {}
    model = zoo.weights.from_timm(ref.state_dict(), num_heads=3, attn_backend="sdpa", **hints)
    x = torch.randn(2, 3, *ref.patch_embed.img_size)
    with torch.no_grad():
        assert max_diff(model.eval()(x), ref(x)) <= TOL


def test_timm_state_dict_needs_heads():
    with pytest.raises(ValueError, match="heads="):
        zoo.weights.from_timm(small_timm().state_dict())


@pytest.mark.parametrize("kw, attribute", [
    (dict(global_pool="map"), "attn_pool"),
    (dict(global_pool="max", class_token=False), "global_pool"),
    (dict(qk_norm=True), "q_norm"),
    (dict(scale_mlp_norm=True), "mlp.norm"),
    (dict(act_layer=torch.nn.SiLU), "act_layer"),
    (dict(embed_norm_layer=torch.nn.LayerNorm), "patch_embed.norm"),
    (dict(pos_embed="none"), "pos_embed"),
])
def test_timm_unsupported_variants_raise(kw, attribute):
    with pytest.raises(ValueError, match=re.escape(attribute)):
        zoo.weights.from_timm(small_timm(**kw))


@pytest.mark.parametrize("act_layer", ["gelu", "gelu_tanh"])
def test_timm_gelu_classes_import(act_layer):
    """timm's own GELU modules (act_layer by name) compute what the zoo's exact / tanh GELU does."""
    ref = small_timm(act_layer=act_layer)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert max_diff(run(zoo.weights.from_timm(ref), x, "sdpa")[0], ref(x)) <= TOL
    assert zoo.weights.from_timm(ref).cfg.backbone.mlp == ("gelu" if act_layer == "gelu" else "gelu_tanh")


def test_timm_state_dict_ambiguities_and_other_architectures_raise():
    # 4 registers + class token, patches only in the table: 9 rows read as 3x3 without the 5
    # prefix tokens and as 2x2 with them, so the grid cannot be told from the shapes.
    ambiguous = small_timm(img_size=24, reg_tokens=4, no_embed_class=True).state_dict()
    with pytest.raises(ValueError, match="img_size= or no_embed_class="):
        zoo.weights.from_timm(ambiguous, num_heads=3)
    model = zoo.weights.from_timm(ambiguous, num_heads=3, no_embed_class=True)
    assert model.cfg.grid_size == (3, 3)
    without_table = {k: v for k, v in small_timm().state_dict().items() if k != "pos_embed"}
    with pytest.raises(ValueError, match="no 'pos_embed'"):
        zoo.weights.from_timm(without_table, num_heads=3)
    eva = timm.models.eva.Eva(img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=3)
    with pytest.raises(ValueError, match="Eva is not a timm VisionTransformer"):
        zoo.weights.from_timm(eva)


def test_timm_extra_weight_is_not_dropped():
    state = small_timm().state_dict()
    state["blocks.0.attn.q_norm.weight"] = torch.ones(16)
    with pytest.raises(ValueError, match="q_norm"):
        zoo.weights.from_timm(state, num_heads=3)


# --- Hugging Face parity -----------------------------------------------------------------

HF_CASES = {
    "classifier": dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=3, intermediate_size=96,
                       image_size=32, patch_size=8, num_labels=5),
    "tanh_gelu_no_qkv_bias_grey": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                       intermediate_size=80, image_size=16, patch_size=4, num_channels=1,
                                       qkv_bias=False, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
                                       num_labels=3),
}


@pytest.mark.parametrize("case", list(HF_CASES))
def test_hf_parity(case):
    cfg = transformers.ViTConfig(**HF_CASES[case])
    ref = perturbed(transformers.ViTForImageClassification(cfg))
    model = zoo.weights.from_hf(ref)
    x = torch.randn(2, cfg.num_channels, cfg.image_size, cfg.image_size)
    with torch.no_grad():
        want = ref(pixel_values=x).logits
    for backend in ("eager", "sdpa", "triton"):
        logits, _ = run(model, x, backend)
        assert max_diff(logits, want) <= TOL, backend


def test_hf_vit_model_features_and_legacy_names():
    cfg = transformers.ViTConfig(**HF_CASES["classifier"])
    ref = perturbed(transformers.ViTModel(cfg, add_pooling_layer=False))
    # Checkpoints saved before transformers 5 name the same tensors differently.
    legacy = [(r"^layers\.(\d+)\.", r"encoder.layer.\1."), (r"attention\.q_proj", "attention.attention.query"),
              (r"attention\.k_proj", "attention.attention.key"), (r"attention\.v_proj", "attention.attention.value"),
              (r"attention\.o_proj", "attention.output.dense"), (r"mlp\.fc1", "intermediate.dense"),
              (r"mlp\.fc2", "output.dense")]
    state = {}
    for key, value in ref.state_dict().items():
        for pattern, replacement in legacy:
            key = re.sub(pattern, replacement, key)
        state[key] = value
    assert any("attention.attention.query" in k for k in state)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = ref(pixel_values=x).last_hidden_state
        for source in (ref.state_dict(), state):
            model = zoo.weights.from_hf(source, config=cfg, attn_backend="sdpa")
            assert model.num_classes == 0
            assert max_diff(model.forward_features(x), want) <= TOL


@pytest.mark.parametrize("size", [(24, 24), (8, 8), (16, 24)])
def test_hf_other_image_size_matches_interpolate_pos_encoding(size):
    """An HF import resamples its table for other sizes as HF's interpolate_pos_encoding=True
    (plain bicubic, whose cubic differs from timm's antialiased one even when enlarging)."""
    cfg = transformers.ViTConfig(**dict(HF_CASES["classifier"], image_size=16, patch_size=4))
    ref = perturbed(transformers.ViTForImageClassification(cfg))
    model = zoo.weights.from_hf(ref, attn_backend="sdpa")
    assert not model.cfg.pos_antialias
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        want = ref(pixel_values=x, interpolate_pos_encoding=True).logits
        assert max_diff(model(x), want) <= TOL
        # The timm resampling is another function: the comparison can tell them apart.
        model.cfg.pos_antialias = True
        assert max_diff(model(x), want) > 10 * TOL


def test_hf_vit_model_with_its_pooler_imports_the_rest_and_names_the_pooler():
    """A ViTModel saved with its pooler (as the in21k releases are): the pooler has no zoo
    counterpart and is left out with a warning; the features are the reference's."""
    cfg = transformers.ViTConfig(**HF_CASES["classifier"])
    ref = perturbed(transformers.ViTModel(cfg)).eval()
    assert any(k.startswith("pooler.") for k in ref.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with pytest.warns(UserWarning, match=r"ViTModel's pooler \(pooler.dense.bias, pooler.dense.weight\)"):
        model = zoo.weights.from_hf(ref.state_dict(), config=cfg, attn_backend="sdpa")
    with torch.no_grad():
        assert max_diff(model.forward_features(x), ref(pixel_values=x).last_hidden_state) <= TOL


def test_imports_keep_the_source_modules_dtype_and_unwrap_torch_compile():
    """A bf16 source gives a bf16 model (not float32: twice the memory); a compiled module
    is imported as the module it wraps. Oracle: the source's own parameters and output."""
    ref = small_timm().eval()
    low = copy.deepcopy(ref).to(torch.bfloat16)
    model = zoo.weights.from_timm(low, attn_backend="sdpa")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert torch.equal(model.patch_embed.weight, low.patch_embed.proj.weight)
    compiled = zoo.weights.from_timm(torch.compile(ref), attn_backend="sdpa")
    assert not compiled.training and {p.dtype for p in compiled.parameters()} == {torch.float32}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert max_diff(compiled(x), ref(x)) <= TOL
    hf = transformers.ViTForImageClassification(transformers.ViTConfig(**HF_CASES["classifier"]))
    assert {p.dtype for p in zoo.weights.from_hf(torch.compile(hf.half())).parameters()} == {torch.float16}


def test_a_table_for_another_image_size_is_refused_with_the_way_to_resample_it():
    ref = small_timm()
    with pytest.raises(ValueError, match=r"import at the table's own size .* model.set_image_size"):
        zoo.weights.from_timm(ref.state_dict(), num_heads=ref.blocks[0].attn.num_heads, img_size=64)


# --- position table ----------------------------------------------------------------------


@pytest.mark.parametrize("new_grid, prefix", [((6, 6), 1), ((3, 5), 0), ((2, 2), 3)])
def test_resample_pos_embed_matches_timm(new_grid, prefix):
    table = torch.randn(1, prefix + 4 * 4, 24)
    want = resample_abs_pos_embed(table, new_size=list(new_grid), old_size=[4, 4], num_prefix_tokens=prefix)
    assert max_diff(resample_pos_embed(table, new_grid, (4, 4), prefix), want) <= 1e-6


@pytest.mark.parametrize("size", [(48, 48), (32, 48)])
def test_other_image_size_matches_timm_dynamic(size):
    ref = small_timm(dynamic_img_size=True, reg_tokens=1)
    model = zoo.weights.from_timm(ref, attn_backend="sdpa")
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        assert max_diff(model(x), ref(x)) <= TOL
        feats = model.forward_features(x)
    assert feats.shape == (2, 2 + (size[0] // 8) * (size[1] // 8), 48)


def test_set_image_size():
    ref = small_timm(dynamic_img_size=True)
    model = zoo.weights.from_timm(ref, attn_backend="sdpa")
    want_table = resample_abs_pos_embed(ref.pos_embed.detach(), new_size=[6, 6], old_size=[4, 4], num_prefix_tokens=1)
    model.set_image_size(48)
    assert model.cfg.img_size == 48 and model.grid_size == (6, 6)
    assert max_diff(model.pos_embed.detach(), want_table) <= 1e-6
    x = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        assert max_diff(model(x), ref(x)) <= TOL
    with pytest.raises(ValueError, match="divisible by the patch size"):
        model.set_image_size(50)


def test_bad_inputs_raise():
    model = create_model("vit_digits")
    with pytest.raises(ValueError, match=r"\(9, 8\).*\(2, 2\)"):
        model(torch.randn(1, 1, 9, 8))
    with pytest.raises(ValueError, match="images must have shape"):
        model(torch.randn(1, 3, 8, 8))


# --- configuration -----------------------------------------------------------------------


def test_bad_configs_raise():
    with pytest.raises(ValueError, match=r"img_size 30 .*patch_size 16"):
        ViTConfig(img_size=30, patch_size=16)
    with pytest.raises(ValueError, match="needs class_token"):
        ViTConfig(class_token=False)
    with pytest.raises(ValueError, match="positions must be 'none'"):
        ViTConfig(backbone=TransformerConfig(positions="learned"))
    with pytest.raises(ValueError, match=r"heads \(5\) must divide dim \(192\)"):
        create_model("vit_tiny_patch16_224", heads=5)
    with pytest.raises(ValueError, match="img_size"):
        create_model("vit_tiny_patch16_224", img_size=100)
    with pytest.raises(TypeError, match="num_class"):
        create_model("vit_tiny_patch16_224", num_class=10)
    for field in ("num_classes", "in_chans", "reg_tokens"):
        with pytest.raises(ValueError, match=f"{field} must be .*got True"):
            ViTConfig(**{field: True})


def test_a_zero_position_init_std_starts_the_table_at_zero():
    model = create_model("vit_digits", pos_init_std=0.0)
    assert model.pos_embed.abs().max() == 0
    assert create_model("vit_digits").pos_embed.std() > 0


def test_create_model_overrides_and_reset_classifier():
    model = create_model("vit_tiny_patch16_224", num_classes=10, depth=2, img_size=32, attn_backend="sdpa")
    assert model.cfg.num_classes == 10 and model.cfg.backbone.depth == 2 and len(model.backbone.blocks) == 2
    assert model.cfg.backbone.dim == 192 and model.cfg.backbone.norm_eps == 1e-6
    x = torch.randn(2, 3, 32, 32)
    assert model(x).shape == (2, 10)
    model.reset_classifier(4)
    assert model.num_classes == 4 and model(x).shape == (2, 4)
    model.reset_classifier(0)
    assert model(x).shape == (2, 192)
    assert torch.equal(model(x), model.forward_head(model.forward_features(x), pre_logits=True))


def test_backends_agree_on_zoo_model():
    model = create_model("vit_digits", reg_tokens=2).eval()
    x = torch.randn(4, 1, 8, 8)
    outs = {b: run(model, x, b)[0] for b in ("eager", "sdpa", "triton")}
    assert model.cfg.backbone.attn_backend == "triton"
    assert max_diff(outs["sdpa"], outs["eager"]) <= 1e-5
    assert max_diff(outs["triton"], outs["eager"]) <= 1e-5


def test_training_step_gives_finite_gradients():
    model = create_model("vit_digits", attn_backend="sdpa", class_token=True, reg_tokens=1)
    shapes = {n: p.shape for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.pos_embed.grad.abs().sum() > 0 and model.cls_token.grad.abs().sum() > 0
    opt.step()
    assert {n: p.shape for n, p in model.named_parameters()} == shapes
