"""Multimodal models against transformers: a tiny random DeepseekVLForConditionalGeneration and
JanusForConditionalGeneration saved in the hub layout, loaded with `dsgraph.load`, must give the same logits
with an image in the prompt and the same greedy tokens; image preprocessing equals transformers' processor;
the vision tower and the splice run on triton (interpreter) equal to eager."""
from __future__ import annotations

import hf_fixtures as fx
import numpy as np
import pytest
import torch

import dsgraph
from dsgraph.numerics import rel_err, tolerance

one_thread = pytest.fixture(scope="module", autouse=True)(fx.one_thread)
TEXT = dict(model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=28,
              patch_size=14)
IMAGE_TOKEN = 250
NEW = 6


def _config(family: str):
    from transformers import DeepseekVLConfig, JanusConfig
    if family == "deepseek_vl":   # SigLIP with its pooling head (skipped), tanh GELU; the aligner's exact GELU
        return DeepseekVLConfig(text_config=TEXT, vision_config={**VISION, "model_type": "siglip_vision_model"},
                                image_token_id=IMAGE_TOKEN, tie_word_embeddings=False)
    return JanusConfig(text_config=TEXT, image_token_id=IMAGE_TOKEN, tie_word_embeddings=False,   # exact GELU,
                       vision_config={**VISION, "patch_size": 7, "projection_dim": 64, "depth": 2,   # projection_layer
                                      "num_image_tokens": 5},   # image tokens transformers' generate draws
                       vq_config=dict(embed_dim=8, num_embeddings=16, base_channels=32, channel_multiplier=[1, 1],
                                      num_res_blocks=1, latent_channels=8, image_token_embed_dim=64,
                                      projection_dim=64, num_patches=4))


def _processor(family: str):
    """transformers' PIL image processor with the released Janus normalisation (mean = std = 0.5)."""
    from transformers.models.deepseek_vl.image_processing_pil_deepseek_vl import DeepseekVLImageProcessorPil
    from transformers.models.janus.image_processing_pil_janus import JanusImageProcessorPil
    if family == "deepseek_vl":
        return DeepseekVLImageProcessorPil(size={"height": 28, "width": 28})
    return JanusImageProcessorPil(size={"height": 28, "width": 28}, image_mean=[0.5] * 3, image_std=[0.5] * 3)


def _prompt(tokens: int, token: int = IMAGE_TOKEN):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 200, (1, 9), generator=g)
    return torch.cat([ids[:, :3], torch.full((1, tokens), token), ids[:, 3:]], 1)


class Case:
    def __init__(self, family: str, path):
        from transformers import AutoModelForImageTextToText
        cfg = _config(family)
        torch.manual_seed(0)
        self.hf = AutoModelForImageTextToText.from_config(cfg, attn_implementation="eager").eval()
        fx.randomize_(self.hf, seed=len(family))
        self.hf.generation_config.eos_token_id = None
        self.hf.generation_config.pad_token_id = 0
        self.hf.save_pretrained(path)
        self.processor = _processor(family)
        self.processor.save_pretrained(path)   # preprocessor_config.json, as the hub ships it
        self.path = path
        tokens = (28 // cfg.vision_config.patch_size) ** 2
        self.ids = _prompt(tokens)
        self.pixels = torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(5))
        with torch.no_grad():
            self.logits = self.hf(input_ids=self.ids, pixel_values=self.pixels).logits.float()
            out = self.hf.generate(input_ids=self.ids, pixel_values=self.pixels, max_new_tokens=NEW,
                                   min_new_tokens=NEW, do_sample=False)
            self.tokens = out[:, self.ids.shape[1]:]


@pytest.fixture(scope="module", params=["deepseek_vl", "janus"])
def case(request, tmp_path_factory):
    return Case(request.param, tmp_path_factory.mktemp(request.param))


def test_logits_and_greedy_tokens_equal_transformers(case):
    with pytest.warns(UserWarning, match="skipped the weights of"):
        model = dsgraph.load(str(case.path))
    exe = dsgraph.compile(model, backend="eager")
    logits = exe(case.ids, images=case.pixels)
    assert rel_err(logits, case.logits) <= tolerance("float32", "model")
    assert torch.equal(exe.generate(case.ids, images=case.pixels, max_new_tokens=NEW), case.tokens)
    text_only = exe(case.ids[:, :3])   # no image, no placeholder: the plain decoder
    assert rel_err(text_only, case.logits[:, :3]) <= tolerance("float32", "model")


