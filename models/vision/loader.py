"""Load a DeepSeek-VL / Janus checkpoint directory in the hub layout (transformers' `save_pretrained` keys):
`model.vision_model.*`, `model.aligner.*`, the hybrid's `model.high_res_vision_*` and Janus'
`model.generation_{embeddings,aligner,head}.*` bind to the graphs' params as they are, the language model's
`model.language_model.*` to the decoders' `model.*`, `lm_head.weight` as it is (absent when tied).

Janus' `model.vqmodel.{quantize,post_quant_conv,decoder}.*` bind to the VQ decoder graph. Keys of parts dsgraph
does not build are skipped with a note: SigLIP's attention-pooling head (`vision_use_head`, unused by these
models' features) and Janus' VQ encoder (`model.vqmodel.{encoder,quant_conv}.*`: pixels -> codes, which
generation does not need). Anything else unexpected, missing or wrongly shaped is one CheckpointError listing all.

DeepSeek-VL2 (`deepseek_vl_v2`, DeepSeek's own layout): `vision.*`, `projector.*`, `image_newline` and
`view_seperator` bind as they are, `language.model.*` to the decoder's `model.*`, `language.lm_head.weight` to
`lm_head.weight`; the SigLIP attention-pooling head (`vision.attn_pool.*`) is skipped with a note. Its `<image>`
token id comes from tokenizer.json when config.json has none; the tiling from processor_config.json.
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path

from dsgraph.errors import CheckpointError
from dsgraph.text import has_tokenizer, load_tokenizer
from dsgraph.weights import SliceableEntry, WeightStore

from ..hf_shards import FLOAT_DTYPES, Shards
from .config import from_hf_vl
from .generation import build_generation_graph
from .image import read_image_config
from .tiling import read_tiled_image_config
from .tower import build_vl_graphs
from .vl2 import MODEL_TYPE as VL2
from .vl2 import from_hf_vl2
from .vl2_tower import build_vl2_graphs
from .vq import build_vq_decoder_graph

_SKIPPED = {r"^model\.vision_model\.head\.": "SigLIP's pooling head (the image features are the patch tokens)",
            r"^model\.vqmodel\.(encoder|quant_conv)\.": "Janus' VQ encoder (pixels -> codes: generation needs none)"}
_SKIPPED_VL2 = {r"^vision\.attn_pool\.": "SigLIP's attention-pooling head (ignore_head: the features are the patch "
                                         "tokens)"}


def hub_key(name: str) -> str:
    """The hub key of a graph param."""
    own = r"vision_model\.|aligner\.|generation_|vqmodel\.|high_res_vision_"
    return re.sub(rf"^model\.(?!{own})", "model.language_model.", name)


def vl2_hub_key(name: str) -> str:
    """The hub key of a DeepSeek-VL2 graph param."""
    if name == "lm_head.weight" or name.startswith("model."):
        return f"language.{name}"
    return name


def _image_token(root: Path) -> int | None:
    """DeepSeek-VL2's `<image>` id from the checkpoint's tokenizer (its config.json has none)."""
    return load_tokenizer(root).backend.token_to_id("<image>") if has_tokenizer(root) else None


def load_vl_parts(root: Path, cfg: dict, dtype: str = "float32", progress: bool = True):
    """(VLConfig | VL2Config, (decoder, vision, Janus' generation and VQ decoder graphs), lazy weights of all,
    ImageConfig | TiledImageConfig); hf_loader makes the Model."""
    name = re.sub(r"\W", "_", root.resolve().name) or "model"
    if cfg.get("model_type") == VL2:
        vl = from_hf_vl2(cfg, str(root / "config.json"), _image_token(root))
        graph, vision = build_vl2_graphs(vl, dtype, name=name)
        store, notes = _bind(root, vl, (graph, vision), vl2_hub_key, _SKIPPED_VL2, progress)
        graph.meta["checkpoint"] = {"path": str(root), "keep_fp8": False, "notes": notes}
        return vl, (graph, vision, None, None), store, read_tiled_image_config(root, vl)
    vl = from_hf_vl(cfg, source=str(root / "config.json"))
    graph, vision = build_vl_graphs(vl, dtype, name=name)
    generation = build_generation_graph(vl, dtype, name=f"{name}_generation") if vl.generation else None
    vq = build_vq_decoder_graph(vl.generation, dtype, name=f"{name}_vq_decoder") if vl.generation else None
    graphs = (graph, vision, *[x for x in (generation, vq) if x is not None])
    store, notes = _bind(root, vl, graphs, hub_key, _SKIPPED, progress)
    graph.meta["checkpoint"] = {"path": str(root), "keep_fp8": False, "notes": notes}
    return vl, (graph, vision, generation, vq), store, read_image_config(root, vl.vision.image_size,
                                                               vl.high_res.image_size if vl.high_res else None)


def _bind(root: Path, vl, graphs, key_of, skipped: dict, progress: bool):
    """Lazy weights of every graph's params from the shards, and the notes on skipped parts; one CheckpointError
    listing every missing, unexpected and wrongly shaped tensor."""
    shards = Shards(root, progress=progress)
    store, used, missing, wrong = WeightStore(reader=shards), set(), [], []
    for g in graphs:
        for pname, v in g.params().items():
            key, want = key_of(pname), v.type.concrete({})
            info = shards.info.get(key)
            if info is None:
                missing.append(f"{key} {list(want)}")
            elif info.shape != want or info.dtype not in FLOAT_DTYPES:
                wrong.append(f"{key}: checkpoint {info.dtype}{list(info.shape)}, model expects float{list(want)}")
            else:
                store.set(pname, SliceableEntry(lambda index, k=key: shards.read(k, index)))
            used.add(key)
    notes = sorted({why for k in shards.info for pat, why in skipped.items() if re.match(pat, k)})
    unexpected = sorted(k for k in shards.info if k not in used and not any(re.match(p, k) for p in skipped)
                        and not (k == key_of("lm_head.weight") and vl.text.tie_word_embeddings))
    if missing or unexpected or wrong:
        parts = [f"  {len(xs)} {what}:\n    " + "\n    ".join(xs[:20])
                 for what, xs in (("missing weights", missing), ("unexpected weights", unexpected),
                                  ("wrongly shaped or typed weights", wrong)) if xs]
        raise CheckpointError(f"checkpoint {root} does not match its config.json ({vl.model_type}):\n"
                              + "\n".join(parts))
    for n in notes:
        warnings.warn(f"{root}: skipped the weights of {n}", stacklevel=4)
    return store, notes
