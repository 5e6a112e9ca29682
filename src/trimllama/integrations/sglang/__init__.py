"""Trimming inside SGLang's engine: `trimllama sglang ... -- <sglang.launch_server args>`.

SGLang loads this package as its external model package (`SGLANG_EXTERNAL_MODEL_PACKAGE`, module `model`: a
`MllamaForConditionalGeneration` served in place of its own) and its external processor package
(`SGLANG_EXTERNAL_MM_PROCESSOR_PACKAGE`, module `processor`: refuses requests whose images and `<|image|>` tokens
disagree). The selection settings reach every tensor-parallel rank's process through the environment variable of
`settings`; `launch` is SGLang's launcher with trimllama's settings in `/server_info`.

`settings` (what the launcher validates) and `layout` (the pool layout and scoring spans) import nothing of SGLang;
`model`, `processor` and `launch` are the only modules that do.
"""
