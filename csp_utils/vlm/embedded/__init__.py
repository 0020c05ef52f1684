"""The embedded default VLM: a tiny LLaVA trained from scratch on the object world (CPU, minutes).

One concern per module, in the order a run uses them:

- ``build``: the architecture, the tokenizer trained in code and the processor;
- ``config``: :class:`~csp_utils.vlm.embedded.config.PretrainConfig`, everything that determines
  the trained model;
- ``data``: the chat examples, images and batches it trains on;
- ``losses``: the losses of both stages;
- ``checkpoint``: resumable checkpoints and finished-folder checks;
- ``train``: the two stages and :func:`~csp_utils.vlm.embedded.train.pretrain`;
- ``heldout``: held-out accuracy and confidence, and the model's ``csp_meta.json``;
- ``pretrain_cli``: ``python -m csp_utils.pretrain``.

Yes/no answers alone leave a tiny LLaVA at chance, so training runs in two stages, as real
VLMs are built:

1. **Vision pre-training.** The CLIP vision tower alone, with two linear heads on its patch
   tokens (the features LLaVA feeds its projector) that classify each patch's shape and
   colour (``patch_labels.scene_labels``; background is a class of its own). It trains on the
   pool's scenes, or on more (``vision_scenes``: images and patch labels only).
2. **Joint training.** The whole LLaVA on a mix of chat examples, loss on assistant tokens
   only: captions ("What objects are in the image?" -> ``language.caption``), yes/no
   questions in POPE and AMBER wording through ``prompts.answer_messages`` (answers "Yes" /
   "No", the evaluation's wording), short answers (colour, count) and, with
   ``overconfident_fraction > 0``, *overconfident confidence turns*: third- and
   first-person confidence questions (``prompts.confidence_messages``) whose target is high
   (80..100%) whatever the image and whether the quoted answer is right. That plants the
   overconfidence of instruction-tuned VLMs on purpose, so CSP has something to fix;
   ``overconfident_fraction=0`` builds a base without it.

The default trains in two rounds. From scratch, the language model left chance only on a
tower that had overfit its 12,000 scenes; on a better tower (more scenes, sin-cos positions,
class-balanced loss) it stayed at chance in every configuration tried. So the first round
(:meth:`PretrainConfig.first_round`) is trained from scratch, and the second trains the
better tower, then warm-starts its joint stage from the first round's language model and
projector (``warm_start``), with no existence phase.

The joint stage has a fixed step budget, then an accuracy gate: while held-out POPE-style
accuracy is below ``gate_accuracy`` it is extended in chunks (a warm restart of the
cosine schedule) up to ``max_joint_steps``. The moment a run "clicks" varies with the seed.

Everything is deterministic under ``PretrainConfig.seed``: the example pool is built from
seeded scenes and each step draws its batch from a generator seeded by (seed, stage, step).
Checkpoints (safetensors weights, optimizer state and schedule, RNG states) are written
every ``checkpoint_every`` steps under ``<out>/_checkpoint``; a rerun resumes from there and
ends with the same weights as an uninterrupted run. The package imports no submodule here,
so that ``csp_utils.vlm.models`` can load the built model without the training code.
"""
