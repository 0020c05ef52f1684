"""Training rows from a perturbed or grounded dataset: SFT rows, option rows' targets and
SimPO pairs, for each confidence target (``paper``, ``measured``, ``correct``, ``cell``,
``internal``); the measured-accuracy targets the base model's own answers give.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from csp_utils.dataset import grounded_rows
from csp_utils.dataset.store import DIGESTS_FILE, verify_dataset_folder
from csp_utils.train.settings import GROUNDED_TARGETS, check_simpo_layout
from csp_utils.vlm import prompts


# --------------------------------------------------------------------------- data

REQUIRED_COLUMNS = ("image", "question", "answer", "confidence", "confidence_prompt")
# a grounded dataset's columns that training reads (the row schema of the grounded builder)
GROUNDED_COLUMNS = ("image", "question", "answer", "correct", "cell_acc", "internal_p")


def required_columns(target: str | None = None) -> tuple[str, ...]:
    if target == "calibrated":
        return GROUNDED_COLUMNS + ("calibrated_p",)
    return GROUNDED_COLUMNS if target in GROUNDED_TARGETS else REQUIRED_COLUMNS


def load_perturbed_dataset(dataset, target: str | None = None):
    """A ``datasets.Dataset`` from itself or a folder: the saved dataset itself, or the
    builder's ``out_dir`` (``{run_dir}/dataset``) holding it under ``dataset/``."""
    import datasets

    if isinstance(dataset, datasets.Dataset):
        ds = dataset
    else:
        path = Path(dataset)
        candidates = [path, path / "dataset"]
        # save_to_disk writes dataset_info.json; the builder's out_dir has only its own state.json.
        found = next((p for p in candidates if (p / "dataset_info.json").exists()), None)
        if found is None:
            raise FileNotFoundError(
                f"no saved datasets.Dataset at {path} or {path / 'dataset'} "
                "(build it with paper_rows.build_perturbed_dataset)"
            )

        if (found / DIGESTS_FILE).exists():  # the builder's output: refuse a damaged copy, naming the file
            verify_dataset_folder(found)
        ds = datasets.load_from_disk(str(found))
        if isinstance(ds, datasets.DatasetDict):
            raise ValueError(f"{found} holds a DatasetDict ({list(ds)}); pass the split to train on")
    missing = [c for c in required_columns(target) if c not in ds.column_names]
    if missing:
        what = "a grounded dataset" if target in GROUNDED_TARGETS else "the perturbed dataset"
        raise ValueError(f"{what} lacks columns {missing} (confidence target {target!r}); it has {ds.column_names}")
    if len(ds) == 0:
        raise ValueError("the perturbed dataset is empty")
    return ds


def _yes_no(text: str) -> str:
    word = str(text).strip().strip(".").lower()
    if word not in ("yes", "no"):
        raise ValueError(f"measured targets need Yes/No answers, got {text!r}")
    return "Yes" if word == "yes" else "No"


@dataclass
class MeasuredTargets:
    """The base model's own answers on the training images and the targets they give."""

    own_answers: list[str]                 # "Yes" / "No" per row
    correct: list[bool]
    targets: list[int]                     # per row: accuracy of its (level, own answer) cell, integer percent
    cells: dict[str, dict]                 # "c=70|Yes" -> {"accuracy": 0.83, "n": 12, "target": 83}


def with_image(messages: list[dict], image) -> list[dict]:
    """Put the PIL image into the (single) image slot of a prompts.* conversation."""
    out = []
    for message in messages:
        content = message["content"]
        if isinstance(content, list):
            content = [{**part, "image": image} if part.get("type") == "image" else part for part in content]
        out.append({**message, "content": content})
    return out


