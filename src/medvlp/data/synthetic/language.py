"""The texts of a scan, made from its facts: captions, questions with their answers, and the classification
label with its referral note."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from medvlp.data.synth_config import QUESTION_KINDS
from medvlp.data.synthetic.facts import BRIGHTNESS, MODALITIES, POSITIONS, REGIONS, SIZES, Facts, pick, pick_weighted

MODALITY_NAMES = {"xray": ("X-ray", "radiograph", "plain radiograph", "plain film"),
                  "ct": ("CT", "CT scan", "CT image", "computed tomography image"),
                  "mri": ("MRI", "MR image", "MRI scan", "magnetic resonance image")}
VIEWS = {"xray": ("frontal", "AP", "PA"), "ct": ("axial", "transverse", "non-contrast"),
         "mri": ("axial", "T2-weighted", "axial T2-weighted")}
REGION_NOUNS = {"head": ("head", "brain"), "chest": ("chest", "thorax"), "abdomen": ("abdomen",)}
REGION_ADJECTIVES = {"head": ("head", "cranial", "brain"), "chest": ("chest", "thoracic"),
                     "abdomen": ("abdominal", "abdomen")}
ORGANS = {"head": ("hemisphere", "cerebral hemisphere"), "chest": ("lung", "hemithorax"),
          "abdomen": ("abdomen", "hemiabdomen")}
BOTH_SIDES = {"head": ("in both hemispheres", "bilaterally", "on both sides"),
              "chest": ("in both lungs", "bilaterally", "on both sides"),
              "abdomen": ("on both sides of the abdomen", "bilaterally", "on both sides")}
SURROUNDINGS = {"head": ("brain", "brain tissue"), "chest": ("lung", "lung tissue"),
                "abdomen": ("tissue", "parenchyma")}
NOUNS = {"head": ("lesion", "mass", "focus"), "chest": ("lesion", "mass", "nodule"),
         "abdomen": ("lesion", "mass", "nodule", "focus")}
PLURALS = {"lesion": "lesions", "mass": "masses", "nodule": "nodules", "focus": "foci", "opacity": "opacities"}
NUMBERS = {1: "one", 2: "two", 3: "three"}
SIZE_WORDS = {"small": ("small", "tiny"), "medium": ("medium-sized", "moderate-sized", "mid-sized"),
              "large": ("large", "big", "sizeable")}
SIZE_PREDICATES = {"small": ("small",), "medium": ("of medium size", "medium-sized"), "large": ("large",)}
BRIGHTNESS_WORDS = {
    ("xray", "brighter"): ("bright", "dense", "radiopaque"), ("xray", "darker"): ("dark", "lucent", "radiolucent"),
    ("ct", "brighter"): ("bright", "hyperdense", "high-attenuation"),
    ("ct", "darker"): ("dark", "hypodense", "low-attenuation"),
    ("mri", "brighter"): ("bright", "hyperintense", "high-signal"),
    ("mri", "darker"): ("dark", "hypointense", "low-signal"),
}
SHAPE_WORDS = {"round": ("round", "rounded", "circular"), "oval": ("oval", "ovoid", "elongated")}
MARGIN_WORDS = {"well-defined": ("well-defined", "well-circumscribed", "sharply marginated"),
                "ill-defined": ("ill-defined", "poorly defined", "indistinct")}
MARGIN_PREDICATES = {"well-defined": ("well defined", "sharply outlined"), "ill-defined": ("ill defined", "blurred")}
NORMAL = ("No focal lesion is seen.", "No lesion is identified.", "No focal abnormality.",
          "No mass or nodule is present.", "No abnormality is detected.")
NORMAL_BY_REGION = {"head": "The brain parenchyma is unremarkable.", "chest": "The lungs are clear.",
                    "abdomen": "The abdominal organs are unremarkable."}


def _a(words: str) -> str:
    """``words`` after the indefinite article they need ("an MRI", "an X-ray", "an 81-year-old", "a CT")."""
    vowel_sound = words[0].lower() in "aeiou" or words.startswith(("MR", "X-", "8", "18-"))
    return ("an " if vowel_sound else "a ") + words


def _join(words: Sequence[str]) -> str:
    """"a", "a and b", "a, b and c"."""
    return " and ".join(words) if len(words) < 3 else f"{', '.join(words[:-1])} and {words[-1]}"


def _capital(text: str) -> str:
    return text[:1].upper() + text[1:]


def _study(facts: Facts, rng: np.random.Generator) -> str:
    """What the image is, e.g. "axial CT of the abdomen", "PA chest radiograph"."""
    modality, view = pick(rng, MODALITY_NAMES[facts.modality]), pick(rng, VIEWS[facts.modality])
    skull = facts.region == "head" and facts.modality == "xray"
    noun = pick(rng, ("skull", "head") if skull else REGION_NOUNS[facts.region])
    adjective = pick(rng, REGION_ADJECTIVES[facts.region])
    return pick(rng, (f"{view} {modality} of the {noun}", f"{modality} of the {noun}", f"{adjective} {modality}",
                      f"{view} {adjective} {modality}"))


def _where(facts: Facts, rng: np.random.Generator, detailed: bool) -> str:
    """Where the lesions are: "in the left lung", "bilaterally", ...; ``detailed`` with each one's position:
    "in the upper and lower left lung", "one in the mid right lung and two in the upper and lower left lung"."""
    organ = pick(rng, ORGANS[facts.region])
    if not detailed:
        if facts.side == "both":
            return pick(rng, BOTH_SIDES[facts.region])
        return pick(rng, (f"in the {facts.side} {organ}", f"on the {facts.side}", f"on the {facts.side} side"))
    order = POSITIONS[facts.view]
    groups = []
    for side in ("right", "left") if rng.random() < 0.5 else ("left", "right"):
        here = [lesion for lesion in facts.lesions if lesion.side == side]
        if here:
            place = f"in the {_join(sorted({h.position for h in here}, key=order.index))} {side} {organ}"
            groups.append(f"{NUMBERS[len(here)]} {place}" if facts.side == "both" else place)
    return " and ".join(groups)


def _finding(facts: Facts, rng: np.random.Generator, complete: bool) -> tuple[str, str, list[str]]:
    """The lesions in random words: noun phrase ("two small hyperdense nodules"), location, and sentences
    for the attributes not in the noun phrase ("They are oval in shape."). Unless ``complete``, an attribute
    or the location is sometimes left out."""
    plural = facts.count > 1
    modes = ("phrase", "phrase", "predicate") if complete else ("phrase", "phrase", "phrase", "predicate", "omit")
    size_mode, margin_mode, shape_mode, bright_mode = (pick(rng, modes) for _ in range(4))
    opacity = ("opacity",) if facts.brightness == "brighter" and facts.modality != "mri" else ()
    noun = pick(rng, NOUNS[facts.region] + opacity)
    adjectives = [pick(rng, words) for mode, words in (
        (size_mode, SIZE_WORDS[facts.size]), (margin_mode, MARGIN_WORDS[facts.margin]),
        (shape_mode, SHAPE_WORDS[facts.shape]), (bright_mode, BRIGHTNESS_WORDS[(facts.modality, facts.brightness)]),
    ) if mode == "phrase"]
    words = " ".join([*adjectives, PLURALS[noun] if plural else noun])
    if plural:
        exact = complete or rng.random() < 0.75
        vague = ("multiple", "several") if facts.count == 3 else ("multiple",)
        phrase = f"{NUMBERS[facts.count] if exact else pick(rng, vague)} {words}"
    else:
        first = pick(rng, ("a", "a single", "one", "a solitary"))
        phrase = _a(words) if first == "a" else f"{first} {words}"
    where = "" if not complete and rng.random() < 0.08 else _where(facts, rng, complete or rng.random() < 0.3)
    subject = pick(rng, ("They are", "The lesions are") if plural else ("It is", "The lesion is"))
    sentences = []
    if size_mode == "predicate":
        sentences.append(f"{subject} {pick(rng, SIZE_PREDICATES[facts.size])}.")
    if margin_mode == "predicate":
        sentences.append(f"{'Their' if plural else 'Its'} margins are {pick(rng, MARGIN_PREDICATES[facts.margin])}.")
    if shape_mode == "predicate":
        sentences.append(f"{subject} {pick(rng, SHAPE_WORDS[facts.shape])} in shape.")
    if bright_mode == "predicate":
        sentences.append(f"{subject} {facts.brightness} than the surrounding {pick(rng, SURROUNDINGS[facts.region])}.")
    rng.shuffle(sentences)
    return phrase, where, sentences


def caption(facts: Facts, rng: np.random.Generator, complete: bool = False) -> str:
    """One description of the image in random words. Some facts may be left out, unless ``complete``: then
    every fact is stated, each lesion's position included."""
    study = _study(facts, rng)
    with_study = complete or rng.random() < 0.9
    if facts.count == 0:
        normal = pick(rng, NORMAL + (NORMAL_BY_REGION[facts.region],))
        if not with_study:
            return normal
        return pick(rng, (f"{_capital(study)}. {normal}", f"{normal} {_capital(study)}.",
                          f"{_capital(study)}: {normal[0].lower()}{normal[1:]}", f"Normal {study}."))
    phrase, where, sentences = _finding(facts, rng, complete)
    verb = "are" if facts.count > 1 else "is"
    if where.startswith(tuple(f"{n} " for n in NUMBERS.values())):  # "two nodules: one in ... and one in ..."
        located = f"{phrase}: {where}"
        clause = pick(rng, (located, f"there {verb} {located}"))
        merged = f"{_capital(study)} shows {located}."
    else:
        located = f"{phrase} {where}".rstrip()
        clause = pick(rng, (located, f"there {verb} {located}",
                            f"{located} {verb} {pick(rng, ('seen', 'noted', 'visible'))}"))
        merged = pick(rng, (f"{_capital(study)} shows {located}.", f"{_capital(located)} on {_a(study)}."))
    if not with_study:
        text = f"{_capital(clause)}."
    else:
        text = pick(rng, (f"{_capital(study)}. {_capital(clause)}.", f"{_capital(clause)}. {_capital(study)}.",
                          merged))
    return " ".join([text, *sentences])


