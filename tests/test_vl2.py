"""DeepSeek-VL2 against an independent torch reference of the published architecture (tests/vl2_reference.py;
there is no transformers class, and DeepSeek's own code needs timm, xformers and an old transformers: where its
deepseek_vl2 package is importable, an opt-in test runs it as the oracle on the same checkpoints): tiny
checkpoints in DeepSeek's hub layout — VL2-Tiny's shape (LLaMA attention) and VL2's (MLA, sigmoid noaux_tc
routing) — must give the reference's logits with a tiled image in the prompt and its greedy tokens; the tiling
equals DeepSeek's processor steps (Pillow's ImageOps.pad and crops) on images of several aspect ratios; the tiny
preset runs on triton (interpreter) and tvm equal to eager."""
from __future__ import annotations

import json

import hf_fixtures as fx
import numpy as np
import pytest
import torch
import vl2_reference as ref
from dsgraph.models.vision import TiledImageConfig, preprocess_tiled

import dsgraph
from dsgraph.numerics import rel_err, tolerance

one_thread = pytest.fixture(scope="module", autouse=True)(fx.one_thread)
IMAGE = 256   # `<image>` in the fixtures' tokenizer
SIDE = 2      # tokens per tile side: 3 patches, padded to 4, shuffled 2x2


def _image(h, w, seed=0):
    return (np.random.default_rng(seed + h * w).random((h, w, 3)) * 255).astype(np.uint8)


@pytest.fixture(scope="module", params=["mha", "mla"])
def ckpt(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"vl2_{request.param}")
    tensors = ref.write_checkpoint(path, request.param, seed=len(request.param))
    return path, ref.Reference(ref.config(request.param), tensors)


@pytest.mark.parametrize("h,w,grid", [(30, 70, (2, 1)), (90, 20, (1, 2)), (40, 40, (1, 1)), (100, 95, (2, 2))])
def test_tiling_equals_deepseeks_processor_steps(h, w, grid):
    """Wide, tall, square and large images: the chosen tile grid, every tile's pixels (the fit's bicubic resize,
    the centring offset, the background colour) and the token layout's length."""
    from PIL import Image
    cfg = TiledImageConfig(ref.TILE, tuple(map(tuple, ref.CANDIDATES)), ref.PATCH, 2, ref.MEAN, ref.STD)
    img = _image(h, w)
    inputs, counts = preprocess_tiled([img], cfg)
    want, crop = ref.tiles(Image.fromarray(img))
    assert tuple(crop) == grid
    assert inputs["pixel_values"].shape == want.shape and rel_err(inputs["pixel_values"], want) <= 1e-6
    assert counts == [ref.image_token_count(*grid, SIDE)] == [len(inputs["image_layout"])]


def test_more_than_two_images_are_not_cropped():
    """DeepSeek's processor crops only prompts of at most two images: three give one local tile each, and the
    layout's feature rows run on across images."""
    from PIL import Image
    cfg = TiledImageConfig(ref.TILE, tuple(map(tuple, ref.CANDIDATES)), ref.PATCH, 2, ref.MEAN, ref.STD)
    imgs = [_image(30, 70), _image(90, 20), _image(50, 50)]
    inputs, counts = preprocess_tiled(imgs, cfg)
    want = torch.cat([ref.tiles(Image.fromarray(i), crop=False)[0] for i in imgs])
    assert rel_err(inputs["pixel_values"], want) <= 1e-6
    assert counts == [ref.image_token_count(1, 1, SIDE)] * 3
    rows = inputs["image_layout"][inputs["image_layout"] >= 2] - 2
    assert torch.equal(rows.sort().values, torch.arange(6 * SIDE * SIDE))   # every tile token exactly once


def test_global_view_tail_puts_the_global_tokens_last():
    """`global_view_pos: tail` (DeepSeek's other order): local rows, the separator, then the global view's rows."""
    from dsgraph.models.vision.tiling import image_layout
    head = image_layout(2, 1, SIDE)
    glob, local = head[:SIDE * (SIDE + 1)], head[SIDE * (SIDE + 1) + 1:]
    assert head[SIDE * (SIDE + 1)] == 1 and image_layout(2, 1, SIDE, head=False) == local + [1] + glob
    assert glob == [2, 3, 0, 4, 5, 0]   # tile 0's rows of 2 tokens, each ended by the newline (0)
    assert local[:5] == [6, 7, 10, 11, 0]   # the first row runs across both local tiles


def _prompt_and_pixels(exe, img):
    ids, px = exe.prepare_inputs([[0, 17, 30, IMAGE, 41, 52]], [img])
    return ids, px


