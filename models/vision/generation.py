"""Janus' image-generation decoder (text -> image tokens), declared as a graph over the same language model.

Image tokens are codebook ids of the VQ tokenizer. Each generated one goes back in as `generation_embeddings`
-> `generation_aligner` (linears with GELU between) at a placeholder position of the token stream (the
`image_token_id`, spliced with `vision.splice`, as understanding splices SigLIP features); the decoder's last
hidden state goes through `generation_head` (proj_out, GELU, vision_head) to logits over the codebook.

Graph interface: DecoderBuilder's plus the input image_codes [I] int64 (I = 0 while prefilling the text prompt)
and the output image_logits [B, S, codebook] fp32. The VQ decoder (codes -> pixels) is not built yet.
"""
from __future__ import annotations

from .config import GenerationConfig
from .tower import VLDecoderBuilder, aligner


class JanusGenerationBuilder(VLDecoderBuilder):
    """The decoder with image codes embedded, aligned and spliced in, and the codebook head."""

    def __init__(self, vl, gen: GenerationConfig, dtype: str = "float32", name: str = "model"):
        super().__init__(vl, dtype, name=name)
        self.gen = gen

    def embed_tokens(self, ids, table):
        b, g = self.b, self.gen
        h = b.embed(ids, table, name="embed")
        codes = b.input("image_codes", ("I",))
        x = b.embed(codes, b.param("model.generation_embeddings.weight", (g.num_embeddings, g.embed_dim)),
                    name="code_embed")
        names = ["model.generation_aligner.fc1"] + [f"model.generation_aligner.hidden_layers.{i}"
                                                      for i in range(g.aligner_layers - 1)]
        x = aligner(b, x, names, [g.embed_dim] + [g.projection_dim] * len(names), g.gelu)
        return b.vision.splice(h, ids, x, token_id=self.vl.image_token_id, name="embed_mm")

    def final_hidden(self, h):
        """image_logits from the final-norm hidden state (what transformers' generation head reads)."""
        b, g, d = self.b, self.gen, self.cfg.hidden_size
        p = "model.generation_head"
        logits = b.mlp.gelu(h, b.param(f"{p}.proj_out.weight", (g.projection_dim, d)),
                            b.param(f"{p}.proj_out.bias", (g.projection_dim,)),
                            b.param(f"{p}.vision_head.weight", (g.num_embeddings, g.projection_dim)),
                            b.param(f"{p}.vision_head.bias", (g.num_embeddings,)), approximate=g.gelu)
        b.output("image_logits", b.cast(logits, dtype="float32", name="image_logits_f32"))


def build_generation_graph(vl, dtype: str = "float32", name: str = "model_generation"):
    g = JanusGenerationBuilder(vl, vl.generation, dtype, name=name).build()
    g.meta.update(codebook_size=vl.generation.num_embeddings)
    return g
