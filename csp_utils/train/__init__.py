"""Stages 03 and 04, CSP training. Reads ``<run>/dataset[@tag]/``; writes
``<run>/adapters/<name>@<tag>/`` (PEFT adapter, ``training_config.json``, ``csp_base.json``),
``<run>/train_logs/<name>@<tag>.csv`` and, while a stage runs, ``<run>/checkpoints/``.

``methods`` names the study's methods (paper CSP, grounded CSP, distilled) and their
settings; ``settings`` holds the configs and hardware presets they layer over; ``shaping``
turns dataset rows into SFT rows, option rows and SimPO pairs; ``trainers`` are trl's
SFTTrainer, the option-loss trainer and the VLM-aware SimPO trainer; ``callbacks`` log;
``regimes`` runs and resumes them.

Stage 1, SFT: the model reads a perturbed image and the confidence prompt and learns to say
the target ``"c%"`` (reply cross-entropy through trl), or, with an option loss, is trained on
its single-pass distribution over the confidence options (expected Brier, soft CE to a
two-point target). Stage 2, SimPO (Meng et al. 2024), reference-free and length-normalised:
``loss = -logsigmoid(beta * (mean_logp(chosen) - mean_logp(rejected)) - simpo_gamma)``,
chosen ``"c%"``, rejected ``"(100 - c)%"``, each row with its image."""
