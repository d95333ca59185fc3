"""DeepSeek-VL 7B hybrid (SigLIP + SAM) against transformers: a tiny random DeepseekVLHybridForConditionalGeneration
saved in the hub layout, loaded with `dsgraph.load`, gives the same logits with an image in the prompt and the
same greedy tokens; both image views equal the hybrid processor's; the towers run on triton (interpreter) and tvm
equal to eager. The tiny SAM has a 4x4 patch grid in windows of 3 (zero-padded to 6x6), a global block in the
middle (the hybrid reads its output) and a last windowed one."""
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
SIGLIP = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=2, image_size=28, patch_size=14)
SAM = dict(hidden_size=32, output_channels=16, num_hidden_layers=3, num_attention_heads=2, image_size=64,
           patch_size=16, window_size=3, global_attn_indexes=[1], mlp_dim=48)
IMAGE_TOKEN, TOKENS, NEW = 250, 4, 6
HIGH_MEAN, HIGH_STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]   # unlike the low view's CLIP defaults: both must be read


WORDS = "describe the image what is in this picture a cat dog red blue please".split()
TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}User: {% for c in m['content'] %}"
            "{% if c['type'] == 'image' %}<image_placeholder>{% else %}{{ c['text'] }}{% endif %}{% endfor %} "
            "{% else %}Assistant: {{ m['content'][0]['text'] }} {% endif %}{% endfor %}"
            "{% if add_generation_prompt %}Assistant:{% endif %}")


