"""The built-in synthetic radiology corpus: the default data of medvlp, generated, deterministic for a seed.

No real pre-training corpus can be downloaded everywhere, so ``generate`` writes one in the record format of
real data (through the same ``write_prepared``): four prepared datasets, each with train/val/test splits.

==================  =========================================================  ===================
dataset             record                                                     plays the part of
==================  =========================================================  ===================
``pretrain``        image + 1-2 captions                                       ROCO, MedICaT
``vqa``             image + question + answer (closed yes/no, or open)         VQA-RAD, SLAKE
``classification``  image + a short request note + a label                     MELINDA
``retrieval``       image + one caption that states every fact                 ROCO retrieval
==================  =========================================================  ===================

**Images.** Grey "scans" (stored at ``image_size``, 128 px by default) of three modalities and three body
regions (head, chest, abdomen). An X-ray is a frontal projection: dark outside the body, bright bones (skull,
ribs, clavicles, spine, pelvis), dark lungs and bowel gas, a little blur. CT and MRI are axial cross-sections
in a dark surrounding field with the scanner table beneath: CT shows bone white and fat dark grey; MRI
(T2-like) shows bone black and fat and fluid bright, under a smooth coil bias and Rician noise. Each image is
drawn from one of 32 anatomy variants (body build, bowel gas, size and tilt), shifted by a few pixels, with its
own exposure, tissue texture and noise.

**Findings.** 0-3 lesions inside the organ of the region (brain hemispheres, lungs, the liver or spleen side
of the abdomen), on the patient's left, right or both sides. All lesions of an image share a size (small,
medium, large), a brightness against the surrounding tissue (brighter, darker), a shape (round, oval) and a
margin (well-defined, ill-defined, i.e. a sharp or a blurred edge). Sides are the *patient's*: as radiology
displays images, the patient's left is on the image's right. Each lesion's position in its organ (upper/mid/
lower on an X-ray, anterior/mid/posterior on a cross-section) shows too.

**Captions** put these facts in varied words: several sentence patterns, synonyms for every fact ("lesion",
"mass", "nodule"; "hyperdense" on CT, "hyperintense" on MRI, "radiopaque" on an X-ray; "ill-defined",
"indistinct"), attributes as adjectives or as separate sentences, varied order, and now and then a fact left
out, so two images with the same facts rarely get the same caption. Retrieval captions always state every
fact, lesion positions included, which makes text-to-image retrieval well posed (in a test split of 1,000,
about 820 images have facts no other one shares).

**Questions** can be answered only from the image: the question never contains its answer, and the closed
questions are built so that "yes" and "no" are about equally frequent (a question about a modality names the
true one half of the time; "Is there a lesion?" alternates with "Is this scan normal?"; ...). Answers: yes/no,
x-ray/ct/mri, head/chest/abdomen, 0-3, left/right/both, small/medium/large, brighter/darker, round/oval,
well-defined/ill-defined.

**The classification label** is the finding pattern, one of ``LABELS``: "normal", "single lesion", "multiple
unilateral lesions", "bilateral lesions", a quarter each. The text is a referral note (age, sex, indication,
sometimes the requested study) that never states the finding, and its indication is only weakly tied to the
label (a staging request makes multiple lesions likelier, as in real referrals). So the label needs the image:
counting the lesions and seeing on which sides they are; the note adds a little.

Captions, questions and labels all speak of the same visible facts, so the corpus shows what pre-training is
for: a model pre-trained on the captions answers the questions (and classifies and retrieves) better after
fine-tuning than the same model trained from scratch. Downstream datasets have images of their own (other
random streams), as real downstream datasets are other images than the pre-training corpus.

Every image and its texts come from their own random stream ``np.random.default_rng([seed, family, split,
index])``, so the output is byte-identical for a seed whatever the number of worker processes, and differs for
another seed.
"""

from __future__ import annotations

from medvlp.data.synth_config import FAMILIES, QUESTION_KINDS, SPLITS, SynthConfig
from medvlp.data.synthetic.facts import (
    ASPECTS,
    BLUR,
    BRIGHTNESS,
    COUNT_PROBS,
    FACT_FIELDS,
    LABELS,
    MARGINS,
    MODALITIES,
    POSITIONS,
    RADIUS,
    REGIONS,
    SHAPES,
    SIDES,
    SIZES,
    ZONES,
    Facts,
    Lesion,
    pick,
    pick_weighted,
    sample_facts,
    view_of,
)
from medvlp.data.synthetic.language import (
    BOTH_SIDES,
    BRIGHTNESS_WORDS,
    CLOSED_KINDS,
    INDICATION_WEIGHTS,
    INDICATIONS,
    MARGIN_PREDICATES,
    MARGIN_WORDS,
    MODALITY_ASKED,
    MODALITY_NAMES,
    NEEDS_LESION,
    NORMAL,
    NORMAL_BY_REGION,
    NOUNS,
    NUMBERS,
    OPEN_QUESTIONS,
    ORGANS,
    PLURALS,
    REGION_ADJECTIVES,
    REGION_NOUNS,
    SHAPE_WORDS,
    SIZE_PREDICATES,
    SIZE_WORDS,
    SURROUNDINGS,
    SYMPTOMS,
    TWO_WAY,
    VIEWS,
    Question,
    caption,
    label_of,
    questions,
    request_note,
)
from medvlp.data.synthetic.painters import (
    ANATOMY,
    SHIFT,
    TISSUES,
    VARIANTS,
    Anatomy,
    Canvas,
    Scene,
    anatomy_template,
    frame,
    png,
    pose,
    render,
    sample_scene,
)
from medvlp.data.synthetic.writer import CHUNK, EXTRA_FIELDS, corpus_ready, ensure_corpus, generate, sample

__all__ = [
    "ANATOMY", "ASPECTS", "Anatomy", "BLUR", "BOTH_SIDES", "BRIGHTNESS", "BRIGHTNESS_WORDS", "CHUNK",
    "CLOSED_KINDS", "COUNT_PROBS", "Canvas", "EXTRA_FIELDS", "FACT_FIELDS", "FAMILIES", "Facts", "INDICATIONS",
    "INDICATION_WEIGHTS", "LABELS", "Lesion", "MARGINS", "MARGIN_PREDICATES", "MARGIN_WORDS", "MODALITIES",
    "MODALITY_ASKED", "MODALITY_NAMES", "NEEDS_LESION", "NORMAL", "NORMAL_BY_REGION", "NOUNS", "NUMBERS",
    "OPEN_QUESTIONS", "ORGANS", "PLURALS", "POSITIONS", "QUESTION_KINDS", "Question", "RADIUS", "REGIONS",
    "REGION_ADJECTIVES", "REGION_NOUNS", "SHAPES", "SHAPE_WORDS", "SHIFT", "SIDES", "SIZES", "SIZE_PREDICATES",
    "SIZE_WORDS", "SPLITS", "SURROUNDINGS", "SYMPTOMS", "Scene", "SynthConfig", "TISSUES", "TWO_WAY", "VARIANTS",
    "VIEWS", "ZONES", "anatomy_template", "caption", "corpus_ready", "ensure_corpus", "frame", "generate",
    "label_of", "pick", "pick_weighted", "png", "pose", "questions", "render", "request_note", "sample",
    "sample_facts", "sample_scene", "view_of",
]
