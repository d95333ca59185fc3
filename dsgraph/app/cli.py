"""The `dsgraph` command line: show, compile, run, chat, list, check, check-weights, bench, plan, export, demo
(text commands in textcli.py, error handling in cli_guard.py)."""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from dsgraph import models, progress
from dsgraph.backends import available_backends, backend_names
from dsgraph.backends.onnx.export import OPSET, export_onnx, save_onnx
from dsgraph.backends.tvm.prebuilt import ENV as TVM_PREBUILT_ENV
from dsgraph.dtypes import compute_dtype
from dsgraph.errors import ConfigError
from dsgraph.models.check_weights import check_weights
from dsgraph.parallel import ParallelPlan
from dsgraph.runtime import distributed
from dsgraph.version import __version__

from . import api, plan_v4, servecli, textcli
from . import cli_guard as guard
from . import plan as planner
from .bench import bench, load_model, prebuild_tvm, report
from .check import check_backend


def cmd_show(args) -> int:
    model = api.load(args.model, dtype=args.dtype, weights=False) if _is_preset(args.model) else \
        api.load(args.model, dtype=args.dtype)
    print(model.summary())
    if args.graph:
        print(model.graph)
    return 0


def _is_preset(name: str) -> bool:
    return name in models.PRESETS


def cmd_compile(args) -> int:
    model = api.load(args.model, dtype=args.dtype, **textcli.load_options(args))
    opts = {"emit_dir": args.emit_dir} if args.emit_dir else {}
    exe = api.compile(model, backend=args.backend, device=args.device, dtype=args.dtype,
                          passes=args.passes.split(",") if args.passes not in ("default", "none") else args.passes,
                          dump_after=args.dump_after, keep_mtp=args.keep_mtp, **opts)
    print(exe.report() if args.report == "full" else exe.compiled.report.summary())
    if args.output:
        path = exe.save(args.output, overwrite=args.overwrite)
        hint = '--prompt "Hello"' if exe.tokenizer is not None else "--prompt-ids 1,2,3"
        print(f"wrote artifact {path} — run it with: dsgraph run {path} {hint}")
    return 0


def cmd_run(args) -> int:
    """Under torchrun with --tp / --ep every rank runs its shard of the model; only rank 0 prints."""
    if args.tp == 1 and args.ep == 1 and not args.dp_attention:
        return _run(args, None)
    plan = ParallelPlan(tp=args.tp, ep=args.ep, dp_attention=args.dp_attention)
    if (Path(args.model) / "manifest.json").exists():
        raise ConfigError(f"{args.model} is a compiled artifact of one process; --tp/--ep shard a model: "
                          "give a preset or checkpoint")
    rank, _ = distributed.init(api.resolve_device(args.device))
    if rank == 0:
        return _run(args, plan)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return _run(args, plan)  # an error still reaches stderr: it propagates past the redirect


def _load_exe(args, plan: ParallelPlan | None = None):
    """An artifact (runs in the backend and dtype it was compiled for: asking for others is an error), or a model
    compiled now (default eager, float32)."""
    if (Path(args.model) / "manifest.json").exists():
        exe = api.load_artifact(args.model, device=args.device, backend=args.backend)
        if args.dtype not in (None, exe.dtype):
            raise ConfigError(f"{args.model} was compiled for {exe.dtype}, not --dtype {args.dtype}; drop --dtype "
                              f"or compile the model again with --dtype {args.dtype}")
        textcli.log.info(f"loaded artifact {args.model} ({exe.compiled.report.backend} on {exe.device}, {exe.dtype})")
        return exe
    dtype = args.dtype or "float32"
    model = api.load(args.model, dtype=dtype, **textcli.load_options(args))
    exe = api.compile(model, backend=args.backend or "eager", device=args.device, dtype=dtype,
                      keep_mtp=getattr(args, "speculative", None) == "mtp", parallel=plan)
    if plan is not None:  # a text run's stdout is the text alone, as in one process
        print(exe.compiled.report.notes[-1], file=sys.stderr if getattr(args, "prompt", None) else sys.stdout)
    return exe


def cmd_chat(args) -> int:
    return textcli.chat_loop(_load_exe(args), args)