def test_the_checkpoint_preprocessor_config_is_read(case):
    """prepare_inputs normalises as the checkpoint's preprocessor_config.json says (Janus: mean = std = 0.5)."""
    from PIL import Image
    with pytest.warns(UserWarning):
        exe = dsgraph.compile(dsgraph.load(str(case.path)))
    img = (np.random.default_rng(4).random((20, 30, 3)) * 255).astype(np.uint8)
    _, pixels = exe.prepare_inputs([[1, IMAGE_TOKEN]], [img])
    want = case.processor(Image.fromarray(img), return_tensors="pt")["pixel_values"]
    assert rel_err(pixels, want) <= 1e-5


def test_the_image_changes_the_answer(case):
    """The features really reach the decoder: other pixels, other logits at and after the image."""
    with pytest.warns(UserWarning):
        exe = dsgraph.compile(dsgraph.load(str(case.path)))
    other = exe(case.ids, images=torch.randn(1, 3, 28, 28))
    assert rel_err(other[:, 3:], case.logits[:, 3:]) > 1e-2
    assert rel_err(other[:, :3], case.logits[:, :3]) <= tolerance("float32", "model")   # causal: before is equal


def test_janus_image_generation_equals_transformers(case):
    """Text -> image tokens: codebook logits teacher-forced over several image tokens (generation_embeddings ->
    generation_aligner at the placeholders, generation_head on the last hidden state), and the greedy tokens of
    transformers' classifier-free-guidance loop (unconditional prompt: pad everywhere but bos and boi)."""
    if case.hf.config.model_type != "janus":
        pytest.skip("DeepSeek-VL has no image generation")
    with pytest.warns(UserWarning, match="VQ encoder"):
        exe = dsgraph.compile(dsgraph.load(str(case.path)))
    prompt, codes = case.ids[:, :3], torch.tensor([[3, 9, 0, 14]])
    m = case.hf.model
    with torch.no_grad():
        embeds = torch.cat([m.language_model.embed_tokens(prompt),
                            case.hf.prepare_embeddings_for_image_generation(codes)], 1)
        want = m.generation_head(m.language_model(inputs_embeds=embeds).last_hidden_state[:, 2:])
    ids = torch.cat([prompt, torch.full((1, 4), IMAGE_TOKEN)], 1)
    out, _ = exe.generation.step(ids, exe.generation.empty_state(1), {"image_codes": codes[0]})
    assert rel_err(out["image_logits"][:, 2:], want) <= tolerance("float32", "model")
    gc = case.hf.generation_config
    gc.bos_token_id, gc.pad_token_id, gc.generation_kwargs = 1, 0, {"boi_token_id": 100}
    prompt = torch.tensor([[1, 17, 30, 99, 100]])
    with torch.no_grad():
        tokens = case.hf.generate(prompt, attention_mask=torch.ones_like(prompt), generation_mode="image",
                                  do_sample=False, guidance_scale=2.0)
    uncond = torch.tensor([[1, 0, 0, 0, 100]])
    assert torch.equal(exe.generate_image_tokens(prompt, uncond, tokens.shape[1], guidance=2.0), tokens)


