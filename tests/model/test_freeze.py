"""Embedding detection and freeze policies (model.embedding, model.freeze), checked name by name per architecture.

Every model is created with ``pretrained=False`` (no hub access); the expected names were checked
against each model's ``named_parameters()`` and against what the paper's code froze: the patch
embedding (+ CLIP's ``norm_pre``) for ViTs, the stem for CNNs, never ``pos_embed`` / ``cls_token``.
"""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from ftsgd.errors import RecipeError
from ftsgd.model.embedding import Embedding, find_embedding
from ftsgd.model.freeze import BlockRow, apply_freeze, frozen_parameter_names, top_level_blocks, train_mode
from ftsgd.recipe.schema import FreezeConfig

RESNET_DEEP_STEM = [
    "conv1.0.weight",
    "conv1.1.weight",
    "conv1.1.bias",
    "conv1.3.weight",
    "conv1.4.weight",
    "conv1.4.bias",
    "conv1.6.weight",
    "bn1.weight",
    "bn1.bias",
]
PATCH_EMBED = ["patch_embed.proj.weight", "patch_embed.proj.bias"]
MAXVIT_STEM = ["stem.conv1.weight", "stem.norm1.weight", "stem.norm1.bias", "stem.conv2.weight"]

# (model, create kwargs, Embedding.modules, first_module, exact `embed` names, first-stage prefixes)
CASES = [
    ("test_vit", {}, ("patch_embed",), "patch_embed.proj", PATCH_EMBED, ("blocks.0.",)),
    (
        "vit_base_patch16_clip_224",
        {"depth": 1},
        ("patch_embed", "norm_pre"),
        "patch_embed.proj",
        ["patch_embed.proj.weight", "norm_pre.weight", "norm_pre.bias"],
        ("blocks.0.",),
    ),
    ("test_vit_relpos", {}, ("patch_embed",), "patch_embed.proj", PATCH_EMBED, ("blocks.0.",)),
    (
        "deit_tiny_patch16_224",
        {"depth": 2},
        ("patch_embed",),
        "patch_embed.proj",
        PATCH_EMBED,
        ("blocks.0.",),
    ),
    (
        "eva02_tiny_patch14_224",
        {"depth": 2},
        ("patch_embed",),
        "patch_embed.proj",
        PATCH_EMBED,
        ("blocks.0.",),
    ),
    (
        "beit_base_patch16_224",
        {"depth": 1},
        ("patch_embed",),
        "patch_embed.proj",
        PATCH_EMBED,
        ("blocks.0.",),
    ),
    (
        "swin_tiny_patch4_window7_224",
        {},
        ("patch_embed",),
        "patch_embed.proj",
        [*PATCH_EMBED, "patch_embed.norm.weight", "patch_embed.norm.bias"],
        ("layers.0.",),
    ),
    (
        "test_convnext",
        {},
        ("stem",),
        "stem.0",
        ["stem.0.weight", "stem.0.bias", "stem.1.weight", "stem.1.bias"],
        ("stages.0.",),
    ),
    ("test_resnet", {}, ("conv1", "bn1"), "conv1.0", RESNET_DEEP_STEM, ("layer1.",)),
    ("resnet50d", {"layers": [1, 1, 1, 1]}, ("conv1", "bn1"), "conv1.0", RESNET_DEEP_STEM, ("layer1.",)),
    (
        "resnet18",
        {},
        ("conv1", "bn1"),
        "conv1",
        ["conv1.weight", "bn1.weight", "bn1.bias"],
        ("layer1.",),
    ),
    (
        "test_efficientnet",
        {},
        ("conv_stem", "bn1"),
        "conv_stem",
        ["conv_stem.weight", "bn1.weight", "bn1.bias"],
        ("blocks.0.",),
    ),
    (
        "mobilenetv3_small_050",
        {},
        ("conv_stem", "bn1"),
        "conv_stem",
        ["conv_stem.weight", "bn1.weight", "bn1.bias"],
        ("blocks.0.",),
    ),
    (
        "regnetx_002",
        {},
        ("stem",),
        "stem.conv",
        ["stem.conv.weight", "stem.bn.weight", "stem.bn.bias"],
        ("s1.",),
    ),
    (
        "densenet121",
        {},
        ("features.conv0", "features.norm0"),
        "features.conv0",
        ["features.conv0.weight", "features.norm0.weight", "features.norm0.bias"],
        # timm's coarse group_matcher puts a dense block and its transition in one group
        ("features.denseblock1.", "features.transition1."),
    ),
    (
        "test_byobnet",
        {},
        ("stem",),
        "stem.conv",
        ["stem.conv.weight", "stem.bn.weight", "stem.bn.bias"],
        ("stages.0.",),
    ),
    (
        "test_nfnet",
        {},
        ("stem",),
        "stem.conv1",
        [f"stem.conv{i}.{p}" for i in range(1, 5) for p in ("weight", "bias", "gain")],
        ("stages.0.",),
    ),
    ("test_maxvit", {}, ("stem",), "stem.conv1", MAXVIT_STEM, ("stages.0.",)),
    ("test_coatnet", {}, ("stem",), "stem.conv1", MAXVIT_STEM, ("stages.0.",)),
]