def _run(args, plan: ParallelPlan | None) -> int:
    text = textcli.text_prompt(args)
    exe = _load_exe(args, plan)
    if text is not None:
        textcli.stream(exe, *_text_with_images(exe, text, args.image), args)
        return 0
    prompt = args.prompt_ids if args.prompt_ids is not None else [1, 2, 3]
    print(f"prompt: {prompt}", flush=True)
    prompt, images = _with_images(exe, [prompt], args.image)
    print("tokens:", end="", flush=True)
    out, stats = exe.generate(prompt, max_new_tokens=args.max_new_tokens, return_stats=True,
                              speculative=args.speculative, draft_depth=args.draft_depth,
                              on_token=lambda i, t: print(f" {int(t[0])}", end="", flush=True), **images)
    print()
    note = distributed.read_note(exe.weights, exe.graph.meta["shard"]["rank"]) if plan is not None else None
    if note:
        print(note)
    print(f"time to first token {stats.time_to_first_token_s * 1e3:.1f} ms, "
          f"decode {stats.decode_tokens_per_s:.1f} tokens/s ({exe.compiled.report.backend} on {exe.device})")
    graphs = stats.extra.get("decode_graphs")
    if graphs:
        print(f"decode CUDA graphs: {graphs['graph_steps']} steps replayed, {graphs['captures']} captured, "
              f"{graphs['plain_steps']} run without a graph")
    if args.speculative:
        acc = ", ".join(f"{a:.0%}" for a in stats.extra["acceptance_per_position"])
        print(f"speculative {args.speculative}: acceptance per draft position {acc}; "
              f"{stats.extra['mean_tokens_per_target_step']:.2f} tokens per main-model step "
              f"({stats.target_steps} steps)")
    return 0


def _with_images(exe, prompt, files):
    """(prompt ids, generate's image keywords): each --image file read with Pillow, a placeholder put before the
    prompt for every image the prompt ids do not mark, the placeholders expanded (exe.prepare_inputs)."""
    if not files:
        return prompt, {}
    if not hasattr(exe, "prepare_inputs"):
        raise ConfigError(f"--image: {exe.model.name} is not a multimodal model (DeepSeek-VL / VL2 / Janus)")
    try:
        from PIL import Image  # optional: only --image needs it
    except ImportError:
        raise ConfigError("--image reads images with Pillow: pip install 'dsgraph[vision]'") from None
    images = [np.asarray(Image.open(f).convert("RGB")) for f in files]
    marks = sum(t == exe.image_token_id for t in prompt[0])
    ids, pixels = exe.prepare_inputs([[exe.image_token_id] * (len(images) - marks) + prompt[0]], images)
    return ids, {"images": pixels}


def _text_with_images(exe, text, files):
    """(text prompt, generate's image keywords) for --prompt with --image: a plain prompt without the model's
    image placeholder gets one per image in front; with --chat the user message takes an image part per image
    (the checkpoint's template writes the placeholders)."""
    if not files:
        return text, {}
    if not hasattr(exe, "text_rows") or not hasattr(exe, "image_token_id"):
        raise ConfigError(f"--image: {exe.model.name} is not a multimodal model (DeepSeek-VL / VL2 / Janus)")
    if isinstance(text, str):
        mark = exe.tokenizer.decode([exe.image_token_id]) if exe.tokenizer is not None else ""
        return (text if mark and mark in text else mark * len(files) + text), {"images": files}
    *before, user = text
    parts = [{"type": "image"} for _ in files] + [{"type": "text", "text": user["content"]}]
    return [*before, {**user, "content": parts}], {"images": files}


def cmd_plan(args) -> int:
    """Memory, collectives and a tokens/s bound of each candidate plan on `--gpus` GPUs (dsgraph/app/plan.py)."""
    hw = planner.GPUS.get(args.gpu)
    if hw is None:
        raise ConfigError(f"unknown --gpu {args.gpu!r}; known: {', '.join(planner.GPUS)}")
    hw = replace(hw, **{k: v for k, v in (("nvlink_gbs", args.nvlink_gbs), ("ib_gbs", args.ib_gbs)) if v})
    rows = plan_v4.plan_any(args.model, args.gpus, hw, args.nodes, args.batch, args.context, args.prefill)
    print(planner.format_rows(args.model, rows, hw, args.gpus, args.nodes, args.batch, args.context))
    return 0


def cmd_check(args) -> int:

    model = api.load(args.model)
    ok = True
    for backend in args.backend.split(","):
        r = check_backend(model, backend, device=args.device, dtype=args.dtype)
        ok &= r.ok
        print(f"{backend:<8} {r.device:<5} {r.dtype:<9} prefill rel err {r.prefill_err:.2e}  decode rel err "
              f"{r.decode_err:.2e}  greedy tokens {'match' if r.tokens_match else 'DIFFER'}  "
              f"fallbacks {r.fallbacks}  {'OK' if r.ok else 'FAIL'}")
    return 0 if ok else 1


