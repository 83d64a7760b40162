"""The ``medvlp`` command: one subcommand per stage, one YAML config per run, ``key=value`` overrides.

A user's mistake (bad data, bad config, missing path) ends the command with one line on stderr and status 2,
never a traceback. Every command reads and checks its config and arguments before it imports torch or loads a
model, so such a line comes in a fraction of a second.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from medvlp import __version__
from medvlp.config import load_config
from medvlp.errors import MedvlpError
from medvlp.log import setup as setup_logging


def _config_args(parser: argparse.ArgumentParser, examples: str) -> None:
    parser.add_argument("--config", type=Path, help="YAML config file (defaults are used for what it leaves out)")
    parser.set_defaults(overrides=[])
    parser.epilog = f"Any config value can be overridden as key=value, e.g. {examples}."


def cmd_datasets(args: argparse.Namespace) -> None:
    from medvlp.data.registry import DATASETS

    for spec in DATASETS.values():
        print(f"{spec.name:14s} {spec.family:15s} {spec.description}")
    print(f"{'synthetic_*':14s} {'all four':15s} the built-in synthetic radiology corpus: `medvlp synth --out DIR`")


def cmd_prepare(args: argparse.Namespace) -> None:
    from medvlp.data.prepare import PrepareConfig
    from medvlp.data.registry import prepare

    config = load_config(PrepareConfig, args.config, args.overrides)
    manifest = prepare(args.name, args.raw, args.out, config, force=args.force)
    splits = ", ".join(f"{name} {entry['rows']:,}" for name, entry in manifest["splits"].items())
    print(f"prepared {args.name} in {args.out}: {splits}; {manifest['images']['rows']:,} images; "
          f"{manifest['skipped']['count']} records skipped")


def cmd_synth(args: argparse.Namespace) -> None:
    from medvlp.data.synth_config import SynthConfig

    config = load_config(SynthConfig, config_path(args.config), args.overrides)
    from medvlp.data.synthetic import generate

    manifests = generate(args.out, config)
    for family, manifest in manifests.items():
        splits = ", ".join(f"{name} {entry['rows']:,}" for name, entry in manifest["splits"].items())
        print(f"{args.out / family}: {family} ({splits})")


def cmd_pretrain(args: argparse.Namespace) -> None:
    from medvlp.training.config import load_pretrain_config

    config = load_pretrain_config(config_path(args.config), args.overrides)
    from medvlp.training.pretrain import pretrain

    run_dir = pretrain(config, resume=args.resume)
    print(f"run folder: {run_dir} (checkpoints/, logs/, pictures/, config.yaml)")


def cmd_export(args: argparse.Namespace) -> None:
    need_folder(args.run_dir, "RUN")
    if args.out.exists() and not args.out.is_dir():
        raise MedvlpError(f"--out {args.out} is a file; give a new folder for vision/, text/ and tokenizer/")
    from medvlp.jobs.export import export_encoders

    paths = export_encoders(args.run_dir, args.out)
    print(f"encoders and tokenizer of {args.run_dir} in {args.out}; start a run from them with "
          f"model.vision.pretrained={paths['vision']} model.text.pretrained={paths['text']} "
          f"data.tokenizer={paths['tokenizer']}")


def cmd_demo(args: argparse.Namespace) -> None:
    """Synthesise -> pre-train -> fine-tune every task, pre-trained and from scratch -> report; rerunnable."""
    from medvlp.jobs.demo import plan_demo, run_demo

    name = args.config or Path("mpma-tiny")
    demo = plan_demo(args.out, config_path(name), args.overrides, label=str(name))
    run_dir, report = run_demo(demo, fresh=args.fresh, say=lambda line: print(line, flush=True))
    print(report.read_text())
    print(f"pre-training run: {run_dir}\nreport: {report} (and report.json, curves.png beside it)")


def cmd_finetune(args: argparse.Namespace) -> None:
    import json

    from medvlp.training.config import load_finetune_config

    flags = [f"{key}={value}" for key, value in (("task", args.task), ("data", args.data), ("init", args.init))
             if value is not None]
    config = load_finetune_config(config_path(args.config), [*flags, *args.overrides])
    for flag in ("init", "data"):
        if getattr(config, flag) is not None and not Path(getattr(config, flag)).exists():
            raise MedvlpError(f"--{flag} {getattr(config, flag)}: no such folder")
    from medvlp.training.finetune import finetune

    run_dir = finetune(config, resume=args.resume)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    print_metrics(metrics, f"{config.task}, best validation step {metrics['best_step']}")
    print(f"run folder: {run_dir} (model.safetensors, config.yaml, tokenizer/, metrics.json, logs/)")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from medvlp.training.config import RetrievalConfig

    keys = [text.partition("=")[0].strip() for text in args.overrides]
    other = next((key for key in keys if not key.startswith("retrieval.")), None)
    if other is not None:
        raise MedvlpError(f"evaluate takes retrieval.* settings only (e.g. retrieval.eval_mode=exhaustive), "
                          f"not {other}")
    retrieval = load_config(RetrievalConfig, None, [text.removeprefix("retrieval.") for text in args.overrides])
    need_folder(args.run_dir, "RUN")
    overrides = {key: getattr(retrieval, key) for key in (k.removeprefix("retrieval.") for k in keys)}
    from medvlp.training.finetune import evaluate_run

    print_metrics(evaluate_run(args.run_dir, args.data, args.split, overrides), str(args.run_dir))


def print_metrics(metrics: dict, title: str) -> None:
    split = metrics["split"]
    values = ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics[split].items())
    print(f"{title}: {split} ({metrics['rows']:,} rows): {values}")


def cmd_predict(args: argparse.Namespace) -> None:
    check_predict_args(args)  # every argument, before torch and the model load
    from medvlp import predict

    model = predict.load(args.run_dir, window=args.window, frame=args.frame)
    if args.question is not None:
        results = model.answer(args.image, args.question, k=args.top)
    elif args.text is not None:
        results = model.classify(args.image, args.text, k=args.top)
    else:
        ranking = model.rank(predict.images_in(args.images), args.query, rerank=args.rerank)
        print(f"scores: {ranking.score}")
        results = [(str(path), score) for path, score in ranking[:args.top]]
        for path, reason in ranking.skipped:
            print(f"medvlp predict: skipped {reason}", file=sys.stderr)
    for name, score in results:
        print(f"{score:8.4f}  {name}")


def cmd_serve(args: argparse.Namespace) -> None:
    from medvlp.serve import serve

    serve(args.run_dir, host=args.host, port=args.port, workers=args.workers, overrides=args.overrides,
          gallery=args.gallery)


def cmd_explain(args: argparse.Namespace) -> None:
    from medvlp import predict

    text = args.question if args.question is not None else args.text
    if text is None:
        raise MedvlpError("give the question with --question TEXT (VQA) or the text with --text TEXT (classification)")
    if args.image is None:
        raise MedvlpError("give the image with --image FILE")
    need_file(args.image, "--image")
    if args.out.suffix.lower() != ".png":
        raise MedvlpError(f"--out {args.out}: the heat-map is written as PNG; name a .png file")
    if args.out.exists():
        raise MedvlpError(f"--out {args.out} exists; medvlp does not overwrite it: name a new file")
    need_folder(args.run_dir, "RUN")
    from medvlp.explain import decode, explain, overlay

    model = predict.load(args.run_dir, window=args.window, frame=args.frame)
    image = decode(model, args.image)
    result = explain(model, image, text, method=args.method, target=args.answer, k=args.top)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    overlay(image, result.heatmap()).save(args.out)
    for name, score in result.scores:
        print(f"{score:8.4f}  {name}")
    x, y = result.hottest()
    print(f"heat-map ({result.method}) of {result.target!r} in {args.out}; hottest at x={x:.0f}, y={y:.0f}")


def cmd_convert(args: argparse.Namespace) -> None:
    from medvlp.convert import convert_m3ae

    run = convert_m3ae(args.checkpoint, args.out, task=args.task, data=args.data, tokenizer=args.tokenizer,
                       reference_config=args.reference_config, text_config=args.text_config,
                       image_size=args.image_size, label_field=args.label_field)
    kind = "pre-training run (use it as --init)" if (run / "checkpoints").is_dir() else "fine-tuned run"
    print(f"run folder: {run} ({kind}; config.yaml, weights, converted.json)")


def check_predict_args(args: argparse.Namespace) -> None:
    """One line for a missing or contradictory argument of ``predict`` (no model is loaded yet)."""
    modes = [flag for flag in ("question", "text", "query") if getattr(args, flag) is not None]
    if not modes:
        raise MedvlpError("say what to predict: --question TEXT (VQA), --text TEXT (classification) or "
                          "--query TEXT with --images DIR (ranking)")
    if len(modes) > 1:
        raise MedvlpError(f"give one of --question, --text and --query, not {' and '.join('--' + m for m in modes)}")
    need_folder(args.run_dir, "RUN")
    if modes[0] == "query":
        if args.images is None:
            raise MedvlpError("--query ranks the images of a folder: give it with --images DIR")
        need_folder(args.images, "--images")
    elif args.image is None:
        raise MedvlpError(f"--{modes[0]} needs the image: give it with --image FILE")
    else:
        need_file(args.image, "--image")
    if args.top < 1 or (args.rerank is not None and args.rerank < 1):
        raise MedvlpError("--top and --rerank must be 1 or more")
    if args.window is not None:
        from medvlp.data.dicom import _window

        _window(args.window)


def _seeds(text: str) -> list[int]:
    try:
        return [int(seed) for seed in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give seeds as integers separated by commas, e.g. 0,1") from None


def cmd_benchmark(args: argparse.Namespace) -> None:
    from medvlp.jobs.benchmark import benchmark

    data = {}
    for item in args.data:
        task, _, folder = item.partition("=")
        if not folder:
            raise MedvlpError(f"--data {item}: write it as TASK=DIR, e.g. --data vqa=prepared/vqa_rad")
        data[task] = folder
    report = benchmark(args.init, args.out, tasks=args.tasks.split(","), data=data, seeds=args.seeds,
                       scratch=not args.no_scratch, overrides=args.overrides, fresh=args.fresh,
                       say=lambda line: print(line, flush=True))
    print(report.read_text())


def cmd_zeroshot(args: argparse.Namespace) -> None:
    need_folder(args.run_dir, "RUN")
    from medvlp.jobs.zero_shot import zero_shot

    print_retrieval(zero_shot(args.run_dir, args.data, args.split), f"zero-shot retrieval, split {args.split}")


def print_retrieval(metrics: dict[str, float], title: str) -> None:
    from medvlp.jobs.zero_shot import describe

    print("\n".join(describe(metrics, title)))


def need_file(path: Path, what: str) -> None:
    """One line for a file argument that names no file (checked before anything is loaded)."""
    if not path.is_file():
        raise MedvlpError(f"{what} {path}: no such file")


def need_folder(path: Path, what: str) -> None:
    """One line for a folder argument that names no folder (checked before anything is loaded)."""
    if not path.is_dir():
        raise MedvlpError(f"{path}: no such run folder" if what == "RUN" else f"{what} {path}: no such folder")


def config_path(name: Path | None) -> Path | None:
    """A config file, or the name of one shipped with medvlp (``m3ae-tiny``, ``mpma-base``, ...)."""
    if name is None or name.exists() or name.suffix:
        return name
    shipped = Path(__file__).parent / "configs" / f"{name}.yaml"
    return shipped if shipped.exists() else name


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medvlp", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"medvlp {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("datasets", help="list the datasets medvlp can prepare")
    p.set_defaults(run=cmd_datasets)

    p = sub.add_parser("prepare", help="turn a raw dataset into the record format")
    p.add_argument("name", help="dataset name (see `medvlp datasets`)")
    p.add_argument("--raw", type=Path, required=True, help="the dataset's folder as its publisher ships it")
    p.add_argument("--out", type=Path, required=True, help="where to write the prepared dataset (a prepared "
                                                           "dataset there is replaced)")
    p.add_argument("--force", action="store_true", help="replace --out even when it holds other files")
    _config_args(p, "val_fraction=0.1 or max_short_side=512")
    p.set_defaults(run=cmd_prepare)

    p = sub.add_parser("synth", help="write the built-in synthetic radiology corpus")
    p.add_argument("--out", type=Path, required=True, help="folder for the four prepared datasets")
    _config_args(p, "image_size=64 or vqa_train=500")
    p.set_defaults(run=cmd_synth)

    p = sub.add_parser("pretrain", help="pre-train a model (M3AE or MPMA) on image-caption pairs")
    _config_args(p, "model_size=base or trainer.max_steps=1000")
    p.add_argument("--resume", action="store_true", help="continue the run in run_dir from its last checkpoint")
    p.set_defaults(run=cmd_pretrain)

    p = sub.add_parser("zeroshot", help="image-text retrieval from a pre-trained run's global embeddings alone")
    p.add_argument("run_dir", metavar="RUN", type=Path, help="a pre-training run folder (or a checkpoints/step-*)")
    p.add_argument("--data", type=Path, help="prepared retrieval pairs (default: the run's synthetic test pairs)")
    p.add_argument("--split", default="test")
    p.set_defaults(run=cmd_zeroshot)

    p = sub.add_parser("export", help="save a pre-trained run's encoders and tokenizer as Hugging Face folders")
    p.add_argument("run_dir", metavar="RUN", type=Path, help="a pre-training run folder (or a checkpoints/step-*)")
    p.add_argument("--out", type=Path, required=True, help="folder for vision/, text/ and tokenizer/")
    p.set_defaults(run=cmd_export)

    p = sub.add_parser("finetune", help="fine-tune on Med-VQA, classification or retrieval")
    p.add_argument("--task", choices=("vqa", "classification", "retrieval"), help="the downstream task")
    p.add_argument("--data", help="a prepared dataset of the task (default: the synthetic corpus's)")
    p.add_argument("--init", help="a pre-training run to start from (default: from scratch)")
    p.add_argument("--resume", action="store_true", help="continue a stopped run in run_dir from its last checkpoint")
    _config_args(p, "val_fraction=0.1 or trainer.max_steps=1000")
    p.set_defaults(run=cmd_finetune)

    p = sub.add_parser("evaluate", help="evaluate a fine-tuned run on a split")
    p.add_argument("run_dir", metavar="RUN", type=Path,
                   help="a folder written by `medvlp finetune` or `medvlp convert`")
    p.add_argument("--data", type=Path, help="another prepared dataset of the same task and classes")
    p.add_argument("--split", help="the split to evaluate (default: test)")
    p.set_defaults(run=cmd_evaluate, overrides=[])
    p.epilog = "Retrieval evaluation settings can be overridden, e.g. retrieval.eval_mode=exhaustive."

    p = sub.add_parser("predict", help="answer, classify or rank with a trained run")
    p.add_argument("run_dir", metavar="RUN", type=Path, help="a run folder: fine-tuned or converted (answers, "
                                                             "classifies, ranks) or pre-trained (ranks)")
    p.add_argument("--image", type=Path, help="the image (PNG, JPEG, DICOM, ...)")
    p.add_argument("--question", help="a question about the image (a VQA run)")
    p.add_argument("--text", help="the text paired with the image (a classification run)")
    p.add_argument("--query", help="a text to rank the images of --images by")
    p.add_argument("--images", type=Path, help="a folder of images to rank")
    p.add_argument("--top", type=int, default=5, help="how many results to print (default 5)")
    p.add_argument("--rerank", type=int, metavar="K", help="ranking with a pre-trained run: re-rank the K best by "
                                                           "embedding similarity with the ITM head")
    p.add_argument("--window", help="DICOM display window: a preset (lung, bone, brain, ...), minmax or "
                                    "CENTER,WIDTH (default: the file's own)")
    p.add_argument("--frame", type=int, help="DICOM frame of a multi-frame file (default: the middle one)")
    p.set_defaults(run=cmd_predict)

    p = sub.add_parser("explain", help="a heat-map of where a fine-tuned run looked to answer (PNG)")
    p.add_argument("run_dir", metavar="RUN", type=Path, help="a VQA or classification run of `medvlp finetune`")
    p.add_argument("--image", type=Path, help="the image (PNG, JPEG, DICOM, ...)")
    p.add_argument("--question", help="a question about the image (a VQA run)")
    p.add_argument("--text", help="the text paired with the image (a classification run)")
    p.add_argument("--out", type=Path, required=True, help="the PNG to write: the image with the heat-map over it")
    p.add_argument("--method", choices=("rollout", "gradient"), default="rollout",
                   help="co-attention rollout (default) or gradient x attention")
    p.add_argument("--answer", help="the answer to explain (default: the top one)")
    p.add_argument("--top", type=int, default=5, help="how many answers to print (default 5)")
    p.add_argument("--window", help="DICOM display window: a preset, minmax or CENTER,WIDTH")
    p.add_argument("--frame", type=int, help="DICOM frame of a multi-frame file (default: the middle one)")
    p.set_defaults(run=cmd_explain)

    p = sub.add_parser("serve", help="serve a run over HTTP: JSON API, OpenAPI page and a web page")
    p.add_argument("run_dir", metavar="RUN", type=Path, help="a fine-tuned run (or a pre-training run: rank, embed)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--workers", type=int, default=1, help="server processes, each with its own model (default 1)")
    p.add_argument("--gallery", type=Path, help="a folder of images the page and /v1/rank rank for a text")
    p.set_defaults(run=cmd_serve, overrides=[])
    p.epilog = ("Limits and batching are key=value options, e.g. max_upload_mb=16 max_batch=16 max_wait_ms=5 "
                "request_timeout_s=30 precision=fp32 (see docs/serving.md).")

    p = sub.add_parser("convert", help="turn a published M3AE checkpoint into a medvlp run folder")
    p.add_argument("source", choices=("m3ae",), help="whose checkpoint it is (the reference M3AE code's)")
    p.add_argument("checkpoint", type=Path, help="a Lightning .ckpt, a state-dict .pt/.bin or a .safetensors file")
    p.add_argument("--out", type=Path, required=True, help="the run folder to write (new or empty)")
    p.add_argument("--task", choices=("pretrain", "vqa", "classification", "retrieval"),
                   help="what the checkpoint was trained for (default: read from its heads)")
    p.add_argument("--data", type=Path, help="the prepared dataset it was fine-tuned on (VQA: the answers in the "
                                             "reference's label order; classification: the labels)")
    p.add_argument("--tokenizer", help="tokenizer folder or hub id (default FacebookAI/roberta-base)")
    p.add_argument("--reference-config", type=Path, help="JSON/YAML of the reference's config values (num_heads, "
                                                         "mim_decoder_num_heads, image_size, ...); default: the "
                                                         "checkpoint's hyper_parameters, else the run scripts'")
    p.add_argument("--text-config", type=Path, help="the RoBERTa config.json (or its folder), for its head count")
    p.add_argument("--image-size", type=int, help="run at this image size (position table interpolated)")
    p.add_argument("--label-field", help="classification: the record field of the labels (e.g. p_meth_label)")
    p.set_defaults(run=cmd_convert)
    p.epilog = ("Example: medvlp convert m3ae m3ae_vqa_rad.ckpt --out runs/m3ae-vqa-rad --data data/vqa-rad; "
                "then medvlp evaluate runs/m3ae-vqa-rad")

    p = sub.add_parser("benchmark", help="fine-tune and evaluate every task, pre-trained and from scratch; "
                                         "write one report")
    p.add_argument("--init", help="the pre-training run to benchmark (default: only from scratch)")
    p.add_argument("--out", type=Path, default=Path("runs/benchmark"), help="folder for the runs and the report")
    p.add_argument("--tasks", default="vqa,classification,retrieval", help="comma-separated tasks")
    p.add_argument("--data", action="append", default=[], metavar="TASK=DIR",
                   help="a prepared dataset for a task (default: the synthetic corpus's); repeatable")
    p.add_argument("--seeds", type=_seeds, default=[0], help="comma-separated fine-tuning seeds (default 0)")
    p.add_argument("--no-scratch", action="store_true", help="skip the from-scratch baseline")
    p.add_argument("--fresh", action="store_true", help="first remove what an earlier benchmark wrote to --out "
                                                          "(default: reuse its finished runs)")
    p.set_defaults(run=cmd_benchmark, overrides=[])
    p.epilog = "Fine-tuning settings apply to every run as key=value, e.g. trainer.max_steps=1000."

    p = sub.add_parser("demo", help="the main job on the built-in synthetic corpus: no downloads, no GPU")
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="folder for everything it writes")
    p.add_argument("--fresh", action="store_true", help="first remove what an earlier demo wrote to --out "
                                                          "(default: reuse its corpus and finished stages)")
    _config_args(p, "trainer.max_steps=200")
    p.epilog = ("--config names the pre-training config (default mpma-tiny); key=value overrides it, e.g. "
                "trainer.max_steps=200, and finetune.key=value overrides every fine-tuning run, e.g. "
                "finetune.trainer.max_steps=400. Run it again to continue: a complete corpus and finished stages "
                "are reused, an interrupted one resumed; --fresh starts over.")
    p.set_defaults(run=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # DataLoader workers fork after tokenizing
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    unknown = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = extra
    try:
        args.run(args)
    except MedvlpError as e:
        print(f"medvlp {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"medvlp {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
