"""LLM adapters: local Hugging Face model folders, GGUF export, and llama.cpp as a runtime.

Only `forseti.adapters.llm.gguf` and `.llama` are torch-free; `folder`, `tiny` and `parity` import
torch and transformers, so import the module you need rather than this package's names.
"""