# =========================================================================================== questions
@dataclass(frozen=True)
class Question:
    kind: str  # what is asked: "modality", "presence", "side_check", ... (stored as ``question_kind``)
    text: str
    answer: str
    answer_type: str  # "open" | "closed"


OPEN_QUESTIONS = {
    "modality": ("What modality is this?", "What imaging modality was used?", "What kind of scan is this?",
                 "How was this image acquired?", "Which imaging technique produced this image?"),
    "region": ("Which part of the body is shown?", "What body region is imaged?",
               "Which anatomical region does this image show?", "What part of the body was scanned?"),
    "count": ("How many lesions are there?", "How many lesions can be seen?",
              "How many focal abnormalities are present?", "What is the number of lesions?"),
    "side": ("Which side is affected?", "On which side is the abnormality?",
             "Which side of the patient shows the findings?", "Where is the lesion, on which side?"),
    "size": ("What size is the lesion?", "How big is the abnormality?", "What is the size of the lesion?",
             "How big are the findings?"),
    "brightness": ("How does the lesion compare in intensity with the surrounding tissue?",
                   "What is the intensity of the lesion relative to its surroundings?",
                   "Compared with the tissue around it, how does the lesion appear?"),
    "shape": ("What shape is the lesion?", "What is the shape of the abnormality?",
              "How would you describe the outline of the lesion?"),
    "margin": ("What are the margins of the lesion like?", "How are the lesion's borders?",
               "What kind of edges does the abnormality have?"),
}
CLOSED_KINDS = ("presence", "multiple", "bilateral", "side_check", "modality_check", "region_check",
                "size_check", "brightness_check")
