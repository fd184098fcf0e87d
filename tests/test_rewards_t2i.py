"""The text-to-image rewards (issue 12): JPEG compressibility, CLIP features and the CLIP score, the LAION aesthetic
predictor, ImageReward. Tiny models built in code, nothing downloaded; each checked against an independent reference
(PIL, torchvision, transformers' own model calls, the MLP by hand, finite differences, numbers of the original
ImageReward code)."""
from __future__ import annotations

import io
import json
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from PIL import Image

from iif.checks import config_errors
from iif.config import compose
from iif.hub import HubDownload, MissingWeights, hub_file
from iif.rewards.aesthetic import AestheticReward
from iif.rewards.clip import CLIP_MEAN, CLIP_STD, CLIPEncoder, clip_pixels
from iif.rewards.clip_score import CLIPScoreReward
from iif.rewards.image_reward import ImageRewardScore
from iif.rewards.jpeg import JPEGSizeReward
from iif.utils import ConfigError

PROMPTS = ["a photo of a cat", "a dog", "an astronaut riding a horse"]
CLIP_L14 = "openai/clip-vit-large-patch14"


@pytest.fixture(autouse=True)
def _hub_offline(monkeypatch):
    """Nothing may be downloaded: the environment variable (read by iif.hub) and huggingface_hub's constant (read at
    its import, maybe before this test)."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def images(b: int, h: int, w: int, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    """Smooth random images in ``[-0.9, 0.9]`` (a low-resolution field, bilinearly upsampled): ``[b, 3, h, w]``."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(b, 3, 6, 6, generator=g, dtype=torch.float64) * 1.8 - 0.9
    return F.interpolate(low, size=(h, w), mode="bilinear", align_corners=True).to(dtype)


def by_hand_pixels(x: torch.Tensor) -> torch.Tensor:
    """CLIP's normalisation of an image already of the model's size: ``((x + 1) / 2 - mean) / std``."""
    mean = torch.tensor(CLIP_MEAN, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=x.dtype).view(1, 3, 1, 1)
    return ((x + 1) / 2 - mean) / std


def features(out) -> torch.Tensor:
    """transformers 4 returns the features, 5 a model output holding them in ``pooler_output``."""
    return out if torch.is_tensor(out) else out.pooler_output


def directional_fd(f, x: torch.Tensor, v: torch.Tensor, h: float = 1e-4) -> torch.Tensor:
    """Central difference of ``f`` along ``v``: ``(f(x + h v) - f(x - h v)) / 2h`` ``[B]``."""
    with torch.no_grad():
        return (f(x + h * v) - f(x - h * v)) / (2 * h)


@pytest.fixture(scope="module")
def tiny_clip():
    return CLIPEncoder("tiny", seed=0)