def measured_accuracy_targets(model, processor, dataset, batch_size: int = 32) -> MeasuredTargets:
    """The base model's measured accuracy in each (confidence level, own answer) cell.

    Each row's target is its cell's accuracy as an integer percent: what the model's own
    answer is worth, given how strongly the image was perturbed and what it answered.
    """
    ds = load_perturbed_dataset(dataset)
    questions = ds["question"]
    truth = [_yes_no(a) for a in ds["answer"]]
    if len(set(truth)) == 1:
        import warnings

        # With one gold answer (a build without include_negatives), every cell is 0% or 100%:
        # "own answer == gold" is all the cell can say. Build with negatives for useful targets.
        warnings.warn(f"every training answer is {truth[0]!r}: measured targets collapse to 0% / 100% per "
                      "(level, own answer) cell; build the dataset with include_negatives=True", stacklevel=2)
    levels = [int(c) for c in ds["confidence"]]
    was_training = model.training
    model.eval()
    own = grounded_rows.model_answers(model, processor, questions, _LazyImages(ds), batch_size).own
    model.train(was_training)
    correct = [o == t for o, t in zip(own, truth)]
    tally: dict[str, list[int]] = {}
    for level, answer, ok in zip(levels, own, correct):
        tally.setdefault(f"c={level}|{answer}", []).append(int(ok))
    cells = {}
    for key, oks in sorted(tally.items()):
        accuracy = sum(oks) / len(oks)
        cells[key] = {"accuracy": accuracy, "n": len(oks), "target": int(round(100 * accuracy))}
    targets = [cells[f"c={level}|{answer}"]["target"] for level, answer in zip(levels, own)]
    return MeasuredTargets(own_answers=own, correct=correct, targets=targets, cells=cells)


class _LazyImages:
    """Indexable images of a dataset, decoded on access (no copy of the image column)."""

    def __init__(self, ds):
        self.images = ds.select_columns(["image"])

    def __len__(self):
        return len(self.images)

    def __getitem__(self, item):
        if isinstance(item, slice):
            return [self.images[i]["image"] for i in range(*item.indices(len(self)))]
        return self.images[item]["image"]


def confidence_examples(ds, target: str, measured: MeasuredTargets | None = None) -> tuple[list[str], list[int]]:
    """(prompt text, target percent) per row for the chosen confidence target."""
    if target == "paper":
        return list(ds["confidence_prompt"]), [int(c) for c in ds["confidence"]]
    if measured is None:
        raise ValueError("confidence_target='measured' needs the base model's measured targets")
    if len(measured.targets) != len(ds):
        raise ValueError(f"measured targets cover {len(measured.targets)} rows, the dataset has {len(ds)}")
    framings = ds["framing"] if "framing" in ds.column_names else ["third"] * len(ds)
    texts = [prompts.confidence_text(q, own, framing=f or "third")
             for q, own, f in zip(ds["question"], measured.own_answers, framings)]
    return texts, list(measured.targets)


def grounded_targets(ds, target: str) -> list[int]:
    """Per row of a grounded dataset, the target as an integer percent: ``correct`` ->
    100 x correct, ``cell`` -> cell_acc, ``internal`` -> round(100 x internal_p), ``blend`` ->
    round(50 x internal_p + 50 x correct), ``calibrated`` -> round(100 x calibrated_p). The data
    already states each value for the QUOTED answer (flip rows included)."""
    if target == "correct":
        values = [100 * int(c) for c in ds["correct"]]
    elif target == "cell":
        values = [int(c) for c in ds["cell_acc"]]
    elif target == "internal":
        values = [int(round(100 * float(p))) for p in ds["internal_p"]]
    elif target == "calibrated":
        values = [int(round(100 * float(p))) for p in ds["calibrated_p"]]
    elif target == "blend":
        values = [int(round(50 * float(p) + 50 * int(c))) for p, c in zip(ds["internal_p"], ds["correct"])]
    else:
        raise ValueError(f"grounded targets are {GROUNDED_TARGETS}, got {target!r}")
    bad = [i for i, v in enumerate(values) if not 0 <= v <= 100]
    if bad:
        raise ValueError(f"target {target!r} lies outside 0..100 at rows {bad[:5]} (values {[values[i] for i in bad[:5]]})")
    return values


def option_examples(ds, target: str, measured: MeasuredTargets | None = None,
                    framing: str | None = None) -> dict[str, list]:
    """Columns ``question``, ``response`` (the quoted answer), ``framing`` and ``target``
    (integer percent) per row: what a confidence conversation in any layout is built from."""
    if target in GROUNDED_TARGETS:
        responses, percents = [str(a) for a in ds["answer"]], grounded_targets(ds, target)
    elif target == "paper":
        responses, percents = [str(a) for a in ds["answer"]], [int(c) for c in ds["confidence"]]
    else:
        if measured is None:
            raise ValueError("confidence_target='measured' needs the base model's measured targets")
        responses, percents = list(measured.own_answers), list(measured.targets)
    framings = ([framing] * len(ds) if framing is not None
                else [f or "third" for f in ds["framing"]] if "framing" in ds.column_names else ["third"] * len(ds))
    return {"question": list(ds["question"]), "response": responses, "framing": framings, "target": percents}