def cmd_demo(args) -> int:

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.perf_counter()
    model = api.load("deepseek-v3-tiny", seed=0)
    print(f"dsgraph demo: deepseek-v3-tiny with deterministic random weights on {device}")
    print(model.summary())
    text = "What is the capital of France?"
    prompt = torch.tensor([model.tokenizer.encode(text)])
    print(f"\nprompt: {text!r} -> ids {prompt[0].tolist()} (the tiny presets' byte-level BPE)\n")
    print(f"{'backend':<10} {'max rel err':>12} {'text (random weights: noise)':<34} {'match':<6} {'compile':>8} "
          f"{'run':>8}")
    ok = True
    for backend in [b for b in available_backends(device) if b in ("eager", "triton", "tvm")]:
        r = check_backend(model, backend, device=device, dtype="float32", prompt=prompt, new_tokens=8)
        ok &= r.ok
        err = max(r.prefill_err, r.decode_err)
        shown = repr(model.tokenizer.decode(r.tokens[0], skip_special_tokens=True))[:34]
        print(f"{backend:<10} {err:>12.2e} {shown:<34} {'yes' if r.tokens_match else 'NO':<6} "
              f"{r.compile_seconds:>7.2f}s {r.seconds:>7.2f}s", flush=True)
    verdict = "agrees" if ok else "does NOT agree"
    print(f"\ndone in {time.perf_counter() - t0:.1f}s — every backend {verdict} with eager")
    return 0 if ok else 1


def _pos_ints(text: str) -> list[int]:
    try:
        values = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        values = []
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers like 1,64, got {text!r}")
    return values


def cmd_bench(args) -> int:
    if args.device == "cpu":
        # Triton runs on the CPU through its interpreter, chosen before triton is first imported
        os.environ.setdefault("TRITON_INTERPRET", "1")
    workloads = [w for w in args.op.split(",") if w] if args.op else None
    if args.prebuild:
        names = prebuild_tvm(args.model, args.prebuild, device=args.device, workloads=workloads, batches=args.batch,
                             prefill_batches=args.prefill_batch, contexts=args.context, dtype=args.dtype,
                             seed=args.seed, log=progress.write)
        print(f"{len(names)} TVM modules for {args.device} in {args.prebuild}; run them with "
              f"dsgraph bench {args.model} --device {args.device} --prebuilt {args.prebuild} (same workloads)")
        return 0
    if args.prebuilt:
        os.environ[TVM_PREBUILT_ENV] = args.prebuilt
    doc = bench(args.model, device=args.device, backends=[b for b in args.backends.split(",") if b],
                workloads=workloads, batches=args.batch,
                prefill_batches=args.prefill_batch, contexts=args.context, dtype=args.dtype, repeats=args.repeats,
                warmup=args.warmup, seed=args.seed, partial_json=args.json)
    env = doc["environment"]
    print(f"dsgraph bench {args.model} on {env['gpu'] or env['cpu']} ({doc['config']['dtype']}); "
          f"peaks: {doc['peaks']['bandwidth_gbs']:.1f} GB/s, "
          + ", ".join(f"{k} {v:.2f} TFLOP/s" for k, v in doc["peaks"]["flops_tflops"].items()))
    print(report.table(doc["rows"]))
    if args.json:
        report.write_json(args.json, doc)
        print(f"wrote {args.json}", file=sys.stderr)
    if args.plot:
        report.plot(doc["rows"], args.plot, f"dsgraph bench {args.model} ({args.device}, {doc['config']['dtype']})")
        print(f"wrote {args.plot}", file=sys.stderr)
    wrong = [r for r in doc["rows"] if r["status"] == "WRONG"]
    return 1 if wrong or guard.unknown_backends(args.backends.split(",")) else 0  # a typo'd backend fails too


def cmd_export(args) -> int:
    model = load_model(args.model, compute_dtype(args.dtype or "float32"), args.seed)
    t0 = time.perf_counter()
    proto = export_onnx(model.graph, model.weights, opset=args.opset or OPSET)
    path = save_onnx(proto, args.onnx)
    ins = ", ".join(f"{i.name}[{','.join(d.dim_param or str(d.dim_value) for d in i.type.tensor_type.shape.dim)}]"
                    for i in proto.graph.input[:3])
    print(f"wrote {path}: opset {args.opset or OPSET}, {len(proto.graph.node)} nodes, "
          f"{len(proto.graph.initializer)} initializers, inputs {ins}, ... "
          f"({time.perf_counter() - t0:.1f}s)")
    return 0