def test_logits_and_greedy_tokens_equal_the_reference(ckpt):
    """One wide image (a global view + 2x1 local tiles) in the prompt: the logits at every position and six greedy
    tokens (the reference recomputes the whole sequence per token) equal the reference's."""
    from PIL import Image
    path, model_ref = ckpt
    with pytest.warns(UserWarning, match="attention-pooling head"):
        model = dsgraph.load(str(path))
    assert model.vision.config.image_token_id == IMAGE   # from tokenizer.json, as DeepSeek ships it
    exe = dsgraph.compile(model, backend="eager")
    img = _image(30, 70, seed=1)
    ids, px = _prompt_and_pixels(exe, img)
    tiles, crop = ref.tiles(Image.fromarray(img))
    assert ids.shape[1] == 5 + ref.image_token_count(*crop, SIDE)
    want = model_ref(ids, tiles, [crop])
    assert rel_err(exe(ids, images=px), want) <= tolerance("float32", "model")
    seq = ids
    for _ in range(6):
        seq = torch.cat([seq, model_ref(seq, tiles, [crop])[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(exe.generate(ids, images=px, max_new_tokens=6), seq[:, ids.shape[1]:])
    other = exe(ids, images={**px, "pixel_values": torch.randn_like(px["pixel_values"])})
    assert rel_err(other[:, 3:], want[:, 3:]) > 1e-2 and rel_err(other[:, :3], want[:, :3]) <= 1e-5


def test_logits_and_greedy_tokens_equal_deepseeks_own_code(ckpt):
    """Opt-in oracle: where DeepSeek's deepseek_vl2 package is importable (with the xformers its SigLIP attention
    calls), its DeepseekVLV2ForCausalLM built from the tiny checkpoint's config.json and model.safetensors gives
    our logits with a 2x1-tiled image in the prompt, and three greedy tokens (its full forward per token)."""
    vl2 = pytest.importorskip("deepseek_vl2.models.modeling_deepseek_vl_v2",
                              reason="DeepSeek's deepseek_vl2 is not installed (not on PyPI; it needs timm, xformers, "
                                     "attrdict and an older transformers): tests/vl2_reference.py is the oracle here")
    pytest.importorskip("xformers", reason="DeepSeek's SigLIP attention calls xformers.ops.memory_efficient_attention")
    from PIL import Image
    from safetensors.torch import load_file
    path, _ = ckpt
    cfg = vl2.DeepseekVLV2Config(**json.loads((path / "config.json").read_text()))
    cfg._attn_implementation = cfg.language_config._attn_implementation = "eager"
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    theirs = vl2.DeepseekVLV2ForCausalLM(cfg).eval()
    missing, unexpected = theirs.load_state_dict(load_file(str(path / "model.safetensors")), strict=False)
    assert all(k.startswith("vision.attn_pool.") for k in missing + unexpected), (missing, unexpected)
    theirs = theirs.float().to(dev)
    with pytest.warns(UserWarning, match="attention-pooling head"):
        exe = dsgraph.compile(dsgraph.load(str(path)), backend="eager")
    img = _image(30, 70, seed=1)
    ids, px = _prompt_and_pixels(exe, img)
    tiles, crop = ref.tiles(Image.fromarray(img))

    def logits(seq):
        with torch.no_grad():
            out = theirs(input_ids=seq.to(dev), attention_mask=torch.ones_like(seq).to(dev),
                         images=tiles[None].to(dev), images_seq_mask=(seq == IMAGE).to(dev),
                         images_spatial_crop=torch.tensor([[crop]], device=dev), use_cache=False)
        return out.logits.float().cpu()
    assert rel_err(exe(ids, images=px), logits(ids)) <= tolerance("float32", "model")
    seq = ids
    for _ in range(3):
        seq = torch.cat([seq, logits(seq)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(exe.generate(ids, images=px, max_new_tokens=3), seq[:, ids.shape[1]:])


@pytest.mark.parametrize("ckpt", ["mla"], indirect=True)
def test_text_prompt_with_an_image_file(ckpt, tmp_path):
    """The text path: `<image>` in the prompt expands to the image's tiles' token count and answers as the ids
    path does; `dsgraph run CKPT --image x.png --prompt ...` runs with the checkpoint's tokenizer."""
    from PIL import Image

    from dsgraph.app.cli import main
    path, _ = ckpt
    png = tmp_path / "x.png"
    Image.fromarray(_image(90, 20, seed=2)).save(png)
    with pytest.warns(UserWarning):
        exe = dsgraph.compile(dsgraph.load(str(path)))
    text = "Hello <image> what is it?"
    out = exe.generate(text, images=[png], max_new_tokens=3)
    prompt = exe.tokenizer.encode(text)
    assert out.prompt_tokens == len(prompt) - 1 + ref.image_token_count(1, 2, SIDE)   # a 1x2 grid for a tall one
    ids, px = exe.prepare_inputs([prompt], [np.asarray(Image.open(png))])
    assert out.token_ids == exe.generate(ids, images=px, max_new_tokens=3)[0, :len(out.token_ids)].tolist()
    with pytest.warns(UserWarning):
        assert main(["run", str(path), "--image", str(png), "--prompt", "Describe it", "--max-new-tokens", "2"]) == 0


@pytest.mark.parametrize("backend", ["triton", "tvm"])
def test_backend_equals_eager(backend):
    """The tiny preset (MLA + MoE) on another backend: the tower's features for a 2x1-tiled image, the prefill's
    logits with them spliced in, and a decode step after it (no image rows) against eager's full forward."""
    if backend == "tvm":
        pytest.importorskip("tvm")
    model = dsgraph.load("deepseek-vl2-small-tiny")
    eager, other = dsgraph.compile(model, backend="eager"), dsgraph.compile(model, backend=backend)
    ids, px = eager.prepare_inputs([[1, 255, 7]], [_image(30, 70)])
    feats = other.encode_images(px)
    assert rel_err(feats, eager.encode_images(px)) <= tolerance("float32", "model")
    out, state = other.step(ids, other.empty_state(1), {"image_features": feats})
    want = eager(torch.cat([ids, torch.tensor([[42]])], 1), images=px)
    assert rel_err(out["logits"], want[:, :-1]) <= tolerance("float32", "model")
    step, _ = other.decode([[42]], state)
    assert rel_err(step, want[:, -1:]) <= tolerance("float32", "model")
    assert "vision.pixel_shuffle" in other.report()


def test_full_size_presets_build_without_weights():
    """VL2-Tiny (MHA), Small (MLA) and base (MLA, q_lora, sigmoid noaux_tc): graphs of the released shapes."""
    for name, family, experts in [("deepseek-vl2-tiny", "deepseek_moe", 64), ("deepseek-vl2-small", "mla", 64),
                                  ("deepseek-vl2", "mla", 72)]:
        m = dsgraph.models.build_model(name, weights=False)
        assert (m.config.family, m.config.n_routed_experts) == (family, experts)
        assert m.vision.graph.inputs["pixel_values"].type.shape[1:] == (3, 384, 384)
        assert m.vision.graph.meta["tile_tokens"] == 196


def test_config_errors_name_the_key(tmp_path):
    from dsgraph.models.vision import from_hf_vl2
    cfg = ref.config("mla")
    with pytest.raises(dsgraph.ConfigError, match="tile_tag '1D'"):
        from_hf_vl2({**cfg, "tile_tag": "1D"}, image_token_id=5)
    with pytest.raises(dsgraph.ConfigError, match="no '<image>' token id"):
        from_hf_vl2(cfg)
    with pytest.raises(dsgraph.ConfigError, match="projector_type 'mlp_gelu'"):
        from_hf_vl2({**cfg, "projector_config": {**cfg["projector_config"], "projector_type": "mlp_gelu"}},
                    image_token_id=5)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "processor_config.json").write_text(json.dumps({"patch_size": 16}))
    from dsgraph.models.vision.tiling import read_tiled_image_config
    with pytest.raises(dsgraph.ConfigError, match="processor_config.json: tile size, patch_size"):
        read_tiled_image_config(tmp_path, from_hf_vl2(cfg, image_token_id=5))


def test_artifacts_keep_the_tiling(tmp_path):
    """exe.save keeps the tiling config (candidate resolutions, mean and std): the loaded artifact tiles and
    answers as the compiled model does."""
    exe = dsgraph.compile(dsgraph.load("deepseek-vl2-small-tiny"))
    exe.save(tmp_path / "a")
    loaded = dsgraph.load_artifact(tmp_path / "a")
    (ids, px), (ids2, px2) = (e.prepare_inputs([[1, 255, 3]], [_image(100, 95)]) for e in (exe, loaded))
    assert torch.equal(ids, ids2) and all(torch.equal(px[k], px2[k]) for k in px)
    assert torch.equal(loaded.generate(ids, images=px, max_new_tokens=3), exe.generate(ids, images=px,
                                                                                       max_new_tokens=3))