# ---------------------------------------------------------------------------------------------- JPEG
def test_jpeg_size_is_the_kb_of_a_pil_jpeg():
    """compressibility = -kB and incompressibility = +kB of the JPEG PIL writes of the 8-bit image (built here with
    numpy); the YAMLs build the reward; a lower quality gives smaller files."""
    x = torch.rand(3, 3, 24, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    comp = instantiate(compose(["reward=compressibility"])[0].reward)
    incomp = instantiate(compose(["reward=incompressibility"])[0].reward)
    low = JPEGSizeReward(sign=1, quality=10)
    for i in range(3):
        u8 = np.clip(np.round((x[i].numpy().transpose(1, 2, 0) + 1) * 127.5), 0, 255).astype(np.uint8)
        kb = {}
        for q in (95, 10):
            buffer = io.BytesIO()
            Image.fromarray(u8, mode="RGB").save(buffer, format="JPEG", quality=q)
            kb[q] = len(buffer.getvalue()) / 1000
        assert comp(x)[i].item() == pytest.approx(-kb[95], abs=1e-6)
        assert incomp(x)[i].item() == pytest.approx(kb[95], abs=1e-6)
        assert low(x)[i].item() == pytest.approx(kb[10], abs=1e-6) and kb[10] < kb[95]
    assert comp.name == "compressibility" and incomp.name == "incompressibility"


def test_a_constant_image_compresses_better_than_noise():
    """Compressibility ranks a flat image above noise (greyscale too), and is a black box."""
    noise = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    flat = torch.full((1, 3, 32, 32), 0.3)
    r = JPEGSizeReward()
    assert r(flat).item() > r(noise).item() + 1.0  # noise: several kB; a flat 32x32 image: well under one
    assert r(flat[:, :1]).item() > r(noise[:, :1]).item()
    assert not r.differentiable
    with pytest.raises(TypeError, match="not differentiable"):
        r.grad_log_tilt(noise)
    with pytest.raises(ValueError, match="reward.sign"):
        JPEGSizeReward(sign=2)


# ---------------------------------------------------------------------------------------------- CLIP
@pytest.mark.parametrize("size", [32, 224])
def test_clip_pixels_follow_the_pil_pipeline(size):
    """The torch preprocessing against CLIP's and ImageReward's own (torchvision on a PIL image: Resize(size,
    bicubic), CenterCrop, ToTensor, Normalize), on a 48x64 image (a crop of the longer side; down- and up-sampling):
    within 1/255 on average and 3/255 at the 99th percentile (PIL rounds to 8 bits; borders differ slightly)."""
    from torchvision import transforms as T

    yy, xx = np.meshgrid(np.arange(48), np.arange(64), indexing="ij")
    smooth = np.stack([127 + 100 * np.sin(xx / 5.0), 127 + 100 * np.cos(yy / 7.0), 2 * xx + yy], -1)
    noise = np.random.default_rng(0).integers(0, 256, (48, 64, 3))
    pipeline = T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size),
                          T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)])
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    for arr in (smooth.astype(np.uint8), noise.astype(np.uint8)):
        ref = pipeline(Image.fromarray(arr))
        x = torch.from_numpy(arr).permute(2, 0, 1)[None].float() / 127.5 - 1
        ours = clip_pixels(x, size)[0]
        assert ours.shape == ref.shape == (3, size, size)
        err = ((ours - ref) * std * 255).abs()  # in 8-bit levels
        assert err.mean() < 1.0 and torch.quantile(err.flatten(), 0.99) < 3.0, (err.mean(), err.max())


def test_clip_image_features_are_transformers_features_normalised(tiny_clip):
    """image_features = get_image_features / norm, on pixels computed here: by hand for an image of the model's size,
    and with torchvision's tensor resize + centre crop for a 40x56 one."""
    from torchvision.transforms.v2 import functional as TF

    model = tiny_clip.model
    x = images(3, 32, 32)
    ref = F.normalize(features(model.get_image_features(pixel_values=by_hand_pixels(x))), dim=-1)
    torch.testing.assert_close(tiny_clip.image_features(x), ref, atol=1e-5, rtol=1e-5)
    y = images(2, 40, 56, seed=1)
    u = TF.resize((y + 1) / 2, [32], interpolation=TF.InterpolationMode.BICUBIC, antialias=True).clamp(0, 1)
    pixels = TF.normalize(TF.center_crop(u, [32, 32]), list(CLIP_MEAN), list(CLIP_STD))
    ref = F.normalize(features(model.get_image_features(pixel_values=pixels)), dim=-1)
    torch.testing.assert_close(tiny_clip.image_features(y), ref, atol=1e-5, rtol=1e-5)
    assert tiny_clip.image_size == 32 and tiny_clip.dim == 16


def test_clip_text_features_are_transformers_features_normalised(tiny_clip):
    tok = tiny_clip.tokenizer(PROMPTS, padding=True, truncation=True, return_tensors="pt")  # 16 tokens
    ref = F.normalize(features(tiny_clip.model.get_text_features(**tok)), dim=-1)
    ours = tiny_clip.text_features(PROMPTS)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.norm(dim=-1), torch.ones(3))


def test_clip_loads_a_local_folder_and_names_its_downloads(tiny_clip, tmp_path):
    """A folder in the transformers layout loads (same features as the model saved); hub ids are downloads, tiny and
    folders are not."""
    tiny_clip.model.save_pretrained(tmp_path / "clip")
    tiny_clip.tokenizer.save_pretrained(tmp_path / "clip")
    loaded = CLIPEncoder(str(tmp_path / "clip"))
    x = images(2, 32, 32)
    ref = F.normalize(features(tiny_clip.model.get_image_features(pixel_values=by_hand_pixels(x))), dim=-1)
    torch.testing.assert_close(loaded.image_features(x), ref, atol=1e-5, rtol=1e-5)
    assert CLIPEncoder.hub_downloads({"pretrained": str(tmp_path / "clip")}) == []
    assert CLIPEncoder.hub_downloads({"pretrained": "tiny"}) == []
    (d,) = CLIPEncoder.hub_downloads({"pretrained": "openai/clip-vit-large-patch14"})
    assert d.repo_id == "openai/clip-vit-large-patch14" and "*.safetensors" in d.allow_patterns