def cmd_check_weights(args) -> int:
    return 1 if check_weights(args.path, progress=not args.quiet) else 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dsgraph", description="Compile, check and benchmark DeepSeek-family models.",
                                allow_abbrev=False)
    p.add_argument("--version", action="version", version=f"dsgraph {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    textcli.add_logging_args(common)

    def model_cmd(name, help_, fn):
        s = sub.add_parser(name, help=help_, description=help_, parents=[common], allow_abbrev=False)
        s.add_argument("model", help="preset name (e.g. deepseek-v3-tiny), HF checkpoint dir, saved graph"
                       + (" or compiled artifact dir" if name in ("run", "chat") else ""))
        s.add_argument("--dtype", default="float32",
                       help="float32 | bfloat16 | float16 | auto (a checkpoint's torch_dtype; default float32)")
        s.set_defaults(fn=fn)
        return s

    s = model_cmd("show", "print a model's summary (params, activated params, KV bytes/token)", cmd_show)
    s.add_argument("--graph", action="store_true", help="also print the graph's text IR")

    s = model_cmd("compile", "compile a model and print the compile report", cmd_compile)
    s.add_argument("--backend", default="eager")
    s.add_argument("--device", default="cpu")
    s.add_argument("--passes", default="default", help="default | none | comma-separated pass names")
    s.add_argument("--dump-after", default=None, metavar="PASS", help="print the graph after this pass")
    s.add_argument("--emit-dir", default=None, help="write generated kernel sources here (triton)")
    s.add_argument("-o", "--output", default=None, help="write a deployable artifact directory")
    s.add_argument("--overwrite", action="store_true", help="replace an existing artifact directory")
    s.add_argument("--keep-mtp", action="store_true", help="keep the MTP branch (for speculative decoding)")
    s.add_argument("--report", choices=("summary", "full"), default="summary",
                   help="the compile report: one line per op and kernel (default) or one per node")
    s.add_argument("--keep-fp8", action="store_true", help="keep an FP8 checkpoint's e4m3 weights (FP8 GEMMs)")

    s = model_cmd("run", "generate text (or tokens), printing it as it comes", cmd_run)
    s.set_defaults(dtype=None)   # an artifact's own, a model's float32 (_load_exe)
    what = s.add_mutually_exclusive_group()
    what.add_argument("--prompt", default=None, help="text, encoded with the model's tokenizer")
    what.add_argument("--prompt-ids", type=guard.token_ids, default=None, help="token ids, e.g. 1,2,3 or \"1 2 3\"")
    _generation_args(s)
    s.add_argument("--image", action="append", default=None, metavar="FILE",
                   help="an image for a DeepSeek-VL / VL2 / Janus model (repeatable; read with Pillow)")
    s.add_argument("--speculative", choices=["mtp"], default=None, help="draft with the MTP branch")
    s.add_argument("--draft-depth", type=guard.int_at_least(1), default=1)
    s.add_argument("--tp", type=guard.int_at_least(1), default=1, help="tensor-parallel ranks (run under torchrun)")
    s.add_argument("--ep", type=guard.int_at_least(1), default=1, help="expert-parallel ranks (run under torchrun)")
    s.add_argument("--dp-attention", action="store_true",
                   help="attention data-parallel per rank (each rank its own requests; here the same prompt), "
                        "MoE expert-parallel with all_to_all")

    s = model_cmd("plan", "memory per GPU, collective bytes and time per step, tokens/s bound of TP / EP / "
                  "DP-attention plans", cmd_plan)
    s.add_argument("--gpus", type=guard.int_at_least(1), required=True, help="GPUs in all")
    s.add_argument("--gpu", default="h200", help="h200 | h100 | b200 (defaults in docs/distributed.md)")
    s.add_argument("--nodes", type=guard.int_at_least(1), default=1)
    s.add_argument("--batch", type=guard.int_at_least(1), default=64, help="decode batch (sequences)")
    s.add_argument("--context", type=guard.int_at_least(1), default=4096, help="cached tokens per sequence")
    s.add_argument("--prefill", type=guard.int_at_least(1), default=4096, help="prompt tokens of a prefill step")
    s.add_argument("--nvlink-gbs", type=float, default=None, help="NVLink GB/s per direction per GPU")
    s.add_argument("--ib-gbs", type=float, default=None, help="InfiniBand GB/s per GPU")

    s = model_cmd("chat", "interactive multi-turn chat with the model's chat template", cmd_chat)
    s.set_defaults(dtype=None)
    _generation_args(s)

    s = sub.add_parser("list", help="list presets, backends or passes", parents=[common], allow_abbrev=False)
    s.add_argument("what", choices=textcli.LISTS)
    s.set_defaults(fn=textcli.cmd_list)

    s = model_cmd("check", "compare backends against eager (logits and greedy tokens)", cmd_check)
    s.add_argument("--backend", default="eager", help="backend or comma-separated list")
    s.add_argument("--device", default="cpu")

    s = model_cmd("bench", "compare backends side by side: checked against eager, then timed (table, JSON, plot)",
                  cmd_bench)
    s.set_defaults(dtype=None)
    s.add_argument("--op", default=None, metavar="NAMES",
                   help="comma-separated workloads: mla_decode, dsa_decode, gqa_decode, prefill_attention, moe, "
                        "rmsnorm, rope, fp8_gemm, prefill, decode (default: every one of these that applies to the "
                        "model), and "
                        "speculative (plain vs MTP-speculative generation of 32 tokens; models with an MTP module)")
    s.add_argument("--device", default="cpu", help="cpu | cuda")
    s.add_argument("--prebuild", default=None, metavar="DIR",
                   help="only build, here, the TVM modules this run needs for --device into DIR (no GPU needed)")
    s.add_argument("--prebuilt", default=None, metavar="DIR",
                   help="the tvm backend loads modules from DIR (made with --prebuild) instead of compiling: "
                        "for a machine whose TVM is runtime-only")
    s.add_argument("--backends", default="eager,torch_compile,triton,tvm,onnx",
                   help="comma-separated; torch_compile:MODE picks a torch.compile mode (e.g. "
                        "torch_compile:reduce-overhead)")
    s.add_argument("--batch", type=_pos_ints, default=None, help="decode batch sizes (cpu default 1,4; cuda 1,64)")
    s.add_argument("--prefill-batch", type=_pos_ints, default=None, help="prefill batch sizes (default 1)")
    s.add_argument("--context", type=_pos_ints, default=None,
                   help="context lengths: cached tokens for decode, prompt tokens for prefill (cpu 64; cuda 4096)")
    s.add_argument("--repeats", type=guard.int_at_least(1), default=None, help="timed repeats (cpu default 5; cuda 50)")
    s.add_argument("--warmup", type=guard.int_at_least(0), default=None, help="warm-up calls before timing")
    s.add_argument("--seed", type=guard.int_at_least(0), default=0)
    s.add_argument("--json", default=None, metavar="FILE",
                   help="write every number and the environment here (rewritten after every row while it runs)")
    s.add_argument("--plot", default=None, metavar="FILE.png", help="write a comparison plot (matplotlib)")

    s = model_cmd("export", "export a model's prefill entry (no MTP) to a standard ONNX file", cmd_export)
    s.add_argument("--onnx", required=True, metavar="FILE", help="output .onnx file (weights beside it if > 2 GB)")
    s.add_argument("--opset", type=guard.int_at_least(1), default=None, help="ONNX opset (>= 17; default 21)")
    s.add_argument("--seed", type=guard.int_at_least(0), default=0, help="seed of the random weights of a preset")

    s = sub.add_parser("check-weights", help="scan a checkpoint, artifact or .safetensors file for NaN/Inf weights",
                       description="scan a checkpoint, artifact or .safetensors file for NaN/Inf weights (-q: no "
                       "progress)", parents=[common], allow_abbrev=False)
    s.add_argument("path", help="HF checkpoint dir, compiled artifact dir, or a .safetensors file")
    s.set_defaults(fn=cmd_check_weights)

    s = sub.add_parser("demo", help="tiny DeepSeek-V3 on every backend this machine has, checked against eager",
                       parents=[common], allow_abbrev=False)
    s.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    s.set_defaults(fn=cmd_demo)
    servecli.add_parser(sub, common)
    return p


def _generation_args(s) -> None:
    s.add_argument("--max-new-tokens", type=guard.int_at_least(1), default=16)
    s.add_argument("--backend", default=None, choices=backend_names(),
                   help="default eager; an artifact runs on the backend it was made for (another is an error)")
    s.add_argument("--device", default=None, help="cpu or cuda (default: the artifact's, else cuda if present)")
    s.add_argument("--keep-fp8", action="store_true", help="keep an FP8 checkpoint's e4m3 weights (FP8 GEMMs)")
    textcli.add_sampling_args(s)


def main(argv=None) -> int:
    """Run one command; a user error prints one line and exits 2 (cli_guard.py); --debug or -v adds the traceback."""
    argv, debug = guard.split_debug(sys.argv[1:] if argv is None else list(argv))
    args = build_parser().parse_args(argv)
    textcli.configure_logging(args.verbose, args.quiet)
    return guard.run(lambda: args.fn(args), args, debug or args.verbose > 0)


if __name__ == "__main__":
    sys.exit(main())
