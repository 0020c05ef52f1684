"""The vision-language model side: loading models and adapters (``models``), the chat
prompts (``prompts``) and the reading of replies (``parsing``), the evaluation's speed engine
(``engine``) and the embedded tiny LLaVA base models (``embedded``). Reads model folders;
writes only ``save_vlm``'s folder and the embedded model's build."""