def test_clip_missing_weights_offline_is_one_line():
    with pytest.raises(MissingWeights) as e:
        CLIPEncoder("iif-tests/no-such-clip", key="reward.pretrained")
    msg = str(e.value)
    assert "\n" not in msg and "reward.pretrained" in msg and "iif-prefetch" in msg and "HF_HUB_OFFLINE" in msg


# ---------------------------------------------------------------------------------------------- CLIP score
def test_clip_score_is_the_scaled_cosine_with_the_samples_prompt(tiny_clip):
    """r = scale * cos(image features, text features of prompts[cond]), the cosine computed here from transformers'
    features; from the YAML with pretrained=tiny."""
    cfg, _ = compose(["reward=clip_score", "conditions=prompts", f"conditions.prompts={json.dumps(PROMPTS)}",
                      "reward.pretrained=tiny"])
    r = instantiate(cfg.reward)
    x, cond = images(4, 32, 32), torch.tensor([2, 0, 1, 2])
    f = features(tiny_clip.model.get_image_features(pixel_values=by_hand_pixels(x)))
    tok = tiny_clip.tokenizer([PROMPTS[i] for i in cond], padding=True, truncation=True, return_tensors="pt")
    g = features(tiny_clip.model.get_text_features(**tok))
    cos = (f * g).sum(-1) / (f.norm(dim=-1) * g.norm(dim=-1))
    torch.testing.assert_close(r(x, cond), 100 * cos, atol=1e-4, rtol=1e-5)
    one = CLIPScoreReward(PROMPTS, pretrained="tiny", scale=1.0)
    torch.testing.assert_close(one(x, cond), cos, atol=1e-6, rtol=1e-5)


def test_clip_score_gradient_matches_finite_differences():
    """grad_x r (through the resize and normalisation) against a central difference, in float64, on a 40x40 image
    (resampled to 32)."""
    r = CLIPScoreReward(PROMPTS, pretrained="tiny", scale=1.0)
    r.encoder.model.double()
    x, cond = images(2, 40, 40, dtype=torch.float64), torch.tensor([1, 2])
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    g = r.grad_log_tilt(x, cond)
    assert g.shape == x.shape and g.abs().sum() > 0
    fd = directional_fd(lambda z: r.evaluate(z, cond), x, v)
    torch.testing.assert_close((g * v).flatten(1).sum(1), fd, atol=1e-7, rtol=1e-4)


def test_prompt_rewards_need_prompts_and_conditions():
    """Without conditions=prompts, building clip_score or image_reward fails with one line naming reward.prompts;
    a missing or out-of-range condition is an error too."""
    for reward in ("clip_score", "image_reward"):
        cfg, _ = compose([f"reward={reward}", "reward.pretrained=tiny"])
        with pytest.raises(ConfigError, match="reward.prompts") as e, config_errors():
            instantiate(cfg.reward)
        assert "\n" not in str(e.value)
    r = CLIPScoreReward(PROMPTS, pretrained="tiny")
    with pytest.raises(ValueError, match="conditions=prompts"):
        r(images(1, 32, 32))
    with pytest.raises(IndexError, match="3 prompts"):
        r(images(1, 32, 32), torch.tensor([3]))


# ---------------------------------------------------------------------------------------------- aesthetic
def published_head(width: int, seed: int = 0) -> dict:
    """A head's state dict in the published layout of sac+logos+ava1-l14-linearMSE.pth (keys layers.{0,2,4,6,7})."""
    g = torch.Generator().manual_seed(seed)
    sizes = {0: (1024, width), 2: (128, 1024), 4: (64, 128), 6: (16, 64), 7: (1, 16)}
    out = {}
    for i, (o, n) in sizes.items():
        out[f"layers.{i}.weight"] = torch.randn(o, n, generator=g) / n ** 0.5
        out[f"layers.{i}.bias"] = torch.randn(o, generator=g) * 0.1
    return out


