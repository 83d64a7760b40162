"""The ``medvlp`` command: one subcommand per stage, one YAML config per run, ``key=value`` overrides.

A user's mistake (bad data, bad config, missing path) ends the command with one line on stderr and status 2,
never a traceback.
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


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="YAML config file (defaults are used for what it leaves out)")
    parser.set_defaults(overrides=[])
    parser.epilog = "Any config value can be overridden as key=value, e.g. val_fraction=0.1 or model.size=base."


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
    from medvlp.data.synthetic import SynthConfig, generate

    config = load_config(SynthConfig, config_path(args.config), args.overrides)
    manifests = generate(args.out, config)
    for family, manifest in manifests.items():
        splits = ", ".join(f"{name} {entry['rows']:,}" for name, entry in manifest["splits"].items())
        print(f"{args.out / family}: {family} ({splits})")


def cmd_pretrain(args: argparse.Namespace) -> None:
    from medvlp.training.pretrain import load_pretrain_config, pretrain

    config = load_pretrain_config(config_path(args.config), args.overrides)
    run_dir = pretrain(config, resume=args.resume)
    print(f"run folder: {run_dir} (checkpoints/, logs/, pictures/, config.yaml)")


def cmd_export(args: argparse.Namespace) -> None:
    from medvlp.training.pretrain import export_encoders

    paths = export_encoders(args.run_dir, args.out)
    print(f"encoders and tokenizer of {args.run_dir} in {args.out}; start a run from them with "
          f"model.vision.pretrained={paths['vision']} model.text.pretrained={paths['text']} "
          f"data.tokenizer={paths['tokenizer']}")


def cmd_demo(args: argparse.Namespace) -> None:
    """Synthesise -> pre-train -> fine-tune every task, pre-trained and from scratch -> report."""
    import json

    from medvlp.evaluation.benchmark import benchmark
    from medvlp.training.pretrain import load_pretrain_config, pretrain, zero_shot

    pretrain_overrides = [o for o in args.overrides if not o.startswith("finetune.")]
    finetune_overrides = [o.removeprefix("finetune.") for o in args.overrides if o.startswith("finetune.")]
    overrides = [f"run_dir={args.out / 'pretrain'}", f"data.synthetic_dir={args.out / 'data'}", *pretrain_overrides]
    config = load_pretrain_config(config_path(args.config or Path("mpma-tiny")), overrides)
    print("[1/2] pre-training", flush=True)
    run_dir = pretrain(config)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    print("held-out (synthetic val): " + ", ".join(f"{k.removeprefix('val/')} {v:.3f}" for k, v in metrics.items()
                                                    if k.endswith(("_acc", "_loss")) and "/" in k))
    if config.tasks.itc:
        print_retrieval(zero_shot(run_dir), "zero-shot retrieval on the synthetic test pairs")
    print("[2/2] fine-tuning vqa, classification and retrieval, pre-trained and from scratch", flush=True)
    report = benchmark(str(run_dir), args.out / "benchmark", overrides=[
        f"synthetic_dir={args.out / 'data'}", *DEMO_FINETUNE,
        *finetune_overrides])
    print(report.read_text())
    print(f"pre-training run: {run_dir}\nreport: {report} (and report.json, curves.png beside it)")


# Fine-tuning in the demo, short enough for the six runs to fit the demo's 15 minutes on 2 CPU cores: retrieval
# fuses every negative pair, so it runs fewer steps, one hard negative each way and re-ranks 8 candidates.
DEMO_FINETUNE = ["trainer.max_steps=120", "trainer.val_every=60", "retrieval:trainer.max_steps=60",
                 "retrieval:retrieval.negatives=1", "retrieval:retrieval.rerank_k=8"]


def cmd_finetune(args: argparse.Namespace) -> None:
    import json

    from medvlp.training.finetune import finetune, load_finetune_config

    flags = [f"{key}={value}" for key, value in (("task", args.task), ("data", args.data), ("init", args.init))
             if value is not None]
    config = load_finetune_config(config_path(args.config), [*flags, *args.overrides])
    run_dir = finetune(config, resume=args.resume)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    print_metrics(metrics, f"{config.task}, best validation step {metrics['best_step']}")
    print(f"run folder: {run_dir} (model.safetensors, config.yaml, tokenizer/, metrics.json, logs/)")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from medvlp.config import parse_override
    from medvlp.training.finetune import evaluate_run

    overrides: dict = {}
    for text in args.overrides:
        key, value = next(iter(parse_override(text).items()))
        if not key.startswith("retrieval."):
            raise MedvlpError(f"evaluate takes retrieval.* settings only (e.g. retrieval.eval_mode=exhaustive), "
                              f"not {key}")
        overrides[key.removeprefix("retrieval.")] = value
    print_metrics(evaluate_run(args.run_dir, args.data, args.split, overrides), str(args.run_dir))


def print_metrics(metrics: dict, title: str) -> None:
    split = metrics["split"]
    values = ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics[split].items())
    print(f"{title}: {split} ({metrics['rows']:,} rows): {values}")


def cmd_predict(args: argparse.Namespace) -> None:
    from medvlp import predict

    model = predict.load(args.run_dir, window=args.window, frame=args.frame)
    if args.question is not None:
        results = model.answer(_one_image(args), args.question, k=args.top)
    elif args.text is not None:
        results = model.classify(_one_image(args), args.text, k=args.top)
    elif args.query is not None:
        if args.images is None:
            raise MedvlpError("--query ranks the images of a folder: give it with --images DIR")
        results = [(str(path), score) for path, score in
                   model.rank(predict.images_in(args.images), args.query)[:args.top]]
    else:
        raise MedvlpError("say what to predict: --question TEXT (VQA), --text TEXT (classification) or "
                          "--query TEXT with --images DIR (ranking)")
    for name, score in results:
        print(f"{score:8.4f}  {name}")


def _seeds(text: str) -> list[int]:
    try:
        return [int(seed) for seed in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give seeds as integers separated by commas, e.g. 0,1") from None


def _one_image(args: argparse.Namespace) -> Path:
    if args.image is None:
        raise MedvlpError("give the image with --image FILE")
    return args.image


def cmd_benchmark(args: argparse.Namespace) -> None:
    from medvlp.evaluation.benchmark import benchmark

    data = {}
    for item in args.data:
        task, _, folder = item.partition("=")
        if not folder:
            raise MedvlpError(f"--data {item}: write it as TASK=DIR, e.g. --data vqa=prepared/vqa_rad")
        data[task] = folder
    report = benchmark(args.init, args.out, tasks=args.tasks.split(","), data=data, seeds=args.seeds,
                       scratch=not args.no_scratch, overrides=args.overrides)
    print(report.read_text())


def cmd_zeroshot(args: argparse.Namespace) -> None:
    from medvlp.training.pretrain import zero_shot

    print_retrieval(zero_shot(args.run_dir, args.data, args.split), f"zero-shot retrieval, split {args.split}")


def print_retrieval(metrics: dict[str, float], title: str) -> None:
    pairs = metrics["pairs"]
    print(f"{title} ({pairs:,} pairs; chance R@1 {100 / pairs:.2f}%):")
    for prefix, direction in (("i2t_r", "image-to-text"), ("t2i_r", "text-to-image")):
        ranks = ", ".join(f"R@{k.removeprefix(prefix)} {v:.1f}%" for k, v in metrics.items() if k.startswith(prefix))
        print(f"  {direction}: {ranks}")


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
    _config_args(p)
    p.set_defaults(run=cmd_prepare)

    p = sub.add_parser("synth", help="write the built-in synthetic radiology corpus")
    p.add_argument("--out", type=Path, required=True, help="folder for the four prepared datasets")
    _config_args(p)
    p.set_defaults(run=cmd_synth)

    p = sub.add_parser("pretrain", help="pre-train a model (M3AE or MPMA) on image-caption pairs")
    _config_args(p)
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
    _config_args(p)
    p.set_defaults(run=cmd_finetune)

    p = sub.add_parser("evaluate", help="evaluate a fine-tuned run on a split")
    p.add_argument("run_dir", metavar="RUN", type=Path, help="a folder written by `medvlp finetune`")
    p.add_argument("--data", type=Path, help="another prepared dataset of the same task and classes")
    p.add_argument("--split", help="the split to evaluate (default: test)")
    p.set_defaults(run=cmd_evaluate, overrides=[])
    p.epilog = "Retrieval evaluation settings can be overridden, e.g. retrieval.eval_mode=exhaustive."

    p = sub.add_parser("predict", help="answer, classify or rank with a fine-tuned run")
    p.add_argument("run_dir", metavar="RUN", type=Path, help="a folder written by `medvlp finetune`")
    p.add_argument("--image", type=Path, help="the image (PNG, JPEG, DICOM, ...)")
    p.add_argument("--question", help="a question about the image (a VQA run)")
    p.add_argument("--text", help="the text paired with the image (a classification run)")
    p.add_argument("--query", help="a text to rank the images of --images by")
    p.add_argument("--images", type=Path, help="a folder of images to rank")
    p.add_argument("--top", type=int, default=5, help="how many results to print (default 5)")
    p.add_argument("--window", help="DICOM display window: a preset (lung, bone, brain, ...), minmax or "
                                    "CENTER,WIDTH (default: the file's own)")
    p.add_argument("--frame", type=int, help="DICOM frame of a multi-frame file (default: the middle one)")
    p.set_defaults(run=cmd_predict)

    p = sub.add_parser("benchmark", help="fine-tune and evaluate every task, pre-trained and from scratch; "
                                         "write one report")
    p.add_argument("--init", help="the pre-training run to benchmark (default: only from scratch)")
    p.add_argument("--out", type=Path, default=Path("runs/benchmark"), help="folder for the runs and the report")
    p.add_argument("--tasks", default="vqa,classification,retrieval", help="comma-separated tasks")
    p.add_argument("--data", action="append", default=[], metavar="TASK=DIR",
                   help="a prepared dataset for a task (default: the synthetic corpus's); repeatable")
    p.add_argument("--seeds", type=_seeds, default=[0], help="comma-separated fine-tuning seeds (default 0)")
    p.add_argument("--no-scratch", action="store_true", help="skip the from-scratch baseline")
    p.set_defaults(run=cmd_benchmark, overrides=[])
    p.epilog = "Fine-tuning settings apply to every run as key=value, e.g. trainer.max_steps=1000."

    p = sub.add_parser("demo", help="the main job on the built-in synthetic corpus: no downloads, no GPU")
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="folder for everything it writes")
    _config_args(p)
    p.epilog = ("--config names the pre-training config (default mpma-tiny); key=value overrides it, and "
                "finetune.key=value overrides every fine-tuning run, e.g. finetune.trainer.max_steps=400.")
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
