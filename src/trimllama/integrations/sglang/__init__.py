"""Trimming inside SGLang's engine: `trimllama sglang ... -- <sglang.launch_server args>`.

SGLang loads this package as its external model package (`SGLANG_EXTERNAL_MODEL_PACKAGE`): its module `model`
exports `EntryClass`, a `MllamaForConditionalGeneration` that SGLang serves in place of its own. The selection
settings reach every tensor-parallel rank's process through the environment variable of `settings`.

Only `model` imports SGLang; `settings` (what the launcher validates and passes on) does not.
"""