def test_aesthetic_is_the_linear_mlp_on_normalised_clip_features(tiny_clip, tmp_path):
    """r = W7 (W6 (W4 (W2 (W0 f + b0) + b2) + b4) + b6) + b7 with f the unit CLIP image embedding (transformers'),
    the head loaded from a local .pth in the published layout; a head of the wrong width is a one-line error."""
    state = published_head(tiny_clip.dim)
    torch.save(state, tmp_path / "head.pth")
    r = AestheticReward(pretrained="tiny", head=str(tmp_path / "head.pth"))
    x = images(3, 32, 32)
    h = F.normalize(features(tiny_clip.model.get_image_features(pixel_values=by_hand_pixels(x))), dim=-1)
    for i in (0, 2, 4, 6, 7):
        h = h @ state[f"layers.{i}.weight"].T + state[f"layers.{i}.bias"]
    torch.testing.assert_close(r(x), h[:, 0], atol=1e-4, rtol=1e-5)
    torch.save(published_head(768), tmp_path / "wide.pth")
    with pytest.raises(ValueError, match="reward.head: .* width 16"):
        AestheticReward(pretrained="tiny", head=str(tmp_path / "wide.pth"))


def test_aesthetic_gradient_matches_finite_differences():
    cfg, _ = compose(["reward=aesthetic", "reward.pretrained=tiny"])  # a tiny CLIP: a random head, not the hub's
    r = instantiate(cfg.reward)
    r.encoder.model.double()
    r.head.double()
    x = images(2, 36, 36, dtype=torch.float64)
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    g = r.grad_log_tilt(x)
    assert g.abs().sum() > 0
    torch.testing.assert_close((g * v).flatten(1).sum(1), directional_fd(r.evaluate, x, v), atol=1e-7, rtol=1e-4)


def test_aesthetic_downloads_and_missing_weights(tmp_path):
    """hub_downloads: CLIP and the head file (nothing for tiny); a missing CLIP, head file or hub head is one line
    naming its key."""
    cfg, _ = compose(["reward=aesthetic"])
    assert AestheticReward.hub_downloads(cfg.reward) == [
        HubDownload("openai/clip-vit-large-patch14", ("*.json", "*.txt", "*.safetensors"), "pretrained"),
        HubDownload("camenduru/improved-aesthetic-predictor", ("sac+logos+ava1-l14-linearMSE.pth",), "head")]
    assert AestheticReward.hub_downloads({"pretrained": "tiny"}) == []
    assert AestheticReward.hub_downloads({"pretrained": CLIP_L14, "head": "tiny"}) == [
        HubDownload(CLIP_L14, ("*.json", "*.txt", "*.safetensors"), "pretrained")]
    with pytest.raises(MissingWeights) as e:
        AestheticReward(pretrained=CLIP_L14 + "-no-such", head="tiny")
    assert "reward.pretrained" in str(e.value) and "iif-prefetch" in str(e.value)
    with pytest.raises(MissingWeights, match="reward.head: the folder .* has no file 'sac"):
        AestheticReward(pretrained="tiny", head=str(tmp_path))
    with pytest.raises(MissingWeights, match="reward.head: 'iif-tests/no-such-head/h.pth': HF_HUB_OFFLINE"):
        hub_file("iif-tests/no-such-head", "h.pth", "reward.head")


# ---------------------------------------------------------------------------------------------- ImageReward
# A tiny ImageReward in the layout of ImageReward.pt: BLIP's ViT (width 128, 2 heads of 64, depth 2, 32 px images in
# 16 px patches) under blip.visual_encoder, BLIP's BERT with cross-attention (width 32, 4 heads, 2 layers, vocabulary
# 40) under blip.text_encoder, the 32-1024-128-64-16-1 head under mlp.layers; every float tensor filled from its key
# alone (fill_rule). ORIGINAL_SCORES are what the image-reward 1.5 package's own classes (VisionTransformer and
# BertModel of ImageReward.models.BLIP, ImageReward.MLP, ImageReward.score_gard) computed for these weights, the
# images `images_for_original()` and the token ids below, in a separate environment with transformers 4.46.3 (where
# that package imports; it does not import with transformers 5).
MED_CONFIG = dict(architectures=["BertModel"], attention_probs_dropout_prob=0.1, hidden_act="gelu",
                  hidden_dropout_prob=0.1, hidden_size=32, initializer_range=0.02, intermediate_size=64,
                  layer_norm_eps=1e-12, max_position_embeddings=40, model_type="bert", num_attention_heads=4,
                  num_hidden_layers=2, pad_token_id=0, type_vocab_size=2, vocab_size=40, encoder_width=128,
                  add_cross_attention=True)
TOKEN_IDS = torch.tensor([[2, 10, 11, 3, 0, 0], [2, 12, 13, 14, 3, 0]])
ORIGINAL_SCORES = torch.tensor([-0.9423502683639526, -0.90079265832901])
ORIGINAL_SCORES_SWAPPED = torch.tensor([-0.9049708843231201, -0.945360004901886])  # prompts of the two images swapped


