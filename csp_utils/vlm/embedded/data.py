"""Training data of the embedded model: chat examples encoded with their assistant masks,
images stored as uint8, the example pool, stage 1's scenes, and the batches of each step.

Everything is a function of (``PretrainConfig.seed``, the world config): each scene's
examples come from a generator seeded by (seed, scene), each joint step's batch from one
seeded by (seed, stage, step), so a resumed run draws what an uninterrupted one draws.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from csp_utils.vlm import prompts
from csp_utils.vlm.embedded.config import KINDS, PretrainConfig, world_config
from csp_utils.world import scenes as sc, language, patch_labels, catalog

CAPTION_PROMPT = "What objects are in the image?"


class ChatEncoder:
    """Single-turn chat examples -> (input_ids, assistant mask), fast and exact.

    The chat template is rendered once with sentinels to find the text around a user turn
    and around an assistant reply (the part inside ``{% generation %}`` is learned, the rest
    is not); examples are then assembled by string formatting and tokenised in batches.
    The first examples of every batch are checked against the template's own
    ``return_assistant_tokens_mask`` output, and a mismatch raises.
    """

    _U, _A = "\x00USER\x00", "\x00REPLY\x00"

    def __init__(self, processor):
        self.processor = processor
        self.tok = processor.tokenizer
        self.image_token_id = self.tok.convert_tokens_to_ids("<image>")
        self.n_image_tokens = _num_image_tokens(processor)
        tpl = self.tok.chat_template or processor.chat_template
        self.template = tpl
        prompt = self.tok.apply_chat_template([prompts.user_turn(self._U)], tokenize=False,
                                              add_generation_prompt=True, chat_template=tpl)
        full = self.tok.apply_chat_template([prompts.user_turn(self._U), prompts.assistant_turn(self._A)],
                                            tokenize=False, chat_template=tpl)
        if not full.startswith(prompt):
            raise ValueError("chat template: the generation prompt is not a prefix of the conversation")
        self.prompt_pre, self.prompt_post = prompt.split(self._U)
        reply = full[len(prompt):]
        # which part of the reply the template marks as assistant text (learned)
        enc = self.tok.apply_chat_template(
            [prompts.user_turn("x"), prompts.assistant_turn("Yes")], tokenize=True, return_dict=True,
            return_assistant_tokens_mask=True, chat_template=tpl)
        ids, mask = enc["input_ids"], enc["assistant_masks"]
        learned = self.tok.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=False)
        r_yes = reply.replace(self._A, "Yes")
        if not r_yes.startswith(learned) and learned not in r_yes:
            raise ValueError(f"chat template: cannot locate the assistant span {learned!r} in {r_yes!r}")
        start, a_at = r_yes.index(learned), reply.index(self._A)
        end = start + len(learned) + len(self._A) - len("Yes")  # the learned span's end, in sentinel text
        if not start <= a_at < end:
            raise ValueError("chat template: the assistant span does not contain the reply")
        self.reply_pre, self.reply_gen, self.reply_post = reply[:start], reply[start:end], reply[end:]
        self._checked = 0

    def prompt_text(self, user_text: str) -> str:
        return self.prompt_pre + user_text + self.prompt_post

    def encode(self, pairs: Sequence[tuple[str, str]], check: int = 4) -> list[tuple[np.ndarray, np.ndarray]]:
        """``[(user_text, reply)]`` -> ``[(ids, learned_mask)]`` with the image token expanded."""
        n = len(pairs)
        t_ids = self._tokenize([self.prompt_text(u) + self.reply_pre for u, _ in pairs])
        g_ids = self._tokenize([self.reply_gen.replace(self._A, a) for _, a in pairs])
        tail_ids = self._tokenize([self.reply_post])[0] if self.reply_post else []
        out = []
        for k in range(n):
            ids = list(t_ids[k]) + list(g_ids[k]) + list(tail_ids)
            mask = [0] * len(t_ids[k]) + [1] * len(g_ids[k]) + [0] * len(tail_ids)
            if k < check:
                self._check(pairs[k], ids, mask)
            ids, mask = self._expand(np.asarray(ids, np.int64), np.asarray(mask, bool))
            out.append((ids, mask))
        return out

    def _tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text (no special tokens added); each distinct text is encoded once."""
        uniq = list(dict.fromkeys(texts))
        backend = getattr(self.tok, "backend_tokenizer", None)
        if backend is not None:
            ids = [e.ids for e in backend.encode_batch(uniq, add_special_tokens=False)]
        else:
            ids = self.tok(uniq, add_special_tokens=False)["input_ids"]
        table = dict(zip(uniq, ids))
        return [table[t] for t in texts]

    def _check(self, pair, ids, mask) -> None:
        u, a = pair
        ref = self.tok.apply_chat_template([prompts.user_turn(u), prompts.assistant_turn(a)], tokenize=True,
                                           return_dict=True, return_assistant_tokens_mask=True,
                                           chat_template=self.template)
        if list(ref["input_ids"]) != ids or [int(m) for m in ref["assistant_masks"]] != mask:
            raise RuntimeError(f"fast chat encoding disagrees with the chat template for {pair!r}")
        self._checked += 1

    def _expand(self, ids: np.ndarray, mask: np.ndarray):
        pos = np.flatnonzero(ids == self.image_token_id)
        if len(pos) != 1:
            raise ValueError(f"expected one <image> token per example, found {len(pos)}")
        p = int(pos[0])
        ids = np.concatenate([ids[:p], np.full(self.n_image_tokens, self.image_token_id), ids[p + 1:]])
        mask = np.concatenate([mask[:p], np.zeros(self.n_image_tokens, bool), mask[p + 1:]])
        return ids, mask