assert len(OPEN_QUESTIONS) + len(CLOSED_KINDS) == QUESTION_KINDS  # SynthConfig.validate bounds it
NEEDS_LESION = {"side", "size", "brightness", "shape", "margin", "bilateral", "size_check", "brightness_check"}
TWO_WAY = {  # closed questions asked for a fact or against it: (the fact holds?, its opposite holds?)
    "presence": (("Is there a lesion?", "Is any lesion visible?", "Is there a focal abnormality?",
                  "Does this image show a lesion?"),
                 ("Is this image normal?", "Is the study free of lesions?", "Is this a normal scan?")),
    "multiple": (("Are there multiple lesions?", "Is there more than one lesion?", "Are several lesions visible?"),
                 ("Is there at most one lesion?", "Is there no more than one lesion?")),
    "bilateral": (("Are both sides affected?", "Is the disease bilateral?"),
                  ("Is only one side affected?", "Is the abnormality confined to one side?")),
}
MODALITY_ASKED = {"xray": ("an X-ray", "a radiograph"), "ct": ("a CT scan", "a CT image"),
                  "mri": ("an MRI", "an MR image")}


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _ask_closed(kind: str, f: Facts, rng: np.random.Generator) -> tuple[str, str]:
    """A yes/no question of one kind and its answer; each kind is answered "yes" about half of the time."""
    if kind in TWO_WAY:  # asked one way or the opposite way, half and half
        truth = {"presence": f.count > 0, "multiple": f.count > 1, "bilateral": f.side == "both"}[kind]
        ask, opposite = TWO_WAY[kind]
        return (pick(rng, ask), _yes(truth)) if rng.random() < 0.5 else (pick(rng, opposite), _yes(not truth))
    if kind == "side_check":  # asked of one-sided findings only
        side = pick(rng, ("left", "right"))
        return pick(rng, (f"Is there a lesion on the {side}?", f"Is the {side} side affected?",
                          f"Does the {side} side show a lesion?")), _yes(f.side == side)
    if kind == "brightness_check":
        asked = pick(rng, BRIGHTNESS)
        return pick(rng, (f"Is the lesion {asked} than the surrounding tissue?",
                          f"Does the lesion appear {asked} than its surroundings?")), _yes(asked == f.brightness)
    # modality, region or size: the true one half of the time, else another
    options = {"modality_check": MODALITIES, "region_check": REGIONS, "size_check": SIZES}[kind]
    truth = {"modality_check": f.modality, "region_check": f.region, "size_check": f.size}[kind]
    asked = truth if rng.random() < 0.5 else pick(rng, [o for o in options if o != truth])
    if kind == "modality_check":
        named = pick(rng, MODALITY_ASKED[asked])
        text = pick(rng, (f"Is this {named}?", f"Was this image acquired as {named}?"))
    elif kind == "region_check":
        text = pick(rng, (f"Is this an image of the {asked}?", f"Does this image show the {asked}?",
                          f"Was the {asked} imaged?"))
    else:
        word = "medium-sized" if asked == "medium" else asked
        text = pick(rng, (f"Is the lesion {word}?", f"Is the abnormality {word}?"))
    return text, _yes(asked == truth)