def image_reward_layout(w: int = 128, depth: int = 2, patches: int = 4, patch: int = 16, d: int = 32,
                        layers: int = 2, inter: int = 64, vocab: int = 40, positions: int = 40) -> dict:
    """``{key: shape}`` of an ImageReward checkpoint of these sizes (BLIP's ViT and BERT-with-cross-attention key
    names; vision MLP ratio 4)."""
    v, t = "blip.visual_encoder.", "blip.text_encoder."
    shapes = {v + "cls_token": (1, 1, w), v + "pos_embed": (1, patches + 1, w),
              v + "patch_embed.proj.weight": (w, 3, patch, patch), v + "patch_embed.proj.bias": (w,),
              v + "norm.weight": (w,), v + "norm.bias": (w,)}
    for i in range(depth):
        b = f"{v}blocks.{i}."
        for name, shape in (("norm1", (w,)), ("norm2", (w,)), ("attn.qkv", (3 * w, w)), ("attn.proj", (w, w)),
                            ("mlp.fc1", (4 * w, w)), ("mlp.fc2", (w, 4 * w))):
            shapes[f"{b}{name}.weight"], shapes[f"{b}{name}.bias"] = shape, shape[:1]
    e = t + "embeddings."
    shapes.update({e + "word_embeddings.weight": (vocab, d), e + "position_embeddings.weight": (positions, d),
                   e + "LayerNorm.weight": (d,), e + "LayerNorm.bias": (d,)})
    for i in range(layers):
        b = f"{t}encoder.layer.{i}."
        for att, kv in (("attention", d), ("crossattention", w)):
            for name, shape in (("self.query", (d, d)), ("self.key", (d, kv)), ("self.value", (d, kv)),
                                ("output.dense", (d, d)), ("output.LayerNorm", (d,))):
                shapes[f"{b}{att}.{name}.weight"], shapes[f"{b}{att}.{name}.bias"] = shape, (d,)
        for name, shape in (("intermediate.dense", (inter, d)), ("output.dense", (d, inter)),
                            ("output.LayerNorm", (d,))):
            shapes[f"{b}{name}.weight"], shapes[f"{b}{name}.bias"] = shape, shape[:1]
    for i, shape in ((0, (1024, d)), (2, (128, 1024)), (4, (64, 128)), (6, (16, 64)), (7, (1, 16))):
        shapes[f"mlp.layers.{i}.weight"], shapes[f"mlp.layers.{i}.bias"] = shape, shape[:1]
    return shapes


def fill_rule(key: str, shape) -> torch.Tensor:
    """A tensor from its key alone: ``0.1 N(0, 1)`` from the generator seeded by crc32(key); LayerNorm weights
    ``1 + 0.1 N(0, 1)``."""
    r = torch.randn(shape, generator=torch.Generator().manual_seed(zlib.crc32(key.encode())), dtype=torch.float32)
    return 1 + 0.1 * r if (len(shape) == 1 and "norm" in key.lower()) else 0.1 * r


def images_for_original() -> torch.Tensor:
    return torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1