def make(name: str, **kwargs: object) -> nn.Module:
    """A timm model with random weights (never the hub) and a fixed seed."""
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **kwargs)


def names_of(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_parameters()]


def freeze(model: nn.Module, policy: str, embedding: Embedding | None = None, **kw: list[str]) -> list[str]:
    return frozen_parameter_names(model, FreezeConfig(policy=policy, **kw), embedding)


@pytest.fixture(scope="module")
def vit() -> nn.Module:
    """Shared read-only test_vit; tests that mutate a model make their own."""
    return make("test_vit")


@pytest.mark.parametrize(
    ("model_name", "kwargs", "modules", "first", "embed", "stage1"),
    CASES,
    ids=[c[0] for c in CASES],
)
def test_embed_and_first_stage_per_architecture(
    model_name: str,
    kwargs: dict[str, object],
    modules: tuple[str, ...],
    first: str,
    embed: list[str],
    stage1: tuple[str, ...],
) -> None:
    model = make(model_name, **kwargs)
    names = names_of(model)
    emb = find_embedding(model)

    assert emb.modules == modules
    assert emb.first_module == first
    assert freeze(model, "embed", emb) == embed
    assert not {"pos_embed", "cls_token", "reg_token", "dist_token"} & set(embed)

    expected_stage1 = [n for n in names if n in embed or n.startswith(stage1)]
    assert freeze(model, "embed+stage1", emb) == expected_stage1
    assert len(expected_stage1) > len(embed)

    # timm's own metadata agrees with what the forward pass found
    assert emb.checks[0] == (
        f"pretrained_cfg first_conv {model.pretrained_cfg['first_conv']!r}: agrees with {first!r}"
    )
    assert emb.checks[1].startswith("group_matcher stem ")
    assert ": agrees" in emb.checks[1]
    assert "forward pass on 1x3x" in emb.method


def test_embedding_is_cached_and_recomputed_identically(vit: nn.Module) -> None:
    assert freeze(vit, "embed") == freeze(vit, "embed", find_embedding(vit)) == PATCH_EMBED


def test_img_size_kwarg_is_used_for_the_dummy_input() -> None:
    """pretrained_cfg still says 160 px; the patch embedding's own img_size must win."""
    model = make("test_vit", img_size=32, patch_size=8)
    emb = find_embedding(model)
    assert "forward pass on 1x3x32x32" in emb.method
    assert freeze(model, "embed", emb) == PATCH_EMBED


def test_explicit_input_size(vit: nn.Module) -> None:
    assert "1x3x64x64" in find_embedding(vit, input_size=(3, 64, 64)).method


def test_explicit_input_size_that_fails_falls_back_to_the_model_size() -> None:
    model = make("vit_tiny_patch16_224", depth=1)  # fixed 224 px patch embedding
    emb = find_embedding(model, input_size=(3, 64, 64))
    assert emb.method.startswith("forward pass on 1x3x224x224 (1x3x64x64 failed: ")
    assert emb.modules == ("patch_embed",)


# --------------------------------------------------------------------------------------------------
# stem / head / none


def test_stem_policy_vit_includes_position_embedding_and_tokens(vit: nn.Module) -> None:
    assert freeze(vit, "stem") == ["cls_token", "pos_embed", *PATCH_EMBED]


def test_stem_policy_clip_vit_includes_norm_pre() -> None:
    model = make("vit_base_patch16_clip_224", depth=1)
    assert freeze(model, "stem") == [
        "cls_token",
        "pos_embed",
        "patch_embed.proj.weight",
        "norm_pre.weight",
        "norm_pre.bias",
    ]


def test_stem_policy_uses_anchored_match() -> None:
    """'^conv_stem|bn1' must not pick up blocks.0.0.bn1 (timm uses re.match, not re.search)."""
    model = make("test_efficientnet")
    assert "blocks.0.0.bn1.weight" in names_of(model)
    assert freeze(model, "stem") == ["conv_stem.weight", "bn1.weight", "bn1.bias"]