def _open_answer(kind: str, f: Facts) -> str:
    return {"modality": f.modality.replace("xray", "x-ray"), "count": str(f.count)}.get(kind) or getattr(f, kind)


def questions(facts: Facts, rng: np.random.Generator, n: int) -> list[Question]:
    """``n`` questions of different kinds about the image (fewer where fewer kinds apply)."""
    kinds = [k for k in (*OPEN_QUESTIONS, *CLOSED_KINDS)
             if (facts.count > 0 or k not in NEEDS_LESION) and (k != "side_check" or facts.side in ("left", "right"))]
    out = []
    for i in sorted(rng.permutation(len(kinds))[:n]):
        kind = kinds[i]
        if kind in OPEN_QUESTIONS:
            out.append(Question(kind, pick(rng, OPEN_QUESTIONS[kind]), _open_answer(kind, facts), "open"))
        else:
            out.append(Question(kind, *_ask_closed(kind, facts, rng), "closed"))
    return out


# ====================================================================================== classification
INDICATIONS = {  # why a study was requested
    "routine": ("routine screening", "pre-operative work-up", "annual check-up", "occupational health examination"),
    "known": ("follow-up of a previously reported finding", "evaluation of an incidental finding on an earlier scan",
              "assessment of a possible mass"),
    "staging": ("staging of a known primary tumour", "follow-up of metastatic disease",
                "surveillance after cancer treatment"),
}
SYMPTOMS = {"head": ("headache", "dizziness", "blurred vision", "a first seizure"),
            "chest": ("cough", "shortness of breath", "chest pain", "haemoptysis"),
            "abdomen": ("abdominal pain", "weight loss", "nausea", "deranged liver tests")}
INDICATION_WEIGHTS = {  # P(kind of indication | label) over routine, known, staging, symptom: a weak hint only
    "normal": (0.4, 0.15, 0.15, 0.3), "single lesion": (0.15, 0.4, 0.15, 0.3),
    "multiple unilateral lesions": (0.15, 0.15, 0.4, 0.3), "bilateral lesions": (0.15, 0.15, 0.4, 0.3),
}


def label_of(facts: Facts) -> str:
    """The classification label: the finding pattern (see the module's docstring)."""
    if facts.count < 2:
        return ("normal", "single lesion")[facts.count]
    return "bilateral lesions" if facts.side == "both" else "multiple unilateral lesions"


def request_note(facts: Facts, rng: np.random.Generator) -> str:
    """A short referral note (who, why, sometimes which study); it never states the finding."""
    kind = ("routine", "known", "staging", "symptom")[pick_weighted(rng, INDICATION_WEIGHTS[label_of(facts)])]
    why = pick(rng, SYMPTOMS[facts.region] if kind == "symptom" else INDICATIONS[kind])
    who = f"{int(rng.integers(18, 90))}-year-old {pick(rng, ('man', 'woman', 'male', 'female', 'patient'))}"
    study = _study(facts, rng)
    return pick(rng, (f"{_capital(who)}. Indication: {why}.", f"Clinical history: {why}. {_capital(who)}.",
                      f"{_capital(why)} in {_a(who)}. {_capital(study)} requested.",
                      f"{_capital(study)} for {why}; {who}."))
