"""Stages 03 and 04, CSP training. Reads ``<run>/dataset[@tag]/``; writes ``<run>/adapters/``,
``<run>/train_logs/`` and, while a stage runs, ``<run>/checkpoints/``.

Modules: ``methods`` (the study's methods, defined once), ``settings`` (configs and hardware
presets), ``shaping`` (dataset rows -> SFT rows, option rows, SimPO pairs per target),
``trainers`` (trl's SFTTrainer, the option-loss trainer, the VLM-aware SimPO trainer),
``callbacks`` (the CSV log), ``regimes`` (running and resuming a stage; margins).

CSP training: LoRA SFT with trl, then a VLM-aware SimPO, in three regimes.

Stage 1, SFT. The model reads a perturbed image and the (third-person by default)
confidence prompt and learns to say the target ``"c%"``; the loss covers the assistant's
reply only. trl's ``SFTTrainer`` does the work: rows are
``{"image": PIL, "messages": [user(image + prompt), assistant("c%")]}``, ``max_length=None``
so image tokens are never truncated, ``assistant_only_loss=True`` masks everything outside
the chat template's ``{% generation %}`` block.

Stage 2, SimPO (Meng et al. 2024), reference-free and length-normalised::

    loss = -logsigmoid(beta * (mean_logp(chosen) - mean_logp(rejected)) - simpo_gamma)

chosen ``"c%"``, rejected ``"(100 - c)%"``, same prompt, same image; pairs with identical
replies (c = 50) are dropped and counted. trl's only SimPO (experimental ``CPOTrainer``)
never passes pixel values to the model, so this module has its own small trainer on
``transformers.Trainer``: the collator builds the chosen and the rejected rows *each with
its image*, and one concatenated forward scores both halves.

Defaults, from the SimPO paper's search ranges (beta in [2.0, 2.5], gamma/beta in
[0.3, 0.8], with 0.5 the recommended starting ratio): ``beta = 2.0``, ``simpo_gamma = 1.0``
(gamma/beta = 0.5).

Confidence targets: ``"paper"`` (the perturbation level c, CSP's own) or ``"measured"``
(the base model's accuracy in each (level, own answer) cell of the training data, rounded
to an integer percent; the prompt then carries the model's own answer, because the cell is
keyed by it). The second is worth comparing: answers to "no" questions stay right under strong
noise, so the level alone overstates how often a noised answer is wrong.
Grounded datasets (rows quote the base model's own answer, or its flip, and carry
``correct``, ``cell_acc`` and ``internal_p``) give four more: ``"correct"`` (100 x correct),
``"cell"`` (the measured accuracy of the row's (level, answer, kind) cell), ``"internal"``
(the base model's temperature-scaled internal probability of the quoted answer, the
distillation baseline) and ``"blend"`` (their mean, 50 x internal_p + 50 x correct: the
distillation with a proper-scoring correctness term, whose expected optimum is the mean of the
internal probability and the probability of being right).

Option losses. With ``loss="brier"``, a grounded target, or a ``layout`` other than the
paper's single turn, stage 1 scores every confidence option (0%, 10%, ..., 100%) exactly as
the evaluation's single-pass read-out does (summed token log-likelihood of each option as the
reply, all options as a prefix tree behind the prompt in one forward, softmax over options)
and minimises either the expected Brier score ``sum_k p_k (o_k - y)^2`` (ConfTuner-style; y
the target fraction; proper, so its optimum is the calibrated distribution) or, for
``loss="ce"``, the reply cross-entropy of the option nearest the target (summed over its
tokens). The paper's path (paper/measured target, single turn, ``ce``) stays trl's SFTTrainer.

Regimes and artefacts, inside the run folder (DESIGN.md; ``regimes.train_regime``)::

    train_regime("sft", ...)        adapters/sft/          train_logs/sft.csv
    train_regime("simpo", ...)      adapters/simpo_only/   train_logs/simpo_only.csv
    train_regime("sft_simpo", ...)  adapters/sft/ + adapters/sft_simpo/  (+ both logs)
    checkpoints/<adapter>/checkpoint-N   what an interrupted run resumes from
    merged/<adapter>/                    with merge=True: base + adapter as one model

``tag="@s1"`` appends to every name (adapters/sft@s1, ...) for repeated seeds. Hardware presets:
``settings.tiny_default()`` (the embedded model on CPU) and ``settings.paper_llava7b()`` (a 7B
LLaVA on one GPU); the study's methods (``methods``: paper CSP, grounded CSP, distilled) over
them; ``settings.make_configs(preset, method=..., sft={...}, simpo={...})`` layers the three.

Every adapter folder is standard PEFT (``PeftModel.from_pretrained`` or
``vlm.models.load_vlm(base, adapter=folder)``) with ``training_config.json`` beside it.

The same code runs under ``accelerate launch`` (``scripts/train_accelerate.py``): the
Trainer does DDP; files outside the Trainer are written by the main process only.
"""