def _tokenizer():
    """A word-level tokenizer with DeepSeek-VL's `<image_placeholder>` at the image token id and a template that
    writes one for each {'type': 'image'} part, as the released processors' chat template does."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    vocab = {"<unk>": 0, "<bos>": 1, "<eos>": 2, **{w: 3 + i for i, w in enumerate(WORDS)}, "User:": 30,
             "Assistant:": 31, "<image_placeholder>": IMAGE_TOKEN}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken("<image_placeholder>", special=True, normalized=False)])
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
                                   extra_special_tokens={"image_token": "<image_placeholder>"},
                                   chat_template=TEMPLATE)


def _processor():
    from transformers.models.deepseek_vl_hybrid import image_processing_pil_deepseek_vl_hybrid as hybrid
    return hybrid.DeepseekVLHybridImageProcessorPil(size={"height": 28, "width": 28},
                                                    high_res_size={"height": 64, "width": 64},
                                                    high_res_image_mean=HIGH_MEAN, high_res_image_std=HIGH_STD)


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    from transformers import AutoModelForImageTextToText, DeepseekVLHybridConfig
    path = tmp_path_factory.mktemp("hybrid")
    cfg = DeepseekVLHybridConfig(text_config=TEXT, vision_config=SIGLIP, high_res_vision_config=SAM,
                                 image_token_id=IMAGE_TOKEN, tie_word_embeddings=False)
    torch.manual_seed(0)
    hf = AutoModelForImageTextToText.from_config(cfg, attn_implementation="eager").eval()
    fx.randomize_(hf, seed=1)   # alpha, rel_pos and pos_embed too (transformers inits them to zero)
    hf.generation_config.eos_token_id, hf.generation_config.pad_token_id = None, 0
    hf.save_pretrained(path)
    _processor().save_pretrained(path)
    _tokenizer().save_pretrained(path)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 200, (1, 9), generator=g)
    ids = torch.cat([ids[:, :3], torch.full((1, TOKENS), IMAGE_TOKEN), ids[:, 3:]], 1)
    px = {"pixel_values": torch.randn(1, 3, 28, 28, generator=g),
          "high_res_pixel_values": torch.randn(1, 3, 64, 64, generator=g)}
    with torch.no_grad():
        logits = hf(input_ids=ids, **px).logits.float()
        tokens = hf.generate(input_ids=ids, **px, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
    with pytest.warns(UserWarning, match="pooling head"):
        model = dsgraph.load(str(path))
    return dict(hf=hf, model=model, ids=ids, px=px, logits=logits, tokens=tokens[:, ids.shape[1]:])


def test_logits_and_greedy_tokens_equal_transformers(case):
    exe = dsgraph.compile(case["model"], backend="eager")
    assert rel_err(exe(case["ids"], images=case["px"]), case["logits"]) <= tolerance("float32", "model")
    assert torch.equal(exe.generate(case["ids"], images=case["px"], max_new_tokens=NEW), case["tokens"])
    other = {**case["px"], "high_res_pixel_values": torch.randn(1, 3, 64, 64)}   # the SAM view reaches the answer
    assert rel_err(exe(case["ids"], images=other)[:, 3:], case["logits"][:, 3:]) > 1e-2
    with pytest.raises(dsgraph.InputError, match="high_res_pixel_values"):
        exe(case["ids"], images=case["px"]["pixel_values"])


def test_a_chat_with_an_image_equals_the_transformers_processor(case, tmp_path):
    """exe.generate(chat, images=[file]): the template writes `<image_placeholder>` for the image part, which is
    expanded to the image's tokens and the image preprocessed, as DeepseekVLHybridProcessor does; the greedy text
    equals transformers' generate on the processor's inputs. A prompt without a placeholder is refused."""
    from PIL import Image
    from transformers import DeepseekVLHybridProcessor
    img = Image.fromarray((np.random.default_rng(0).random((30, 20, 3)) * 255).astype(np.uint8))
    img.save(tmp_path / "photo.png")
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe the image please"}]}]
    proc = DeepseekVLHybridProcessor(image_processor=_processor(), tokenizer=_tokenizer(), chat_template=TEMPLATE,
                                     num_image_tokens=TOKENS)
    enc = proc(text=proc.apply_chat_template(chat, add_generation_prompt=True, tokenize=False), images=[img],
               add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        want = case["hf"].generate(**enc, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
    exe = dsgraph.compile(case["model"])
    out = exe.generate(chat, images=[tmp_path / "photo.png"], max_new_tokens=NEW, stop_token_ids=[])
    assert out.prompt_tokens == enc["input_ids"].shape[1]
    assert out.token_ids == want[0, enc["input_ids"].shape[1]:].tolist()
    with pytest.raises(dsgraph.InputError, match="0 image placeholders .*'<image_placeholder>'"):
        exe.generate("describe the image", images=[img], max_new_tokens=2)


@pytest.mark.parametrize("h,w", [(20, 30), (90, 50)])
def test_both_views_equal_the_hybrid_processor(case, h, w):
    """Low view resized from the padded high-resolution square; each normalised by its own mean and std. Equal up
    to one 0..255 level on a few pixels (Pillow's fixed-point bicubic rounds some halves the other way)."""
    from PIL import Image
    exe = dsgraph.compile(case["model"])
    img = (np.random.default_rng(h * w).random((h, w, 3)) * 255).astype(np.uint8)
    ids, px = exe.prepare_inputs([[1, IMAGE_TOKEN, 2]], [img])
    assert ids.shape == (1, 2 + TOKENS)
    want = _processor()(Image.fromarray(img), return_tensors="pt")
    for key, std in (("pixel_values", dsgraph.models.vision.image.CLIP_STD), ("high_res_pixel_values", HIGH_STD)):
        assert px[key].shape == want[key].shape
        levels = (px[key] - want[key]).abs() * torch.tensor(std)[:, None, None] * 255
        assert levels.max() <= 1.001 and (levels > 0.5).float().mean() < 0.01, key


@pytest.mark.parametrize("backend", ["triton", "tvm"])
def test_backend_equals_eager(case, backend):
    """SAM's ops (window partition, relative-position attention, bilinear resize, convs) on another backend: on
    triton the attention is its Triton kernel, the rest library calls; legalized to primitives on tvm; all named in
    the compile report."""
    if backend == "tvm":
        pytest.importorskip("tvm")
    eager = dsgraph.compile(case["model"], backend="eager")
    other = dsgraph.compile(case["model"], backend=backend)
    assert rel_err(other(case["ids"], images=case["px"]), eager(case["ids"], images=case["px"])) \
        <= tolerance("float32", "model")
    report = other.report()
    assert all(op in report for op in ("attention.rel_pos", "vision.window_partition", "vision.resize"))
    if backend == "triton":   # every node of every graph has a triton lowering
        assert "rel_pos_attention._rel_pos_attention_kernel" in report
        assert not [line for line in report.splitlines() if " fallback " in line]
    if backend == "tvm":   # the decompositions' constants (resize matrices, window padding, scale) follow retype
        bf16 = dsgraph.compile(case["model"], backend=backend, dtype=torch.bfloat16)
        assert rel_err(bf16(case["ids"], images=case["px"]), case["logits"]) <= tolerance("bfloat16", "model")


@pytest.mark.parametrize("chat", [False, True])
def test_cli_runs_a_text_prompt_with_an_image(case, tmp_path, capsys, chat):
    """dsgraph run CKPT --image photo.png --prompt "...": a placeholder put before a plain prompt; with --chat an
    image part in the user message, which the template writes as the placeholder. The same greedy text."""
    from PIL import Image

    from dsgraph.app.cli import main
    png = tmp_path / "photo.png"
    Image.fromarray((np.random.default_rng(1).random((30, 20, 3)) * 255).astype(np.uint8)).save(png)
    path = case["model"].graph.meta["checkpoint"]["path"]
    assert main(["run", path, "--image", str(png), "--prompt", "describe the image", "--max-new-tokens", "3",
                 "--temperature", "0"] + ["--chat"] * chat) == 0
    text = capsys.readouterr().out
    exe = dsgraph.compile(case["model"])
    prompt = ([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe the image"}]}]
              if chat else "<image_placeholder>describe the image")
    assert text.strip() == exe.generate(prompt, images=[png], max_new_tokens=3, temperature=0).text.strip()
