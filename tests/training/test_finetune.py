"""Fine-tuning end to end on a small synthetic corpus: each task from a pre-training run and from scratch,
model selection, evaluation, prediction (DICOM included), and the refusals."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import benchmark_script

from medvlp import predict
from medvlp.cli import main
from medvlp.data.splits import holdout_images
from medvlp.errors import ConfigError, DataError, MedvlpError
from medvlp.training.checkpoint import load_weights
from medvlp.training.finetune import (
    FinetuneConfig,
    evaluate_run,
    finetune,
    load_finetune_config,
)
from medvlp.training.pretrain import load_pretrain_config, pretrain
from medvlp.training.runs import open_run

SMALL = [f"{family}_{split}={n}" for family in ("pretrain", "vqa", "classification", "retrieval")
         for split, n in (("train", 48), ("val", 12), ("test", 10))]


def pretrain_settings(root, name, *extra):
    """A 4-step MPMA pre-training on the small corpus under ``root``."""
    return load_pretrain_config("src/medvlp/configs/mpma-tiny.yaml", [
        f"run_dir={root / name}", f"data.synthetic_dir={root / 'data'}", "data.batch_size=8",
        "data.num_workers=0", "trainer.max_steps=4", "trainer.val_every=4", "trainer.val_batches=1",
        "trainer.pictures=0", "trainer.progress_bar=false", "data.vocab_size=400", "data.synthetic.workers=1",
        *[f"data.synthetic.{s}" for s in SMALL], *extra])


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A 4-step MPMA pre-training run on the small corpus (shared by the tests of this module)."""
    return pretrain(pretrain_settings(tmp_path_factory.mktemp("finetune"), "pretrain"))


def settings(pretrained, name, task, *extra):
    root = pretrained.parent
    return load_finetune_config(None, [
        f"task={task}", f"run_dir={root / name}", f"synthetic_dir={root / 'data'}", "batch_size=8",
        "num_workers=0", "trainer.max_steps=4", "trainer.val_every=2", "trainer.progress_bar=false",
        *[f"synthetic.{s}" for s in SMALL], *extra])


@pytest.mark.parametrize("task, selection", [("vqa", "overall_acc"), ("classification", "accuracy"),
                                             ("retrieval", "mean_recall")])
def test_each_task_fine_tunes_from_the_pretraining_run(pretrained, task, selection):
    run = finetune(settings(pretrained, f"{task}-pre", task, f"init={pretrained}"))
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["split"] == "test" and metrics["best_step"] in (2, 4)
    assert [h["step"] for h in metrics["val_history"]] == [2, 4]
    assert metrics["val"][selection] == max(h[selection] for h in metrics["val_history"])
    opened = open_run(run, "fine-tuned")
    config, model = opened.config, opened.model
    assert config.init == str(pretrained) and model.cfg.image_size == 80
    assert model.vision.model.embeddings.position_embedding.weight.shape[0] == 1 + 5 * 5  # resized once
    # the pre-trained encoders were the starting point: their weights moved only a little
    start = load_weights(next((pretrained / "checkpoints").glob("step-*")) / "model.safetensors")
    moved = (model.text.model.embeddings.word_embeddings.weight
             - start["model.text.model.embeddings.word_embeddings.weight"]).abs().max()
    assert 0 < moved < 0.05
    # evaluating again gives the test figures the run wrote
    again = evaluate_run(run)
    assert again["test"] == pytest.approx(metrics["test"])


def test_select_on_test_reproduces_the_reference_protocol(pretrained):
    """select_on=test picks the checkpoint on the test split (M3AE on VQA-RAD): the best validation figures are
    the test figures of the chosen weights."""
    run = finetune(settings(pretrained, "vqa-select-test", "vqa", f"init={pretrained}", "select_on=test"))
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["split"] == "test"
    assert metrics["val"]["overall_acc"] == pytest.approx(metrics["test"]["overall_acc"])
    assert metrics["val"]["open_n"] + metrics["val"]["closed_n"] == metrics["rows"]


def test_best_checkpoint_is_the_best_validation_step(pretrained, monkeypatch):
    from medvlp.training import downstream

    scores = iter([10.0, 5.0])  # validation at step 2 beats step 4

    def fake(model, loader, dataset, cfg):
        return {"overall_acc": next(scores, 0.0), "open_acc": 0.0, "closed_acc": 0.0}

    monkeypatch.setitem(downstream.TASKS, "vqa", downstream.TASKS["vqa"].__class__(
        "vqa", "vqa", "answer_vocab", "overall_acc", downstream.vqa_step, fake))
    run = finetune(settings(pretrained, "selection", "vqa", f"init={pretrained}"))
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["best_step"] == 2 and metrics["val"]["overall_acc"] == 10.0


def test_scratch_run_trains_its_own_tokenizer(pretrained):
    run = finetune(settings(pretrained, "scratch", "classification"))
    opened = open_run(run, "fine-tuned")
    config, model = opened.config, opened.model
    assert config.init is None and (run / "tokenizer" / "tokenizer.json").is_file()
    assert config.classes == ["bilateral lesions", "multiple unilateral lesions", "normal", "single lesion"]
    assert model.classifier.num_classes == 4


def test_holdout_keeps_every_question_of_an_image_together():
    images = [0, 0, 1, 1, 1, 2, 3, 3, 4, 5]
    train, held = holdout_images(images, 0.34, seed=0)
    assert sorted(train + held) == list(range(10))
    assert not {images[r] for r in train} & {images[r] for r in held}
    assert len({images[r] for r in held}) == 2