@pytest.mark.parametrize(
    ("model_name", "expected"),
    [("test_resnet", RESNET_DEEP_STEM), ("test_nfnet", None), ("test_maxvit", MAXVIT_STEM)],
)
def test_stem_policy_equals_embed_for_cnns(model_name: str, expected: list[str] | None) -> None:
    model = make(model_name)
    stem = freeze(model, "stem")
    assert stem == freeze(model, "embed")
    if expected is not None:
        assert stem == expected


def test_head_policy_trains_only_the_classifier(vit: nn.Module) -> None:
    frozen = freeze(vit, "head")
    assert [n for n in names_of(vit) if n not in frozen] == ["head.weight", "head.bias"]
    assert "norm.weight" in frozen and "cls_token" in frozen


def test_head_policy_nested_classifier_convnext() -> None:
    model = make("test_convnext")
    frozen = freeze(model, "head")
    # head.norm is part of the features; only the linear classifier head.fc trains
    assert "head.norm.weight" in frozen
    assert [n for n in names_of(model) if n not in frozen] == ["head.fc.weight", "head.fc.bias"]


def test_head_policy_tuple_classifier_distilled_deit() -> None:
    model = make("deit_tiny_distilled_patch16_224", depth=1)
    assert model.pretrained_cfg["classifier"] == ("head", "head_dist")
    frozen = freeze(model, "head")
    assert [n for n in names_of(model) if n not in frozen] == [
        "head.weight",
        "head.bias",
        "head_dist.weight",
        "head_dist.bias",
    ]


def test_head_policy_without_classifier_is_an_error() -> None:
    model = make("test_vit", num_classes=0)
    with pytest.raises(RecipeError, match="'head' needs a classifier"):
        freeze(model, "head")


def test_none_policy(vit: nn.Module) -> None:
    assert freeze(vit, "none") == []
    assert FreezeConfig().policy == "none"


def test_unknown_policy(vit: nn.Module) -> None:
    with pytest.raises(RecipeError, match=r"freeze\.policy: unknown policy 'embeddings'"):
        freeze(vit, "embeddings")


# --------------------------------------------------------------------------------------------------
# patterns and trainable


def test_glob_pattern_adds_to_policy(vit: nn.Module) -> None:
    frozen = freeze(vit, "embed", patterns=["blocks.0.*"])
    assert frozen == PATCH_EMBED + [n for n in names_of(vit) if n.startswith("blocks.0.")]


def test_regex_pattern_and_order(vit: nn.Module) -> None:
    frozen = freeze(vit, "none", patterns=[r"re:^blocks\.1\.attn\.qkv", "pos_embed"])
    # named_parameters order, not pattern order
    assert frozen == ["pos_embed", "blocks.1.attn.qkv.weight", "blocks.1.attn.qkv.bias"]


def test_trainable_overrides_policy_and_patterns(vit: nn.Module) -> None:
    frozen = freeze(
        vit, "stem", patterns=["blocks.0.*"], trainable=["patch_embed.proj.bias", r"re:^blocks\.0\.mlp"]
    )
    expected = ["cls_token", "pos_embed", "patch_embed.proj.weight"] + [
        n for n in names_of(vit) if n.startswith("blocks.0.") and not n.startswith("blocks.0.mlp")
    ]
    assert frozen == expected


def test_trainable_glob_on_head_policy(vit: nn.Module) -> None:
    frozen = freeze(vit, "head", trainable=["norm.*"])
    assert [n for n in names_of(vit) if n not in frozen] == [
        "norm.weight",
        "norm.bias",
        "head.weight",
        "head.bias",
    ]


def test_pattern_matching_nothing_is_a_recipe_error_with_hint(vit: nn.Module) -> None:
    with pytest.raises(RecipeError) as info:
        freeze(vit, "embed", patterns=["blcks.0.*"])
    (problem,) = info.value.problems
    assert problem.startswith("freeze.patterns: 'blcks.0.*' matches no parameter of test_vit; ")
    assert "close names: 'blocks.0.*'" in problem
    assert info.value.exit_code == 2


def test_module_name_pattern_suggests_glob(vit: nn.Module) -> None:
    with pytest.raises(RecipeError) as info:
        freeze(vit, "none", patterns=["blocks.0"])
    assert "'blocks.0' is a module; use 'blocks.0.*' for all its parameters" in info.value.problems[0]


