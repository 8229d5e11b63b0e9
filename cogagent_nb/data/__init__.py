"""Stage 1, the data: the CogAgent JSONL format and its validator, prompts and actions, the synthetic
GUI screens, the GLM-4 tokenizer and chat template, and the encoder that turns a conversation into
training ids and loss labels (course notebooks 01 and 02).

Modules: `actions` (action space, answers), `boxes` (thousandths <-> pixels), `prompts` (the official
prompt), `validation` (loading and checking JSONL files), `screens` + `synthetic` (the demo dataset),
`images` (CLIP transform), `bpe` (the tokenizer.model format, BPE training), `chat_format` (the
chat layout and the conversation grammar, written once), `tokenizer`, `encoding`.
Only `images`, `tokenizer` and `encoding` need torch.
"""
