"""Load a DeepSeek-VL / Janus checkpoint directory in the hub layout (transformers' `save_pretrained` keys):
`model.vision_model.*`, `model.aligner.*`, the hybrid's `model.high_res_vision_*` and Janus'
`model.generation_{embeddings,aligner,head}.*` bind to the graphs' params as they are, the language model's
`model.language_model.*` to the decoders' `model.*`, `lm_head.weight` as it is (absent when tied).

Janus' `model.vqmodel.{quantize,post_quant_conv,decoder}.*` bind to the VQ decoder graph. Keys of parts dsgraph
does not build are skipped with a note: SigLIP's attention-pooling head (`vision_use_head`, unused by these
models' features) and Janus' VQ encoder (`model.vqmodel.{encoder,quant_conv}.*`: pixels -> codes, which
generation does not need). Anything else unexpected, missing or wrongly shaped is one CheckpointError listing all.
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path

from dsgraph.errors import CheckpointError
from dsgraph.weights import SliceableEntry, WeightStore

from ..hf_shards import FLOAT_DTYPES, Shards
from .config import from_hf_vl
from .generation import build_generation_graph
from .image import read_image_config
from .tower import build_vl_graphs
from .vq import build_vq_decoder_graph

_SKIPPED = {r"^model\.vision_model\.head\.": "SigLIP's pooling head (the image features are the patch tokens)",
            r"^model\.vqmodel\.(encoder|quant_conv)\.": "Janus' VQ encoder (pixels -> codes: generation needs none)"}


def hub_key(name: str) -> str:
    """The hub key of a graph param."""
    own = r"vision_model\.|aligner\.|generation_|vqmodel\.|high_res_vision_"
    return re.sub(rf"^model\.(?!{own})", "model.language_model.", name)


def load_vl_parts(root: Path, cfg: dict, dtype: str = "float32", progress: bool = True):
    """(VLConfig, (decoder, vision, Janus' generation and VQ decoder graphs), lazy weights of all, ImageConfig);
    hf_loader makes the Model."""
    vl = from_hf_vl(cfg, source=str(root / "config.json"))
    name = re.sub(r"\W", "_", root.resolve().name) or "model"
    graph, vision = build_vl_graphs(vl, dtype, name=name)
    generation = build_generation_graph(vl, dtype, name=f"{name}_generation") if vl.generation else None
    vq = build_vq_decoder_graph(vl.generation, dtype, name=f"{name}_vq_decoder") if vl.generation else None
    shards = Shards(root, progress=progress)
    store, used, missing, wrong = WeightStore(reader=shards), set(), [], []
    for g in (graph, vision, *[x for x in (generation, vq) if x is not None]):
        for pname, v in g.params().items():
            key, want = hub_key(pname), v.type.concrete({})
            info = shards.info.get(key)
            if info is None:
                missing.append(f"{key} {list(want)}")
            elif info.shape != want or info.dtype not in FLOAT_DTYPES:
                wrong.append(f"{key}: checkpoint {info.dtype}{list(info.shape)}, model expects float{list(want)}")
            else:
                store.set(pname, SliceableEntry(lambda index, k=key: shards.read(k, index)))
            used.add(key)
    notes = sorted({why for k in shards.info for pat, why in _SKIPPED.items() if re.match(pat, k)})
    unexpected = sorted(k for k in shards.info if k not in used and not any(re.match(p, k) for p in _SKIPPED)
                        and not (k == "lm_head.weight" and vl.text.tie_word_embeddings))
    if missing or unexpected or wrong:
        parts = [f"  {len(xs)} {what}:\n    " + "\n    ".join(xs[:20])
                 for what, xs in (("missing weights", missing), ("unexpected weights", unexpected),
                                  ("wrongly shaped or typed weights", wrong)) if xs]
        raise CheckpointError(f"checkpoint {root} does not match its config.json ({vl.model_type}):\n"
                              + "\n".join(parts))
    for n in notes:
        warnings.warn(f"{root}: skipped the weights of {n}", stacklevel=3)
    graph.meta["checkpoint"] = {"path": str(root), "keep_fp8": False, "notes": notes}
    return vl, (graph, vision, generation, vq), store, read_image_config(root, vl.vision.image_size,
                                                               vl.high_res.image_size if vl.high_res else None)