def test_all_pattern_problems_reported_together(vit: nn.Module) -> None:
    with pytest.raises(RecipeError) as info:
        freeze(vit, "none", patterns=["re:nope$", "re:("], trainable=["xyz"])
    problems = info.value.problems
    assert problems[0].startswith("freeze.patterns: 're:nope$' matches no parameter of test_vit; ")
    assert problems[1].startswith("freeze.patterns: 're:(' is not a valid regular expression")
    assert len(problems) == 2  # trainable is checked after patterns


def test_trainable_matching_nothing_is_an_error(vit: nn.Module) -> None:
    with pytest.raises(RecipeError, match=r"freeze.trainable: 'xyz' matches no parameter of test_vit"):
        freeze(vit, "embed", trainable=["xyz"])


# --------------------------------------------------------------------------------------------------
# models timm does not know


def plain_cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )


class TinyViT(nn.Module):
    """A ViT-like model with its own names: stem container, block list, MHA, position parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.pos = nn.Parameter(torch.zeros(1, 16, 32))
        self.embedding = nn.Sequential(nn.Conv2d(3, 32, 8, stride=8), nn.Flatten(2))
        self.ln_pre = nn.LayerNorm(32)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"norm": nn.LayerNorm(32), "attn": nn.MultiheadAttention(32, 2, batch_first=True)})
            for _ in range(3)
        )
        self.classifier = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ln_pre(self.embedding(x).transpose(1, 2) + self.pos)
        for block in self.blocks:
            h = block["norm"](x)
            x = x + block["attn"](h, h, h, need_weights=False)[0]
        return self.classifier(x.mean(1))


class FeaturesClassifier(nn.Module):
    """torchvision VGG/DenseNet layout: one `features` container holding the whole backbone."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for cin, cout in [(3, 8), (8, 8), (8, 16)]:
            layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(16 * 8 * 8, 32), nn.ReLU(), nn.Linear(32, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(nn.functional.adaptive_avg_pool2d(self.features(x), 8))


def test_plain_sequential_by_execution_order() -> None:
    model = plain_cnn()
    emb = find_embedding(model)
    assert emb.modules == ("0", "1")
    assert emb.first_module == "0"
    assert emb.checks[:2] == ("pretrained_cfg first_conv: not available", "group_matcher stem: not available")
    assert freeze(model, "embed", emb) == ["0.weight", "0.bias", "1.weight", "1.bias"]
    assert freeze(model, "stem", emb) == ["0.weight", "0.bias", "1.weight", "1.bias"]
    assert freeze(model, "embed+stage1", emb) == [
        "0.weight",
        "0.bias",
        "1.weight",
        "1.bias",
        "3.weight",
        "3.bias",
    ]
    assert [n for n in names_of(model) if n not in freeze(model, "head", emb)] == ["8.weight", "8.bias"]


def test_custom_module_stem_container_norm_and_first_block() -> None:
    model = TinyViT()
    emb = find_embedding(model, input_size=(3, 32, 32))
    assert emb.modules == ("embedding", "ln_pre")
    assert emb.first_module == "embedding.0"
    embed = ["embedding.0.weight", "embedding.0.bias", "ln_pre.weight", "ln_pre.bias"]
    assert freeze(model, "embed", emb) == embed
    # `blocks` holds most of the model, so the first stage is its first element
    assert freeze(model, "embed+stage1", emb) == embed + [
        n for n in names_of(model) if n.startswith("blocks.0.")
    ]
    # the last Linear that *ran*: MultiheadAttention's out_proj is only used functionally
    assert [n for n in names_of(model) if n not in freeze(model, "head", emb)] == [
        "classifier.weight",
        "classifier.bias",
    ]


def test_backbone_container_is_not_the_embedding() -> None:
    model = FeaturesClassifier()
    emb = find_embedding(model, input_size=(3, 32, 32))
    assert emb.modules == ("features.0", "features.1")
    assert freeze(model, "embed", emb) == [
        "features.0.weight",
        "features.0.bias",
        "features.1.weight",
        "features.1.bias",
    ]
    assert [n for n in names_of(model) if n not in freeze(model, "head", emb)] == [
        "classifier.3.weight",
        "classifier.3.bias",
    ]


def test_failed_forward_falls_back_to_registration_order() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 30 * 30, 2))
    emb = find_embedding(model)  # 224 px does not fit the Linear
    assert emb.method.startswith("registration order (forward pass failed: RuntimeError")
    assert emb.modules == ("0", "1")
    emb32 = find_embedding(model, input_size=(3, 32, 32))
    assert emb32.method.startswith("forward pass on 1x3x32x32")
    assert emb32.modules == ("0", "1")


# --------------------------------------------------------------------------------------------------
# cross-checks