def test_janus_vq_decoder_equals_transformers(case):
    """Codes -> pixels (codebook lookup, L2 norm, ResNet / attention blocks, GroupNorm, nearest upsampling, convs)
    for a fixed random code grid, against transformers' JanusVQVAE.decode."""
    if case.hf.config.model_type != "janus":
        pytest.skip("DeepSeek-VL has no image generation")
    with pytest.warns(UserWarning, match="VQ encoder"):
        exe = dsgraph.compile(dsgraph.load(str(case.path)))
    codes = torch.randint(0, 16, (2, 16), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        want = case.hf.model.vqmodel.decode(codes)
    got = exe.decode_image(codes)
    assert got.shape == want.shape == (2, 3, 8, 8)
    assert rel_err(got, want) <= tolerance("float32", "model")


def test_the_tower_runs_once_per_prompt():
    """The vision encoder runs in prefill only, never per decoded token."""
    exe = dsgraph.compile(dsgraph.load("deepseek-vl-tiny"))
    runs, run = [], exe.vision.run
    exe.vision.run = lambda inputs, **kw: runs.append(inputs["pixel_values"].shape[0]) or run(inputs, **kw)
    img = (np.random.default_rng(0).random((20, 35, 3)) * 255).astype(np.uint8)
    ids, pixels = exe.prepare_inputs([1, 2, 255, 3, 255], [img, img[:, :10]])   # one placeholder per image
    assert ids.tolist() == [[1, 2] + [255] * 4 + [3] + [255] * 4] and pixels.shape == (2, 3, 28, 28)
    exe.generate(ids, images=pixels, max_new_tokens=5)
    assert runs == [2]


def test_artifacts_carry_every_graph(tmp_path):
    """exe.save keeps the vision tower, Janus' generation and VQ decoders and the image preprocessing: the loaded
    artifact answers about an image and draws one as the compiled model does; an edited part is refused."""
    exe = dsgraph.compile(dsgraph.load("janus-tiny"))
    exe.save(tmp_path / "a")
    loaded = dsgraph.load_artifact(tmp_path / "a")
    img = (np.random.default_rng(0).random((20, 35, 3)) * 255).astype(np.uint8)
    (ids, px), (ids2, px2) = exe.prepare_inputs([1, 255, 3], [img]), loaded.prepare_inputs([1, 255, 3], [img])
    assert torch.equal(ids, ids2) and torch.equal(px, px2)
    assert torch.equal(loaded.generate(ids, images=px, max_new_tokens=4), exe.generate(ids, images=px,
                                                                                       max_new_tokens=4))
    cond, uncond = torch.tensor([[1, 17, 30, 99]]), torch.tensor([[1, 0, 0, 0]])
    assert torch.equal(loaded.generate_image(cond, uncond), exe.generate_image(cond, uncond))
    part = tmp_path / "a" / "vision_graph.json"
    part.write_text(part.read_text().replace('"V0', '"W0', 1))
    with pytest.raises(dsgraph.errors.ArtifactError, match="vision_graph.json"):
        dsgraph.load_artifact(tmp_path / "a")


def test_placeholder_count_must_match_the_images():
    exe = dsgraph.compile(dsgraph.load("deepseek-vl-tiny"))
    with pytest.raises(dsgraph.InputError, match="image tokens"):
        exe(_prompt(3, 255), images=torch.randn(1, 3, 28, 28))
    with pytest.raises(dsgraph.InputError, match="pixel_values"):
        exe(_prompt(4, 255), images=torch.randn(1, 3, 32, 32))


@pytest.mark.parametrize("h,w,exact", [(20, 30, True), (300, 200, True), (9, 50, True), (28, 28, True),
                                       (41, 17, False)])
def test_preprocessing_equals_the_transformers_processor(h, w, exact):
    """Resize (up and down, both aspect ratios, min_size), pad with the background colour, normalise. Pillow's
    fixed-point two-pass bicubic is matched exactly in most shapes; in some (41x17) its rounding differs from
    torch's antialiased kernel by a few 0..255 levels on some pixels."""
    from PIL import Image
    from transformers.models.deepseek_vl.image_processing_pil_deepseek_vl import DeepseekVLImageProcessorPil
    img = (np.random.default_rng(h * w).random((h, w, 3)) * 255).astype(np.uint8)
    want = DeepseekVLImageProcessorPil(size={"height": 28, "width": 28})(Image.fromarray(img),
                                                                          return_tensors="pt")["pixel_values"][0]
    got = dsgraph.models.vision.preprocess(img, dsgraph.models.vision.ImageConfig(28))
    assert got.shape == want.shape
    levels = (got - want).abs() * torch.tensor(dsgraph.models.vision.image.CLIP_STD)[:, None, None] * 255
    assert levels.max() <= (1e-3 if exact else 8), levels.max()


@pytest.mark.parametrize("preset,backend", [("deepseek-vl-tiny", "triton"), ("janus-tiny", "triton"),
                                            ("janus-tiny", "tvm")])
def test_backend_equals_eager(preset, backend):
    """The tower and the decoders on another backend (the vision ops on triton: the VQ decoder's GroupNorm a Triton
    kernel, the rest library calls; Relax or legalized to primitives on tvm; all named in the compile report);
    greedy decoding passes through decode steps with no image rows."""
    if backend == "tvm":
        pytest.importorskip("tvm")
    model = dsgraph.load(preset)
    ids = _prompt(model.vision.config.vision.num_patches, model.vision.config.image_token_id)
    px = torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    eager = dsgraph.compile(model, backend="eager")
    other = dsgraph.compile(model, backend=backend)
    assert rel_err(other(ids, images=px), eager(ids, images=px)) <= tolerance("float32", "model")
    assert torch.equal(other.generate(ids, images=px, max_new_tokens=4),
                       eager.generate(ids, images=px, max_new_tokens=4))
    report = other.report()
    assert "vision tower" in report and "vision.splice" in report
    assert backend != "triton" or not [line for line in report.splitlines() if " fallback " in line]
    if model.vision.generation is not None:   # text -> codes -> pixels
        cond, uncond = torch.tensor([[1, 17, 30, 99]]), torch.tensor([[1, 0, 0, 0]])
        codes = eager.generate_image_tokens(cond, uncond, 4)
        assert torch.equal(other.generate_image_tokens(cond, uncond, 4), codes)
        assert rel_err(other.decode_image(codes), eager.decode_image(codes)) <= tolerance("float32", "model")
        assert rel_err(other.generate_image(cond, uncond), eager.decode_image(codes)) <= tolerance("float32", "model")
        assert "image-generation decoder" in report and "VQ decoder" in report
        assert backend != "triton" or "group_norm._group_norm_kernel" in report


def test_bfloat16_stays_close_to_float32():
    """retype reaches every graph: pixels, features, image codes' embeddings and the VQ decoder run in bf16."""
    model = dsgraph.load("janus-tiny")
    ids, px = _prompt(16, 255), torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(2))
    f32, bf16 = dsgraph.compile(model), dsgraph.compile(model, dtype=torch.bfloat16)
    assert rel_err(bf16(ids, images=px), f32(ids, images=px)) <= tolerance("bfloat16", "model")
    codes = torch.randint(0, 16, (1, 4), generator=torch.Generator().manual_seed(3))
    assert rel_err(bf16.decode_image(codes), f32.decode_image(codes)) <= tolerance("bfloat16", "model")