def nearest_and_farthest_option(percent: int, options=prompts.CONFIDENCE_LEVELS) -> tuple[int, int]:
    """(option nearest ``percent``, option farthest from it); ties go to the lower option."""
    nearest = min(options, key=lambda o: (abs(o - percent), o))
    farthest = max(options, key=lambda o: (abs(o - percent), -o))
    return nearest, farthest


def image_table(ds, indices: list[int], columns: dict[str, list]):
    """The dataset's images at ``indices`` with new columns beside them: a plain
    ``datasets.Dataset`` (trl's SFTTrainer takes nothing else). Without reordering no
    image is copied; with it (replay) the image column is materialised once."""
    table = ds.select_columns(["image"])
    if indices != list(range(len(ds))):
        table = table.select(indices)
    for name, values in columns.items():
        table = table.add_column(name, values)
    return table


def sft_rows(ds, target: str = "paper", measured: MeasuredTargets | None = None, replay_fraction: float = 0.0,
             seed: int = 0):
    """SFT rows ``{"image", "messages"}``: one confidence conversation per dataset row, plus
    replayed clean QA turns (drawn with replacement from the ``t == 0`` rows, the
    unperturbed images) making up ``replay_fraction`` of all rows.

    Message contents are plain strings: trl's collator puts the image slot before the user
    text, which renders exactly as ``prompts.confidence_messages`` (and keeps Arrow's
    schema simple). Returns (dataset, number of replay rows)."""
    texts, percents = confidence_examples(ds, target, measured)
    replies = [prompts.format_confidence(p) for p in percents]
    if target == "paper" and "target_text" in ds.column_names:  # the builder's own text wins
        replies = [tt or r for tt, r in zip(ds["target_text"], replies)]
    indices = list(range(len(ds)))
    messages = [[{"role": "user", "content": t}, {"role": "assistant", "content": r}] for t, r in zip(texts, replies)]
    n_replay = 0
    if replay_fraction > 0:
        clean = [i for i, t in enumerate(ds["t"] if "t" in ds.column_names else []) if int(t) == 0]
        if not clean:
            raise ValueError("replay_fraction > 0 needs clean rows (t == 0, i.e. confidence 100) in the dataset")
        n_replay = int(round(replay_fraction / (1 - replay_fraction) * len(indices)))
        rng = random.Random(seed)
        questions, answers = ds["question"], ds["answer"]
        for i in (rng.choice(clean) for _ in range(n_replay)):
            indices.append(i)
            messages.append([{"role": "user", "content": prompts.answer_text(questions[i])},
                             {"role": "assistant", "content": str(answers[i])}])
    return image_table(ds, indices, {"messages": messages}), n_replay


def simpo_pairs(ds, target: str = "paper", measured: MeasuredTargets | None = None, layout: str = "single_turn",
                framing: str | None = None):
    """Preference pairs ``{"image", "prompt", "chosen", "rejected"}`` (chosen "c%", rejected
    "(100-c)%", same prompt, same image) and the number of rows dropped because both
    replies are the same text (c = 50).

    Grounded targets and other layouts: pairs ``{"image", "question", "response", "framing",
    "chosen", "rejected"}`` whose chosen reply is the option nearest the target and the
    rejected one the option farthest from it (so SimPO sharpens what the option loss
    taught instead of mirroring the target); nothing is dropped."""
    check_simpo_layout(layout)
    if target in GROUNDED_TARGETS or layout != "single_turn":
        cols = option_examples(ds, target, measured, framing)
        near_far = [nearest_and_farthest_option(p) for p in cols.pop("target")]
        cols["chosen"] = [prompts.format_confidence(n) for n, _ in near_far]
        cols["rejected"] = [prompts.format_confidence(f) for _, f in near_far]
        return image_table(ds, list(range(len(ds))), cols), 0
    texts, percents = confidence_examples(ds, target, measured)
    keep, chosen, rejected, prompt = [], [], [], []
    for i, (text, p) in enumerate(zip(texts, percents)):
        c, r = prompts.format_confidence(p), prompts.format_confidence(100 - p)
        if c == r:
            continue
        keep.append(i)
        prompt.append(text)
        chosen.append(c)
        rejected.append(r)
    dropped = len(ds) - len(keep)
    if not keep:
        raise ValueError(f"no preference pairs left: all {dropped} rows have confidence 50")
    return image_table(ds, keep, {"prompt": prompt, "chosen": chosen, "rejected": rejected}), dropped