def test_checks_report_disagreement_with_first_conv() -> None:
    model = make("test_resnet")
    model.pretrained_cfg = {**model.pretrained_cfg, "first_conv": "conv1.3"}
    assert find_embedding(model).checks[0] == (
        "pretrained_cfg first_conv 'conv1.3': DISAGREES, forward pass ran 'conv1.0' first"
    )
    model.pretrained_cfg = {**model.pretrained_cfg, "first_conv": ("conv1.0", "aux.conv")}
    assert find_embedding(model).checks[0].endswith(": agrees with 'conv1.0'")
    model.pretrained_cfg = {k: v for k, v in model.pretrained_cfg.items() if k != "first_conv"}
    assert find_embedding(model).checks[0] == "pretrained_cfg first_conv: not available"


def test_checks_name_what_the_stem_group_adds(vit: nn.Module) -> None:
    emb = find_embedding(vit)
    assert emb.checks[1] == (
        "group_matcher stem '^cls_token|reg_token|pos_embed|patch_embed|norm_pre': "
        "agrees (also matches cls_token, pos_embed)"
    )
    assert emb.checks[2] == "module names: well-known embedding names"


def test_find_embedding_restores_modes_and_statistics() -> None:
    model = make("test_resnet")
    model.train()
    model.bn1.eval()
    before = {n: b.clone() for n, b in model.named_buffers()}
    find_embedding(model)
    assert model.training and model.layer1[0].bn1.training
    assert not model.bn1.training
    assert all(torch.equal(before[n], b) for n, b in model.named_buffers())


# --------------------------------------------------------------------------------------------------
# apply_freeze, train_mode, top_level_blocks


def test_apply_freeze_exact_names() -> None:
    model = make("test_vit")
    apply_freeze(model, PATCH_EMBED)
    assert [n for n, p in model.named_parameters() if not p.requires_grad] == PATCH_EMBED
    apply_freeze(model, [])
    assert [n for n, p in model.named_parameters() if not p.requires_grad] == PATCH_EMBED
    with pytest.raises(ValueError, match="not parameters of test_vit: nope"):
        apply_freeze(model, ["nope"])


def test_train_mode_keeps_frozen_batchnorm_statistics() -> None:
    model = make("test_resnet")
    apply_freeze(model, freeze(model, "embed"))
    # a BatchNorm with only some parameters frozen still trains (and updates its statistics)
    model.layer1[0].bn2.weight.requires_grad_(False)
    train_mode(model)
    assert model.training
    frozen_bns = [model.conv1[1], model.conv1[4], model.bn1]
    live_bns = [model.layer1[0].bn1, model.layer1[0].bn2, model.layer4[0].bn2]
    assert [m.training for m in frozen_bns] == [False, False, False]
    assert all(m.training for m in live_bns)
    before = {id(m): m.running_mean.clone() for m in frozen_bns + live_bns}
    torch.manual_seed(1)
    for _ in range(2):
        model(torch.randn(2, 3, 64, 64)).sum().backward()
    for m in frozen_bns:
        assert torch.equal(m.running_mean, before[id(m)])
        assert int(m.num_batches_tracked) == 0
    for m in live_bns:
        assert not torch.equal(m.running_mean, before[id(m)])
        assert int(m.num_batches_tracked) == 2


def test_train_mode_timm_batchnormact_stem() -> None:
    model = make("test_efficientnet")
    apply_freeze(model, freeze(model, "embed"))
    train_mode(model)
    assert type(model.bn1).__name__ == "BatchNormAct2d"
    assert not model.bn1.training and model.blocks[0][0].bn1.training
    mean = model.bn1.running_mean.clone()
    model(torch.randn(2, 3, 64, 64))
    assert torch.equal(model.bn1.running_mean, mean)


def test_top_level_blocks(vit: nn.Module) -> None:
    frozen = set(freeze(vit, "embed", patterns=["blocks.0.norm1.*"]))
    rows = top_level_blocks(vit, frozen)
    assert [(r.name, r.type, r.status) for r in rows] == [
        ("cls_token", "Parameter", "trainable"),
        ("pos_embed", "Parameter", "trainable"),
        ("patch_embed", "PatchEmbed", "frozen"),
        ("blocks", "Sequential", "partial"),
        ("norm", "LayerNorm", "trainable"),
        ("head", "Linear", "trainable"),
    ]
    assert sum(r.params for r in rows) == sum(p.numel() for p in vit.parameters())
    blocks = rows[3]
    assert blocks == BlockRow("blocks", "Sequential", blocks.params, 2 * vit.embed_dim, "partial")
    assert rows[2].frozen_params == rows[2].params == vit.patch_embed.proj.weight.numel() + vit.embed_dim