def test_a_subset_of_rows_names_the_images_of_its_own_rows(pretrained):
    from medvlp.data.loader import FamilyDataset
    from medvlp.data.splits import Rows

    dataset = FamilyDataset(pretrained.parent / "data" / "vqa", "train", 64, train=False)
    rows = Rows(dataset, [7, 0, 12])
    assert rows.image_ids() == [dataset.image_ids()[r] for r in (7, 0, 12)]
    assert len(dataset.image_ids()) == len(dataset) and len(set(dataset.image_ids())) < len(dataset)


def test_a_head_for_other_classes_is_refused(pretrained, tmp_path):
    run = finetune(settings(pretrained, "cls-refuse", "classification", f"init={pretrained}"))
    other = tmp_path / "other"
    shutil.copytree(pretrained.parent / "data" / "classification", other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["labels"] = manifest["labels"][:3]
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(MedvlpError, match="fine-tuned on 4 classes but .* has 3"):
        evaluate_run(run, data=other)
    with pytest.raises(MedvlpError, match="fine-tuned for classification, not vqa"):
        finetune(settings(pretrained, "vqa-from-cls", "vqa", f"init={run}"))


def test_wrong_family_and_bad_values_give_one_line(pretrained):
    data = pretrained.parent / "data" / "retrieval"
    with pytest.raises(DataError, match="holds retrieval data; task vqa needs vqa data"):
        finetune(settings(pretrained, "wrong", "vqa", f"data={data}"))
    with pytest.raises(MedvlpError, match="unknown task 'caption'"):
        finetune(settings(pretrained, "bad", "caption"))
    with pytest.raises(ConfigError, match="retrieval.negatives=8 needs a batch_size above it"):
        finetune(settings(pretrained, "bad", "retrieval", "retrieval.negatives=8"))
    with pytest.raises(ConfigError, match="image_size=90 is not a multiple"):
        finetune(settings(pretrained, "bad2", "vqa", "image_size=90", f"init={pretrained}"))


def test_predict_answers_classifies_ranks_and_reads_dicom(pretrained, tmp_path, capsys):
    pydicom = pytest.importorskip("pydicom")
    vqa = finetune(settings(pretrained, "vqa-predict", "vqa", f"init={pretrained}"))
    model = predict.load(vqa)
    image = tmp_path / "scan.png"
    from PIL import Image

    Image.fromarray((torch.rand(96, 96) * 255).byte().numpy()).save(image)
    answers = model.answer(image, "Is there a lesion?", k=3)
    assert len(answers) == 3 and all(a in model.classes for a, _ in answers)
    assert answers[0][1] >= answers[1][1] >= answers[2][1]
    with pytest.raises(MedvlpError, match="fine-tuned for vqa; it cannot classify"):
        model.classify(image, "a note")
    ranked = model.rank([image, image.read_bytes()], "a round lesion")
    assert len(ranked) == 2 and ranked[0][1] >= ranked[1][1]
    for name in ("CT_small.dcm", "MR_small.dcm"):  # real CT and MR files shipped with pydicom
        path = pydicom.data.get_testdata_file(name)
        assert main(["predict", str(vqa), "--image", path, "--question", "What modality is this?",
                     "--top", "2"]) == 0
        lines = capsys.readouterr().out.strip().splitlines()
        assert len(lines) == 2 and lines[0].split()[1] in model.classes
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    assert main(["predict", str(vqa), "--image", str(broken), "--question", "Is it?"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "broken.png: cannot read the image" in error


def test_config_defaults_are_checked():
    FinetuneConfig().validate()
    with pytest.raises(ConfigError, match="crop_scale"):
        load_finetune_config(None, ["crop_scale=[0.9,0.1]"]).validate()


def test_retrieval_benchmark_two_stage_equals_exhaustive_when_k_covers_every_candidate(pretrained, monkeypatch,
                                                                                      capsys):
    run = finetune(settings(pretrained, "retrieval-bench", "retrieval", f"init={pretrained}"))
    monkeypatch.setattr("sys.argv", ["retrieval.py", str(run), "--pairs", "10", "--k", "10", "--batch-size", "7"])
    benchmark_script("retrieval").main()
    lines = capsys.readouterr().out.splitlines()
    assert "10 texts, 10 images" in lines[0]
    two_stage, exhaustive = lines[2], lines[4]  # the R@k line under each mode's timing line
    assert lines[1].split(":")[0].strip() == "two-stage" and lines[3].split(":")[0].strip() == "exhaustive"
    assert two_stage == exhaustive and "i2t_r10 100.0" in two_stage  # every candidate re-ranked: same ranking
    assert "fusion passes 100" in lines[3] and "faster than exhaustive" in lines[5]


def test_bf16_mixed_runs_pretraining_and_fine_tuning_with_clipping(pretrained):
    """Lightning refuses to clip the gradients of a fused AdamW under mixed precision (it stopped every bf16 run
    at its first step): pre-training and fine-tuning both run with optim.grad_clip on."""
    config = pretrain_settings(pretrained.parent, "pretrain-bf16", "trainer.max_steps=2", "trainer.val_every=2",
                               "trainer.precision=bf16-mixed")
    assert config.optim.grad_clip > 0
    assert json.loads((pretrain(config) / "metrics.json").read_text())["step"] == 2
    run = finetune(settings(pretrained, "bf16-cls", "classification", f"init={pretrained}",
                            "trainer.precision=bf16-mixed", "trainer.max_steps=2", "trainer.val_every=2"))
    assert json.loads((run / "metrics.json").read_text())["best_step"] == 2
