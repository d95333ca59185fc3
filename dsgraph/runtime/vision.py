"""The runtime of multimodal models: an Executable whose decoder takes image features, and a compiled vision
graph that makes them, once per image, in prefill.

    exe = dsgraph.compile(dsgraph.load("deepseek-vl-tiny"), backend="triton")
    ids, pixels = exe.prepare_inputs(prompt_ids, [image])   # one placeholder per image expanded to its tokens
    new = exe.generate(ids, images=pixels, max_new_tokens=8)
    out = exe.generate([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it"}]}],
                       images=["photo.png"])   # text: the template writes the placeholders; expanded here

DeepSeek-VL2's images give varying token counts (their tiles): its `preprocess_images` returns the tower's inputs
(tiles and the token layout) with each image's count, which the placeholders expand to.

Decode steps feed an empty [0, D] feature tensor: the splice leaves every position as it is. Janus adds
`generate_image_tokens` (text -> codebook ids under classifier-free guidance, through its generation decoder)
and `decode_image` (codes -> pixels, through its VQ decoder).
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from dsgraph.dtypes import to_torch
from dsgraph.errors import ArtifactError, InputError

from . import generation
from .executable import Executable


class VisionExecutable(Executable):
    """Executable + `vision` (the tower's CompiledGraph); `images` are pixel_values [N, C, H, W]."""

    def __init__(self, *args, vision=None, generation=None, vq_decoder=None, preprocess=None, preprocess_images=None,
                 image_config=None, part_weights=None, **kw):
        super().__init__(*args, **kw)
        self.vision = vision
        self.generation = generation   # Janus: an Executable over the image-generation decoder
        self.vq_decoder = vq_decoder   # Janus: codes [N, grid*grid] -> pixels [N, 3, H, W]
        self.preprocess = preprocess   # image -> pixel_values (the model's image processor)
        self.preprocess_images = preprocess_images   # VL2: images -> (tower inputs, token count per image)
        self.image_config = image_config   # its config (a dataclass), which artifacts keep
        self.part_weights = part_weights or {}   # the vision tower's and VQ decoder's weights after their passes
        feats = self.graph.inputs["image_features"].type
        self.feature_dim, self.feature_dtype = feats.shape[1], to_torch(feats.dtype)
        self.image_token_id = self.graph.meta["image_token_id"]
        self.image_tokens = self.graph.meta["image_tokens"]   # per image; None where it varies (VL2)
        self._features = None
        self._image_counts = []   # token counts of the images given with a text prompt (text_rows expands them)

    def encode_images(self, images) -> torch.Tensor:
        """image_features [N * image_tokens, D] from pixel_values [N, C, H, W], or for a tower of several pixel
        inputs (DeepSeek-VL hybrid: pixel_values and high_res_pixel_values) a dict of them."""
        wants = {k: v.type for k, v in self.vision.graph.inputs.items() if v.kind == "activation"}
        given = images if isinstance(images, dict) else {"pixel_values": images}
        if set(given) != set(wants) or any(not isinstance(t, torch.Tensor) or tuple(t.shape[1:]) != wants[k].shape[1:]
                                           for k, t in given.items()):
            want = ", ".join(f"{k} [N, {', '.join(map(str, t.shape[1:]))}]" for k, t in wants.items())
            got = {k: tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__ for k, t in given.items()}
            raise InputError(f"images must be {want}{' (a dict)' if len(wants) > 1 else ''}, got {got}; "
                             "preprocess images with exe.prepare_inputs")
        return self.vision.run({k: t.to(self.device, to_torch(wants[k].dtype)) for k, t in given.items()})[
            "image_features"]

    def prepare_inputs(self, prompt_ids, images):
        """(ids with each image placeholder expanded to image_tokens copies, pixel_values) from prompt ids holding
        one placeholder per image and the images (arrays [H, W, 3] uint8 or [3, H, W] tensors)."""
        ids = self._ids(prompt_ids, "prompt_ids")
        marks = int((ids == self.image_token_id).sum())
        if marks != len(images) or ids.shape[0] != 1:
            raise InputError(f"prompt holds {marks} image placeholders (id {self.image_token_id}) for {len(images)} "
                             "images in one sequence; give one placeholder per image")
        pixels, counts = self._preprocessed(images)
        return torch.tensor([self._expand(ids[0].tolist(), counts)]), pixels

    def _expand(self, row: list[int], counts: list[int]) -> list[int]:
        """The row with its k-th image placeholder repeated counts[k] times."""
        counts, out = iter(counts), []
        for t in row:
            out += [t] * next(counts) if t == self.image_token_id else [t]
        return out

    def pixel_values(self, images):
        """The model's pixel inputs for a list of images (PIL images, paths, arrays [H, W, 3] uint8 or tensors
        [3, H, W]), preprocessed as the checkpoint's image processor does: a tensor [N, C, H, W], or a dict of them
        for a tower of several inputs (the hybrid's two views; VL2's tiles and token layout)."""
        return self._preprocessed(images)[0]

    def _preprocessed(self, images) -> tuple:
        """(pixel_values, the token count of each image)."""
        images = [_rgb(im) for im in images]
        if self.preprocess_images is not None:
            return self.preprocess_images(images)
        pixels = [self.preprocess(im) for im in images]
        if pixels and isinstance(pixels[0], dict):
            return {k: torch.stack([p[k] for p in pixels]) for k in pixels[0]}, [self.image_tokens] * len(pixels)
        return torch.stack(pixels), [self.image_tokens] * len(pixels)

    def text_rows(self, prompt):
        """A text prompt's rows, each image placeholder token (what the chat template writes for an image, e.g.
        DeepSeek-VL's `<image_placeholder>`, VL2's `<image>`) expanded to its image's token count, as the
        processors expand it."""
        rows, single = super().text_rows(prompt)
        for r in rows:
            marks = sum(t == self.image_token_id for t in r)
            if marks != len(self._image_counts):
                mark = self.tokenizer.decode([self.image_token_id])
                raise InputError(f"the prompt holds {marks} image placeholders ({mark!r}, id {self.image_token_id}) "
                                 f"for {len(self._image_counts)} images; put one in the text (or an "
                                 "{'type': 'image'} part in a chat message) per image")
        return [self._expand(r, self._image_counts) for r in rows], single

    def step_inputs(self, ids, state, extra=None):
        inputs = super().step_inputs(ids, state, extra)
        if "image_features" not in inputs:
            feats = self._features if self._features is not None and state.length == 0 else None
            inputs["image_features"] = feats if feats is not None else \
                torch.zeros(0, self.feature_dim, dtype=self.feature_dtype, device=self.device)
        return inputs

    def _check_images(self, ids: torch.Tensor, feats: torch.Tensor | None) -> None:
        n = int((ids == self.image_token_id).sum())
        have = 0 if feats is None else feats.shape[0]
        if n != have:
            per = f"{self.image_tokens} per image" if self.image_tokens else "per image: its tiles' layout"
            raise InputError(f"prompt holds {n} image tokens (id {self.image_token_id}) but the images give {have} "
                             f"feature rows ({per}); expand placeholders with prepare_inputs")

    def _with_images(self, prompt_ids, images, fn):
        feats = self.encode_images(images) if images is not None else None
        self._check_images(self._ids(prompt_ids, "prompt_ids"), feats)
        self._features = feats
        try:
            return fn()
        finally:
            self._features = None

    def __call__(self, input_ids, images=None) -> torch.Tensor:
        return self._with_images(input_ids, images, lambda: super(VisionExecutable, self).__call__(input_ids))

    def generate(self, prompt_ids, max_new_tokens: int = 32, images=None, **kw):
        """Executable.generate, the images' features spliced in at the prompt's placeholders. With ids, `images`
        are pixel values (see prepare_inputs); with a text prompt or a chat, a list of images (PIL, paths,
        arrays) for the placeholders its template writes, which are expanded and the images preprocessed here."""
        if kw.get("speculative"):
            raise InputError("speculative decoding is not available for multimodal models (no MTP branch)")
        def run():
            return super(VisionExecutable, self).generate(prompt_ids, max_new_tokens, **kw)
        if not generation.is_text(prompt_ids):
            return self._with_images(prompt_ids, images, run)
        if isinstance(prompt_ids, (list, tuple)) and all(isinstance(p, str) for p in prompt_ids) and images:
            raise InputError("images go with one prompt (a string or a chat), not a batch of strings")
        images = list(images or [])
        pixels, counts = self._preprocessed(images) if images else (None, [])
        feats = self.encode_images(pixels) if images else None
        self._features = None if feats is None else feats.repeat(kw.get("n", 1), 1)   # n samples: n rows
        self._image_counts = counts
        try:
            return run()
        finally:
            self._features, self._image_counts = None, []

    def artifact_parts(self) -> dict:
        """The vision tower, Janus' generation decoder and VQ decoder, each with its weights and compiled code."""
        parts = {"vision": (self.vision.graph, self.part_weights["vision"], self.vision)}
        if self.generation is not None:
            parts["generation"] = (self.generation.graph, self.generation.weights, self.generation.compiled)
        if self.vq_decoder is not None:
            parts["vq_decoder"] = (self.vq_decoder.graph, self.part_weights["vq_decoder"], self.vq_decoder)
        return parts

    def image_config_dict(self) -> dict:
        if self.image_config is None:
            raise ArtifactError("this multimodal executable has no image_config to save (compile it with "
                                "dsgraph.compile)")
        return asdict(self.image_config)

    @torch.no_grad()
    def generate_image_tokens(self, prompt_ids, uncond_ids, num_tokens: int, guidance: float = 5.0):
        """Janus text -> image: `num_tokens` codebook ids [B, num_tokens], greedy under classifier-free guidance
        (logits = uncond + guidance * (cond - uncond)), the conditional and unconditional prompts (same shape) as
        one batch of 2B. Each chosen code goes back in through the generation aligner at a placeholder position."""
        gen = self.generation
        if gen is None:
            raise InputError("this model has no image-generation decoder (only Janus / Janus-Pro checkpoints do)")
        cond, uncond = self._ids(prompt_ids, "prompt_ids"), self._ids(uncond_ids, "uncond_ids")
        if cond.shape != uncond.shape:
            raise InputError(f"prompt {tuple(cond.shape)} and unconditional prompt {tuple(uncond.shape)} differ")
        b = cond.shape[0]
        none = torch.zeros(0, dtype=torch.int64, device=self.device)
        out, state = gen.step(torch.cat([cond, uncond]), gen.empty_state(2 * b), {"image_codes": none})
        codes = []
        ids = torch.full((2 * b, 1), self.image_token_id, dtype=torch.int64, device=self.device)
        for i in range(num_tokens):
            lg = out["image_logits"][:, -1]
            codes.append((lg[b:] + guidance * (lg[:b] - lg[b:])).argmax(-1))
            if i + 1 < num_tokens:
                out, state = gen.step(ids, state, {"image_codes": codes[-1].repeat(2)})
        return torch.stack(codes, 1)

    def decode_image(self, codes) -> torch.Tensor:
        """Pixels [N, 3, H, W] (about -1..1) of codebook ids [N, grid*grid] through the VQ decoder."""
        if self.vq_decoder is None:
            raise InputError("this model has no VQ decoder (only Janus / Janus-Pro checkpoints do)")
        want = self.vq_decoder.graph.inputs["image_codes"].type.shape[1]
        codes = self._ids(codes, "codes")
        if codes.shape[1] != want:
            raise InputError(f"codes must be [N, {want}] (the whole code grid), got {tuple(codes.shape)}")
        return self.vq_decoder.run({"image_codes": codes})["pixels"]

    def generate_image(self, prompt_ids, uncond_ids, guidance: float = 5.0) -> torch.Tensor:
        """Janus text -> image: the whole code grid by generate_image_tokens, then decode_image's pixels."""
        n = self.vq_decoder.graph.inputs["image_codes"].type.shape[1] if self.vq_decoder is not None else 0
        return self.decode_image(self.generate_image_tokens(prompt_ids, uncond_ids, n, guidance))


def _rgb(image):
    """An image as an array [H, W, 3] uint8 (PIL images and paths through Pillow) or the tensor as given."""
    if isinstance(image, (str, Path)):
        try:
            from PIL import Image  # optional: only image files need it
        except ImportError:
            raise InputError("reading image files needs Pillow: pip install 'dsgraph[vision]'") from None
        with Image.open(image) as im:
            return np.asarray(im.convert("RGB"))
    if hasattr(image, "convert") and hasattr(image, "size"):   # a PIL image
        return np.asarray(image.convert("RGB"))
    return image