def test_config_and_checkpoint_errors_name_the_key(case, tmp_path):
    """A nested config without its vision half, and a checkpoint with a stray tensor, fail naming what and where."""
    from dsgraph.models.vision import from_hf_vl
    with pytest.raises(dsgraph.ConfigError, match="missing 'vision_config'"):
        from_hf_vl({"model_type": case.hf.config.model_type, "text_config": TEXT})
    bad = tmp_path / "ckpt"
    case.hf.save_pretrained(bad)
    fx.add_tensors(bad, {"model.aligner.extra.weight": torch.randn(3)})
    with pytest.raises(dsgraph.CheckpointError, match=r"1 unexpected weights:\n\s+model.aligner.extra.weight"):
        dsgraph.load(str(bad))


def test_cli_runs_with_an_image(tmp_path, capsys):
    """dsgraph run MODEL --prompt-ids ... --image photo.png: one placeholder put before the prompt, expanded."""
    from PIL import Image

    from dsgraph.app.cli import main
    png = tmp_path / "photo.png"
    Image.fromarray((np.random.default_rng(1).random((30, 20, 3)) * 255).astype(np.uint8)).save(png)
    assert main(["run", "deepseek-vl-tiny", "--prompt-ids", "1,2,3", "--image", str(png),
                 "--max-new-tokens", "3"]) == 0
    assert "time to first token" in capsys.readouterr().out
    assert main(["run", "deepseek-llm-tiny", "--image", str(png), "--max-new-tokens", "2"]) != 0
    assert "not a multimodal model" in capsys.readouterr().err