@pytest.fixture(scope="module")
def image_reward_folder(tmp_path_factory):
    """A local ImageReward folder (ImageReward.pt with unused extras as the real one has, med_config.json) and a
    tokenizer folder (vocab.txt: 5 specials, a-z and 9 continuations: 40 tokens, the text encoder's vocabulary)."""
    root = tmp_path_factory.mktemp("imagereward")
    state = {k: fill_rule(k, s) for k, s in image_reward_layout().items()}
    state["blip.text_encoder.embeddings.position_ids"] = torch.arange(40).view(1, -1)
    state["blip.vision_proj.weight"], state["blip.text_proj.weight"] = torch.zeros(256, 128), torch.zeros(256, 32)
    torch.save(state, root / "ImageReward.pt")
    (root / "med_config.json").write_text(json.dumps(MED_CONFIG))
    letters = list("abcdefghijklmnopqrstuvwxyz")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + letters + ["##" + c for c in "abcdegost"]
    (root / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return root, vocab


def test_image_reward_matches_the_original_implementation(image_reward_folder):
    """Loaded from a local folder in ImageReward's own checkpoint layout, the score of given tokens equals the
    original package's (ORIGINAL_SCORES), so the renaming onto transformers' BLIP, the cross-attention, the head and
    the normalisation (mu, sigma) are ImageReward's."""
    root, _ = image_reward_folder
    r = ImageRewardScore(prompts=["a cat"], pretrained=str(root), tokenizer=str(root))
    x, mask = images_for_original(), (TOKEN_IDS != 0).long()
    torch.testing.assert_close(r.score_tokens(x, TOKEN_IDS, mask), ORIGINAL_SCORES, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(r.score_tokens(x, TOKEN_IDS.flip(0), mask.flip(0)), ORIGINAL_SCORES_SWAPPED,
                               atol=2e-5, rtol=1e-5)
    raw = ImageRewardScore(prompts=["a cat"], pretrained=str(root), tokenizer=str(root), score_mean=0, score_std=1)
    torch.testing.assert_close(raw.score_tokens(x, TOKEN_IDS, mask),
                               ORIGINAL_SCORES * 1.0333394966054072 + 0.16717362830052426, atol=3e-5, rtol=1e-5)


def test_image_reward_tokenises_each_samples_prompt(image_reward_folder):
    """BERT's uncased WordPiece ([CLS] a c ##a ##t [SEP], padded to max_length), then the sample's prompt by cond."""
    root, vocab = image_reward_folder
    prompts = ["A Cat", "bad"]
    r = ImageRewardScore(prompts=prompts, pretrained=str(root), tokenizer=str(root), max_length=8)
    ids = {t: i for i, t in enumerate(vocab)}
    cat = [ids[t] for t in ("[CLS]", "a", "c", "##a", "##t", "[SEP]")] + [0, 0]
    bad = [ids[t] for t in ("[CLS]", "b", "##a", "##d", "[SEP]")] + [0, 0, 0]
    assert r.input_ids.tolist() == [cat, bad] and r.attention_mask.tolist() == [[1] * 6 + [0] * 2, [1] * 5 + [0] * 3]
    x, cond = images_for_original(), torch.tensor([1, 0])
    expected = r.score_tokens(x, torch.tensor([bad, cat]), torch.tensor([[1] * 5 + [0] * 3, [1] * 6 + [0] * 2]))
    torch.testing.assert_close(r(x, cond), expected)


def test_image_reward_gradient_matches_finite_differences(image_reward_folder):
    """grad_x r through BLIP's ViT, the cross-attention and the torch preprocessing (48x48 resampled to 32), float64."""
    root, _ = image_reward_folder
    r = ImageRewardScore(prompts=["a cat", "a dog"], pretrained=str(root), tokenizer=str(root))
    for net in (r.vision, r.text, r.head):
        net.double()
    x, cond = images(2, 48, 48, dtype=torch.float64), torch.tensor([0, 1])
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    g = r.grad_log_tilt(x, cond)
    assert g.abs().sum() > 0
    fd = directional_fd(lambda z: r.evaluate(z, cond), x, v)
    torch.testing.assert_close((g * v).flatten(1).sum(1), fd, atol=1e-7, rtol=1e-4)


def test_image_reward_missing_weights_and_downloads(image_reward_folder, tmp_path):
    """Offline, a hub checkpoint or tokenizer that is not cached fails with one line naming its key and iif-prefetch;
    hub_downloads lists ImageReward's two files and BERT's vocabulary, nothing for tiny; tiny builds and scores."""
    root, _ = image_reward_folder
    with pytest.raises(MissingWeights) as e:
        ImageRewardScore(prompts=["a"], pretrained="iif-tests/no-such-imagereward")
    assert "\n" not in str(e.value) and "reward.pretrained" in str(e.value) and "iif-prefetch" in str(e.value)
    with pytest.raises(MissingWeights, match="reward.tokenizer: 'iif-tests/no-such-bert/vocab.txt'"):
        ImageRewardScore(prompts=["a"], pretrained=str(root), tokenizer="iif-tests/no-such-bert")
    cfg, _ = compose(["reward=image_reward", "conditions=prompts"])
    assert ImageRewardScore.hub_downloads(cfg.reward) == [
        HubDownload("THUDM/ImageReward", ("ImageReward.pt", "med_config.json"), "pretrained"),
        HubDownload("google-bert/bert-base-uncased", ("vocab.txt",), "tokenizer")]
    assert ImageRewardScore.hub_downloads({"pretrained": "tiny"}) == []
    r = instantiate(compose(["reward=image_reward", "conditions=prompts", "reward.pretrained=tiny"])[0].reward)
    assert r.differentiable and torch.isfinite(r(images(2, 64, 64), torch.tensor([0, 0]))).all()