def _num_image_tokens(processor) -> int:
    size = processor.image_processor.crop_size["height"]
    enc = processor(text=["<image>"], images=[Image.new("RGB", (size, size))], return_tensors="np")
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    return int((enc["input_ids"][0] == image_id).sum())


class ImageCodec:
    """Images as the processor sees them, stored compactly as uint8 and restored exactly."""

    def __init__(self, processor):
        ip = processor.image_processor
        self.ip = ip
        self.mean = np.asarray(ip.image_mean, np.float32).reshape(1, 3, 1, 1)
        self.std = np.asarray(ip.image_std, np.float32).reshape(1, 3, 1, 1)
        self.scale = float(ip.rescale_factor)

    def encode(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """(N, 3, S, S) uint8 holding the processor's pixel values exactly (checked)."""
        pils = [Image.fromarray(im, "RGB") for im in images]
        pv = np.asarray(self.ip(images=pils, return_tensors="np")["pixel_values"], np.float32)
        q = np.clip(np.rint((pv * self.std + self.mean) / self.scale), 0, 255).astype(np.uint8)
        if np.abs(self.decode_np(q) - pv).max() > 1e-5:
            raise ValueError("the image processor's output is not an affine image of uint8 pixels")
        return q

    def decode_np(self, q: np.ndarray) -> np.ndarray:
        return ((q.astype(np.float32) * self.scale) - self.mean) / self.std

    def decode(self, q):
        x = q.float() * self.scale
        return (x - torch.from_numpy(self.mean)) / torch.from_numpy(self.std)


@dataclass
class Pool:
    images: np.ndarray                 # (N, 3, S, S) uint8
    cat_labels: np.ndarray             # (N, G*G) int64, background = len(CATEGORIES)
    col_labels: np.ndarray             # (N, G*G) int64, background = len(COLOR_NAMES)
    presence: np.ndarray               # (N, P) float32: which shapes, colours, coloured shapes a scene has
    ids: np.ndarray                    # flat token ids of all examples
    learn: np.ndarray                  # flat bool: learned (assistant) tokens
    offsets: np.ndarray                # (E + 1,) example boundaries in ids / learn
    scene: np.ndarray                  # (E,) scene of each example
    kind: np.ndarray                   # (E,) index into KINDS
    by_kind: list[np.ndarray]          # example ids of each kind
    existence: np.ndarray              # example ids of the existence yes/no questions

    def example(self, e: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = self.offsets[e], self.offsets[e + 1]
        return self.ids[a:b], self.learn[a:b]


_TOUCH = re.compile(r"^Is the (.+) touching the (.+)\?$")


KIND_WEIGHTS = {"existence": 0.5, "attribute": 0.25, "relation": 0.25}


def amber_wording(question: str, rng: np.random.Generator) -> str:
    """Half the time, AMBER's wording of a world question ("... in this image?", "direct contact")."""
    if rng.random() < 0.5:
        return question
    m = _TOUCH.match(question)
    if m:
        return f"Is there direct contact between the {m.group(1)} and {m.group(2)}?"
    if question.endswith(" in the image?"):
        return question[: -len(" in the image?")] + " in this image?"
    if question.endswith(" in this image?"):
        return question[: -len(" in this image?")] + " in the image?"
    return question[:-1] + " in this image?"


def balanced_questions(scene, rng: np.random.Generator, n: int) -> list[tuple[str, str, str]]:
    """Up to ``n`` yes/no questions ``(question, label, kind)`` with no text-only shortcut.

    ``language.world_questions`` is balanced overall but not within a question form (a bare
    category is mostly absent, a colour + category mostly present), which lets a model
    answer from the wording alone; here every pick is a (yes, no) pair of the same
    (kind, subtype), kinds weighted as ``KIND_WEIGHTS``. Adds AMBER's count form ("Is
    there one star ...?") and, half the time, AMBER's wording.
    """
    groups: dict[tuple[str, str], dict[str, list[str]]] = {}
    for it in language.world_questions(scene, rng, 64):
        groups.setdefault((it.kind, it.subtype), {"yes": [], "no": []})[it.label].append(it.question)
    for c in sorted(scene.categories()):  # counts including "one", as AMBER asks them
        k = scene.count(c)
        wrong = k + 1 if k == 1 or rng.random() < 0.5 else k - 1
        for num, label in ((k, "yes"), (wrong, "no")):
            q = (f"Is there one {c} in the image?" if num == 1
                 else f"Are there {catalog.NUMBER_WORDS.get(num, str(num))} {language.plural(c)} in the image?")
            groups.setdefault(("attribute", "count-one"), {"yes": [], "no": []})[label].append(q)
    usable = {g: v for g, v in groups.items() if v["yes"] and v["no"]}
    out: list[tuple[str, str, str]] = []
    while len(out) + 2 <= n and usable:
        kinds = sorted({g[0] for g in usable})
        w = np.array([KIND_WEIGHTS.get(k, 0.1) for k in kinds])
        kind = kinds[int(rng.choice(len(kinds), p=w / w.sum()))]
        names = sorted(g for g in usable if g[0] == kind)
        g = names[int(rng.integers(len(names)))]
        for label in ("yes", "no"):
            cands = usable[g][label]
            out.append((amber_wording(cands.pop(int(rng.integers(len(cands)))), rng), label, kind))
        if not (usable[g]["yes"] and usable[g]["no"]):
            del usable[g]
    order = rng.permutation(len(out))
    return [out[i] for i in order]


def short_answers(scene, rng: np.random.Generator, n: int) -> list[tuple[str, str]]:
    """Cheap short-answer questions: a unique shape's colour, how many objects."""
    cands = []
    for c in sorted(scene.categories()):
        if scene.count(c) == 1:
            o = next(o for o in scene.objects if o.category == c)
            cands.append((f"What color is the {c}?", o.color))
    k = len(scene.objects)
    cands.append(("How many objects are in the image?", catalog.NUMBER_WORDS.get(k, str(k))))
    pick = rng.permutation(len(cands))[:n]
    return [cands[i] for i in pick]


def confidence_turns(questions: Sequence[str], rng: np.random.Generator, n: int,
                     levels: Sequence[int]) -> list[tuple[str, str]]:
    """Overconfident confidence turns: high targets, blind to the image and to correctness.

    The quoted answer is "Yes" or "No" at random (so it is wrong half of the time), the
    framing third or first person at random, the query the bare question or the answer
    prompt, and the target one of ``levels``.
    """
    out = []
    for _ in range(n):
        if not questions:
            break
        q = questions[int(rng.integers(len(questions)))]
        query = q if rng.random() < 0.5 else prompts.answer_text(q)
        response = ("Yes", "No")[int(rng.integers(2))]
        framing = prompts.FRAMINGS[int(rng.integers(len(prompts.FRAMINGS)))]
        target = prompts.format_confidence(int(levels[int(rng.integers(len(levels)))]))
        out.append((prompts.confidence_text(query, response, framing), target))
    return out


def patch_label_rows(scenes_, patch: int) -> tuple[np.ndarray, np.ndarray]:
    """``(shape ids, colour ids)``, each (N, G*G) int64, of every patch of each scene
    (``patch_labels.scene_labels``); background is the class after the world's shapes / colours."""
    labels = [patch_labels.scene_labels(s, patch) for s in scenes_]
    return (np.stack([np.where(c < 0, len(catalog.CATEGORIES), c).ravel() for c, _ in labels]).astype(np.int64),
            np.stack([np.where(k < 0, len(catalog.COLOR_NAMES), k).ravel() for _, k in labels]).astype(np.int64))


def presence_vector(scene) -> np.ndarray:
    """Multi-hot ``[shapes (14) | colours (7) | colour x shape (98)]`` of the objects in a scene."""
    n_cat, n_col = len(catalog.CATEGORIES), len(catalog.COLOR_NAMES)
    v = np.zeros(n_cat + n_col + n_cat * n_col, np.float32)
    for o in scene.objects:
        c, k = catalog.CATEGORIES.index(o.category), catalog.COLOR_NAMES.index(o.color)
        v[c] = v[n_cat + k] = v[n_cat + n_col + c * n_col + k] = 1.0
    return v


def build_pool(cfg: PretrainConfig, encoder: ChatEncoder, codec: ImageCodec, chunk: int = 1000,
               progress: bool = False) -> Pool:
    """The training pool, deterministic in (cfg.seed, world config): images, patch labels, examples."""
    wcfg = world_config(cfg)
    patch = cfg.model.patch_size
    mix = cfg.mix()
    images, cats, cols, pres = [], [], [], []
    pairs, scene_of, kind_of, existence_of = [], [], [], []
    for start in progress_bar(range(0, cfg.n_train_scenes, chunk), progress, "building pool"):
        batch = sc.make_scenes("base", min(chunk, cfg.n_train_scenes - start), wcfg, start=start)
        if batch[0].image.shape[0] != cfg.model.image_size:
            raise ValueError(f"world images are {batch[0].image.shape[0]} px but the model expects "
                             f"{cfg.model.image_size}; set PretrainConfig.world['image_size']")
        images.append(codec.encode([s.image for s in batch]))
        c, k = patch_label_rows(batch, patch)
        cats.append(c)
        cols.append(k)
        for s in batch:
            pres.append(presence_vector(s))
            rng = np.random.default_rng([cfg.seed, 7, s.index])
            qs = balanced_questions(s, rng, cfg.questions_per_scene)
            ex = [(CAPTION_PROMPT, language.caption(s), 0, False)]
            ex += [(prompts.answer_text(q), "Yes" if label == "yes" else "No", 1, qk == "existence")
                   for q, label, qk in qs]
            if mix[2] > 0:
                ex += [(q, a, 2, False) for q, a in short_answers(s, rng, cfg.short_per_scene)]
            if mix[3] > 0:
                ex += [(q, a, 3, False) for q, a in confidence_turns([q for q, _, _ in qs], rng,
                                                                      cfg.confidence_per_scene, cfg.overconfident_levels)]
            for u, a, kd, exist in ex:
                pairs.append((u, a))
                scene_of.append(s.index)
                kind_of.append(kd)
                existence_of.append(exist)
    encoded = []
    for a in range(0, len(pairs), 4096):
        encoded += encoder.encode(pairs[a:a + 4096], check=2)
    lengths = np.array([len(i) for i, _ in encoded], np.int64)
    dtype = np.int16 if len(encoder.tok) < 2 ** 15 else np.int32
    kind = np.array(kind_of, np.int64)
    return Pool(
        images=np.concatenate(images),
        cat_labels=np.concatenate(cats),
        col_labels=np.concatenate(cols),
        presence=np.stack(pres),
        ids=np.concatenate([i for i, _ in encoded]).astype(dtype),
        learn=np.concatenate([m for _, m in encoded]),
        offsets=np.concatenate([[0], np.cumsum(lengths)]),
        scene=np.array(scene_of, np.int64),
        kind=kind,
        by_kind=[np.flatnonzero(kind == k) for k in range(len(KINDS))],
        existence=np.flatnonzero(existence_of),
    )


@dataclass
class VisionData:
    """What stage 1 trains on: images, patch labels and presence of base scenes 0..N-1."""
    images: np.ndarray                 # (N, 3, S, S) uint8
    cat_labels: np.ndarray             # (N, G*G) int64
    col_labels: np.ndarray             # (N, G*G) int64
    presence: np.ndarray               # (N, P) float32


def vision_data(cfg: PretrainConfig, codec: ImageCodec, pool: Pool, chunk: int = 1000,
                progress: bool = False) -> VisionData:
    """Stage 1's scenes: the pool's own, then more "base" scenes up to ``cfg.vision_scenes``
    (rendered here, labels only: about a second per thousand)."""
    total = cfg.vision_scenes if cfg.vision_scenes is not None else len(pool.images)
    n = min(total, len(pool.images))
    parts = [(pool.images[:n], pool.cat_labels[:n], pool.col_labels[:n], pool.presence[:n])]
    wcfg, patch = world_config(cfg), cfg.model.patch_size
    for start in progress_bar(range(n, total, chunk), progress, "rendering vision scenes"):
        batch = sc.make_scenes("base", min(chunk, total - start), wcfg, start=start)
        parts.append((codec.encode([s.image for s in batch]), *patch_label_rows(batch, patch),
                      np.stack([presence_vector(s) for s in batch])))
    return VisionData(*(np.concatenate(arrays) for arrays in zip(*parts)))


def step_generator(seed: int, stage: int, step: int):
    g = torch.Generator()
    g.manual_seed(int(np.random.SeedSequence([seed, 1000 + stage, step]).generate_state(1, np.uint64)[0] >> 1))
    return g


def sample_joint_batch(pool: Pool, cfg: PretrainConfig, step: int) -> np.ndarray:
    """Example ids of joint step ``step``: a function of (seed, step) only, so resuming is exact."""
    g = step_generator(cfg.seed, 2, step)
    by_kind = list(pool.by_kind)
    if step < cfg.existence_phase_steps and len(pool.existence):
        y = cfg.existence_phase_yes_no
        mix = torch.tensor([1.0 - y, y, 0.0, 0.0], dtype=torch.float64)
        by_kind[1] = pool.existence
    else:
        mix = torch.tensor(cfg.mix(), dtype=torch.float64)
    avail = torch.tensor([len(b) > 0 for b in by_kind])
    mix = mix * avail
    kinds = torch.multinomial(mix, cfg.batch_size, replacement=True, generator=g).numpy()
    u = torch.rand(cfg.batch_size, generator=g, dtype=torch.float64).numpy()
    return np.array([by_kind[k][int(x * len(by_kind[k]))] for k, x in zip(kinds, u)], np.int64)


def collate(pool: Pool, codec: ImageCodec, examples: np.ndarray, pad_id: int, pixels: bool = True):
    """Left-padded batch: input_ids, attention_mask, position_ids, labels (-100 off assistant
    tokens) and, with ``pixels``, pixel_values."""
    seqs = [pool.example(int(e)) for e in examples]
    width = max(len(i) for i, _ in seqs)
    ids = np.full((len(seqs), width), pad_id, np.int64)
    att = np.zeros((len(seqs), width), np.int64)
    lab = np.full((len(seqs), width), -100, np.int64)
    for r, (i, m) in enumerate(seqs):
        ids[r, width - len(i):] = i
        att[r, width - len(i):] = 1
        lab[r, width - len(i):] = np.where(m, i, -100)
    pos = np.maximum(np.cumsum(att, axis=1) - 1, 0)
    batch = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(att),
             "position_ids": torch.from_numpy(pos), "labels": torch.from_numpy(lab)}
    if pixels:
        batch["pixel_values"] = codec.decode(torch.from_numpy(pool.images[pool.scene[examples]]))
    return batch


def progress_bar(it, enabled: bool, desc: str, total=None, initial=0):
    if not enabled:
        return it
    return tqdm(it, desc=desc, total=total, initial=initial, mininterval=float(os.environ.get("CSP_TQDM_INTERVAL", 1)))
